"""Export: a whole .keras file plain Keras loads, class names inside it, TF SavedModel."""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import cifar_utils as cu

FRESH_PROCESS = """
import json, sys, zipfile
import keras, numpy as np
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    model = keras.saving.load_model(path)
    names = json.loads(zipfile.ZipFile(path).read("class_names.json"))
    probs = model.predict(x, verbose=0)
    print(json.dumps({"names": names, "probs": probs.tolist()}))
assert "cifar_utils" not in sys.modules and "efficientnet" not in sys.modules
"""


def _shake(model, seed=0):
    """Scale every weight by a random factor in [0.5, 1.5): trained-looking, BatchNorm
    statistics included (variances stay positive)."""
    rng = np.random.default_rng(seed)
    model.set_weights([w * rng.uniform(0.5, 1.5, w.shape) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def images():
    """uint8 (16, 32, 32, 3) in [0, 255]."""
    return np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def simple(tmp_path_factory):
    """The simple CNN, fast gradients on, compiled as the notebooks compile it (a custom
    top-5 metric that plain Keras cannot load), exported with metadata: (model, path)."""
    keras.utils.set_random_seed(0)
    model = _shake(cu.build_simple_cnn())
    assert cu.fast_cpu_training(model) == {  # none of it reaches the file
        "batch_norm": ["bn1", "bn2", "bn3", "bn4"],
        "dropout": ["drop1", "drop2", "drop3", "drop_gap"],
        "small_conv": ["conv4"],
    }
    model.compile("adam", "categorical_crossentropy", metrics=cu.compile_metrics())
    path = tmp_path_factory.mktemp("export") / "simple_cnn.keras"
    assert cu.export_model(model, path, model="simple_cnn", test_top1=0.25) == path
    return model, path


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory):
    """EfficientNetB0 (random weights, 32x32 inside) exported: (model, path, weights before)."""
    keras.utils.set_random_seed(0)
    model = _shake(cu.build_efficientnet_b0(weights=None, image_size=32))
    before = [w.copy() for w in model.get_weights()]
    path = cu.export_model(model, tmp_path_factory.mktemp("export") / "efficientnet_b0.keras")
    return model, path, before


def test_simple_cnn_export_matches_and_drops_fast_gradients(simple, images):
    model, path = simple
    loaded, names, metadata = cu.load_exported_model(path)
    gap = np.abs(cu.predict_proba(loaded, images) - cu.predict_proba(model, images)).max()
    assert gap < 1e-5
    assert names == list(cu.FINE_LABEL_NAMES)
    assert metadata == {"model": "simple_cnn", "test_top1": 0.25}
    # the fast-gradient swap stays on the model in memory and never reaches the file
    swapped = {layer.name for layer in model.layers if hasattr(layer, "_keras_convolution_op")}
    assert swapped == {"conv4"}
    assert not any(hasattr(layer, "_keras_convolution_op") for layer in loaded.layers)
    for layer in loaded.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert layer.convolution_op.__func__ is keras.layers.Conv2D.convolution_op
    # so do the fused BatchNorm and the dropout masks: the loaded layers are Keras' own
    assert sum(hasattr(layer, "_keras_call") for layer in model.layers) == 8  # 4 BN, 4 Dropout
    assert not any(hasattr(layer, "_keras_call") for layer in loaded.layers)
    with zipfile.ZipFile(path) as archive:
        assert "col2im" not in archive.read("config.json").decode()
        assert json.loads(archive.read("class_names.json")) == list(cu.FINE_LABEL_NAMES)
        assert json.loads(archive.read("export_metadata.json"))["model"] == "simple_cnn"
    assert sorted(p.name for p in path.parent.iterdir()) == ["simple_cnn.keras"]  # no temp


@pytest.mark.slow
def test_efficientnet_export_is_plain_keras_with_equal_outputs(efficientnet, images):
    model, path, before = efficientnet
    loaded, names, metadata = cu.load_exported_model(path)
    gap = np.abs(cu.predict_proba(loaded, images) - cu.predict_proba(model, images)).max()
    assert gap < 1e-5
    assert (names, metadata) == (list(cu.FINE_LABEL_NAMES), {})
    config = zipfile.ZipFile(path).read("config.json").decode()
    assert "FixedDropout" not in config and '"module": "efficientnet' not in config
    assert '"module": "builtins"' not in config  # the package's swish function
    # exporting never changes the model: BatchNorm statistics included
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_a_fresh_python_without_cifar_utils_loads_both_files(
    simple, efficientnet, images, tmp_path
):
    """Plain keras.saving.load_model in a new process that imports only keras and numpy."""
    x = images.astype(np.float32) / 255.0
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, "x.npy", str(simple[1]), str(efficientnet[1])],
        cwd=tmp_path,  # cifar_utils is not importable from here
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    for (model, *_), out in zip([simple, efficientnet], outputs, strict=True):
        assert out["names"] == list(cu.FINE_LABEL_NAMES)
        expected = cu.predict_proba(model, images)
        assert np.abs(np.asarray(out["probs"]) - expected).max() < 1e-5


def test_saved_model_export_for_tf_serving(simple, images, tmp_path, capsys):
    model, path = simple
    out = tmp_path / "serving" / "simple_cnn"
    assert cu.main(["export", str(path), "--format", "saved_model", "--out", str(out)]) == 0
    assert f"Wrote TensorFlow SavedModel {out}" in capsys.readouterr().out
    served = tf.saved_model.load(str(out))  # keep a reference while calling it
    probs = served.serve(images.astype(np.float32) / 255.0).numpy()
    assert np.abs(probs - cu.predict_proba(model, images)).max() < 1e-5
    names = json.loads((out / "assets.extra" / "class_names.json").read_text())
    assert names == list(cu.FINE_LABEL_NAMES)
    assert [p.name for p in out.parent.iterdir()] == ["simple_cnn"]  # temp folder renamed

    # an existing non-empty folder is refused and left alone
    saved = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cu.main(["export", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists and is not an empty folder" in err
    assert err.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == saved
    # an empty one is fine
    (tmp_path / "empty").mkdir()
    assert cu.main(["export", str(path), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "saved_model.pb").is_file()


def _tiny(outputs=100, activation="softmax"):
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(outputs, activation=activation)(h))


def test_load_exported_model_explains_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model file at"):
        cu.load_exported_model(tmp_path / "missing.keras")
    (tmp_path / "notes.keras").write_text("not a model\n")
    with pytest.raises(ValueError, match="is truncated or not a Keras model file"):
        cu.load_exported_model(tmp_path / "notes.keras")
    ten = cu.export_model(_tiny(10), tmp_path / "ten.keras", class_names=list("abcdefghij"))
    cut = tmp_path / "cut.keras"  # a copy cut short: Keras itself would say "File not found"
    cut.write_bytes(ten.read_bytes()[: ten.stat().st_size // 2])
    with pytest.raises(ValueError, match="is truncated or not a Keras model file"):
        cu.load_exported_model(cut)
    cut.rename(tmp_path / "cut.h5")  # another suffix: Keras' own reason, whole
    with pytest.raises(ValueError, match="not a Keras model file that plain Keras can load") as e:
        cu.load_exported_model(tmp_path / "cut.h5")
    assert str(e.value).endswith("e.g. results/simple_cnn.keras)")
    with pytest.raises(ValueError, match=r"output shape \(None, 10\).*100 class"):
        cu.load_exported_model(ten)
    # a name copied from the README where another model was trained: say what is there
    with pytest.raises(FileNotFoundError, match=r"That folder '.*' holds notes.keras, ten.keras\. "
                       r"A notebook writes OUTPUT_DIR/<model>.keras"):  # fmt: skip
        cu.load_exported_model(tmp_path / "efficientnet_b0.keras")
    (tmp_path / "simple_cnn").mkdir()  # the run folder named instead of the model file
    with pytest.raises(FileNotFoundError, match=r"It is a folder; its parent '.*' holds notes"):
        cu.load_exported_model(tmp_path / "simple_cnn")
    # a whole model saved by Keras itself: the CIFAR-100 names, no metadata
    plain = _tiny()
    plain.save(tmp_path / "plain.keras")
    model, names, metadata = cu.load_exported_model(tmp_path / "plain.keras")
    assert (names, metadata) == (list(cu.FINE_LABEL_NAMES), {})
    assert model.output_shape == (None, 100)


def test_export_model_refuses_what_plain_keras_could_not_load(tmp_path):
    model = _tiny()
    with pytest.raises(ValueError, match="'.keras' file"):
        cu.export_model(model, tmp_path / "model.h5")
    with pytest.raises(ValueError, match="99 class names for a model with 100 outputs"):
        cu.export_model(model, tmp_path / "m.keras", class_names=cu.FINE_LABEL_NAMES[:99])
    with pytest.raises(ValueError, match="JSON-able"):
        cu.export_model(model, tmp_path / "m.keras", trained=np.float32(0.5))

    def doubled(x):
        return 2 * x

    with pytest.raises(ValueError, match="custom activation 'doubled'"):
        cu.export_model(_tiny(activation=doubled), tmp_path / "m.keras")

    class Shift(keras.layers.Layer):
        def call(self, x):
            return x + 1

    inputs = keras.Input((32, 32, 3))
    custom = keras.Model(inputs, Shift(name="shift")(_tiny()(inputs)))
    with pytest.raises(ValueError, match="Layer 'shift' is a .*Shift, not a Keras built-in"):
        cu.export_model(custom, tmp_path / "m.keras")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
