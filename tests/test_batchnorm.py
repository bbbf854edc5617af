"""``cu.fuse_batch_norm``: which layers it switches, what it leaves as it was, and (in
``tests/batchnorm_cases.py``, run with oneDNN off and on) that it trains as Keras' own does."""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import cifar_utils as cu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_fused_batch_norm_matches_keras_with_onednn_off_and_on(onednn):
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "batchnorm_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"\b4 passed", done.stdout.strip().splitlines()[-1]), done.stdout[-2000:]


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
    assert not hasattr(model.get_layer("bn_dense1"), "_unfused_call")


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
        assert not any(hasattr(layer, "_unfused_call") for layer in other.layers)
        assert cu.fuse_batch_norm(other) == ["bn1", "bn2", "bn3", "bn4"]
