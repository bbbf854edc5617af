"""Series over seeds: the repeat command, the report's spread, model cards.

One real series of three tiny runs of the simple notebook (on a generated archive) is made
once per module, interrupted after its first run and resumed; the other tests read its
results files, cards and models, or copies of them.
"""

import json
import re
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import papermill
import pytest
import synthetic_cifar
from conftest import check_calibrated_export

import cifar_utils as cu
import cifar_utils.data
import cifar_utils.plots

matplotlib.use("Agg")

NOTEBOOK = "simple_image_clasifier.ipynb"
README = "# Project\n\n<!-- results:start -->\n<!-- results:end -->\n"


def tiny(archive, folder) -> dict:
    """The parameters of a run of a few seconds: 200 images, one epoch."""
    return {"DATA_DIR": str(archive), "TRAIN_LIMIT": 200, "VAL_SIZE": 100, "EPOCHS": 1,
            "BATCH_SIZE": 16, "MIXED_PRECISION": "float32", "OUTPUT_DIR": str(folder)}  # fmt: skip


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A series of SEEDs 42, 43, 44: stopped (Ctrl-C) as its second run starts, then
    resumed. Returns ``{"folder", "parameters", "calls", "logs"}``."""
    root = tmp_path_factory.mktemp("series")
    archive = synthetic_cifar.write_archive(root / "data", 600, 200, seed=0)
    folder, calls, logs = root / "results" / "simple-seeds", [], []
    real = papermill.execute_notebook

    def execute(*args, **kwargs):
        calls.append(kwargs["parameters"]["SEED"])
        if calls == [42, 43]:
            raise KeyboardInterrupt  # the user stops the series
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(papermill, "execute_notebook", execute)
        with pytest.raises(KeyboardInterrupt):
            cu.run_series(NOTEBOOK, 3, tiny(archive, folder), log=logs.append)
        stopped = json.loads((folder / cu.SERIES_FILE).read_text())
        first = (folder / "seed-42" / "simple_cnn.json").read_bytes()
        card = (folder / "seed-42" / "simple_cnn.card.md").read_text()  # the notebook's own
        logs.append("--- resumed")
        cu.run_series(NOTEBOOK, 3, tiny(archive, folder), log=logs.append)
    return {"folder": folder, "parameters": tiny(archive, folder), "calls": calls,
            "logs": logs, "stopped": stopped, "first": first, "card": card}  # fmt: skip


def records(folder):
    return [
        json.loads((folder / f"seed-{s}" / "simple_cnn.json").read_text()) for s in (42, 43, 44)
    ]


@pytest.mark.slow
def test_an_interrupted_series_resumes_without_redoing_finished_runs(series):
    folder = series["folder"]
    assert series["stopped"]["seeds"] == [42, 43, 44] and list(series["stopped"]["done"]) == ["42"]
    assert series["calls"] == [42, 43, 43, 44]  # 42 ran once; 43 again after the stop
    assert (folder / "seed-42" / "simple_cnn.json").read_bytes() == series["first"]
    resumed = series["logs"][series["logs"].index("--- resumed") + 1 :]
    assert resumed[1].startswith("[1/3] SEED 42: finished earlier (test top-1 ")
    assert (
        resumed[2].startswith("[2/3] SEED 43: test top-1 ")
        and "1 run(s) left, about" in (resumed[2])
    )
    assert resumed[3].startswith("[3/3] SEED 44: test top-1 ")
    assert sorted(p.name for p in folder.iterdir()) == [
        "seed-42", "seed-43", "seed-44", "series.json",
    ]  # fmt: skip
    for seed, record in zip((42, 43, 44), records(folder), strict=True):
        assert record["settings"]["SEED"] == seed
        assert record["settings"]["OUTPUT_DIR"] == str(folder / f"seed-{seed}")
        assert (folder / f"seed-{seed}" / "simple_cnn" / "state.json").is_file()
    manifest = json.loads((folder / cu.SERIES_FILE).read_text())
    assert sorted(manifest["done"]) == ["42", "43", "44"]
    assert manifest["notebook"] == NOTEBOOK and "SEED" not in manifest["parameters"]


@pytest.mark.slow
def test_each_runs_calibration_and_tta_are_what_its_files_give_again(series):
    """The notebook wrote the card itself (seed 42's before the series added its spread)."""
    folder = series["folder"]
    test = cu.load_cifar100(series["parameters"]["DATA_DIR"])[1]
    for seed, record in zip((42, 43, 44), records(folder), strict=True):
        check_calibrated_export(folder / f"seed-{seed}", record, test, cu.build_simple_cnn)
    first = records(folder)[0]
    assert series["card"].startswith("# simple_cnn: NOT trained on CIFAR-100 (md5 ")
    assert "A single run: no spread over seeds is known" in series["card"]
    assert f"divided by {first['temperature']:.4f}, fitted on the" in series["card"]


def _table_rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the first markdown table after the line starting with ``title``."""
    lines = text[text.index(title) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Model"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


@pytest.mark.slow
def test_report_all_gives_numpys_mean_and_sample_sd(series, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = series["folder"].parent
    assert cu.main(["report", "--all", "--results-dir", str(results), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    assert "simple_cnn | 1,777,636" not in readme.read_text()  # quick runs: never the README's
    rows = _table_rows(out, "Quick or non-CIFAR-100 runs (NOT in the README table")
    assert len(rows) == 1
    row, runs = rows[0], records(series["folder"])
    for column, key in ((4, "test_top1"), (5, "test_top5"), (6, "test_superclass_top1"),
                        (7, "test_ece"), (8, "test_tta_top1")):  # fmt: skip
        values = np.array([r[key] for r in runs])
        expected = f"{values.mean():.3f} ± {values.std(ddof=1):.3f} (n = 3)"
        assert row[column] == expected, (key, values)
    assert row[9] == "42, 43, 44" and "not the official CIFAR-100 archive" in row[-1]
    groups = cu.group_series([(p, r) for p, r, _ in cu.read_results(results)])
    summary = cu.series_summary(groups[0])
    values = [r["test_top1"] for r in runs]
    assert summary["metrics"]["test_top1"]["mean"] == np.mean(values)
    assert summary["metrics"]["test_top1"]["std"] == np.std(values, ddof=1)
    assert summary["n"] == 3 and summary["seeds"] == [42, 43, 44]


@pytest.mark.slow
def test_runs_with_other_settings_never_pool_and_the_report_says_why(series, tmp_path, capsys):
    results = tmp_path / "results"
    skip = shutil.ignore_patterns("*.keras", "simple_cnn", "figures", "*.ipynb")
    shutil.copytree(series["folder"], results / "simple-seeds", ignore=skip)
    runs = records(series["folder"])
    other = {**runs[0], "settings": {**runs[0]["settings"], "EPOCHS": 2},
             "settings_changed": {**runs[0]["settings_changed"], "EPOCHS": 2}}  # fmt: skip
    cu.write_json(results / "simple_cnn.json", other)  # a single run with EPOCHS = 2
    cu.write_json(results / "z_copy.json", runs[1])  # SEED 43 again: counted once
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert cu.main(["report", "--all", "--results-dir", str(results), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out, "Quick or non-CIFAR-100 runs")
    assert [(r[2], r[9]) for r in rows] == [("1", "42"), ("1", "42, 43, 44")]
    assert rows[0][4] == f"{runs[0]['test_top1']:.3f} (n = 1)"  # one run: n = 1, no spread
    assert "EPOCHS=2" in rows[0][11] and "EPOCHS=1" in rows[1][11]
    assert rows[1][4].endswith("(n = 3)")
    assert "simple_cnn: seeds 42 and seeds 42, 43, 44 not pooled (EPOCHS: 2 vs 1)" in out
    groups = cu.group_series([(p, r) for p, r, _ in cu.read_results(results)])
    assert [len(g["records"]) for g in groups] == [1, 3]
    assert [p.name for p in groups[1]["repeated"]] == ["z_copy.json"]


def test_only_runs_of_one_network_trained_alike_pool():
    base = {"model": "simple_cnn", "network": "aaaa", "epochs": 2, "test_top1": 0.5,
            "data": {"md5": "m"}, "precision": "float32", "test_images": 100}  # fmt: skip

    def run(seed, **changes):
        return {**base, "settings": {"SEED": seed, "EPOCHS": 2}, **changes}

    loose = {**run(6), "settings": None, "settings_changed": None}  # a script's record
    entries = [(Path(f"{i}.json"), r) for i, r in enumerate([
        run(1), run(2),
        run(3, network="bbbb"),  # an edited network cell: same name, another network
        run(4, epochs=3),  # 3 epochs trained, then resumed with EPOCHS = 2: nothing trained
        run(5, replanned_from=[4]),  # planned for 4 epochs, resumed with EPOCHS = 2
        loose, dict(loose),  # no settings: never pooled, not even with its copy
    ])]  # fmt: skip
    groups = cu.group_series(entries)
    assert [g["seeds"] for g in groups] == [[1, 2], [3], [4], [5], [None], [None]]
    why = cu.not_pooled(groups)
    assert "(network: 'aaaa' vs 'bbbb')" in why[0]
    assert "(epochs trained: 2 vs 3)" in why[1]
    assert "(EPOCHS changed while resuming, from: [] vs [4])" in why[2]
    assert "no settings recorded" in why[3]


@pytest.mark.slow
def test_full_runs_of_a_series_reach_the_readme_as_mean_sd_and_n(series, tmp_path, monkeypatch):
    """The three runs' records as if made on all of official CIFAR-100 (the archive's md5
    taken as official): the README row is their mean ± sample sd, n = 3."""
    runs = records(series["folder"])
    md5 = runs[0]["data"]["md5"]
    monkeypatch.setattr(cifar_utils.data, "CIFAR100_MD5", md5)
    folder = tmp_path / "results" / "simple_cnn-series"
    cu.write_json(folder / cu.SERIES_FILE, {"seeds": [42, 43, 44]})
    for record in runs:
        data = {**record["data"], "official": True, "train_images": 300, "test_images": 200}
        whole = {**record, "data": data, "full_cifar100": True}  # 200 + 100 of 300 images
        cu.write_json(folder / f"seed-{record['settings']['SEED']}" / "simple_cnn.json", whole)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    cu.update_readme_results(tmp_path / "results", readme)
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| simple_cnn"))
    cells = [cell.strip() for cell in row.strip("|").split(" | ")]
    top1 = np.array([r["test_top1"] for r in runs])
    assert cells[4] == f"{top1.mean():.3f} ± {top1.std(ddof=1):.3f} (n = 3)"
    tta = np.array([r["test_tta_top1"] for r in runs])  # TTA in a column of its own
    assert cells[8] == f"{tta.mean():.3f} ± {tta.std(ddof=1):.3f} (n = 3)"
    assert cells[9:11] == ["42, 43, 44", runs[0]["hardware"]]
    assert cells[-1] == "0.483 (about 80.0 min)"  # the seed's figure beside it


def _card_figures(card: str) -> dict:
    return {m[1]: float(m[2]) for m in re.finditer(r"^- (.+?): (\d\.\d{4})$", card, re.M)}


@pytest.mark.slow
def test_the_card_figures_are_the_records_and_info_prints_the_card(series, capsys):
    folder = series["folder"]
    runs = records(folder)
    summary = cu.series_summary(
        cu.group_series([(s, r) for s, r in zip("abc", runs, strict=True)])[0]
    )
    for seed, record in zip((42, 43, 44), runs, strict=True):
        model_file = folder / f"seed-{seed}" / "simple_cnn.keras"
        card = cu.card_path(model_file).read_text()
        assert card.splitlines()[0].startswith("# simple_cnn: NOT trained on CIFAR-100 (md5 ")
        shown = _card_figures(card)
        for key, label in cu.CARD_FIGURES:
            if key in record:
                assert shown[label] == round(record[key], 4), key
        top1 = summary["metrics"]["test_top1"]
        assert f"- Test top-1: {cu.format_spread(top1['mean'], top1['std'], 3)}" in card
        assert f"SEED {seed}; batch size 16" in card
        _, _, metadata = cu.load_exported_model(model_file)  # still a whole .keras file
        assert metadata["card"]["figures"]["exported_test_top1"] == record["exported_test_top1"]
        assert metadata["card"]["series"]["seeds"] == [42, 43, 44]
        assert cu.main(["predict", "--model", str(model_file), "--info"]) == 0
        assert capsys.readouterr().out == card
    # Its guesses come with the card's caveat (a model exported without a card has none).
    assert cu.main(["predict", "--model", str(model_file), str(cu.sample_photo())]) == 0
    assert "note: this model is no full CIFAR-100 run (not the official CIFAR-100 archive" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_a_card_says_what_data_the_model_saw(series):
    record = records(series["folder"])[0]
    official = {"md5": cu.CIFAR100_MD5, "official": True, "check": "md5 x: the official archive",
                "train_images": 50_000, "test_images": 10_000}  # fmt: skip
    full = {**record, "data": official, "train_images": 45_000, "val_images": 5_000,
            "test_images": 10_000, "full_cifar100": True}  # fmt: skip
    first = cu.card_markdown(cu.card_facts(full)).splitlines()[0]
    assert first == "# simple_cnn: a CIFAR-100 classifier (a full run on the official archive)"
    quick = {**full, "train_images": 900, "val_images": 100, "full_cifar100": False}
    first = cu.card_markdown(cu.card_facts(quick)).splitlines()[0]
    assert first.startswith("# simple_cnn: a quick run on part of CIFAR-100, not a full run")
    assert "trained on 1,000 of the 50,000 training images" in first
    card = cu.card_markdown(cu.card_facts(full))
    assert "A single run: no spread over seeds is known" in card
    assert "published a test top-1 of 0.483" in card
    with pytest.raises(ValueError, match="needs the run's results record"):
        cu.card_facts({"model": "simple_cnn"})


@pytest.mark.slow
def test_curves_of_a_series_overlay_its_runs(series, tmp_path, monkeypatch, capsys):
    drawn, plot = {}, cifar_utils.plots.plot_series_history

    def spy(histories, labels, **kwargs):
        drawn.update(histories=histories, labels=labels)
        return plot(histories, labels, **kwargs)

    monkeypatch.setattr(cifar_utils.plots, "plot_series_history", spy)
    out = tmp_path / "curves.png"
    assert cu.main(["curves", str(series["folder"]), "--out", str(out)]) == 0
    assert "3 run(s) of the series, mean and band" in capsys.readouterr().out
    assert drawn["labels"] == ["SEED 42", "SEED 43", "SEED 44"]
    runs = records(series["folder"])
    for history, record in zip(drawn["histories"], runs, strict=True):
        np.testing.assert_allclose(history["val_accuracy"], record["history"]["val_accuracy"],
                                   rtol=1e-6)  # fmt: skip
    fig = plot(drawn["histories"], drawn["labels"])
    mean_line = next(li for li in fig.axes[0].lines if li.get_label().startswith("validation"))
    expected = np.mean([r["history"]["val_accuracy"] for r in runs], axis=0)
    np.testing.assert_allclose(mean_line.get_ydata(), expected, rtol=1e-6)
    assert out.stat().st_size > 10_000


def _never_run(*args, **kwargs):
    raise AssertionError("no notebook may run")


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bad_series_input_is_refused_and_nothing_is_overwritten(series, tmp_path, monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook", _never_run)
    parameters = series["parameters"]
    # A folder holding other runs.
    other = tmp_path / "other"
    cu.write_json(other / "simple_cnn.json", records(series["folder"])[0])
    before = _snapshot(other)
    with pytest.raises(ValueError, match="already holds other files or runs .*simple_cnn.json"):
        cu.run_series(NOTEBOOK, 2, {**parameters, "OUTPUT_DIR": str(other)})
    assert _snapshot(other) == before
    # Another series' folder, asked with other settings.
    before = _snapshot(series["folder"])
    with pytest.raises(ValueError, match="holds a series with parameters .*'EPOCHS': 1"):
        cu.run_series(NOTEBOOK, 3, {**parameters, "EPOCHS": 2})
    # Zero seeds, or a word.
    for seeds, message in ((0, "at least one run"), ([], "at least one run"), ([1, 1], "twice")):
        with pytest.raises(ValueError, match=message):
            cu.run_series(NOTEBOOK, seeds, parameters)
    assert _snapshot(series["folder"]) == before
    # A results file cut short, and one of another notebook, in a copy of the series.
    copy = tmp_path / "copy"
    shutil.copytree(series["folder"], copy, ignore=shutil.ignore_patterns("*.keras", "simple_cnn"))
    cut = copy / "seed-43" / "simple_cnn.json"
    cut.write_bytes(cut.read_bytes()[:100])
    before = _snapshot(copy)
    with pytest.raises(ValueError, match="seed-43/simple_cnn.json is truncated or no JSON"):
        cu.run_series(NOTEBOOK, 3, {**parameters, "OUTPUT_DIR": str(copy)})
    assert _snapshot(copy) == before
    shutil.copy(series["folder"] / "seed-43" / "simple_cnn.json", cut)
    complex_record = {**records(series["folder"])[2], "model": "complex_cnn"}
    cu.write_json(copy / "seed-44" / "complex_cnn.json", complex_record)
    before = _snapshot(copy)
    with pytest.raises(ValueError, match="holds the results of 'complex_cnn', not of 'simple_cnn'"):
        cu.run_series(NOTEBOOK, 3, {**parameters, "OUTPUT_DIR": str(copy)})
    assert _snapshot(copy) == before


def test_repeat_command_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the default series folder would go
    assert cu.main(["repeat", NOTEBOOK, "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --seeds 0: a series needs at least one run (e.g. --seeds 3)\n"
    for bad in ("x", "-1", "2.5", "1,,2", ""):  # argparse's own usage error
        with pytest.raises(SystemExit, match="2"):
            cu.main(["repeat", NOTEBOOK, "--seeds", bad])
        assert "give a count of runs (e.g. 3) or seeds separated by commas" in (
            capsys.readouterr().err
        )
    assert cu.main(["repeat", NOTEBOOK, "--seeds", "2", "-p", "EPOCH", "2"]) == 2
    assert "EPOCH: no such parameter; did you mean EPOCHS?" in capsys.readouterr().err
    assert cu.main(["repeat", "missing.ipynb", "--seeds", "2"]) == 2
    assert "No notebook at 'missing.ipynb'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_seed_list():
    assert cu.seed_list(3, 42) == [42, 43, 44]
    assert cu.seed_list([7, 1, 9], 42) == [7, 1, 9]
    assert cu.seed_list(1, 0) == [0]
    for bad, message in ((0, "at least one run"), ([2, 2], "twice"), ([2**32], "2\\*\\*32")):
        with pytest.raises(ValueError, match=message):
            cu.seed_list(bad, 42)


@pytest.mark.slow
def test_export_model_writes_the_card_beside_the_file(series, tmp_path, capsys):
    import keras

    record = records(series["folder"])[0]
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(100, activation="softmax")(keras.layers.Flatten()(inputs))
    path = cu.export_model(keras.Model(inputs, outputs), tmp_path / "simple_cnn.keras",
                           model="simple_cnn", record=record)  # fmt: skip
    card = (tmp_path / "simple_cnn.card.md").read_text()
    assert card == cu.card_markdown(cu.card_facts(record))
    assert "A single run: no spread over seeds is known" in card  # no series given
    _, _, metadata = cu.load_exported_model(path)
    assert metadata["model"] == "simple_cnn" and metadata["card"] == cu.card_facts(record)
    # The SavedModel export carries the card along.
    served = series["folder"] / "seed-42" / "simple_cnn.keras"
    out = tmp_path / "serving"
    assert cu.main(["export", str(served), "--out", str(out)]) == 0
    assert "Wrote its model card" in capsys.readouterr().out
    assert (out / "assets.extra" / "model_card.md").read_text() == cu.card_path(served).read_text()


def test_info_of_a_file_without_a_card_says_so(small_model, capsys):
    assert cu.main(["predict", "--model", str(small_model[0]), "--info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "holds no model card (it was exported without its run's results record)" in err
    assert cu.main(["predict", "--model", str(small_model[0])]) == 2
    assert "Name photos (or folders of them) to classify, or give --info" in (
        capsys.readouterr().err
    )
