"""The command line: curves of a run (also while it trains) and predict from the shell."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import keras
import matplotlib
import numpy as np
import pytest
from PIL import Image

import cifar_utils as cu
import cifar_utils.plots
from cifar_utils.checks import check_model_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# What Keras' CSVLogger writes (sorted keys, 0-based epoch, \r\n line ends), 3 epochs and
# the start of a 4th row, as a run that is still training leaves it.
LOG = (
    "epoch,accuracy,learning_rate,loss,top5_accuracy,val_accuracy,val_loss,val_top5_accuracy\r\n"
    "0,0.0102,0.001,4.60521,0.051,0.0110,4.60519,0.052\r\n"
    "1,0.0125,0.0005,4.60512,0.060,0.0120,4.60514,NA\r\n"
    "2,0.0150,0.00025,4.60503,0.070,0.0135,4.60509,0.071\r\n"
    "3,0.01"
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _run(*args):
    """``python -m cifar_utils ARGS`` in a real process: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "cifar_utils", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def _one_error_line(err: str) -> str:
    """The single ``error: ...`` line of a command's stderr (TensorFlow's C++ start-up
    lines may stand before it); there must be no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    return errors[0]


# ---------------------------------------------------------------- curves


def test_read_log_skips_the_row_being_written(tmp_path):
    (tmp_path / "log.csv").write_text(LOG, newline="")
    history = cu.read_log(tmp_path)
    assert history["epoch"] == [1, 2, 3]  # 1-based, the half-written 4th row left out
    assert history["accuracy"] == [0.0102, 0.0125, 0.0150]
    assert history["learning_rate"] == [0.001, 0.0005, 0.00025]
    assert np.isnan(history["val_top5_accuracy"][1]) and history["val_loss"][2] == 4.60509


def test_curves_figure_has_learning_rate_integer_epochs_and_no_offsets(tmp_path):
    (tmp_path / "log.csv").write_text(LOG, newline="")
    phases = [{"name": "head", "first_epoch": 1}, {"name": "finetune", "first_epoch": 3}]
    fig = cu.plot_history(cu.read_log(tmp_path), phases=phases)
    fig.canvas.draw()
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy", "loss", "learning rate"]
    assert fig.axes[2].get_yscale() == "log"
    np.testing.assert_allclose(fig.axes[2].lines[0].get_ydata(), [0.001, 0.0005, 0.00025])
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1, 2, 3]
        assert ax.xaxis.get_offset_text().get_text() == ""
        if ax.get_yscale() == "linear":  # losses 4.60503..4.60521 would get "+4.605"
            assert ax.yaxis.get_offset_text().get_text() == ""
        box = ax.get_window_extent()
        labels = [t for t in ax.texts if t.get_text().strip() in ("head", "finetune")]
        assert len(labels) == 2
        for label in labels:
            inside = label.get_window_extent()
            assert box.x0 <= inside.x0 and inside.x1 <= box.x1
            assert box.y0 <= inside.y0 and inside.y1 <= box.y1


def test_curves_command_writes_the_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text(LOG, newline="")
    assert cu.main(["curves", str(run)]) == 0
    assert f"Wrote {run / 'curves.png'}: 3 epoch(s)" in capsys.readouterr().out
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG" and png.width > 3 * png.height > 0
    assert cu.main(["curves", str(run), "--out", str(tmp_path / "figs" / "c.png")]) == 0
    assert (tmp_path / "figs" / "c.png").stat().st_size > 10_000
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "log.csv"]  # no temp


def test_curves_of_a_two_phase_run_join_both_phases(tmp_path, capsys, monkeypatch):
    """The transfer notebook's run folder holds head/log.csv and finetune/log.csv."""
    run = tmp_path / "results" / "efficientnet_b0"
    finetune = LOG.split("\r\n")[0] + "\r\n0,0.02,1e-05,4.5,0.08,0.02,4.5,0.08\r\n"
    for phase, log in (("head", LOG), ("finetune", finetune)):
        (run / phase).mkdir(parents=True)
        (run / phase / "log.csv").write_text(log, newline="")
    drawn, plot = {}, cifar_utils.plots.plot_history

    def spy(history, **kwargs):  # what the command hands the figure
        drawn.update(kwargs, history=history)
        return plot(history, **kwargs)

    monkeypatch.setattr(cifar_utils.plots, "plot_history", spy)
    assert cu.main(["curves", str(run)]) == 0
    logs = f"{run / 'head' / 'log.csv'}, {run / 'finetune' / 'log.csv'}"
    assert capsys.readouterr().out == f"Wrote {run / 'curves.png'}: 4 epoch(s) from {logs}\n"
    assert drawn["history"]["epoch"] == [1, 2, 3, 4]
    assert drawn["history"]["learning_rate"] == [0.001, 0.0005, 0.00025, 1e-05]
    marks = [(phase["name"], phase["first_epoch"]) for phase in drawn["phases"]]
    assert marks == [("head", 1), ("finetune", 4)]
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG" and png.width > 3 * png.height > 0


@pytest.mark.slow
def test_curves_of_a_real_run(tmp_path):
    """cu.train's own log.csv: two epochs of a tiny model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(100, activation="softmax"),
        ]
    )
    model.compile("adam", "categorical_crossentropy", metrics=cu.compile_metrics())
    y = np.arange(200) % 100
    x = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    ds = cu.make_dataset(x, y, batch_size=50, training=False)
    run = cu.train(model, ds, ds, epochs=2, run_dir=tmp_path / "run", verbose=0)
    history = cu.read_log(tmp_path / "run")
    assert history["epoch"] == [1, 2]
    for key in ("accuracy", "loss", "val_accuracy", "val_loss", "learning_rate"):
        np.testing.assert_allclose(history[key], run.history[key], rtol=1e-5)
    assert cu.main(["curves", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("log", "message"),
    [
        (None, "has no log.csv: it is no run folder. The notebooks train in results/simple_cnn"),
        ("no folder", "No folder '"),
        ("", "has no complete row yet"),
        ("epoch,accuracy,loss\r\n", "has no complete row yet"),
        ("epoch,accuracy,loss\r\n0,0.1", "has no complete row yet"),  # row being written
        ("epoch,accuracy,loss\r\n0,0.1,x\r\n1,0.2,4.0\r\n", "line 2, is not a CSVLogger row"),
    ],
)
def test_curves_errors(tmp_path, capsys, log, message):
    run_dir = tmp_path / "nonexistent" if log == "no folder" else tmp_path
    if log not in (None, "no folder"):
        (tmp_path / "log.csv").write_text(log, newline="")
    assert cu.main(["curves", str(run_dir)]) == 2
    captured = capsys.readouterr()
    error = _one_error_line(captured.err)
    assert message in error and captured.out == ""
    assert "cu." not in error and "run_dir" not in error  # no internal names
    assert not (tmp_path / "curves.png").exists()


def test_curves_error_in_a_real_process(tmp_path):
    status, out, err = _run("curves", tmp_path)
    assert status == 2 and out == ""
    assert "has no log.csv" in _one_error_line(err)


# ---------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of three photos of other sizes and modes (and a text file), plus the rocket."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (90, 50), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(folder / "c.png")
    (folder / "notes.txt").write_text("not a photo\n")
    return folder


def _parse_text(out: str) -> dict:
    """``predict``'s text output -> {image: [(name, probability), ...]}."""
    result, current = {}, None
    for line in out.splitlines():
        if line.startswith("  "):
            name, probability = line.split()
            result[current].append((name, float(probability)))
        else:
            current = line
            result[current] = []
    return result


def test_predict_text_output_equals_predict_image(small_model, photos, capsys):
    path, model = small_model
    files = [cu.sample_photo("rocket"), photos / "a.jpg"]
    assert cu.main(["predict", "--model", str(path), *map(str, files), "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    shown = _parse_text(captured.out)
    assert list(shown) == [str(f) for f in files]
    for file in files:
        expected = cu.predict_image(model, file, top_k=3)
        assert [n for n, _ in shown[str(file)]] == [n for n, _ in expected]
        assert [p for _, p in shown[str(file)]] == [round(p, 4) for _, p in expected]
    assert shown[str(files[0])][0][1] > 0.05  # a confident model: the numbers differ


def test_predict_json_for_a_folder_equals_predict_image(small_model, photos, capsys):
    path, model = small_model
    assert cu.main(["predict", "--model", str(path), str(photos), "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["model"] == str(path) and document["errors"] == []
    assert f"note: skipped 1 entries in '{photos}'" in captured.err
    assert "Pillow reads (.txt)" in captured.err  # said, not silently dropped
    images = [p["image"] for p in document["predictions"]]
    assert images == [str(photos / n) for n in ("a.jpg", "b.png", "c.png")]  # sorted, no .txt
    for prediction in document["predictions"]:
        expected = cu.predict_image(model, prediction["image"], top_k=5)
        assert [(t["class"], t["probability"]) for t in prediction["top"]] == expected


def test_predict_reports_an_unreadable_image_and_classifies_the_others(
    small_model, photos, tmp_path, capsys
):
    path, model = small_model
    (tmp_path / "notes.png").write_text("a text file with an image's name\n")
    files = [photos / "a.jpg", tmp_path / "notes.png", photos / "b.png"]
    assert cu.main(["predict", "--model", str(path), *map(str, files), "--top-k", "1"]) == 2
    captured = capsys.readouterr()
    assert "notes.png' is not a readable image" in _one_error_line(captured.err)
    shown = _parse_text(captured.out)
    assert list(shown) == [str(files[0]), str(files[2])]
    assert shown[str(files[2])][0][0] == cu.predict_image(model, files[2], top_k=1)[0][0]

    assert cu.main(["predict", "--model", str(path), *map(str, files), "--json"]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert [p["image"] for p in document["predictions"]] == [str(files[0]), str(files[2])]
    assert [e["image"] for e in document["errors"]] == [str(files[1])]
    assert "not a readable image" in _one_error_line(captured.err)


def test_predict_refuses_a_huge_image_in_one_line_and_goes_on(small_model, huge_png, capsys):
    path, rocket = small_model[0], cu.sample_photo()
    assert cu.main(["predict", "--model", str(path), str(huge_png), str(rocket)]) == 2
    captured = capsys.readouterr()
    error = _one_error_line(captured.err)
    assert "'huge.png' is too large to open safely: it has 13000x13000 pixels" in error
    assert list(_parse_text(captured.out)) == [str(rocket)]


def test_predict_says_what_a_folder_skips_and_goes_on_past_an_empty_one(
    small_model, tmp_path, capsys
):
    path, model = small_model
    folder, empty = tmp_path / "trip", tmp_path / "empty"
    (folder / "day1").mkdir(parents=True)  # subfolders are not searched: said so
    empty.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "day1" / "x.png")
    shutil.copy(cu.sample_photo("coffee"), folder / "cup.png")
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    argv = ["predict", "--model", str(path), str(empty), str(folder), "--json"]
    assert cu.main(argv) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert [p["image"] for p in document["predictions"]] == [str(folder / "cup.png")]
    assert document["errors"] == [
        {"image": str(empty), "error": f"Folder '{empty}' holds no image files (PNG, JPEG, "
                                       "BMP, GIF, ...)"}
    ]  # fmt: skip
    assert f"note: skipped 2 entries in '{folder}'" in captured.err
    assert "(broken link, subfolder)" in captured.err


def test_predict_explain_writes_each_photos_overlay_at_its_size(small_model, photos, tmp_path,
                                                                 capsys):  # fmt: skip
    path, model = small_model  # an exported .keras file, loaded back
    files = [cu.sample_photo("rocket"), photos / "a.jpg"]
    out = tmp_path / "maps" / "cam.png"
    assert cu.main(["predict", "--model", str(path), *map(str, files), "--explain", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["cam-a.png", "cam-rocket.png"]
    for file in files:
        written = out.with_name(f"cam-{file.stem}.png")
        assert f"  Grad-CAM overlay: {written}" in printed
        photo, heat = cu.explain_photo(model, file)
        png = np.asarray(Image.open(written))
        assert png.shape == photo.shape and png.dtype == np.uint8  # the photo's own size
        assert (png == cu.overlay_heatmap(photo, heat)).all()
    one = tmp_path / "one.png"  # one photo: OUT.png itself
    argv = ["predict", "--model", str(path), str(files[1]), "--explain", str(one), "--json"]
    assert cu.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["predictions"][0]["explain"] == str(one)
    assert Image.open(one).size == (50, 90)  # a.jpg is 50 wide, 90 high


@pytest.mark.parametrize(
    ("explain", "twins", "message"),
    [("cam.jpg", False, "--explain names the PNG file to write (e.g. overlay.png), not "),
     ("folder.png", False, "--explain names the PNG file to write"),
     ("cam.png", True, "would both write"),
     ("a/x.png", False, "--explain would write over the photo '"),
     ("a/../a/x.png", False, "--explain would write over the photo '"),
     ("old.png", False, "old.png', which exists: delete it or name another OUT.png"),
     ("link.png", False, "link.png', which exists: delete it or name another OUT.png"),
     ("dangling.png", False, "dangling.png', which exists"),
    ],
)  # fmt: skip
def test_predict_explain_errors_in_one_line(small_model, tmp_path, capsys, explain, twins,
                                            message):  # fmt: skip
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "old.png").write_bytes(b"the user's own file")
    (tmp_path / "target.txt").write_text("not to be written through a link")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.txt")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.txt")
    first = tmp_path / "a" / "x.png"
    first.parent.mkdir()
    shutil.copy(cu.sample_photo("coffee"), first)
    files = [first]
    if twins:  # two photos named x: both would write cam-x.png
        files.append(tmp_path / "b" / "x.png")
        files[1].parent.mkdir()
        shutil.copy(cu.sample_photo("rocket"), files[1])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["predict", "--model", str(small_model[0]), *map(str, files), "--explain",
            str(tmp_path / explain)]  # fmt: skip
    assert cu.main(argv) == 2
    captured = capsys.readouterr()
    assert message in _one_error_line(captured.err) and captured.out == ""
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing replaced
    assert not (tmp_path / "nowhere.txt").exists()


def test_predict_explain_keeps_a_file_appearing_meanwhile(small_model, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    """E.g. two commands writing the same OUT.png at once: the second never replaces the first."""
    import cifar_utils.explain as explain

    out, real = tmp_path / "cam.png", explain.explain_photo

    def slow_explain(model, image):
        out.write_text("the other command's overlay")  # appears after the check, before the write
        return real(model, image)

    monkeypatch.setattr(explain, "explain_photo", slow_explain)
    argv = [
        "predict",
        "--model",
        str(small_model[0]),
        str(cu.sample_photo()),
        "--explain",
        str(out),
    ]
    assert cu.main(argv) == 2
    assert "exists: it is never replaced" in _one_error_line(capsys.readouterr().err)
    assert out.read_text() == "the other command's overlay"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.png"]  # no temporary left


def test_predict_explain_names_overlays_by_what_the_command_names(small_model, tmp_path):
    """A folder holding one photo still gets OUT-<stem>.png: the name follows the command."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(cu.sample_photo("coffee"), folder / "cup.png")
    out = tmp_path / "cam.png"
    assert cu.main(["predict", "--model", str(small_model[0]), str(folder), "--explain",
                    str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cam-cup.png"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing model", "No model file at"),
        ("text as model", "is truncated or not a Keras model file"),
        ("10 classes", "output shape (None, 10)"),
        ("top-k 0", "argument --top-k: must be a whole number from 1 to 100, not '0'"),
        ("top-k 101", "argument --top-k: must be a whole number from 1 to 100, not '101'"),
        ("empty folder", "holds no image files"),
    ],
)
def test_predict_errors(small_model, tmp_path, capsys, case, message):
    model, photo, top_k = small_model[0], cu.sample_photo(), "5"
    if case == "missing model":
        model = tmp_path / "missing.keras"
    elif case == "text as model":
        model = tmp_path / "notes.keras"
        model.write_text("not a model\n")
    elif case == "10 classes":
        inputs = keras.Input((32, 32, 3))
        ten = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
        model = cu.export_model(ten, tmp_path / "ten.keras", class_names=list("abcdefghij"))
    elif case.startswith("top-k"):
        top_k = case.split()[1]
    else:
        photo = tmp_path / "empty"
        photo.mkdir()
    argv = ["predict", "--model", str(model), str(photo), "--top-k", top_k]
    if case.startswith("top-k"):  # argparse's own usage error
        with pytest.raises(SystemExit, match="2"):
            cu.main(argv)
    else:
        assert cu.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err.strip().splitlines()[-1] and captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["predict", "--model", "missing.keras", "photo.jpg"],
        ["predict", "--model", "missing.keras", "photo.jpg", "--top-k", "0"],
        ["export", "missing.keras", "--out", "served"],
        ["export", "model.keras", "--out", "link"],  # a symbolic link
        ["predict", "--model", "model.keras", "missing.jpg", "missing/"],  # no photo at all
        ["predict", "--model", "results.json", "photo.jpg"],  # not a model file
        ["report", "--readme", "missing.md"],
        [
            "predict",
            "--model",
            "model.keras",
            str(ROOT / "images" / "demo.png"),
            "--explain",
            "out.jpg",
        ],  # not a PNG to write
    ],
)
def test_arguments_are_checked_before_tensorflow_starts(argv, tmp_path):
    """The answer comes without importing TensorFlow (which takes seconds to start)."""
    (tmp_path / "model.keras").write_bytes(b"PK")  # exists: the other argument is wrong
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path)
    code = (
        "import sys\nfrom cifar_utils.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint('tensorflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr
    assert ("usage:" in done.stdout) if argv == ["--help"] else ("error" in done.stderr)
    assert "Traceback" not in done.stderr


def test_a_python_without_the_requirements_gets_one_line(tmp_path):
    """The system's python3 instead of .venv/bin/python: --help works, a command says how."""
    code = (
        "import sys\nsys.modules['keras'] = sys.modules['tensorflow'] = None  # not installed\n"
        "from cifar_utils.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    (tmp_path / "model.keras").write_bytes(b"PK")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, "predict", "--model", "model.keras",
                           str(cu.sample_photo())], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "`.venv/bin/python -m cifar_utils" in done.stderr


def test_the_demo_refuses_a_missing_model_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "app.py", "--model", str(tmp_path / "missing.keras")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "No model file at" in _one_error_line(done.stderr)


def test_the_demo_page_header_never_shows_a_wrong_figure(small_model, tmp_path):
    import app

    path = tmp_path / "small.keras"
    shutil.copy(small_model[0], path)
    results = path.with_suffix(".json")
    results.write_text('{"model": "small", "test_top1": 0.2')  # cut while being written
    assert "its results file `small.json` is unreadable" in app.describe_model(path)
    results.write_text(json.dumps({"params": True, "test_top1": True}))
    assert "? parameters · test top-1 ?" in app.describe_model(path)
    results.write_text(json.dumps({"params": {"total": 1777636}, "test_top1": 0.25}))
    header = app.describe_model(path)
    assert "1,777,636 parameters · test top-1 0.250 (not a full CIFAR-100 run" in header


def test_the_demo_returns_the_grad_cam_overlay_of_the_photo(small_model):
    import base64
    import io

    import app

    model, photo = small_model[1], cu.load_image(cu.sample_photo("rocket"))  # 640x427
    html = app.overlay_html(model, photo)
    assert html.startswith('<img alt="Grad-CAM overlay"') and 'src="data:image/png;base64,' in html
    png = Image.open(io.BytesIO(base64.b64decode(html.split("base64,")[1].rstrip('">'))))
    small = Image.fromarray(photo)
    small.thumbnail((app.OVERLAY_SIDE, app.OVERLAY_SIDE))  # shrunk to 512 pixels wide
    assert png.size == small.size and png.size[0] == app.OVERLAY_SIDE == 512
    expected = cu.overlay_heatmap(*cu.explain_photo(model, photo, max_side=app.OVERLAY_SIDE))
    assert (np.asarray(png) == expected).all()
    # The heatmap is the network's view of the whole photo (what predict_image lists), not of
    # the shrunk one: shrunk to the input's own 32x32 it is grad_cam of that view itself.
    square = photo[:400, :400]
    shown, heat = cu.explain_photo(model, square, max_side=32)
    assert shown.shape == (32, 32, 3)
    seen = cu.grad_cam(model, cu.load_image(square, size=(32, 32))[None])[0]
    np.testing.assert_allclose(heat, seen, atol=1e-6)


def test_the_demo_says_when_its_port_is_taken(small_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "app.py", "--model", str(small_model[0]), "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "GRADIO_ANALYTICS_ENABLED": "False"},
            timeout=300,
        )
    assert done.returncode == 2 and done.stdout == ""
    assert f"error: cannot serve on 127.0.0.1:{port}" in _one_error_line(done.stderr)


def test_predict_errors_in_a_real_process(small_model, tmp_path):
    status, out, err = _run("predict", "--model", tmp_path / "missing.keras", cu.sample_photo())
    assert status == 2 and out == ""
    assert "No model file at" in _one_error_line(err)
    (tmp_path / "notes.png").write_text("not an image\n")
    status, out, err = _run("predict", "--model", small_model[0], tmp_path / "notes.png")
    assert status == 2 and out == ""
    assert "is not a readable image" in _one_error_line(err)


# ---------------------------------------------------------------- every command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--readme", "missing.md"], "error: No file 'missing.md' to write the results"),
        (["predict", "--model", "m.keras", "x.jpg", "--top-k", "0"],
         "error: argument --top-k: must be a whole number from 1 to 100, not '0' (see: "
         "python -m cifar_utils predict --help)"),
        (["export", "m.keras"], "error: the following arguments are required: --out (see: "),
        (["export", "m.keras", "--format", "onnx", "--out", "x"],
         "error: argument --format: invalid choice: 'onnx' (choose from "),
        (["curve", "x"], "error: argument command: invalid choice: 'curve'"),
        ([], "error: the following arguments are required: command (see: python -m cifar_utils "
             "--help)"),
    ],
)  # fmt: skip
def test_every_error_is_one_line_with_status_2(argv, message, tmp_path):
    """Usage errors too: argparse's usage block would stand before its error otherwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cifar_utils", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr


def test_report_errors_are_one_line_with_status_2(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("# Notes without the results markers\n")
    assert cu.main(["report", "--readme", str(tmp_path / "notes.md")]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "must hold the lines '<!-- results:start -->' and '<!-- results:end -->'" in error
    assert (tmp_path / "notes.md").read_text() == "# Notes without the results markers\n"


@pytest.mark.parametrize(
    ("command", "defaults"),
    [("report", ["(default: results)", "(default: README.md)"]),
     ("predict", ["1 to 100 (default: 5)", "an existing file is never replaced (default: none "
                  "written)"]),
     ("curves", ["(default: RUN_DIR/curves.png)"]),
     ("export", ["TensorFlow SavedModel (default: saved_model)"])],
)  # fmt: skip
def test_help_shows_the_defaults(command, defaults, capsys):
    with pytest.raises(SystemExit, match="0"):
        cu.main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(default in shown for default in defaults), shown


def test_a_missing_model_names_only_model_files_beside_it(tmp_path):
    (tmp_path / ".keras").mkdir()  # Keras' own settings folder, as in ~/.keras
    (tmp_path / "simple_cnn.keras").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError) as refused:
        check_model_file(tmp_path / "missing.keras")
    assert f"That folder '{tmp_path}' holds simple_cnn.keras. A notebook" in str(refused.value)
