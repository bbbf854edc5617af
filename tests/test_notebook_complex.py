"""The complex notebook end to end on a small synthetic archive: run, interrupt, resume."""

import json

import pytest
import synthetic_cifar
from conftest import run_notebook

import cifar_utils as cu

SEED_COUNTS = {"total": 15_047_588, "trainable": 15_038_116, "non_trainable": 9_472}


@pytest.mark.slow
def test_complex_notebook_on_two_replicas_resumes_a_stopped_run(tmp_path, monkeypatch):
    # A smaller archive than the session one: the 15M-parameter net costs ~20x the simple
    # one per image on CPU, so 100 training, 100 validation and 100 test images. Two
    # logical CPU devices under MirroredStrategy, 16 images each: global batch 32.
    monkeypatch.setenv("CIFAR_CPU_DEVICES", "2")
    archive = synthetic_cifar.write_archive(tmp_path / "data", 300, 100, seed=1)
    quick = dict(
        DATA_DIR=str(archive),
        TRAIN_LIMIT=100,
        VAL_SIZE=100,
        BATCH_SIZE=16,
        MIXED_PRECISION="float32",
    )  # forced: what "auto" picks varies by machine
    run_notebook("complex_image_clasifier.ipynb", tmp_path, EPOCHS=1, **quick)
    run_dir = tmp_path / "results" / "complex_cnn"
    first = json.loads((run_dir / "state.json").read_text())
    assert (first["epoch"], first["step"]) == (1, 4)  # ceil(100 / 32) optimizer steps

    executed = run_notebook("complex_image_clasifier.ipynb", tmp_path, EPOCHS=2, **quick)
    record = json.loads((tmp_path / "results" / "complex_cnn.json").read_text())
    assert record["params"] == SEED_COUNTS
    assert record["epochs"] == 2
    history = record["history"]
    assert len(history["loss"]) == len(history["val_accuracy"]) == 2
    assert history["loss"][0] == first["history"]["loss"][0]  # epoch 1 kept, not retrained
    state = json.loads((run_dir / "state.json").read_text())
    # The seed's settings (cifar_utils.published), as the run's plan records them.
    seed, optimizer = cu.OPTIMIZERS["complex_cnn"], state["plan"]["optimizer"]
    assert (optimizer["class"], optimizer["momentum"]) == (seed["class"], seed["momentum"])
    schedule = optimizer["learning_rate"]
    assert schedule["class_name"] == seed["schedule"] == "ExponentialDecay"
    assert schedule["config"]["initial_learning_rate"] == seed["learning_rate"] == 0.1
    layers = {a["layer"]: a for a in state["plan"]["data"]["augmentation"]}
    assert layers["RandomFlip"]["mode"] == "horizontal"
    shift = cu.AUGMENTATION["complex_cnn"]["shift"]
    assert layers["RandomTranslation"]["width_factor"] == shift == 0.1
    degrees = cu.AUGMENTATION["complex_cnn"]["rotation_degrees"]
    assert layers["RandomRotation"]["factor"] == pytest.approx([-degrees / 360, degrees / 360])
    assert degrees == 15
    assert (state["initial_epoch"], state["step"]) == (1, 8)  # resumed at epoch 2
    # EPOCHS=2 plans 0.1 -> 0.001 over 2 x 4 steps. Continuing from the restored step 4, the
    # second epoch ends at 0.001; had the step restarted at 0 it would end at 0.01. (Run 1
    # planned 0.1 -> 0.001 over its single epoch.)
    assert history["learning_rate"] == pytest.approx([0.001, 0.001], rel=1e-4)
    outputs = "".join(
        out.get("text", "") for cell in executed.cells for out in cell.get("outputs", [])
    )
    assert "Resuming from" in outputs and "trained epochs 2-2 now" in outputs
    assert "MirroredStrategy: 2 replica(s), global batch 32" in outputs
    assert (record["train_images"], record["test_images"]) == (100, 100)
    # Accuracy is not asserted: 8 SGD steps of this net stay at chance (0.01) on CPU budgets;
    # tests/test_complex.py checks that the deep net learns, on a slimmer copy.
    assert 0.0 <= record["test_top1"] <= record["test_top5"] <= 1.0
    assert len((run_dir / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs
