"""The networks against the seed's published tables and counts (cifar_utils.published); each
network written once, in its notebook's cell tagged "network", and built from there; the simple
network's input pipeline. The transfer network's table is checked in tests/test_transfer.py (its
model fixture); the notebooks run end to end in tests/test_readme.py and
tests/test_distributed.py."""

import json
import shutil

import keras
import nbformat
import numpy as np
import pytest

import cifar_utils as cu
from cifar_utils.models import NETWORK_TAG
from cifar_utils.notebooks import NOTEBOOK_DIR


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
    assert rates == [0.2, 0.3, 0.4, 0.5]  # our choice, as the notebook says


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
    assert [c.filters for c in convs] == [64, 64, 128, 384, 384, 384, 384, 384, 512, 512, 512, 512]
    assert all(c.kernel_regularizer is None for c in convs)  # L2 on the dense layers only
    for name in ("dense1", "predictions"):
        assert model.get_layer(name).kernel_regularizer.l2 == pytest.approx(5e-4)
    assert model.get_layer("flatten").output.shape == (None, 512)  # 32 -> 1 after 5 pools
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    assert model.output.shape == (None, 100)


@pytest.mark.parametrize("name", list(cu.NETWORK_NOTEBOOKS))
def test_each_notebook_trains_the_network_its_cell_defines(name):
    """The cell tagged "network" defines build_model, the cell after it builds the notebook's
    model with it, and no cell builds a model another way."""
    cells = nbformat.read(cu.notebook_path(cu.NETWORK_NOTEBOOKS[name]), as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    at = [i for i, c in enumerate(code) if NETWORK_TAG in c.metadata.get("tags", [])]
    assert len(at) == 1 and "def build_model(" in code[at[0]].source
    assert "    model = build_model(" in code[at[0] + 1].source
    assert "keep-output" in code[at[0] + 1].metadata["tags"]  # its summary stays committed
    assert not any("cu.build_" in c.source for c in code)


def _edited_copy(tmp_path, old: str, new: str):
    """A copy of the simple notebook whose network cell has ``old`` replaced by ``new``."""
    path = tmp_path / "edited.ipynb"
    shutil.copy(cu.notebook_path(cu.NETWORK_NOTEBOOKS["simple_cnn"]), path)
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if NETWORK_TAG in c.metadata.get("tags", [])]
    assert cell.source.count(old) == 1
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, path)
    return path


def test_an_edit_in_the_network_cell_is_what_gets_built(tmp_path):
    path = _edited_copy(tmp_path, 'Dropout(0.2, name="drop1")', 'Dropout(0.25, name="drop1")')
    edited, committed = cu.build_from_notebook(path), cu.build_simple_cnn()
    assert edited.get_layer("drop1").rate == 0.25 and committed.get_layer("drop1").rate == 0.2
    assert [la.name for la in edited.layers] == [la.name for la in committed.layers]
    assert cu.parameter_counts(edited) == cu.PARAMS["simple_cnn"]  # Dropout has no weights
    assert cu.build_from_notebook(path, num_classes=10).output.shape == (None, 10)


def test_a_missing_notebook_or_network_cell_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No notebook at .*gone\.ipynb.*tagged 'network'"):
        cu.build_from_notebook(tmp_path / "gone.ipynb")
    path = _edited_copy(tmp_path, "def build_model(", "def make_model(")
    with pytest.raises(LookupError, match=r"edited\.ipynb: its cell tagged 'network' defines no"):
        cu.build_from_notebook(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    nbformat.write(nb, path)
    with pytest.raises(LookupError, match=r"edited\.ipynb has 0 code cells tagged 'network'"):
        cu.build_from_notebook(path)
    nb.cells[-1] = nbformat.v4.new_code_cell("1 / 0", metadata={"tags": ["network"]})
    nbformat.write(nb, path)
    with pytest.raises(ZeroDivisionError) as err:  # the traceback names the notebook's cell
        cu.build_from_notebook(path)
    assert err.traceback[-1].frame.code.path == f"{path} (cell tagged 'network')"


@pytest.mark.slow
def test_the_notebook_trains_its_edited_cell(tmp_path, cifar_archive):
    """A copy of the simple notebook with Dropout 0.25 in its network cell, run headless on
    the synthetic archive: the model it saved has that rate; plain Keras loads it."""
    import papermill

    path = _edited_copy(tmp_path, 'Dropout(0.2, name="drop1")', 'Dropout(0.25, name="drop1")')
    out = tmp_path / "results"
    papermill.execute_notebook(str(path), str(tmp_path / "run.ipynb"), cwd=str(NOTEBOOK_DIR),
                               kernel_name="python3", progress_bar=False, parameters={
        "DATA_DIR": str(cifar_archive), "TRAIN_LIMIT": 200, "VAL_SIZE": 100, "EPOCHS": 1,
        "BATCH_SIZE": 32, "OUTPUT_DIR": str(out)})  # fmt: skip
    saved = keras.saving.load_model(out / "simple_cnn.keras")
    assert saved.get_layer("drop1").rate == 0.25 and saved.get_layer("drop2").rate == 0.3
    record = json.loads((out / "simple_cnn.json").read_text())
    assert record["params"] == cu.PARAMS["simple_cnn"] and record["epochs"] == 1


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
