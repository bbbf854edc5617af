"""The networks against the seed's published tables and counts (cifar_utils.published), and
the simple network's input pipeline. The transfer network's table is checked in
tests/test_transfer.py (its model fixture); the notebooks run end to end in tests/test_readme.py
and tests/test_distributed.py."""

import keras
import numpy as np
import pytest

import cifar_utils as cu
import cifar_utils.models


def rows(model, skip=()) -> list[tuple]:
    """(Keras class, output shape without the batch axis, parameters) of each layer, as the
    seed's tables print them; the input layer and the classes in ``skip`` left out."""
    return [
        (type(layer).__name__, tuple(layer.output.shape[1:]), layer.count_params())
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and type(layer).__name__ not in skip
    ]


def test_simple_cnn_is_the_seeds_table_row_by_row():
    model = cu.build_simple_cnn()
    assert rows(model) == list(cu.SIMPLE_CNN_LAYERS)  # all 18 rows; the project adds none
    assert cu.parameter_counts(model) == cu.PARAMS["simple_cnn"] == {
        "total": 1_777_636, "trainable": 1_775_716, "non_trainable": 1_920,
    }  # fmt: skip
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.kernel_size, c.padding, c.activation.__name__) for c in convs] == [
        ((3, 3), "valid", "relu")
    ] * 4  # ReLU inside the convolutions: the table has no activation rows
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.activation.__name__ for d in dense] == ["relu", "relu", "softmax"]
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"
    rates = [la.rate for la in model.layers if isinstance(la, keras.layers.Dropout)]
    assert tuple(rates) == cifar_utils.models.SIMPLE_CNN_DROPOUT  # our choice, kept in one place


def test_complex_cnn_follows_every_sentence_of_the_seed():
    model = cu.build_complex_cnn()
    assert cu.parameter_counts(model) == cu.PARAMS["complex_cnn"] == {
        "total": 15_047_588, "trainable": 15_038_116, "non_trainable": 9_472,
    }  # fmt: skip
    layers = model.layers
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds.count("Conv2D") == cu.COMPLEX_CONV_LAYERS == 12
    assert kinds.count("Dense") == cu.COMPLEX_DENSE_LAYERS == 2
    assert kinds.count("MaxPooling2D") == 5 and kinds.count("Dropout") == 6
    for i, kind in enumerate(kinds):  # BatchNorm after every convolution, then ReLU
        if kind == "Conv2D":
            assert kinds[i + 1 : i + 3] == ["BatchNormalization", "Activation"]
            assert layers[i + 2].activation.__name__ == "relu"
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert tuple(c.filters for c in convs) == cu.COMPLEX_CONV_WIDTHS
    assert all(c.kernel_regularizer is None for c in convs)  # L2 on the dense layers only
    for name in ("dense1", "predictions"):
        assert model.get_layer(name).kernel_regularizer.l2 == pytest.approx(5e-4)
    assert model.get_layer("flatten").output.shape == (None, 512)  # 32 -> 1 after 5 pools
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    assert model.output.shape == (None, 100)


def test_complex_cnn_rejects_sizes_the_pools_cannot_halve():
    with pytest.raises(ValueError, match="multiples of 32"):
        cu.build_complex_cnn(input_shape=(28, 28, 3))


def test_a_run_of_the_old_simple_layout_is_refused_on_resume(tmp_path, cifar_archive):
    """A run folder written before the network matched the seed's table is never loaded into
    the new layout: the resume names what differs."""
    (x, y), _ = cu.load_cifar100(cifar_archive)
    data = cu.make_dataset(x[:64], y[:64], batch_size=32, training=True, seed=0)

    def compiled(model):
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
        return model

    old = compiled(_old_simple_cnn())
    assert cu.parameter_counts(old) == cu.PARAMS["simple_cnn"]  # the counts could not tell
    cu.train(old, data, None, epochs=1, run_dir=tmp_path, monitor="loss", verbose=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(cu.ResumeError, match=r"another plan: model\.layers\.\d+ \w+:") as e:
        cu.train(compiled(cu.build_simple_cnn()), data, None, epochs=2, run_dir=tmp_path,
                 monitor="loss", verbose=0)  # fmt: skip
    assert "RESUME=False" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _old_simple_cnn():
    """The layout of build_simple_cnn before it followed the seed's table (conv, BatchNorm,
    ReLU; pooling after convs 1 and 2): the same 1,777,636 parameters."""
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for width, pool, drop in [(64, True, 0.0), (128, True, 0.2), (256, False, 0.3),
                              (512, False, 0.4)]:  # fmt: skip
        h = keras.layers.Conv2D(width, 3)(h)
        h = keras.layers.BatchNormalization(momentum=0.9)(h)
        h = keras.layers.Activation("relu")(h)
        if pool:
            h = keras.layers.MaxPooling2D(2)(h)
        if drop:
            h = keras.layers.Dropout(drop)(h)
    h = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(h))
    h = keras.layers.Dense(256, activation="relu")(h)
    h = keras.layers.Dense(256, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(100, activation="softmax")(h))


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
