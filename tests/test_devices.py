"""cifar_utils.devices: strategies, dtype policy, XLA switch, fast small-conv gradients."""

import json
import socket
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import cifar_utils as cu
from cifar_utils import devices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def float32_policy_after():
    """Put Keras' global dtype policy back to float32 whatever the test did."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_one_device_strategy_trains_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = cu.choose_strategy()
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended.worker_devices[0].endswith("CPU:0")
    assert cu.global_batch_size(128, strategy) == 128
    rng = np.random.default_rng(0)
    x = rng.random((64, 8), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    before = model.get_weights()[0].copy()
    history = model.fit(x, y, batch_size=cu.global_batch_size(16, strategy), epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert not np.allclose(before, model.get_weights()[0])


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", "not valid multi-worker JSON"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', "not valid multi-worker JSON"),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
            "not in its cluster",
        ),
    ],
)
def test_bad_tf_config_is_explained(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message):
        cu.choose_strategy()


def test_a_worker_whose_port_is_taken_is_told_so(monkeypatch):
    # TensorFlow would say only "Could not start gRPC server", its peers waiting forever.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for cluster in (
            {"worker": ["127.0.0.1:1", f"127.0.0.1:{port}"]},
            {"worker": {"0": "127.0.0.1:1", "1": f"127.0.0.1:{port}"}},  # TensorFlow's too
        ):
            config = {"cluster": cluster, "task": {"type": "worker", "index": 1}}
            monkeypatch.setenv("TF_CONFIG", json.dumps(config))
            with pytest.raises(RuntimeError, match=rf"the address 127.0.0.1:{port}, but port "
                               rf"{port} cannot be taken here .*start all again"):  # fmt: skip
                cu.choose_strategy()
        # This process's own server, as after a first choose_strategy (a cell run twice),
        # and addresses whose port TensorFlow parses, not the check, pass it.
        monkeypatch.setattr(devices, "_SERVING", {f"127.0.0.1:{port}"})
        for address in (f"127.0.0.1:{port}", "127.0.0.1:0", "127.0.0.1:70000", "host:x"):
            devices._check_own_port(address)


def test_one_worker_tf_config_stays_on_one_device(monkeypatch):
    config = {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert isinstance(cu.choose_strategy(), tf.distribute.OneDeviceStrategy)


class _FourReplicas:
    num_replicas_in_sync = 4


def test_global_batch_size_scales_and_checks():
    assert cu.global_batch_size(128, _FourReplicas()) == 512
    for bad in (0, -8, 12.0, True, "128"):
        with pytest.raises(ValueError, match="per_replica batch size must be an int >= 1"):
            cu.global_batch_size(bad, _FourReplicas())


def test_xla_switch():
    from tensorflow.python.framework.config import is_op_determinism_enabled

    # Whatever an earlier test left: op determinism rules XLA out (tests/test_training.py
    # checks both DETERMINISTIC values).
    assert cu.resolve_jit_compile(True) is not is_op_determinism_enabled()
    assert cu.resolve_jit_compile(False) is False
    # "auto": XLA only where a GPU is visible (none on the test machines).
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert cu.resolve_jit_compile("auto") is (gpu and not is_op_determinism_enabled())
    with pytest.raises(ValueError, match='True, False or "auto"'):
        cu.resolve_jit_compile("yes")


def test_mixed_precision_policy(float32_policy_after):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cu.configure_precision(True) == "mixed_float16"
    no_gpu = not tf.config.list_physical_devices("GPU")
    slow = "mixed_float16 on a CPU without native float16 runs slower than float32"
    assert any(slow in str(w.message) for w in caught) == no_gpu
    model = cu.build_simple_cnn()
    conv, head = model.get_layer("conv1"), model.get_layer("predictions")
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    assert model.get_layer("dense1").compute_dtype == "float16"
    assert head.compute_dtype == "float32"
    assert all(w.dtype == "float32" for w in model.weights)
    probs = model(np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32))
    assert probs.dtype == "float32"
    np.testing.assert_allclose(np.sum(np.asarray(probs), axis=1), 1.0, rtol=1e-5)
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    assert cu.configure_precision(False) == "float32"
    plain = cu.build_simple_cnn()
    assert plain.get_layer("conv1").compute_dtype == "float32"


def _tiny_convnet(padding: str):
    inputs = keras.Input((6, 6, 5))
    h = keras.layers.Conv2D(7, 3, padding=padding, name="small_a")(inputs)
    h = keras.layers.Conv2D(6, (3, 2), padding=padding, name="small_b")(h)
    h = keras.layers.Conv2D(4, 1, name="pointwise")(h)
    return keras.Model(inputs, keras.layers.Flatten()(h))


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_fast_small_conv_gradients_match_tensorflow(padding):
    keras.utils.set_random_seed(0)
    native = _tiny_convnet(padding)
    fast = _tiny_convnet(padding)
    fast.set_weights(native.get_weights())
    switched = cu.fast_small_conv_gradients(fast, max_output_pixels=16)
    # valid: 6x6 -> 4x4 (16 px) -> 2x3; same: 6x6 (36 px) stays on TensorFlow's kernel.
    assert switched == (["small_a", "small_b"] if padding == "valid" else [])
    if padding == "same":
        switched = cu.fast_small_conv_gradients(fast, max_output_pixels=36)
        assert switched == ["small_a", "small_b"]
    x = tf.constant(np.random.default_rng(1).normal(size=(3, 6, 6, 5)), tf.float32)
    grads = []
    for model in (native, fast):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x) ** 2)
        grads.append(tape.gradient(loss, [x, *model.trainable_weights]))
        grads[-1].append(model(x))
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert float(tf.reduce_max(tf.abs(grads[1][0]))) > 0


def test_fast_small_conv_gradients_on_the_simple_network():
    model = cu.build_simple_cnn()
    before = cu.parameter_counts(model)
    # conv4 (6x6 -> 4x4); conv1 to conv3 (30x30, 28x28, 12x12 outputs) stay native.
    assert cu.fast_small_conv_gradients(model) == ["conv4"]
    assert cu.fast_small_conv_gradients(model) == []  # already switched
    assert cu.parameter_counts(model) == before


def test_a_conv2d_subclass_keeps_its_own_convolution():
    class Standardized(keras.layers.Conv2D):  # weight standardisation in its convolution_op
        def convolution_op(self, inputs, kernel):
            mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
            return super().convolution_op(inputs, (kernel - mean) / tf.sqrt(var + 1e-5))

    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, Standardized(4, 3, name="ws")(inputs))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    before = np.asarray(model(x))
    assert cu.fast_small_conv_gradients(model) == []
    np.testing.assert_array_equal(model(x), before)
