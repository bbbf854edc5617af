"""Evaluation metrics, predict-your-own-image, evaluation plots and the README report command."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import matplotlib
import numpy as np
import pytest
from conftest import peak_memory
from PIL import Image

import cifar_utils as cu
from cifar_utils.photos import JPEG_DRAFT_SIDE, MAX_IMAGE_PIXELS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINE = cu.FINE_LABEL_NAMES.index


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- metrics


def test_top1_top5_hand_computed():
    probs = np.full((4, 100), 0.001)
    ranks = {0: 0, 1: 2, 2: 5, 3: 4}  # where each row's true class ranks (0 = first)
    for row, rank in ranks.items():
        others = [c for c in range(10, 20)]
        for r, c in enumerate(others[:rank]):  # classes ranked above the true one
            probs[row, c] = 0.5 - 0.01 * r
        probs[row, row] = 0.3
    y = np.array([0, 1, 2, 3])
    assert cu.top_k_accuracy(y, probs, k=1) == pytest.approx(1 / 4)
    assert cu.top_k_accuracy(y, probs, k=5) == pytest.approx(3 / 4)
    summary = cu.evaluation_summary(y, probs, prefix="test")
    assert summary["test_top1"] == pytest.approx(0.25)
    assert summary["test_top5"] == pytest.approx(0.75)
    assert summary["test_images"] == 4


def test_per_class_accuracy_hand_computed():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 5, 1, 0, 7])
    acc = cu.per_class_accuracy(y_true, y_pred)
    assert acc.shape == (100,)
    np.testing.assert_allclose(acc[:3], [2 / 3, 1 / 2, 0.0])
    assert np.isnan(acc[3:]).all()  # classes absent from y_true
    report = cu.classification_report(y_true, y_pred, output_dict=True)
    assert report["apple"]["recall"] == pytest.approx(2 / 3)  # class 0 is apple
    assert report["apple"]["precision"] == pytest.approx(2 / 3)  # 0 predicted 3 times
    assert report["aquarium_fish"]["support"] == 2
    text = cu.classification_report(y_true, y_pred)
    assert "willow_tree" in text and "macro avg" in text


def test_superclass_accuracy_hand_computed():
    true = ["beaver", "beaver", "orchid", "orchid", "bee"]
    pred = ["dolphin", "orchid", "tulip", "orchid", "beaver"]
    y_true, y_pred = np.array([FINE(n) for n in true]), np.array([FINE(n) for n in pred])
    overall, per = cu.superclass_accuracy(y_true, y_pred)
    assert overall == pytest.approx(3 / 5)  # beaver->dolphin, orchid->tulip, orchid->orchid
    coarse = dict(zip(cu.COARSE_LABEL_NAMES, per, strict=True))
    assert coarse["aquatic_mammals"] == pytest.approx(1 / 2)
    assert coarse["flowers"] == pytest.approx(1.0)
    assert coarse["insects"] == pytest.approx(0.0)
    assert np.isnan(coarse["vehicles_1"])
    np.testing.assert_array_equal(cu.to_superclass(y_true), [0, 0, 2, 2, 7])

    probs = np.zeros((5, 100))
    probs[np.arange(5), y_pred] = 1.0
    summary = cu.evaluation_summary(y_true, probs, prefix="val")
    assert summary["val_top1"] == pytest.approx(1 / 5)
    assert summary["val_superclass_top1"] == pytest.approx(3 / 5)
    assert summary["val_per_superclass"]["flowers"] == 1.0
    assert summary["val_per_superclass"]["trees"] is None
    assert summary["val_per_class"]["orchid"] == 0.5
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN


def _saturated_row():
    """A saturated softmax: four classes share all the probability, 96 are exactly 0."""
    row = np.zeros((1, 100), np.float32)
    row[0, [40, 50, 60, 70]] = 0.25
    return row


def test_top5_ties_go_to_the_lower_class_index_everywhere():
    """Class 0 and class 99 tie at 0: the fifth place goes to class 0, as argmax and
    predict_image rank; scikit-learn's top_k_accuracy_score gives it to class 99, and Keras'
    in_top_k counts both."""
    from sklearn.metrics import top_k_accuracy_score

    row = _saturated_row()
    assert [cu.top_k_accuracy([c], row, k=5) for c in (0, 99)] == [1.0, 0.0]
    sklearn = [top_k_accuracy_score([c], row, k=5, labels=np.arange(100)) for c in (0, 99)]
    assert sklearn == [0.0, 1.0]  # the rule the results files followed before
    top5 = cu.compile_metrics()[1]  # the history's top5_accuracy (and val_top5_accuracy)
    for c, expected in ((0, 1.0), (99, 0.0)):
        top5.reset_state()
        top5.update_state(keras.utils.to_categorical([c], 100), row)
        assert float(top5.result()) == expected, c


def test_fully_tied_rows_agree_in_every_metric(tmp_path):
    """A model whose softmax is exactly uniform: every class ties, class 0 wins everywhere."""
    uniform = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
         keras.layers.Dense(100, "softmax", kernel_initializer="zeros")]
    )  # fmt: skip
    images = np.zeros((4, 32, 32, 3), np.uint8)
    probs = cu.predict_proba(uniform, images)
    assert (probs == probs[0, 0]).all()  # softmax of equal logits: exactly equal
    y = np.array([0, 0, 5, 99])
    summary = cu.evaluation_summary(y, probs)
    assert summary["test_top1"] == summary["test_top5"] == 0.5  # scikit-learn's rule: 0.25
    names = cu.FINE_LABEL_NAMES
    assert summary["test_per_class"][names[0]] == 1.0
    assert summary["test_per_class"][names[5]] == summary["test_per_class"][names[99]] == 0.0
    confused = cu.most_confused(y, probs.argmax(1))
    assert [(r["true"], r["predicted"]) for r in confused] == [(names[5], names[0]),
                                                               (names[99], names[0])]  # fmt: skip
    assert [name for name, _ in cu.predict_image(uniform, images[0], top_k=5)] == list(names[:5])
    metrics = cu.compile_metrics()
    uniform.compile(loss="categorical_crossentropy", metrics=metrics)
    scores = uniform.evaluate(images, keras.utils.to_categorical(y, 100), verbose=0,
                              return_dict=True)  # fmt: skip
    assert scores["accuracy"] == scores["top5_accuracy"] == 0.5  # in_top_k's rule: 1.0


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="outside"):
        cu.per_class_accuracy([0, 100], [0, 1])
    with pytest.raises(ValueError, match="argmax"):
        cu.superclass_accuracy(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="equally long"):
        cu.superclass_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match=r"\(N, 100\)"):
        cu.evaluation_summary([0, 1], np.ones((2, 10)) / 10)


def test_most_confused_on_known_confusion():
    pairs = [("maple_tree", "oak_tree")] * 3 + [("oak_tree", "maple_tree")] * 2
    pairs += [("boy", "girl")] + [("maple_tree", "maple_tree")] * 2 + [("boy", "boy")] * 3
    y_true = np.array([FINE(t) for t, _ in pairs])
    y_pred = np.array([FINE(p) for _, p in pairs])
    rows = cu.most_confused(y_true, y_pred)
    assert rows == [
        {"true": "maple_tree", "predicted": "oak_tree", "count": 3, "share": 0.6},
        {"true": "oak_tree", "predicted": "maple_tree", "count": 2, "share": 1.0},
        {"true": "boy", "predicted": "girl", "count": 1, "share": 0.25},
    ]  # pairs that never happen are left out
    assert cu.most_confused(y_true, y_pred, n=1) == rows[:1]
    table = cu.markdown_table(rows, ["true", "predicted", "count", ("share", "share of true")])
    assert table.splitlines() == [
        "| true | predicted | count | share of true |",
        "|---|---|---|---|",
        "| maple_tree | oak_tree | 3 | 0.600 |",
        "| oak_tree | maple_tree | 2 | 1.000 |",
        "| boy | girl | 1 | 0.250 |",
    ]


# ---------------------------------------------------------------- predict_image


def _tiny_model(height=32, width=32):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((height, width, 3))
    h = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(
        100, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 3, 0)
    )(h)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_model()


def _photo(size=(53, 37)):
    """A colourful uint8 RGB image (H, W, 3) with a gradient, like a small photo."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "mode", "size"),
    [
        ("rgb.png", "RGB", (53, 37)),
        ("photo.jpg", "RGB", (101, 67)),
        ("grey.png", "L", (45, 29)),
        ("grey.jpg", "L", (33, 70)),
        ("alpha.png", "RGBA", (30, 50)),
        ("grey16.png", "I;16", (31, 17)),
        ("palette.png", "P", (64, 40)),
    ],
)
def test_predict_image_on_files(tmp_path, tiny_model, name, mode, size):
    rgb = Image.fromarray(_photo(size))
    image = {
        "RGB": rgb,
        "L": rgb.convert("L"),
        "RGBA": rgb.convert("RGBA"),
        "I;16": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
        "P": rgb.convert("P"),
    }[mode]
    path = tmp_path / name
    image.save(path)
    loaded = cu.load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (size[1], size[0], 3)
    if mode in ("L", "I;16"):
        assert (loaded == loaded[..., :1]).all()  # grey repeated over RGB
    if name.endswith(".png") and mode != "P":  # lossless: the pixels come back exactly
        grey = np.asarray(rgb.convert("L"))[..., None]
        expected = np.asarray(rgb) if mode in ("RGB", "RGBA") else np.repeat(grey, 3, -1)
        np.testing.assert_array_equal(loaded, expected)

    for k in (1, 3, 5):
        top = cu.predict_image(tiny_model, path, top_k=k)
        assert len(top) == k
        names = [n for n, _ in top]
        probs = [p for _, p in top]
        assert set(names) <= set(cu.FINE_LABEL_NAMES) and len(set(names)) == k
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    every = cu.predict_image(tiny_model, path, top_k=100)
    assert sum(p for _, p in every) == pytest.approx(1.0, abs=1e-5)


def test_predict_image_matches_the_model(tmp_path, tiny_model):
    """A 32x32 PNG (lossless, no resize) gives exactly the model's probabilities."""
    image = _photo((32, 32))
    Image.fromarray(image).save(tmp_path / "exact.png")
    expected = cu.predict_proba(tiny_model, image[None])[0]
    top = cu.predict_image(tiny_model, tmp_path / "exact.png", top_k=5)
    order = np.argsort(-expected)[:5]
    assert [n for n, _ in top] == [cu.FINE_LABEL_NAMES[i] for i in order]
    np.testing.assert_allclose([p for _, p in top], expected[order], rtol=1e-5)
    # the array path, and float [0, 1] arrays, give the same answer
    assert cu.predict_image(tiny_model, image) == pytest.approx(top)
    assert cu.predict_image(tiny_model, str(tmp_path / "exact.png")) == pytest.approx(top)
    floats = cu.predict_image(tiny_model, image.astype(np.float32) / 255.0)
    assert [n for n, _ in floats] == [n for n, _ in top]


def test_predict_image_resizes_to_the_model_input(tmp_path):
    model = _tiny_model(20, 28)
    photo = _photo((90, 61))
    top = cu.predict_image(model, photo, top_k=4)
    small = np.asarray(Image.fromarray(photo).resize((28, 20), Image.Resampling.LANCZOS))
    expected = cu.predict_proba(model, small[None])[0]
    np.testing.assert_allclose([p for _, p in top], np.sort(expected)[::-1][:4], rtol=1e-5)


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((9, 11, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[:, :5, 3] = 0  # ... fully transparent on the left
    rgba[:, 5:, 3] = 255  # ... opaque on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", rgba):
        rgb = cu.load_image(source)
        assert rgb.shape == (9, 11, 3)
        assert (rgb[:, :5] == 255).all()
        assert (rgb[:, 5:] == [255, 0, 0]).all()


def test_load_image_turns_a_jpeg_as_its_exif_orientation_says(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :5] = 255  # a white left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = cu.load_image(tmp_path / "phone.jpg")
    assert shown.shape == (30, 10, 3)
    assert shown[:4].min() > 200 and shown[6:].max() < 50  # the left edge is on top


def test_predict_image_refuses_bad_files_and_arrays(tmp_path, tiny_model):
    (tmp_path / "noise.png").write_bytes(os.urandom(2048))
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(_photo((200, 150))).save(tmp_path / "full.jpg", quality=95)
    blob = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(blob[: len(blob) // 3])
    for name in ("noise.png", "notes.jpg", "empty.png", "truncated.jpg"):
        with pytest.raises(ValueError, match="not a readable image"):
            cu.predict_image(tiny_model, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="No image file"):
        cu.predict_image(tiny_model, tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        cu.predict_image(tiny_model, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cu.predict_image(tiny_model, np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match="top_k"):
        cu.predict_image(tiny_model, _photo(), top_k=0)


def test_a_huge_image_is_refused_from_its_header(huge_png):
    """A 600 KB PNG declaring 13000x13000 RGBA pixels (676 MB to decode) is never decoded."""
    load = f"photos.load_image({str(huge_png)!r})"
    grew, result = peak_memory("import cifar_utils.photos as photos", load)
    assert result.startswith("ValueError: 'huge.png' is too large to open safely: it has ")
    assert "13000x13000 pixels (169 million) to decode" in result
    assert f"more than the {MAX_IMAGE_PIXELS // 10**6} million pixels" in result
    assert grew < 50, f"peak memory rose by {grew:.0f} MB"


def test_a_48_megapixel_jpeg_is_decoded_shrunk(tmp_path):
    """A phone's 8000x6000 JPEG is decoded at half scale by the JPEG decoder itself."""
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (8000, 6000), (90, 140, 200)).save(path)
    shape = f"photos.load_image({str(path)!r}).shape"
    grew, result = peak_memory("import cifar_utils.photos as photos", shape)
    height, width, channels = ast.literal_eval(result)
    assert JPEG_DRAFT_SIDE <= width <= 2 * JPEG_DRAFT_SIDE and channels == 3
    assert width / height == pytest.approx(8000 / 6000, rel=0.01)
    assert grew < 150, f"peak memory rose by {grew:.0f} MB (undrafted: 192 MB for the pixels alone)"


def test_a_progressive_jpeg_counts_at_its_full_size(tmp_path):
    """libjpeg holds a progressive JPEG's full-size coefficients even when drafted smaller, so
    its budget counts the full size: a 2 MB progressive 13000x13000 file would take 1 GB."""
    path = tmp_path / "progressive.jpg"
    Image.new("RGB", (7000, 7000), (90, 140, 200)).save(path, progressive=True)
    with pytest.raises(ValueError, match=r"too large to open safely: it has 7000x7000 pixels"):
        cu.load_image(path)
    from cifar_utils.photos import _jpeg_scans

    baseline = tmp_path / "baseline.jpg"
    Image.new("RGB", (64, 48), (90, 140, 200)).save(baseline)
    assert _jpeg_scans(baseline) == 1 and _jpeg_scans(path) > 1  # drafted: single-scan only
    small = tmp_path / "small.jpg"  # a progressive photo within the budget still loads
    Image.new("RGB", (640, 480), (90, 140, 200)).save(small, progressive=True)
    assert cu.load_image(small).shape == (480, 640, 3)


def test_top_k_never_counts_a_row_with_nan(tmp_path):
    rows = np.full((3, 100), 0.01)
    rows[0, :] = np.nan  # all NaN: argmax says 0, no rank is right
    rows[1, 42] = np.nan  # only the true class is NaN
    rows[2, 7] = np.nan  # NaN elsewhere, the true class 42 tied with the rest
    for k in (1, 5, 100):
        assert cu.top_k_accuracy([42, 42, 42], rows, k=k) == 0.0


def test_sample_photo_is_a_real_shipped_photo():
    path = cu.sample_photo()
    assert path.name == "rocket.jpg" and path.is_file()
    assert cu.load_image(path).shape == (427, 640, 3)
    assert cu.SAMPLE_PHOTOS["rocket"][1] in cu.FINE_LABEL_NAMES
    assert cu.load_image(cu.sample_photo("coffee")).shape == (400, 600, 3)
    with pytest.raises(ValueError, match="chelsea"):
        cu.sample_photo("lena")


# ---------------------------------------------------------------- plots


def test_superclass_confusion_figure(tmp_path):
    true = ["beaver", "beaver", "orchid", "bee"]
    pred = ["dolphin", "orchid", "tulip", "bee"]
    y_true, y_pred = np.array([FINE(n) for n in true]), np.array([FINE(n) for n in pred])
    fig = cu.plot_superclass_confusion(y_true, y_pred, path=tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    matrix = np.asarray(fig.axes[0].images[0].get_array())
    assert matrix.shape == (20, 20)
    assert matrix[0, 0] == pytest.approx(0.5) and matrix[0, 2] == pytest.approx(0.5)
    assert matrix[2, 2] == 1.0 and matrix[7, 7] == 1.0
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == list(cu.COARSE_LABEL_NAMES)


def test_misclassified_grid_shows_most_confident_mistakes():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    y_true = np.array([0, 1, 2, 3])
    probs = np.full((4, 100), 0.001)
    probs[0, 0] = 0.9  # right
    probs[1, 5] = 0.6  # wrong, 0.6
    probs[2, 7] = 0.8  # wrong, 0.8
    probs[3, 3] = 0.7  # right
    fig = cu.plot_misclassified(x, y_true, probs, n=16)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [
        f"true: {cu.FINE_LABEL_NAMES[2]}\npred: {cu.FINE_LABEL_NAMES[7]} (0.80)",
        f"true: {cu.FINE_LABEL_NAMES[1]}\npred: {cu.FINE_LABEL_NAMES[5]} (0.60)",
    ]
    with pytest.raises(ValueError, match="No image is misclassified"):
        cu.plot_misclassified(x[[0, 3]], y_true[[0, 3]], probs[[0, 3]])


def test_prediction_figure_shows_top_k(tiny_model):
    fig = cu.plot_prediction(tiny_model, cu.sample_photo(), top_k=3)
    top = cu.predict_image(tiny_model, cu.sample_photo(), top_k=3)
    assert fig.axes[0].get_title() == "640x427 photo, seen at 32x32"
    bars = fig.axes[1].patches
    assert [b.get_width() for b in bars] == pytest.approx([p for _, p in top])
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == [n for n, _ in top]


def test_describe_hardware_names_the_cpu():
    text = cu.describe_hardware()
    assert f"({os.cpu_count()} logical CPUs)" in text


# ---------------------------------------------------------------- report command

README = """# Project

Intro text | with a pipe.

<!-- results:start -->
| stale | table |
<!-- results:end -->

## After
Footer text.
"""


OFFICIAL = {"md5": cu.CIFAR100_MD5, "official": True, "check": "md5 ...: the official archive",
            "train_images": 50_000, "test_images": 10_000}  # fmt: skip
WHOLE = {"train_images": 45_000, "val_images": 5_000, "test_images": 10_000, "data": OFFICIAL}


def _sample_results(folder: Path) -> None:
    cu.write_results(
        folder,
        "simple_cnn",
        params={"total": 1777636, "trainable": 1775716, "non_trainable": 1920},
        epochs=3,
        seconds=125.0,
        val_top1=0.2468,
        val_top5=0.5012,
        test_top1=0.2391,
        test_top5=0.4987,
        hardware="AMD EPYC (2 logical CPUs)",
        full_cifar100=True,
        settings_changed={"EPOCHS": 3, "DATA_DIR": "/data", "MIXED_PRECISION": True},
        **WHOLE,
    )
    cu.write_results(
        folder,
        "complex_cnn",
        params=15047588,
        epochs=1,
        seconds=30.4,
        test_top1=0.05,
        full_cifar100=True,
        settings_changed={},
        **WHOLE,
    )
    # A quick run on part of the data (or on the synthetic archive) never reaches the table.
    cu.write_results(folder, "efficientnet_b0", epochs=1, test_top1=0.9, full_cifar100=True,
                     **{**WHOLE, "train_images": 4_000})  # fmt: skip
    cu.write_json(folder / "benchmark.json", {"images_per_second": 1234.5})  # not a model run


def test_report_command_writes_the_table(tmp_path):
    results = tmp_path / "results"
    _sample_results(results)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    done = subprocess.run(
        [sys.executable, "-m", "cifar_utils", "report", "--results-dir", str(results)]
        + ["--readme", str(readme)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    before, rest = text.split("<!-- results:start -->")
    block, after = rest.split("<!-- results:end -->")
    assert before == README.split("<!-- results:start -->")[0]
    assert after == README.split("<!-- results:end -->")[1]
    lines = block.strip().splitlines()
    assert lines[0] == (
        "| Model | Params | Epochs | Train time (mean) | Test top-1 (mean ± sd, n) | "
        "Test top-5 (mean ± sd, n) | Test superclass top-1 (mean ± sd, n) | Seeds | Hardware | "
        "Settings (not the notebook's defaults) | "
        "Seed's published test top-1 and training time (one run, not measured here) |"
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert rows["complex_cnn"] == (
        "| complex_cnn | 15,047,588 | 1 | 30 s | 0.050 (n = 1) | — | — | — | — | defaults | "
        "0.629 (about 5.0 h) |"
    )  # a single run: n = 1, no spread
    assert rows["simple_cnn"] == (
        "| simple_cnn | 1,777,636 | 3 | 2.1 min | 0.239 (n = 1) | 0.499 (n = 1) | — | — | "
        "AMD EPYC (2 logical CPUs) | EPOCHS=3, MIXED_PRECISION=True | 0.483 (about 80.0 min) |"
    )
    assert rows["efficientnet_b0"] == (
        "| efficientnet_b0 | — | — | — | — | — | — | — | — | — | 0.797 (about 40.0 min) |"
    )
    assert set(rows) == {"simple_cnn", "complex_cnn", "efficientnet_b0"}  # benchmark skipped
    assert "stale" not in text and "Updated" in done.stdout
    assert "2 run(s) on all of CIFAR-100" in done.stdout
    assert "not listed: benchmark.json: not a model's results file (no 'model' field)" in (
        done.stdout
    )
    assert (
        "not listed: efficientnet_b0.json: trained on 9,000 of the 50,000 training images "
        "(TRAIN_LIMIT)" in done.stdout
    )


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# No markers here\n")
    with pytest.raises(ValueError, match="results:start"):
        cu.update_readme_results(tmp_path, readme)
    assert readme.read_text() == "# No markers here\n"
    (tmp_path / "bad.json").write_text("{not json")
    readme.write_text(README)
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        cu.update_readme_results(tmp_path, readme)
    assert readme.read_text() == README
