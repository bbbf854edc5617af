"""EfficientNetB0 transfer learning: model, weights (offline-safe), albumentations pipeline."""

import functools
import warnings

import h5py
import numpy as np
import pytest
import tensorflow as tf

import cifar_utils as cu
import cifar_utils.models

UNREACHABLE = "http://127.0.0.1:9/" + cu.EFFICIENTNET_B0_WEIGHTS  # discard port: refused at once


@pytest.fixture(scope="module")
def model():
    """A randomly initialised transfer model (shared: tests must not change it)."""
    return cu.build_efficientnet_b0(weights=None)


def _textured(n=8, seed=0):
    """uint8 (n, 32, 32, 3) images with structure at several scales and no flat black areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    checker = ((yy // 4 + xx // 4) % 2)[None, :, :, None] * 120
    return (60 + checker + rng.integers(0, 60, (n, 32, 32, 3))).astype(np.uint8)


# ------------------------------------------------------------------ the network


def test_efficientnet_package_builds_no_top_224():
    """Field case 1: efficientnet 1.1.1 imports and builds under the pinned TF/Keras."""
    import efficientnet.tfkeras as efn

    base = efn.EfficientNetB0(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert base.output_shape == (None, 7, 7, 1280)
    assert base.count_params() == 4_049_564
    from efficientnet.weights import IMAGENET_WEIGHTS_HASHES, IMAGENET_WEIGHTS_PATH

    assert cu.EFFICIENTNET_B0_URL == IMAGENET_WEIGHTS_PATH + cu.EFFICIENTNET_B0_WEIGHTS
    assert cu.EFFICIENTNET_B0_SHA256 == IMAGENET_WEIGHTS_HASHES["efficientnet-b0"][1]


#: Rows the project adds on purpose before the seed's table: the input is resized to 224x224
#: and normalised inside the model (neither has parameters), so pipelines keep 32x32 images.
ADDED_ROWS = ("Resizing", "Normalization")


def test_the_seeds_table_row_by_row_and_exact_parameter_counts(model):
    from test_models import rows

    assert rows(model, skip=ADDED_ROWS) == list(cu.TRANSFER_LAYERS)
    assert [type(layer).__name__ for layer in model.layers[1:3]] == list(ADDED_ROWS)
    assert model.get_layer(cu.EFFICIENTNET_BASE).input_shape[1:3] == (cu.TRANSFER_IMAGE_SIZE,) * 2
    assert model.get_layer("top_dropout").rate == cu.TRANSFER_DROPOUT == 0.2
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    assert (
        cu.parameter_counts(model)
        == cu.PARAMS["efficientnet_b0"]
        == {
            "total": 4_177_664,
            "trainable": 4_135_648,
            "non_trainable": 42_016,
        }
    )
    assert cu.parameter_counts(model.get_layer(cu.EFFICIENTNET_BASE))["total"] == 4_049_564
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 100)


def test_two_phase_trainable_counts_keep_batchnorm_frozen():
    m = cu.build_efficientnet_b0(weights=None)
    base = m.get_layer(cu.EFFICIENTNET_BASE)
    batchnorms = [la for la in base.layers if la.__class__.__name__ == "BatchNormalization"]
    assert len(batchnorms) == 49

    cu.set_base_trainable(m, False)
    assert cu.parameter_counts(m)["trainable"] == 1280 * 100 + 100
    cu.set_base_trainable(m, True)
    counts = cu.parameter_counts(m)
    # everything but BatchNorm's gamma/beta (42,016 = 2 x 21,008 channels) trains
    assert counts == {"total": 4_177_664, "trainable": 4_093_632, "non_trainable": 84_032}
    assert not any(la.trainable for la in batchnorms)
    # frozen BatchNorm runs in inference mode even in training: moving statistics stay put
    before = [w.numpy().copy() for w in batchnorms[0].non_trainable_weights]
    m(np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32), training=True)
    for b, w in zip(before, batchnorms[0].non_trainable_weights, strict=True):
        np.testing.assert_array_equal(b, w.numpy())


def test_normalisation_matches_the_package_preprocess_input(model):
    """The in-model Resizing + Normalization equals efficientnet's own preprocess_input."""
    import efficientnet.tfkeras as efn
    import keras

    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    prep = keras.Model(model.input, model.get_layer("imagenet_normalization").output)
    resized = keras.layers.Resizing(224, 224)(x).numpy()
    expected = efn.preprocess_input(resized * 255.0)
    np.testing.assert_allclose(prep(x).numpy(), expected, atol=1e-4)
    assert prep(x).shape == (2, 224, 224, 3)


def test_predictions_are_probabilities(model):
    probs = model(np.random.default_rng(2).random((3, 32, 32, 3), dtype=np.float32)).numpy()
    assert probs.shape == (3, 100)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_checkpoint_suffixes(model, tmp_path):
    """Field case 4 on this model: .weights.h5 round-trips, .hdf5 is refused."""
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        cu.save_checkpoint(model, tmp_path / "model.hdf5")
    path = cu.save_checkpoint(model, tmp_path / "model.weights.h5")
    other = cu.build_efficientnet_b0(weights=None)
    other.load_weights(path)
    for a, b in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ weights


def _assert_same_layers(expected_base, got_base):
    expected, got = expected_base.layers[1:], got_base.layers[1:]  # after the input layers
    assert [la.name for la in expected] == [la.name for la in got]
    for a, b in zip(expected, got, strict=True):
        wa, wb = a.get_weights(), b.get_weights()
        assert len(wa) == len(wb), a.name
        for x, y in zip(wa, wb, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=a.name)


@pytest.mark.parametrize("fmt", ["package_h5", "keras3_weights_h5"])
def test_local_weights_round_trip(tmp_path, fmt):
    """Weights of a fresh base, saved to a file, load back layer by layer through WEIGHTS=path."""
    import efficientnet.tfkeras as efn

    source = efn.EfficientNetB0(include_top=False, weights=None, input_shape=(224, 224, 3))
    if fmt == "package_h5":  # the legacy layout of the package's download
        from keras.src.legacy.saving import legacy_h5_format

        path = tmp_path / cu.EFFICIENTNET_B0_WEIGHTS
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, source)
    else:
        path = tmp_path / "base.weights.h5"
        source.save_weights(path)
    m = cu.build_efficientnet_b0(weights=str(path))
    _assert_same_layers(source, m.get_layer(cu.EFFICIENTNET_BASE))
    fresh = cu.build_efficientnet_b0(weights=None).get_layer(cu.EFFICIENTNET_BASE)
    assert not np.array_equal(
        fresh.get_layer("stem_conv").kernel, source.get_layer("stem_conv").kernel
    )


def test_local_weights_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(cu.WeightsError, match="No weights file"):
        cu.build_efficientnet_b0(weights=str(tmp_path / "missing.h5"))
    wrong_suffix = tmp_path / "weights.hdf5"
    wrong_suffix.write_bytes(b"x")
    with pytest.raises(cu.WeightsError, match=r"not an \.h5"):
        cu.build_efficientnet_b0(weights=wrong_suffix)
    html = tmp_path / cu.EFFICIENTNET_B0_WEIGHTS
    html.write_text("<html>rate limited</html>")
    with pytest.raises(cu.WeightsError, match="not a readable HDF5") as err:
        cu.build_efficientnet_b0(weights=html)
    assert cu.EFFICIENTNET_B0_SHA256 in str(err.value)


def test_with_top_weights_file_is_explained(tmp_path):
    import efficientnet.tfkeras as efn
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path / "with_top.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, efn.EfficientNetB0(weights=None))
    with pytest.raises(cu.WeightsError, match="does not fit EfficientNetB0 without its top") as e:
        cu.build_efficientnet_b0(weights=path)
    assert cu.EFFICIENTNET_B0_WEIGHTS in str(e.value)


def test_wrong_hash_in_keras_cache_is_explained_not_redownloaded(tmp_path):
    """Field case 2: a hand-placed file with another sha256 gets an explanation."""
    cached = cu.default_cache_dir().parent / "models" / cu.EFFICIENTNET_B0_WEIGHTS
    assert str(cached).startswith(str(tmp_path))  # the isolated KERAS_HOME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.raises(cu.WeightsError) as err:
        cu.efficientnet_b0_weights_file(origin=UNREACHABLE)
    msg = str(err.value)
    assert cu.EFFICIENTNET_B0_SHA256 in msg and "silently download" in msg
    assert str(cached) in msg and cu.EFFICIENTNET_B0_URL in msg
    assert cached.read_bytes() == b"not the weights"  # neither deleted nor replaced


def test_imagenet_offline_gives_clear_error(tmp_path, monkeypatch):
    """No network (a refused local port): how to get the file, where to put it, its sha256."""
    offline = functools.partial(cu.efficientnet_b0_weights_file, origin=UNREACHABLE)
    monkeypatch.setattr(cifar_utils.models, "efficientnet_b0_weights_file", offline)
    with pytest.raises(cu.WeightsError) as err:
        cu.build_efficientnet_b0(weights="imagenet")
    msg = str(err.value)
    dest = cu.default_cache_dir().parent / "models" / cu.EFFICIENTNET_B0_WEIGHTS
    assert "Could not download" in msg and UNREACHABLE in msg
    assert cu.EFFICIENTNET_B0_URL in msg and cu.EFFICIENTNET_B0_SHA256 in msg and str(dest) in msg
    assert not dest.exists()


def test_download_with_wrong_hash_is_refused_and_removed(tmp_path):
    """A loopback server hands out the wrong file: a clear error and nothing left in the cache."""
    import http.server
    import threading

    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / cu.EFFICIENTNET_B0_WEIGHTS).write_bytes(b"an HTML error page")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv")
    )
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{cu.EFFICIENTNET_B0_WEIGHTS}"
        try:
            with pytest.raises(cu.WeightsError, match="hash") as err:
                cu.efficientnet_b0_weights_file(origin=url)
        finally:
            server.shutdown()
    dest = cu.default_cache_dir().parent / "models" / cu.EFFICIENTNET_B0_WEIGHTS
    assert str(dest) in str(err.value) and not dest.exists()


# ------------------------------------------------------------------ albumentations


def test_transform_uses_affine_with_explicit_border_and_no_deprecations():
    """Field case 6: Affine (not ShiftScaleRotate), reflect border, no rotation or scale."""
    import albumentations as A
    import cv2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform = cu.albumentations_transform(seed=0)
    kinds = [type(t) for t in transform.transforms]
    assert kinds == [A.HorizontalFlip, A.Affine, A.GridDistortion, A.ElasticTransform]
    affine = transform.transforms[1]
    assert affine.translate_percent == {"x": (-0.5, 0.5), "y": (0.0, 0.0)}
    assert affine.rotate == (0.0, 0.0) and affine.scale == {"x": (1.0, 1.0), "y": (1.0, 1.0)}
    assert all(t.border_mode == cv2.BORDER_REFLECT_101 for t in transform.transforms[1:])
    # a large shift fills with reflected pixels, never black: every pixel keeps the image's range
    affine.p = 1.0
    images = _textured(16)
    shifted = np.stack([affine(image=img)["image"] for img in images])
    assert shifted.min() >= images.min() > 0
    assert np.abs(shifted.astype(int) - images).mean() > 10  # and it did shift


def test_elastic_and_grid_distortion_really_change_images():
    """Field case 5: ElasticTransform with this alpha moves pixels on 32x32; the default doesn't."""
    import albumentations as A

    images = _textured(16)
    transform = cu.albumentations_transform(seed=0)
    change = {}
    for t in transform.transforms[2:]:
        t.p = 1.0
        changed = np.stack([t(image=img)["image"] for img in images])
        change[type(t).__name__] = np.abs(changed.astype(int) - images).mean()
    default = A.ElasticTransform(p=1.0)  # alpha 1: sub-pixel moves, only interpolation blur
    default.set_random_seed(0)
    barely = np.stack([default(image=img)["image"] for img in images])
    change["default"] = np.abs(barely.astype(int) - images).mean()
    assert change["GridDistortion"] > 8 and change["ElasticTransform"] > 8, change
    assert change["ElasticTransform"] > 3 * change["default"], change


def test_batch_is_uint8_and_deterministic_under_a_seed():
    images = _textured(32)
    out = cu.albumentations_batch(images, seed=7)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(out, cu.albumentations_batch(images, seed=7))
    assert not np.array_equal(out, cu.albumentations_batch(images, seed=8))
    assert (out != images).any(axis=(1, 2, 3)).mean() > 0.5  # most images are augmented
    assert cu.albumentations_batch(images[:0], seed=1).shape == (0, 32, 32, 3)


def test_albumentations_settings_are_the_seeds():
    """Flip, width shift 0.5, GridDistortion 0.2 and ElasticTransform 0.2 (probabilities)."""
    seed = cu.AUGMENTATION["efficientnet_b0"]
    steps = {type(t).__name__: t for t in cu.albumentations_transform().transforms}
    assert list(steps) == ["HorizontalFlip", "Affine", "GridDistortion", "ElasticTransform"]
    shift = seed["width_shift"]
    assert steps["Affine"].translate_percent == {"x": (-shift, shift), "y": (0.0, 0.0)}
    assert (steps["GridDistortion"].p, steps["ElasticTransform"].p) == (0.2, 0.2)
    assert (seed["GridDistortion"], seed["ElasticTransform"], shift) == (0.2, 0.2, 0.5)


def test_batch_handles_float_input_as_zero_one():
    """Field case 7: uint8 in, uint8 out; floats are [0, 1] and are augmented as uint8."""
    images = _textured(8)
    as_float = images.astype(np.float32) / 255.0
    out = cu.albumentations_batch(as_float, seed=3)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_allclose(out, cu.albumentations_batch(images, seed=3) / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\].*uint8"):
        cu.albumentations_batch(images.astype(np.float32), seed=3)  # 0-255 floats would saturate
    with pytest.raises(ValueError, match="uint8"):
        cu.albumentations_batch(images.astype(np.int32), seed=3)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        cu.albumentations_batch(images[0], seed=3)
    with pytest.raises(TypeError, match="before normalisation"):
        cu.albumentations_batch_transform(tf.constant(as_float), tf.constant(0, tf.int64))


def _pipeline(x, y, seed=0):
    return cu.make_dataset(
        x,
        y,
        batch_size=16,
        training=True,
        seed=seed,
        batch_transform=cu.albumentations_batch_transform,
    )


def test_tf_data_pipeline_has_static_shapes_and_fits():
    """Field case 8: numpy_function loses shapes; the pipeline restores them and fit works."""
    import keras

    raw = tf.data.Dataset.from_tensors(tf.zeros((2, 32, 32, 3), tf.uint8))
    raw = raw.map(lambda a: tf.numpy_function(lambda b: b, [a], tf.uint8))
    assert raw.element_spec.shape.rank is None  # what ensure_shape repairs
    x, y = _textured(48), np.arange(48) % 100
    ds = _pipeline(x, y)
    images_spec, labels_spec = ds.element_spec
    assert images_spec.shape.as_list() == [None, 32, 32, 3] and images_spec.dtype == tf.float32
    assert labels_spec.shape.as_list() == [None, 100]
    images, _ = next(iter(ds))
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    tiny = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(100)]
    )
    tiny.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))
    history = tiny.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_batch_transform_only_in_training():
    x, y = _textured(16), np.arange(16) % 100
    ds = cu.make_dataset(
        x, y, batch_size=16, training=False, batch_transform=cu.albumentations_batch_transform
    )
    images, _ = next(iter(ds))
    np.testing.assert_allclose(images.numpy(), x / 255.0, atol=1e-6)


def test_tf_data_pipeline_is_repeatable_and_varies_per_epoch():
    x, y = _textured(48), np.arange(48) % 100
    first = [b.numpy() for b, _ in _pipeline(x, y, seed=5)]
    again = [b.numpy() for b, _ in _pipeline(x, y, seed=5)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    ds = _pipeline(x, y, seed=5)
    epoch1 = np.concatenate([b.numpy() for b, _ in ds])
    epoch2 = np.concatenate([b.numpy() for b, _ in ds])
    assert not np.array_equal(epoch1, epoch2)


# ------------------------------------------------------------------ curves


def test_join_runs_and_phase_markers():
    head = cu.RunState(
        "r/head",
        2,
        {},
        epoch=2,
        seconds=10.0,
        best_epoch=2,
        best=0.2,
        params={"total": 10, "trainable": 3, "non_trainable": 7},
        history={"accuracy": [0.1, 0.2], "loss": [4.0, 3.0]},
    )
    fine = cu.RunState(
        "r/finetune", 3, {}, epoch=3, seconds=20.0, best_epoch=2, best=0.6,
        params={"total": 10, "trainable": 8, "non_trainable": 2},
        history={"accuracy": [0.5, 0.6, 0.7], "loss": [2.0, 1.5, 1.2], "lr": [1e-5] * 3},
    )  # fmt: skip
    run = cu.join_runs(head=head, finetune=fine)
    assert run.history["accuracy"] == [0.1, 0.2, 0.5, 0.6, 0.7]
    assert np.isnan(run.history["lr"][:2]).all() and run.history["lr"][2:] == [1e-5] * 3
    assert run.phases == [
        {"name": "head", "first_epoch": 1, "epochs": 2, "trainable_params": 3},
        {"name": "finetune", "first_epoch": 3, "epochs": 3, "trainable_params": 8,
         "starts_from": {"phase": "head", "epoch": 2, "weights": "last.weights.h5"}},
    ]  # fmt: skip
    assert (run.epoch, run.seconds, run.best_epoch, run.best) == (5, 30.0, 4, 0.6)
    assert run.run_dir == "r/finetune" and run.params["trainable"] == 8
    fig = cu.plot_history(run.history, phases=run.phases)
    dashed = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in dashed] == [0.5, 2.5]
    for ax in fig.axes:  # whole epochs, no offset, phase names inside the axes
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert ax.yaxis.get_major_formatter().get_offset() == ""
        fig.canvas.draw()
        box = ax.get_window_extent()
        for text in ax.texts:
            inner = text.get_window_extent()
            assert (
                box.y0 <= inner.y0
                and inner.y1 <= box.y1
                and text.get_text().strip() in ("head", "finetune")
            )
    flat = cu.plot_history({"loss": [4.6051, 4.60515, 4.6052], "accuracy": [0.01] * 3})
    flat.canvas.draw()  # values this close made matplotlib print "+4.605" beside the axis
    assert all(ax.yaxis.get_major_formatter().get_offset() == "" for ax in flat.axes)
    with pytest.raises(ValueError, match="at least one phase"):
        cu.join_runs()


def test_finetuning_starts_from_the_heads_best_epoch(tmp_path):
    """The head's best epoch (1 of 3 here) is loaded and recorded, not its last one."""
    import keras

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    (tmp_path / "head").mkdir()
    net.save_weights(tmp_path / "head" / "best.weights.h5")  # the head's epoch 1
    best = [np.asarray(w) for w in net.weights]
    net.set_weights([w + 1 for w in best])  # the head's last epoch, as train leaves it
    head = cu.RunState(str(tmp_path / "head"), 3, {}, epoch=3, best_epoch=1, seconds=1.0,
                       history={"val_accuracy": [0.3, 0.2, 0.25]})  # fmt: skip
    head = cu.load_best(net, head)
    for loaded, saved in zip(net.weights, best, strict=True):
        np.testing.assert_array_equal(np.asarray(loaded), saved)
    fine = cu.RunState(str(tmp_path / "fine"), 2, {}, epoch=2, best_epoch=2, seconds=1.0,
                       history={"val_accuracy": [0.4, 0.5]})  # fmt: skip
    phases = cu.join_runs(head=head, finetune=fine).phases
    assert "starts_from" not in phases[0]
    assert phases[1]["starts_from"] == {"phase": "head", "epoch": 1, "weights": "best.weights.h5"}
    with pytest.raises(FileNotFoundError, match="No best checkpoint"):
        cu.load_best(net, fine)


# ------------------------------------------------------------------ notebook


@pytest.mark.slow
def test_readme_quick_check_then_resumed_on_two_replicas(tmp_path, monkeypatch):
    """The README's quick check of this notebook as written (random weights, 32x32, one
    epoch per phase, one device), then the same run resumed for a second fine-tuning epoch
    under MirroredStrategy on two logical CPU devices (BATCH_SIZE 32 each: the same global
    batch of 64, so the same plan), evaluated and written again."""
    import json

    import synthetic_cifar
    from conftest import run_notebook, run_readme_block

    synthetic = tmp_path / "synthetic"
    synthetic_cifar.write_archive(synthetic, 3000, 1000, seed=0)  # the README's smoke data
    run_readme_block("transfer", {"/tmp/synthetic": str(synthetic)})
    out = synthetic / "results"
    first = json.loads((out / "efficientnet_b0.json").read_text())
    assert first["epochs"] == 2 and (out / "efficientnet_b0.keras").is_file()

    monkeypatch.setenv("CIFAR_CPU_DEVICES", "2")
    settings = {**first["settings"], "FINETUNE_EPOCHS": 2, "BATCH_SIZE": 32}
    again = run_notebook("image_classifier_with_transfer_learning.ipynb", tmp_path, **settings)
    outputs = "".join(o.get("text", "") for c in again.cells for o in c.get("outputs", []))
    assert "MirroredStrategy: 2 replica(s), global batch 64" in outputs
    assert "That run already has 1 epoch(s), EPOCHS=1: nothing to train" in outputs  # head
    results = json.loads((out / "efficientnet_b0.json").read_text())
    # What trained: the head alone, then everything but BatchNorm (frozen, in inference mode).
    assert [{k: v for k, v in p.items() if k != "starts_from"} for p in results["phases"]] == [
        {"name": "head", "first_epoch": 1, "epochs": 1, "trainable_params": 128_100},
        {"name": "finetune", "first_epoch": 2, "epochs": 2, "trainable_params": 4_093_632},
    ]
    head = json.loads((out / "efficientnet_b0" / "head" / "state.json").read_text())
    assert results["phases"][1]["starts_from"] == {
        "phase": "head", "epoch": head["best_epoch"], "weights": "best.weights.h5"
    }  # fmt: skip
    assert results["params"] == {
        "total": 4_177_664,
        "trainable": 4_093_632,
        "non_trainable": 84_032,
    }
    assert 0.0 <= results["test_top1"] <= results["test_top5"] <= 1.0
    assert 0.0 <= results["val_top1"] <= results["val_top5"] <= 1.0
    assert results["epochs"] == 3 and len(results["history"]["val_accuracy"]) == 3
    assert results["history"]["loss"][:2] == first["history"]["loss"]  # not retrained
    assert (results["train_images"], results["val_images"], results["test_images"]) == (
        200,
        100,
        1000,
    )
    assert results["weights"] is None and results["image_size"] == 32
    assert results["settings"]["FINETUNE_EPOCHS"] == 2 and results["full_cifar100"] is False
    fine = json.loads((out / "efficientnet_b0" / "finetune" / "state.json").read_text())
    assert (head["epoch"], head["initial_epoch"]) == (1, 0)  # written by the first run only
    assert (fine["epoch"], fine["initial_epoch"], fine["step"]) == (2, 1, 8)  # 4 steps/epoch
    assert fine["plan"]["image_size"] == 32 and fine["plan"]["weights"] is None
    assert {p.name for p in (out / "figures").iterdir()} == {
        f"efficientnet_b0_{n}.png"
        for n in (
            "augmentation",
            "curves",
            "superclass_confusion",
            "mistakes",
            "photo_prediction",
            "reliability",
            "grad_cam",
            "photo_grad_cam",
        )
    }
