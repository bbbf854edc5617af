"""Fused BatchNorm against Keras' own, on whatever kernels this process has.

Not collected on its own: ``tests/test_batchnorm.py`` runs this module in subprocesses with
``TF_ENABLE_ONEDNN_OPTS=0`` and ``=1`` (oneDNN's fused kernel is another implementation).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import cifar_utils as cu


def _net(**bn):
    """Conv (no bias: BatchNorm's mean would cancel it) -> BatchNorm(**bn) -> Dense."""
    inputs = keras.Input((6, 6, 5))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.Flatten()(keras.layers.BatchNormalization(name="bn", **bn)(h))
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float32", name="head")(h))


def _step(model, x) -> dict:
    """One training-mode forward and gradient, then inference: the arrays to compare."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x, training=True)
        loss = tf.reduce_sum(out**2)
    grads = tape.gradient(loss, [x, *model.trainable_weights])
    named = {"train_output": out, "input_grad": grads[0]}
    named |= {f"grad {w.path}": g for w, g in zip(model.trainable_weights, grads[1:], strict=True)}
    named |= {w.path: w.value for w in model.non_trainable_weights}  # the moving statistics
    named["inference_output"] = model(x, training=False)
    return {k: np.asarray(tf.cast(v, tf.float32)) for k, v in named.items()}


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize(
    "bn", [{"momentum": 0.9}, {"momentum": 0.5, "epsilon": 1e-5, "center": False, "scale": False}]
)
def test_fused_batch_norm_trains_as_keras_does(policy, bn):
    keras.utils.set_random_seed(0)
    native, fused = _net(**bn), _net(**bn)
    fused.set_weights(native.get_weights())
    assert cu.fuse_batch_norm(fused) == ["bn"]
    # off-centre activations, so the mean and variance matter
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (7, 6, 6, 5)), tf.float32)
    for _ in range(2):  # the second step starts from moved statistics
        want, got = _step(native, x), _step(fused, x)
    assert want.keys() == got.keys()
    for name, a in want.items():
        # float32 and the moving statistics (float32 from the same activations): round-off,
        # measured up to 6e-7 of each array's largest value; bfloat16 activations and their
        # gradients keep 8 significant bits (relative rounding 2**-9)
        tol = 1e-5 if policy == "float32" or "moving" in name else 2e-2
        np.testing.assert_allclose(got[name], a, rtol=tol, atol=tol * np.abs(a).max(), err_msg=name)
    # inference is Keras' own call: the same ops on the same weights
    plain = _net(**bn)
    plain.set_weights(fused.get_weights())
    np.testing.assert_array_equal(fused(x, training=False), plain(x, training=False))
    # the moving variance moved by the biased batch variance, as Keras moves it
    moved = np.asarray(fused.get_layer("bn").moving_variance)
    assert np.abs(moved - 1).max() > 0.1
