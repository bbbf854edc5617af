"""Divergence guards that must hold whatever the CPU's kernels do with NaN (issue: AVX-512).

Not collected on its own: ``tests/test_divergence.py`` runs this module in subprocesses with
``TF_ENABLE_ONEDNN_OPTS=0`` and ``=1``. With oneDNN on some CPUs (AVX-512), ``tf.nn.softmax``
of a row holding NaN returns zeros, not NaN, so the loss stays finite; the guards must not
depend on that. ``ZeroNaNSoftmax`` does on purpose what those kernels do, so that behaviour is
exercised on every machine.
"""

import json
import os

import keras
import numpy as np
import pytest
import synthetic_cifar
import tensorflow as tf
from conftest import AtBatch, small_datasets

import cifar_utils as cu

N_TRAIN, BATCH = 96, 16


class ZeroNaNSoftmax(keras.layers.Layer):
    """Softmax whose rows with a NaN/inf logit become zeros: oneDNN's softmax on AVX-512."""

    def call(self, logits):
        finite = keras.ops.isfinite(keras.ops.sum(logits, axis=-1, keepdims=True))
        return keras.ops.where(finite, keras.ops.softmax(logits), 0.0)


def bn_cnn(output="softmax"):
    """A small BatchNorm CNN (SGD 0.9, BatchNorm fused), its head plain or NaN-to-zeros softmax."""
    keras.utils.set_random_seed(0)
    f32 = "float32"  # the output stays float32 under a mixed policy, as cu's models' do
    head = (
        ZeroNaNSoftmax(dtype=f32)
        if output == "zeros"
        else keras.layers.Activation("softmax", dtype=f32)
    )
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(100, name="logits"),
            head,
        ]
    )
    assert cu.fast_cpu_training(model)["batch_norm"] == ["bn"]  # as the notebooks train it
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy", metrics=["accuracy"]
    )
    return model


@pytest.fixture(scope="module")
def data():
    return small_datasets(N_TRAIN, 48, BATCH)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def poison_kernel(model):
    """An ``AtBatch`` action: one NaN in the conv kernel."""
    kernel = model.get_layer("conv").kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0, 0, 0]], [np.nan]))


def test_what_this_machines_softmax_does_with_nan():
    """Not a guard: records the behaviour the guards must not rely on (NaN or zeros)."""
    row = tf.nn.softmax(tf.constant([[1.0, np.nan, 2.0]]))[0].numpy()
    # Seen: [nan nan nan] (oneDNN off), [0. nan 0.] (oneDNN on, AVX2), zeros (AVX-512).
    print(f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}: softmax -> {row}")
    probs = ZeroNaNSoftmax()(tf.constant([[1.0, np.nan, 2.0], [0.0, 0.0, 0.0]])).numpy()
    np.testing.assert_array_equal(probs[0], [0, 0, 0])
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_nan_weight_mid_run_raises_and_leaves_the_run_folder_as_it_was(
    tmp_path, data, output, policy
):
    train_ds, val_ds = data
    assert bn_cnn(output).get_layer("conv").compute_dtype == policy.removeprefix("mixed_")
    cu.train(bn_cnn(output), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    before = _files(tmp_path)
    assert {"last.weights.h5", "best.weights.h5", "state.json"} <= set(before)
    with pytest.raises(cu.TrainingDiverged) as err:
        cu.train(
            bn_cnn(output), train_ds, val_ds, epochs=3, run_dir=tmp_path, verbose=0,
            check_every=2, callbacks=[AtBatch(1, 0, poison_kernel)],
        )  # fmt: skip
    message = str(err.value)
    # Caught within epoch 2 (the state check after its 2nd batch), whatever the loss did,
    # naming the first variable that holds NaN (the kernel, or its BatchNorm statistics).
    assert "at epoch 2, batch 2 (state check)" in message or "at epoch 2, batch 1." in message
    assert "Nothing of epoch 2 was saved" in message and "(epoch 1)" in message
    assert _files(tmp_path) == before  # not one byte written
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_nan_weights_from_the_start_never_reach_a_checkpoint(tmp_path, data, output):
    train_ds, val_ds = data
    model = bn_cnn(output)
    model.get_layer("conv").kernel.assign(
        tf.tensor_scatter_nd_update(model.get_layer("conv").kernel, [[0, 0, 0, 0]], [np.nan])
    )
    with pytest.raises(cu.TrainingDiverged, match=r"at epoch 1") as err:
        cu.train(model, train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    assert "holds NaN or inf" in str(err.value) or "loss became nan" in str(err.value)
    assert "(none: it diverged in epoch 1)" in str(err.value)
    assert not list(tmp_path.glob("*.h5")) and not (tmp_path / "state.json").exists()


class PoisonMomentumAfterLastBatch(keras.callbacks.Callback):
    """NaN in an optimizer slot only, after the epoch's last update: weights stay finite."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == N_TRAIN // BATCH - 1:
            slot = next(v for v in self.model.optimizer.variables if "momentum" in v.path)
            slot.assign(np.full(slot.shape, np.nan, "float32"))


def test_nan_in_an_optimizer_slot_is_caught_without_a_strategy_scope(tmp_path, data):
    train_ds, val_ds = data
    model = bn_cnn()  # built outside any strategy scope: Keras creates the slots late
    with pytest.raises(cu.TrainingDiverged, match=r"variable '.*momentum.*' holds NaN"):
        cu.train(model, train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0,
                 callbacks=[PoisonMomentumAfterLastBatch()])  # fmt: skip
    assert not (tmp_path / "state.json").exists()


def _nan_images(n=64, at=5):
    x = np.random.default_rng(0).random((n, 32, 32, 3), dtype=np.float32)
    x[at, 3, 3, 0] = np.nan  # one bad pixel, e.g. from a broken preprocessing step
    return tf.data.Dataset.from_tensor_slices((x, tf.one_hot(np.arange(n) % 100, 100))).batch(16)


@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_nan_input_is_caught_in_its_epoch_and_an_older_run_survives(tmp_path, data, output):
    train_ds, val_ds = data
    cu.train(bn_cnn(output), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    before = _files(tmp_path)
    with pytest.raises(cu.TrainingDiverged, match="at epoch 1, "):
        cu.train(
            bn_cnn(output), _nan_images(), val_ds, epochs=3, run_dir=tmp_path, resume=False,
            verbose=0,
        )  # fmt: skip
    # RESUME=False replaces the older run only when its own first epoch commits.
    assert _files(tmp_path) == before


@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_nan_in_validation_is_caught_at_epoch_end_with_nothing_saved(tmp_path, data, output):
    train_ds, _ = data
    with pytest.raises(cu.TrainingDiverged, match=r"epoch 1, the end of the epoch"):
        cu.train(bn_cnn(output), train_ds, _nan_images(), epochs=2, run_dir=tmp_path, verbose=0)
    assert not list(tmp_path.glob("*.h5")) and not (tmp_path / "state.json").exists()


@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_huge_learning_rate_diverges_with_clear_message(tmp_path, data, output):
    train_ds, val_ds = data
    model = bn_cnn(output)
    model.compile(keras.optimizers.SGD(1e30, momentum=0.9), "categorical_crossentropy")
    with pytest.raises(cu.TrainingDiverged, match="Lower the learning rate") as err:
        cu.train(model, train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    assert "epoch 1" in str(err.value)
    assert not list(tmp_path.glob("*.h5"))  # no NaN checkpoint


def test_resume_refuses_a_checkpoint_holding_nan(tmp_path, data):
    train_ds, val_ds = data
    cu.train(bn_cnn(), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    broken = bn_cnn()  # as if a NaN checkpoint had been written by an older version
    broken.optimizer.build(broken.trainable_variables)
    broken.load_weights(tmp_path / "last.weights.h5")
    broken.get_layer("bn").moving_variance.assign(np.full(8, np.nan, np.float32))
    broken.save_weights(tmp_path / "last.weights.h5")
    with pytest.raises(
        ValueError, match=r"last\.weights\.h5 holds NaN or inf .*bn/moving_var"
    ) as e:
        cu.train(bn_cnn(), train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    assert "RESUME=False" in str(e.value) and "best.weights.h5" in str(e.value)


@pytest.mark.parametrize("output", ["softmax", "zeros"])
def test_predictions_of_a_nan_model_are_refused_everywhere(tmp_path, output):
    model = bn_cnn(output)
    model.get_layer("logits").bias.assign(np.full(100, np.nan, np.float32))
    images = synthetic_cifar.make_images(np.arange(20) % 100, seed=1)
    with pytest.raises(cu.NotProbabilities, match=r"row 0 (holds NaN or inf|sums to 0,)"):
        cu.predict_proba(model, images)
    with pytest.raises(cu.NotProbabilities):
        cu.predict_image(model, images[0])
    model.save_weights(tmp_path / "best.weights.h5")
    run = cu.RunState(str(tmp_path), 1, {}, epoch=1, seconds=1.0,
                      params=cu.parameter_counts(model))  # fmt: skip
    labels = np.arange(20) % 100
    with pytest.raises(cu.NotProbabilities):
        cu.evaluate_and_save(model, run, output_dir=tmp_path, name="m", train_images=20,
                             val=(images, labels), test=(images, labels))  # fmt: skip
    assert not (tmp_path / "m.json").exists()


def test_probability_rows_are_checked():
    good = np.full((3, 4), 0.25, np.float32)
    assert cu.check_probabilities(good) is not None
    for bad, why in [
        (np.vstack([good, np.zeros((1, 4))]), "row 3 sums to 0, not 1"),
        (np.vstack([good, [[np.nan, 0.5, 0.25, 0.25]]]), "row 3 holds NaN or inf"),
        (np.vstack([[[np.inf, 0, 0, 0]], good]), "row 0 holds NaN or inf"),
        (np.vstack([good, [[0.9, 0.9, -0.8, 0.0]]]), "row 3"),
    ]:
        with pytest.raises(cu.NotProbabilities, match=why):
            cu.check_probabilities(bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1, 1.5])
def test_make_dataset_refuses_float_images_that_are_no_pixels(bad):
    x = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    x[3, 1, 2, 0] = bad
    match = "NaN or infinite" if not np.isfinite(bad) else r"must be in \[0, 1\]"
    for training in (True, False):
        with pytest.raises(ValueError, match=match):
            cu.make_dataset(x, np.arange(8), batch_size=4, training=training)
    x[3, 1, 2, 0] = 0.5  # float images in [0, 1] are used as they are, not divided by 255
    images, _ = next(iter(cu.make_dataset(x, np.arange(8), batch_size=8, training=False)))
    np.testing.assert_allclose(images.numpy(), x)
