"""The throughput benchmark's arithmetic (its speeds are printed, never asserted)."""

import sys
from pathlib import Path

import keras
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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


def test_auto_is_listed_once_under_the_machines_choice():
    auto = cu.choose_precision("auto")[0]
    labels = throughput.resolve_precisions(["float32", "auto"])
    assert list(labels.values()) == list(dict.fromkeys(["float32", auto]))
    dtype = keras.DTypePolicy(auto).compute_dtype
    assert labels[f"{dtype} (auto)"] == auto
    assert throughput.resolve_precisions(["bfloat16", "float16"]) == {
        "bfloat16": "mixed_bfloat16",
        "float16": "mixed_float16",
    }
    with pytest.raises(SystemExit):
        throughput.parse_args(["--precision", "fp8"])
