"""Training and inference throughput of the three notebooks' models against this machine's limit.

For each model: training and inference images/s at the notebook's batch size (one
batch held in memory, so the input pipeline is not involved), forward GFLOPs per image
counted from the layers, achieved GFLOP/s and its fraction of the machine's dense
float32 matmul rate measured in the same run; then the input pipeline alone, with that
notebook's augmentation, in images/s and as a multiple of the training rate (it must be
at least 10x, or the pipeline would hold the model back); and the cost of ``cu.train``'s
divergence guard (every variable checked for NaN/inf, outputs on 8 images checked as
probabilities), once and as a share of the 50 training steps between two checks. Prints
a table and writes ``results/benchmark.json``.

Conventions:
- FLOPs: 2 x multiply-accumulates of Conv2D, DepthwiseConv2D and Dense layers (nested
  models included); BatchNorm, activations, pooling, resizing and the loss are not
  counted. A training step counts 3x the forward FLOPs (forward, gradient with respect
  to the activations, gradient with respect to the weights).
- Rates come from the median step time of the timed steps (robust to other programs
  briefly taking the cores); warm-up steps (tracing, first allocations) are excluded.
- Peak: ``tf.matmul`` of two float32 N x N matrices (2 N^3 FLOPs), best of several runs,
  measured before and after the models; the higher figure is used.

Usage::

    python benchmarks/throughput.py                      # all three models, default settings
    python benchmarks/throughput.py --quick --models simple
    python benchmarks/throughput.py --models complex --batch-size 256 --xla on
    python benchmarks/throughput.py --mixed-precision    # GPUs with tensor cores
    python benchmarks/throughput.py --deterministic      # the notebooks' DETERMINISTIC = True

Speed is measured here, never asserted in the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cifar_utils as cu  # noqa: E402

#: The notebooks' batch sizes (per replica); ``--batch-size`` overrides them all.
BATCH_SIZE = {"simple": 128, "complex": 128, "efficientnet": 64}
MODELS = tuple(BATCH_SIZE)


def _simple():
    model = cu.build_simple_cnn()
    return model, keras.optimizers.Adam(1e-3), cu.augmentation_layers(flip=True, shift=0.1)


def _complex():
    model = cu.build_complex_cnn()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    return model, optimizer, cu.augmentation_layers(flip=True, shift=0.1, rotation_degrees=15)


def _efficientnet():
    model = cu.build_efficientnet_b0(weights=None)
    return model, keras.optimizers.Adam(1e-4), None


BUILDERS = {"simple": _simple, "complex": _complex, "efficientnet": _efficientnet}
#: ``cu.train``'s default ``check_every``: batches between two divergence-guard checks.
GUARD_EVERY = 50


def forward_flops(model) -> int:
    """Forward FLOPs per image: 2 x MACs of every Conv2D, DepthwiseConv2D and Dense layer.

    MACs = (output pixels) x (kernel size), which covers ordinary, grouped and depthwise
    convolutions alike (the kernel holds KH*KW*Cin/groups*Cout or KH*KW*Cin*multiplier
    entries, each used once per output pixel). Nested models are walked.
    """
    total, stack = 0, list(model.layers)
    while stack:
        layer = stack.pop()
        if hasattr(layer, "layers"):
            stack.extend(layer.layers)
            continue
        kernel = getattr(layer, "kernel", None)
        if kernel is None or not isinstance(
            layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
        ):
            continue
        out_shape = layer.output.shape
        pixels = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        total += 2 * pixels * int(np.prod(kernel.shape))
    return total


def matmul_peak(n: int, repeats: int) -> float:
    """Best float32 ``tf.matmul`` rate of two n x n matrices, in GFLOP/s."""
    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    product().numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product().numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _median_rate(step, batch: int, warmup: int, steps: int) -> float:
    """Images/s from the median wall time of ``steps`` calls of ``step`` after ``warmup``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def pipeline_rate(name: str, augment, batch: int, batches: int) -> tuple[float, str]:
    """Images/s of the notebook's training input pipeline alone, and what it ran."""
    rng = np.random.default_rng(0)
    n = batch * 8
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, size=n)
    if name == "efficientnet":
        ds = cu.make_dataset(
            x, y, batch_size=batch, training=True, batch_transform=cu.albumentations_batch_transform
        )
        what = "albumentations (cu.albumentations_batch_transform)"
    else:
        ds = cu.make_dataset(x, y, batch_size=batch, training=True, augment=augment)
        what = "Keras layers (cu.augmentation_layers)"
    iterator = iter(ds.repeat())
    rate = _median_rate(lambda: next(iterator), batch, warmup=3, steps=batches)
    return rate, what


def bench_model(name: str, args) -> dict:
    """Build, compile and time one model; returns its row of figures."""
    keras.utils.set_random_seed(0)
    model, optimizer, augment = BUILDERS[name]()
    switched = [] if args.no_fast_conv else cu.fast_small_conv_gradients(model)
    batch = args.batch_size or BATCH_SIZE[name]
    jit = cu.resolve_jit_compile(args.xla)
    model.compile(optimizer, "categorical_crossentropy", jit_compile=jit)
    shape = (batch, *model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, size=shape).astype(model.inputs[0].dtype))
    if model.inputs[0].dtype != "uint8":
        x = x / 255
    y = tf.one_hot(rng.integers(0, model.outputs[0].shape[-1], size=batch), 100)
    train = _median_rate(lambda: model.train_on_batch(x, y), batch, args.warmup, args.steps)
    infer = _median_rate(lambda: model.predict_on_batch(x), batch, args.warmup, args.steps)
    probe = x[:8]  # what cu.train's divergence guard runs every 50 batches and per epoch
    guard = 1 / _median_rate(lambda: cu.training_state_problem(model, probe), 1, 1, 5)
    flops = forward_flops(model)
    pipe, what = pipeline_rate(name, augment, batch, args.pipeline_batches)
    return {
        "batch_size": batch,
        "params": cu.parameter_counts(model)["total"],
        "jit_compile": bool(jit),
        "fast_conv_layers": switched,
        "train_images_per_s": train,
        "inference_images_per_s": infer,
        "forward_gflops_per_image": flops / 1e9,
        "train_gflops_per_image": 3 * flops / 1e9,
        "train_gflop_per_s": train * 3 * flops / 1e9,
        "inference_gflop_per_s": infer * flops / 1e9,
        "pipeline": what,
        "pipeline_images_per_s": pipe,
        "pipeline_to_train_ratio": pipe / train,
        "guard_seconds": guard,
        "guard_share_every_50_steps": guard / (GUARD_EVERY * batch / train),
    }


def machine() -> dict:
    """What this ran on: CPU model, core count, GPUs, library versions."""
    cpu = platform.processor() or platform.machine()
    with __import__("contextlib").suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpus": [g.name for g in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def table(results: dict, peak: float) -> str:
    """The figures as a Markdown table (also what the README shows)."""
    head = (
        "| model | batch | train img/s | infer img/s | GFLOPs/img (fwd) | train GFLOP/s "
        "| % of matmul peak | pipeline img/s | pipeline / train | guard ms (% of 50 steps) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['batch_size']} | {r['train_images_per_s']:.0f} "
            f"| {r['inference_images_per_s']:.0f} | {r['forward_gflops_per_image']:.3f} "
            f"| {r['train_gflop_per_s']:.1f} | {100 * r['train_gflop_per_s'] / peak:.0f}% "
            f"| {r['pipeline_images_per_s']:.0f} | {r['pipeline_to_train_ratio']:.0f}x "
            f"| {1000 * r['guard_seconds']:.0f} ({100 * r['guard_share_every_50_steps']:.2f}%) |"
        )
    return head + "\n".join(rows) + f"\n\nMatmul peak (float32): {peak:.1f} GFLOP/s"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, help="override the notebook batch sizes")
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--deterministic", action="store_true", help="TensorFlow op determinism (DETERMINISTIC)"
    )
    parser.add_argument("--threads", type=int, help="TensorFlow intra-op threads")
    parser.add_argument(
        "--no-fast-conv", action="store_true", help="keep TF's small-conv gradient kernel"
    )
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmark.json"))
    args = parser.parse_args(argv)
    args.xla = {"auto": "auto", "on": True, "off": False}[args.xla]
    if args.quick:
        args.steps, args.warmup, args.pipeline_batches = 5, 2, 8
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    policy = cu.configure_precision(args.mixed_precision)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    peaks = [matmul_peak(args.matmul_size, 5)]
    results = {}
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        results[name] = bench_model(name, args)
    peaks.append(matmul_peak(args.matmul_size, 5))
    peak = max(peaks)
    for r in results.values():
        r["fraction_of_matmul_peak"] = r["train_gflop_per_s"] / peak
    record = {
        "machine": machine(),
        "settings": {
            "dtype_policy": policy,
            "xla": args.xla,
            "deterministic": args.deterministic,
            "steps": args.steps,
            "warmup": args.warmup,
            "fast_conv": not args.no_fast_conv,
            "conventions": "FLOPs = 2 x MACs of conv/dense layers; training = 3 x forward; "
            "rates from median step times",
        },
        "matmul_peak_gflop_per_s": peak,
        "matmul_peak_runs_gflop_per_s": peaks,
        "models": results,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(table(results, peak))
    print(f"wrote {cu.write_json(args.output, record)}")
    return record


if __name__ == "__main__":
    main()
