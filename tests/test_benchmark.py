"""The throughput benchmark's arithmetic (its speeds are printed, never asserted)."""

import sys
from pathlib import Path

import keras
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_profile  # noqa: E402
import throughput  # noqa: E402

import cifar_utils as cu  # noqa: E402
import cifar_utils.devices as cu_devices  # noqa: E402


def test_forward_flops_of_the_simple_cnn_match_a_hand_count():
    macs = (
        30 * 30 * 64 * (3 * 3 * 3)  # conv1: output pixels x channels x kernel taps
        + 28 * 28 * 128 * (3 * 3 * 64)
        + 12 * 12 * 256 * (3 * 3 * 128)
        + 4 * 4 * 512 * (3 * 3 * 256)
        + 512 * 256
        + 256 * 256
        + 256 * 100  # dense layers
    )
    assert throughput.forward_flops(cu.build_simple_cnn()) == 2 * macs == 241_843_712  # 0.24 GFLOPs


def test_quick_run_writes_every_figure_per_precision(tmp_path, capsys):
    out = tmp_path / "benchmark.json"
    record = throughput.main(
        ["--quick", "--models", "simple", "--output", str(out), "--matmul-sizes", "128,256",
         "--batch-size", "32",
         "--precision", "float32,bfloat16"]
    )  # fmt: skip
    assert out.is_file() and keras.mixed_precision.global_policy().name == "float32"
    assert list(record["precisions"]) == ["float32", "bfloat16"]
    assert [p["policy"] for p in record["precisions"].values()] == ["float32", "mixed_bfloat16"]
    assert [(r["model"], r["precision"]) for r in record["rows"]] == [
        ("simple", "float32"),
        ("simple", "bfloat16"),
    ]
    for row in record["rows"]:
        peak = record["precisions"][row["precision"]]["matmul_peak_gflop_per_s"]
        assert row["profile"] is None  # no --profile
        assert peak > 0 and row["fraction_of_matmul_peak"] == row["train_gflop_per_s"] / peak
        assert row["batch_size"] == 32 and row["params"] == 1_777_636
        assert row["train_gflops_per_image"] == pytest.approx(3 * row["forward_gflops_per_image"])
        assert row["train_images_per_s"] > 0 and row["pipeline_images_per_s"] > 0
        assert row["inference_ms_per_image"] == 1000 / row["inference_images_per_s"]
        assert row["grad_cam_ms_per_image"] > 0  # an explanation's cost, beside inference's
        assert row["pipeline_to_train_ratio"] == (
            row["pipeline_images_per_s"] / row["train_images_per_s"]
        )
        # The divergence guard's cost: one check, and as a share of the 50 steps between checks.
        step = row["batch_size"] / row["train_images_per_s"]
        assert row["guard_seconds"] > 0
        assert row["guard_share_every_50_steps"] == pytest.approx(
            row["guard_seconds"] / (50 * step)
        )
    printed = capsys.readouterr().out
    assert "| simple | bfloat16 | 32 |" in printed and "| simple | float32 | 32 |" in printed
    assert "Matmul peak: float32 " in printed and " GFLOP/s; bfloat16 " in printed
    assert record["machine"]["cpu"] == cu_devices.cpu_info()["model"]
    assert set(record["machine"]["cpu_flags"]) <= cu_devices.cpu_info()["flags"]


def test_auto_is_listed_once_under_the_machines_choice_for_each_model():
    for model, network in throughput.NETWORKS.items():
        auto = cu.choose_precision("auto", network=network)[0]
        labels = throughput.resolve_precisions(["float32", "auto"], model)
        assert list(labels.values()) == list(dict.fromkeys(["float32", auto]))
        dtype = keras.DTypePolicy(auto).compute_dtype
        assert labels[f"{dtype} (auto)"] == auto
    # EfficientNetB0 trains in float32 on every CPU: its auto row is its float32 row.
    assert throughput.resolve_precisions(["float32", "auto"], "efficientnet") == {
        "float32 (auto)": "float32"
    }
    assert throughput.resolve_precisions(["bfloat16", "float16"], "simple") == {
        "bfloat16": "mixed_bfloat16",
        "float16": "mixed_float16",
    }
    with pytest.raises(SystemExit):
        throughput.parse_args(["--precision", "fp8"])


def test_speedups_compare_each_models_auto_row_with_its_float32_row():
    rows = [
        {"model": "simple", "precision": "float32", "train_images_per_s": 100.0},
        {"model": "simple", "precision": "bfloat16 (auto)", "train_images_per_s": 150.0},
        {"model": "efficientnet", "precision": "float32 (auto)", "train_images_per_s": 10.0},
    ]
    assert throughput.speedups(rows) == (
        "\n\nAuto over float32, training: simple x1.50 (bfloat16 (auto)); efficientnet x1.00 "
        "(float32 (auto))"
    )


def test_time_is_shared_among_overlapping_ops_and_the_gaps():
    ops = [(0.0, 2.0, "conv forward"), (1.0, 3.0, "BatchNorm"), (1.5, 2.5, "casts")]
    seconds = step_profile.share_time(ops, (0.0, 4.0))
    # 0-1 conv alone; 1-1.5 conv and BN; 1.5-2 all three; 2-2.5 BN and casts; 2.5-3 BN; 3-4 none
    assert seconds["conv forward"] == pytest.approx(1 + 0.25 + 0.5 / 3)
    assert seconds["BatchNorm"] == pytest.approx(0.25 + 0.5 / 3 + 0.25 + 0.5)
    assert seconds["casts"] == pytest.approx(0.5 / 3 + 0.25)
    assert seconds["no op running"] == pytest.approx(1.0)
    assert sum(seconds.values()) == pytest.approx(4.0)
    assert list(seconds) == list(step_profile.KINDS)
    # Ops reaching outside the window count only inside it.
    assert step_profile.share_time([(-1.0, 0.5, "matmul")], (0.0, 1.0))["matmul"] == 0.5


@pytest.mark.parametrize(
    ("name", "op_type", "kind"),
    [
        ("StatefulPartitionedCall/IteratorGetNext", "IteratorGetNext", "input pipeline"),
        ("g/gradient_tape/m/conv2_1/convolution/Conv2DBackpropFilter",
         "_MklNativeConv2DBackpropFilterWithBias", "conv gradients"),
        ("StatefulPartitionedCall/small_conv_gradient/MatMul", "_MklMatMul", "conv gradients"),
        ("StatefulPartitionedCall/m/conv2_1/Relu", "_MklNativeFusedConv2D", "conv forward"),
        ("StatefulPartitionedCall/m/dense1_1/MatMul", "_MklMatMul", "matmul"),
        ("StatefulPartitionedCall/m/bn1_1/Cast", "Cast", "casts"),
        ("StatefulPartitionedCall/adam/Sub_51", "Sub", "optimizer update"),
        ("StatefulPartitionedCall/SGD/update/mul", "Mul", "optimizer update"),
        ("StatefulPartitionedCall/m/bn1_1/moments/mean", "Mean", "BatchNorm"),
        ("g/gradient_tape/m/drop1_1/Mul", "Mul", "dropout"),
        ("StatefulPartitionedCall/m/pool2_1/MaxPool", "_MklNativeMaxPool", "pooling"),
        ("StatefulPartitionedCall/m/flatten_1/Reshape", "Reshape", "element-wise and other"),
    ],
)  # fmt: skip
def test_each_op_goes_to_its_kind(name, op_type, kind):
    layers = {"bn1": "BatchNorm", "drop1": "dropout", "pool2": "pooling"}
    assert step_profile.op_kind(name, op_type, layers) == kind


def _tiny_model(jit_compile=False):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", jit_compile=jit_compile)
    return model


def test_a_step_waiting_for_its_batch_is_input_pipeline_time():
    import time

    import tensorflow as tf

    def slow(x):
        time.sleep(0.2)  # an input pipeline far slower than the model
        return x

    data = tf.data.Dataset.from_tensors((tf.zeros((16, 8)), tf.one_hot(tf.zeros(16, "int32"), 4)))
    data = data.repeat().map(lambda x, y: (tf.numpy_function(slow, [x], tf.float32), y))
    data = data.map(lambda x, y: (tf.ensure_shape(x, (16, 8)), y))
    profile = step_profile.profile_fit(_tiny_model(), data, steps=3, warmup=1)
    assert profile["shares"]["input pipeline"] > 0.8
    assert profile["step_seconds"] > 0.15


def test_the_profile_refuses_xla():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--profile", "--xla", "on"])
    with pytest.raises(ValueError, match="the profile needs XLA off"):
        step_profile.profile_fit(_tiny_model(jit_compile=True), None, steps=1, warmup=1)


@pytest.mark.slow
def test_a_profiled_run_shares_out_each_step(tmp_path, capsys):
    record = throughput.main(
        ["--quick", "--models", "simple", "--output", str(tmp_path / "b.json"),
         "--matmul-sizes", "128", "--batch-size", "32", "--precision", "float32",
         "--profile", "3"]
    )  # fmt: skip
    profile = record["rows"][0]["profile"]
    assert set(profile["shares"]) == set(step_profile.KINDS)
    assert sum(profile["shares"].values()) == pytest.approx(1.0)
    # The simple network's step is mostly its convolutions, both ways.
    assert profile["shares"]["conv gradients"] + profile["shares"]["conv forward"] > 0.3
    assert profile["shares"]["BatchNorm"] > 0 and profile["shares"]["dropout"] > 0
    assert 0 < profile["step_seconds"] <= profile["wall_step_seconds"]
    assert "top 3 of a step" in capsys.readouterr().out
