"""The throughput benchmark's arithmetic (its speeds are printed, never asserted)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput  # noqa: E402

import cifar_utils as cu  # noqa: E402


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


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "benchmark.json"
    record = throughput.main(
        ["--quick", "--models", "simple", "--output", str(out), "--matmul-size", "512"]
    )
    row = record["models"]["simple"]
    assert out.is_file() and record["matmul_peak_gflop_per_s"] > 0
    assert row["batch_size"] == 128 and row["params"] == 1_777_636
    assert row["train_gflops_per_image"] == pytest.approx(3 * row["forward_gflops_per_image"])
    assert row["train_images_per_s"] > 0 and row["pipeline_images_per_s"] > 0
    assert row["pipeline_to_train_ratio"] == (
        row["pipeline_images_per_s"] / row["train_images_per_s"]
    )
    # The divergence guard's cost: one check, and as a share of the 50 steps between checks.
    step = row["batch_size"] / row["train_images_per_s"]
    assert row["guard_seconds"] > 0
    assert row["guard_share_every_50_steps"] == pytest.approx(row["guard_seconds"] / (50 * step))
