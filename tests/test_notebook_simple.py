"""The simple network (its exact parameter counts) and its input pipeline; the notebook itself
runs end to end in tests/test_readme.py (the README smoke run) and tests/test_distributed.py."""

import numpy as np

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
