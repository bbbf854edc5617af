"""The simple notebook end to end on the learnable synthetic archive, and its model."""

import json

import numpy as np
import pytest
from conftest import run_notebook

import cifar_utils as cu


def test_simple_cnn_has_the_seed_parameter_counts():
    model = cu.build_simple_cnn()
    assert cu.parameter_counts(model) == {
        "total": 1_777_636,
        "trainable": 1_775_716,
        "non_trainable": 1_920,
    }
    assert model.output_shape == (None, 100)
    assert [layer.kernel_size for layer in model.layers if "conv" in layer.name] == [(3, 3)] * 4


def test_pipeline_shapes_ranges_and_augmentation(cifar_archive):
    (x, y), _ = cu.load_cifar100(cifar_archive)
    ds = cu.make_dataset(
        x[:64],
        y[:64],
        batch_size=16,
        training=True,
        augment=cu.augmentation_layers(shift=0.1, rotation_degrees=15, seed=1),
        seed=1,
    )
    images, labels = ds.element_spec
    # Field case 8: static shapes everywhere, or fit() cannot build the model.
    assert tuple(images.shape) == (None, 32, 32, 3) and tuple(labels.shape) == (None, 100)
    batch_x, batch_y = next(iter(ds))
    assert batch_x.dtype.name == "float32" and 0.0 <= float(batch_x.numpy().min())
    assert float(batch_x.numpy().max()) <= 1.0
    assert np.array_equal(batch_y.numpy().sum(axis=1), np.ones(16))
    plain = cu.make_dataset(x[:16], y[:16], batch_size=16, training=False)
    plain_x, plain_y = next(iter(plain))
    assert np.allclose(plain_x.numpy(), x[:16] / 255.0)  # no shuffle, no augmentation
    assert np.array_equal(plain_y.numpy().argmax(axis=1), y[:16])


@pytest.mark.slow
def test_simple_notebook_trains_far_above_chance(cifar_archive, tmp_path):
    run_notebook(
        "simple_image_clasifier.ipynb",
        tmp_path,
        DATA_DIR=str(cifar_archive),
        TRAIN_LIMIT=2000,
        VAL_SIZE=500,
        EPOCHS=3,
        BATCH_SIZE=64,
    )
    record = json.loads((tmp_path / "results" / "simple_cnn.json").read_text())
    assert record["params"] == {"total": 1777636, "trainable": 1775716, "non_trainable": 1920}
    assert record["epochs"] == 3 and len(record["history"]["val_accuracy"]) == 3
    assert (record["train_images"], record["val_images"], record["test_images"]) == (
        2000,
        500,
        1000,
    )
    assert record["full_cifar100"] is False  # a quick run: kept out of the README table
    # Chance is 0.01 (top-1) and 0.05 (top-5); 3 epochs on 2,000 images reached 0.39 / 0.98.
    assert record["test_top1"] > 0.15 and record["test_top5"] > 0.4
    run_dir = tmp_path / "results" / "simple_cnn"
    assert {p.name for p in run_dir.iterdir()} == {
        "best.weights.h5",
        "last.weights.h5",
        "state.json",
        "log.csv",
    }
    assert len((run_dir / "log.csv").read_text().splitlines()) == 4  # header + 3 epochs
    assert {p.name for p in (tmp_path / "images").iterdir()} == {
        f"simple_cnn_{n}.png"
        for n in (
            "samples",
            "augmentation",
            "curves",
            "superclass_confusion",
            "mistakes",
            "photo_prediction",
        )
    }
