"""``cu.fast_cpu_training``: fused BatchNorm (which layers it switches, what it leaves as it
was, and, in ``tests/batchnorm_cases.py`` run with oneDNN off and on, that it trains as Keras'
own does) and 16-bit dropout masks (their rate, scale, gradient and seeding)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_cases_with_onednn

import cifar_utils as cu


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_fused_batch_norm_matches_keras_with_onednn_off_and_on(onednn):
    out = run_cases_with_onednn("batchnorm_cases.py", onednn)
    assert re.search(r"\b4 passed", out.strip().splitlines()[-1]), out[-2000:]


def _op_types(model) -> set[str]:
    """The op types of one traced training-mode forward and gradient of ``model``."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_weights)

    graph = step.get_concrete_function(tf.TensorSpec((2, 32, 32, 3), tf.float32)).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # the gradient's own function graphs
        types |= {op.type for op in function.graph.get_operations()}
    return types


def test_the_simple_network_trains_its_four_batch_norms_fused():
    model = cu.build_simple_cnn()
    before = cu.parameter_counts(model)
    assert "FusedBatchNormV3" not in _op_types(model)
    assert cu.fuse_batch_norm(model) == ["bn1", "bn2", "bn3", "bn4"]
    assert cu.fuse_batch_norm(model) == []  # already switched
    assert cu.parameter_counts(model) == before
    assert {type(layer).__name__ for layer in model.layers if "bn" in layer.name} == {
        "BatchNormalization"
    }  # the seed's layer table is unchanged
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= _op_types(model)


def test_the_complex_network_keeps_its_dense_batch_norm_unfused():
    model = cu.build_complex_cnn()
    switched = cu.fuse_batch_norm(model)
    # the twelve convolutions' BatchNorms; bn_dense1 sees (B, 512): not 4-D, Keras' own
    assert switched == [f"bn{i}" for i in range(1, 13)]
    assert not hasattr(model.get_layer("bn_dense1"), "_keras_call")


def test_what_stays_keras_own():
    inputs = keras.Input((4, 4, 3))
    h = keras.layers.BatchNormalization(renorm=True, name="renorm")(inputs)
    h = keras.layers.BatchNormalization(synchronized=True, name="synced")(h)
    h = keras.layers.BatchNormalization(axis=1, name="axis1")(h)
    frozen = keras.layers.BatchNormalization(name="frozen")
    h = frozen(h)
    model = keras.Model(inputs, h)
    assert cu.fuse_batch_norm(model) == ["frozen"]
    frozen.trainable = False  # a frozen layer runs Keras' inference call, with no update
    x = np.random.default_rng(0).normal(3.0, 2.0, (5, 4, 4, 3)).astype("float32")
    model(x, training=True)
    np.testing.assert_array_equal(frozen.moving_mean, np.zeros(3))


def test_a_clone_and_a_reloaded_model_have_plain_layers(tmp_path):
    model = cu.build_simple_cnn()
    cu.fuse_batch_norm(model)
    path = tmp_path / "m.keras"
    model.save(path)
    for other in (keras.models.clone_model(model), keras.saving.load_model(path)):
        assert not any(hasattr(layer, "_keras_call") for layer in other.layers)
        assert cu.fuse_batch_norm(other) == ["bn1", "bn2", "bn3", "bn4"]


def _dropout_model(rate=0.3, **kwargs):
    inputs = keras.Input((16, 16, 32))
    return keras.Model(inputs, keras.layers.Dropout(rate, name="drop", seed=7, **kwargs)(inputs))


def test_dropout_masks_keep_the_rate_and_scale(policy):
    model = _dropout_model(0.3)
    assert cu.fast_dropout(model) == ["drop"]
    assert cu.fast_dropout(model) == []  # already switched
    x = tf.ones((64, 16, 16, 32))  # 524,288 activations
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        total = tf.reduce_sum(y)
    kept = np.asarray(y) != 0
    # kept with probability 1 - 19661 / 65536 (0.3 rounded to 16 bits): within 5 sd
    p = 1 - 19661 / 65536
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / kept.size)
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / p, rtol=1e-6)  # 1 / (1 - r)
    assert abs(float(tf.reduce_mean(y)) - 1) < 0.01  # the expected output is the input
    grad = np.asarray(tape.gradient(total, x))
    np.testing.assert_array_equal(grad, np.where(kept, 1 / p, 0).astype("float32"))
    np.testing.assert_array_equal(model(x, training=False), x)  # inference: the input


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_dropout_masks_in_bfloat16(policy):
    model = _dropout_model(0.5)
    cu.fast_dropout(model)
    y = model(tf.ones((8, 16, 16, 32)), training=True)
    assert y.dtype == tf.bfloat16
    assert set(np.unique(np.asarray(tf.cast(y, tf.float32)))) == {0.0, 2.0}


def test_dropout_masks_follow_the_layer_seed_generator_as_keras_does():
    x = tf.ones((4, 16, 16, 32))
    keras_own, fast, again = _dropout_model(), _dropout_model(), _dropout_model()
    cu.fast_dropout(fast)
    cu.fast_dropout(again)
    masks = [np.asarray(fast(x, training=True)) != 0 for _ in range(2)]
    keras_own(x, training=True)
    keras_own(x, training=True)
    states = [m.get_layer("drop").seed_generator.state.numpy() for m in (keras_own, fast)]
    np.testing.assert_array_equal(*states)  # one draw per call, as Keras' own layer
    assert (masks[0] != masks[1]).mean() > 0.3  # each call a new mask
    # the same seed state, the same masks: a seeded or resumed run repeats
    np.testing.assert_array_equal(np.asarray(again(x, training=True)) != 0, masks[0])


def test_dropout_layers_that_stay_keras_own():
    class Sub(keras.layers.Dropout):
        pass

    inputs = keras.Input((4, 4, 3))
    h = keras.layers.Dropout(0.3, noise_shape=(None, 1, 1, 3), name="spatial")(inputs)
    h = keras.layers.Dropout(0.0, name="none")(h)
    h = Sub(0.3, name="sub")(h)
    model = keras.Model(inputs, keras.layers.Dropout(0.2, name="plain")(h))
    assert cu.fast_dropout(model) == ["plain"]


def test_fast_cpu_training_on_the_complex_network():
    model = cu.build_complex_cnn()
    assert cu.fast_cpu_training(model) == {
        "batch_norm": [f"bn{i}" for i in range(1, 13)],
        "dropout": ["drop2", "drop3", "drop5", "drop8", "drop12", "drop_dense1"],  # the pools'
        "small_conv": [f"conv{i}" for i in range(6, 13)],  # outputs of 4x4 pixels and less
    }


def test_a_subclass_keeps_its_own_call_and_a_changed_rate_takes_effect():
    class FrozenStats(keras.layers.BatchNormalization):  # a subclass's call is its own
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=False, mask=mask)

    inputs = keras.Input((4, 4, 3))
    drop = keras.layers.Dropout(0.5, name="drop")
    model = keras.Model(inputs, drop(FrozenStats(name="frozen")(inputs)))
    assert cu.fast_cpu_training(model)["batch_norm"] == []
    assert cu.fast_cpu_training(model)["dropout"] == []  # switched by the first call
    drop.rate = 0.0  # dropout off, as in Keras
    x = np.ones((8, 4, 4, 3), "float32")
    np.testing.assert_allclose(model(x, training=True), x / np.sqrt(1 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_batch_norm_under_a_non_mixed_policy_stays_keras_own(dtype):
    inputs = keras.Input((4, 4, 3), dtype=dtype)
    layer = keras.layers.BatchNormalization(dtype=dtype, name="bn")
    model = keras.Model(inputs, layer(inputs))
    assert cu.fuse_batch_norm(model) == []  # the fused kernel takes float32 weights only
    x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 4, 3)).astype(dtype)
    y = np.asarray(model(x, training=True), "float32")
    assert abs(y.mean()) < 0.05 and abs(y.std() - 1) < 0.05


@pytest.mark.parametrize("rate", [1 - 2**-18, 2**-18])
def test_a_dropout_rate_16_bits_cannot_tell_from_1_or_0_trains_as_keras(rate):
    model = _dropout_model()
    drop = model.get_layer("drop")
    assert cu.fast_dropout(model) == ["drop"]
    drop.rate = rate
    y = np.asarray(model(tf.ones((4, 16, 16, 32)), training=True))
    assert np.isfinite(y).all()
    # Keras' own call: all but about 0 or 16 of 32768 activations dropped or kept
    assert (y == 0).mean() > 0.99 if rate > 0.5 else (y == 0).mean() < 0.01
