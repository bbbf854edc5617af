"""Training and inference throughput of the three notebooks' models against this machine's limit.

For each model and each precision asked for (``--precision``: float32, bfloat16, float16,
and ``auto``, what ``MIXED_PRECISION = "auto"`` picks for that model's notebook here):
training and inference images/s at the notebook's batch size (one batch held in memory, so
the input pipeline is not involved), forward GFLOPs per image counted from the layers,
achieved GFLOP/s and its fraction of the machine's dense matmul rate in that same precision,
measured in the same run; then the input pipeline alone, with that notebook's augmentation,
in images/s and as a multiple of the training rate (it must be at least 10x, or the
pipeline would hold the model back); and the cost of ``cu.train``'s
divergence guard (every variable checked for NaN/inf, outputs on 8 images checked as
probabilities), once and as a share of the 50 training steps between two checks; and what
an explanation costs (``cu.grad_cam`` on a batch, ms per image) beside inference; with
``--profile``, where a training step's time goes (``step_profile.py``). Prints a table, the
speed-up of each model's auto row over its float32 row, and writes
``results/benchmark.json``.

Conventions:
- FLOPs: 2 x multiply-accumulates of Conv2D, DepthwiseConv2D and Dense layers (nested
  models included); BatchNorm, activations, pooling, resizing and the loss are not
  counted. A training step counts 3x the forward FLOPs (forward, gradient with respect
  to the activations, gradient with respect to the weights).
- Rates come from the median step time of the timed steps (robust to other programs
  briefly taking the cores); warm-up steps (tracing, first allocations) are excluded.
- Peak, per precision: ``tf.matmul`` of two N x N matrices in that precision's compute
  dtype (float32, bfloat16, float16; 2 N^3 FLOPs), the best of a few runs at each of a few
  sizes (``--matmul-sizes``), measured before and after all the models; the
  highest figure is used, so each row's share of peak is against its own precision's.

Usage::

    python benchmarks/throughput.py                      # all three models, float32 and auto
    python benchmarks/throughput.py --profile            # and each step's time by operation
    python benchmarks/throughput.py --quick --models simple
    python benchmarks/throughput.py --models complex --batch-size 256 --xla on
    python benchmarks/throughput.py --precision float32,bfloat16,float16
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
from cifar_utils.devices import cpu_info  # noqa: E402
from cifar_utils.models import leaf_layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402

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
#: The models whose notebooks call ``cu.fast_cpu_training``.
FAST_CPU_TRAINING = ("simple", "complex")
#: Each model's notebook ``NAME``, which ``MIXED_PRECISION = "auto"`` decides by.
NETWORKS = {"simple": "simple_cnn", "complex": "complex_cnn", "efficientnet": "efficientnet_b0"}
#: ``--precision`` names -> ``MIXED_PRECISION`` values (``auto``: the machine's choice).
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
#: CPU flags that decide or limit the low-precision speed, shown when present.
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_fp16")  # fmt: skip
#: ``cu.train``'s default ``check_every``: batches between two divergence-guard checks.
GUARD_EVERY = 50


def forward_flops(model) -> int:
    """Forward FLOPs per image: 2 x MACs of every Conv2D, DepthwiseConv2D and Dense layer.

    MACs = (output pixels) x (kernel size), which covers ordinary, grouped and depthwise
    convolutions alike (the kernel holds KH*KW*Cin/groups*Cout or KH*KW*Cin*multiplier
    entries, each used once per output pixel). Nested models are walked.
    """
    total = 0
    for layer in leaf_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or not isinstance(
            layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
        ):
            continue
        out_shape = layer.output.shape
        pixels = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        total += 2 * pixels * int(np.prod(kernel.shape))
    return total


def matmul_peak(dtype: str, sizes, repeats: int) -> float:
    """Best ``tf.matmul`` rate of two n x n ``dtype`` matrices over the ``sizes``, in GFLOP/s."""
    best = 0.0
    for n in sizes:
        a = tf.cast(tf.random.normal((n, n), seed=1), dtype)
        b = tf.cast(tf.random.normal((n, n), seed=2), dtype)
        product = tf.function(lambda a=a, b=b: tf.reduce_sum(tf.cast(tf.matmul(a, b), "float32")))
        product().numpy()
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product().numpy()
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * n**3 / fastest / 1e9)
    return best


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


def training_pipeline(name: str, augment, batch: int) -> tuple:
    """The notebook's training input pipeline over 8 batches of random images, repeated,
    and what augments it."""
    rng = np.random.default_rng(0)
    n = batch * 8
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, size=n)
    if name == "efficientnet":
        ds = cu.make_dataset(
            x, y, batch_size=batch, training=True, batch_transform=cu.albumentations_batch_transform
        )
        return ds.repeat(), "albumentations (cu.albumentations_batch_transform)"
    ds = cu.make_dataset(x, y, batch_size=batch, training=True, augment=augment)
    return ds.repeat(), "Keras layers (cu.augmentation_layers)"


def explain_ms(model, x, args) -> float:
    """Milliseconds per image of ``cu.grad_cam`` on the batch ``x`` (one gradient call)."""
    images = np.asarray(x)
    rate = _median_rate(
        lambda: cu.grad_cam(model, images, batch_size=len(images)), len(images), 1, args.steps
    )
    return 1000 / rate


def bench_model(name: str, args) -> dict:
    """Build, compile and time one model; returns its row of figures."""
    keras.utils.set_random_seed(0)
    model, optimizer, augment = BUILDERS[name]()
    fast = name in FAST_CPU_TRAINING  # what its notebook's cu.fast_cpu_training switches
    switched = {
        "batch_norm": cu.fuse_batch_norm(model) if fast and not args.no_fused_bn else [],
        "dropout": cu.fast_dropout(model) if fast and not args.no_fast_dropout else [],
        "small_conv": cu.fast_small_conv_gradients(model) if fast and not args.no_fast_conv else [],
    }
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
    explain = explain_ms(model, x, args)
    flops = forward_flops(model)
    pipeline, what = training_pipeline(name, augment, batch)
    iterator = iter(pipeline)
    pipe = _median_rate(lambda: next(iterator), batch, 3, args.pipeline_batches)
    profile = step_profile.profile_fit(model, pipeline, args.profile, 2) if args.profile else None
    return {
        "batch_size": batch,
        "params": cu.parameter_counts(model)["total"],
        "jit_compile": bool(model.jit_compile),  # as Keras used it (FIELD-CASES 18)
        "fast_cpu_training": switched,
        "train_images_per_s": train,
        "inference_images_per_s": infer,
        "inference_ms_per_image": 1000 / infer,
        "grad_cam_ms_per_image": explain,
        "forward_gflops_per_image": flops / 1e9,
        "train_gflops_per_image": 3 * flops / 1e9,
        "train_gflop_per_s": train * 3 * flops / 1e9,
        "inference_gflop_per_s": infer * flops / 1e9,
        "pipeline": what,
        "pipeline_images_per_s": pipe,
        "pipeline_to_train_ratio": pipe / train,
        "guard_seconds": guard,
        "guard_share_every_50_steps": guard / (GUARD_EVERY * batch / train),
        "profile": profile,
    }


def machine() -> dict:
    """What this ran on: CPU model, its precision-relevant flags, cores, GPUs, library versions."""
    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "cpu_flags": [f for f in PRECISION_FLAGS if f in cpu["flags"]],
        "cpu_cores": cpu["cores"],
        "gpus": [g.name for g in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def table(rows: list[dict], precisions: dict) -> str:
    """The figures as a Markdown table (also what docs/performance.md shows), then each peak."""
    cells = [
        {
            "model": r["model"],
            "precision": r["precision"],
            "batch": r["batch_size"],
            "train": f"{r['train_images_per_s']:.0f}",
            "infer": f"{r['inference_images_per_s']:.0f}",
            "gflops": f"{r['forward_gflops_per_image']:.3f}",
            "gflop_s": f"{r['train_gflop_per_s']:.1f}",
            "peak": f"{100 * r['fraction_of_matmul_peak']:.0f}%",
            "pipeline": f"{r['pipeline_images_per_s']:.0f}",
            "ratio": f"{r['pipeline_to_train_ratio']:.0f}x",
            "explain": f"{r['grad_cam_ms_per_image']:.2f} ({r['inference_ms_per_image']:.2f})",
            "guard": f"{1000 * r['guard_seconds']:.0f} "
            f"({100 * r['guard_share_every_50_steps']:.2f}%)",
            "profile": top_kinds(r["profile"]),
        }
        for r in rows
    ]
    columns = [
        ("model", "model"), ("precision", "precision"), ("batch", "batch"),
        ("train", "train img/s"), ("infer", "infer img/s"), ("gflops", "GFLOPs/img (fwd)"),
        ("gflop_s", "train GFLOP/s"), ("peak", "% of its matmul peak"),
        ("pipeline", "pipeline img/s"), ("ratio", "pipeline / train"),
        ("explain", "Grad-CAM ms/img (infer)"), ("guard", "guard ms (% of 50 steps)"),
    ]  # fmt: skip
    if rows and rows[0]["profile"]:
        columns.append(("profile", "top 3 of a step (profiled step s)"))
    peaks = "; ".join(
        f"{label} {p['matmul_peak_gflop_per_s']:.1f} GFLOP/s" for label, p in precisions.items()
    )
    return cu.markdown_table(cells, columns) + f"\n\nMatmul peak: {peaks}" + speedups(rows)


def top_kinds(profile: dict | None, n: int = 3) -> str:
    """The ``n`` largest shares of a profiled step, e.g. "conv gradients 45%, ... (0.49 s)"."""
    if not profile:
        return ""
    top = sorted(profile["shares"].items(), key=lambda kv: -kv[1])[:n]
    shown = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in top)
    return f"{shown} ({profile['step_seconds']:.2f} s)"


def speedups(rows: list[dict]) -> str:
    """Per model, the training speed-up of its auto row over its float32 row (x1.00 where
    auto is float32), for the models with both."""
    found = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rates = {r["precision"]: r["train_images_per_s"] for r in rows if r["model"] == model}
        auto = next((label for label in rates if label.endswith("(auto)")), None)
        base = rates.get("float32", rates.get("float32 (auto)"))
        if auto and base:
            found.append(f"{model} x{rates[auto] / base:.2f} ({auto})")
    return f"\n\nAuto over float32, training: {'; '.join(found)}" if found else ""


def resolve_precisions(names, model: str) -> dict:
    """``--precision`` names -> ``{label: policy}`` for ``model``, one entry per distinct
    policy, in order.

    ``auto`` becomes what :func:`cu.choose_precision` picks for that model's notebook on this
    machine; its label says so (``"float32 (auto)"``), and a precision also asked for by name
    is listed once.
    """
    auto = cu.choose_precision("auto", network=NETWORKS[model])[0]
    labels = {}
    for name in names:
        policy = auto if name == "auto" else cu.choose_precision(name)[0]
        labels.setdefault(policy, keras.DTypePolicy(policy).compute_dtype)
    if "auto" in names:
        labels[auto] += " (auto)"
    return {label: policy for policy, label in labels.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, help="override the notebook batch sizes")
    parser.add_argument(
        "--precision",
        default="float32,auto",
        help=f"comma-separated, from {', '.join(PRECISIONS)} (auto: the machine's choice)",
    )
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--deterministic", action="store_true", help="TensorFlow op determinism (DETERMINISTIC)"
    )
    parser.add_argument("--threads", type=int, help="TensorFlow intra-op threads")
    parser.add_argument(
        "--no-fast-conv", action="store_true", help="keep TF's small-conv gradient kernel"
    )
    parser.add_argument(
        "--no-fused-bn", action="store_true", help="keep Keras' unfused BatchNorm in training"
    )
    parser.add_argument(
        "--no-fast-dropout", action="store_true", help="keep Keras' 32-bit dropout masks"
    )
    parser.add_argument(
        "--matmul-sizes", default="1024,2048,4096", help="comma-separated matmul sizes N"
    )
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument(
        "--profile", type=int, nargs="?", const=5, default=0, metavar="STEPS",
        help="also trace STEPS (default 5) model.fit steps on the notebook's pipeline with "
        "TensorFlow's profiler and share each step's time among kinds of operation",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmark.json"))
    args = parser.parse_args(argv)
    if args.profile and args.xla == "on":
        parser.error("--profile needs XLA off: XLA-compiled steps show no ops one by one")
    args.xla = {"auto": "auto", "on": True, "off": False}[args.xla]
    if args.quick:
        args.steps, args.warmup, args.pipeline_batches = 5, 2, 8
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = sorted(set(args.precision) - set(PRECISIONS))
    if unknown or not args.precision:
        parser.error(f"--precision {unknown or 'empty'}: choose from {', '.join(PRECISIONS)}")
    try:
        args.matmul_sizes = [int(n) for n in args.matmul_sizes.split(",")]
    except ValueError:
        parser.error(f"--matmul-sizes must be comma-separated ints, not {args.matmul_sizes!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    plans = {name: resolve_precisions(args.precision, name) for name in args.models}
    policies = dict.fromkeys(policy for plan in plans.values() for policy in plan.values())
    try:
        peaks = {policy: [measure_peak(policy, args)] for policy in policies}
        rows = []
        for name, plan in plans.items():
            for label, policy in plan.items():
                keras.mixed_precision.set_global_policy(policy)
                print(f"benchmarking {name} in {label} ...", flush=True)
                row = {"model": name, "precision": label, "policy": policy}
                rows.append(row | bench_model(name, args))
        for policy in policies:  # again after the models: the best of the two counts
            peaks[policy].append(measure_peak(policy, args))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for row in rows:
        row["fraction_of_matmul_peak"] = row["train_gflop_per_s"] / max(peaks[row["policy"]])
    precisions = {
        keras.DTypePolicy(policy).compute_dtype: {
            "policy": policy,
            "matmul_peak_gflop_per_s": max(runs),
            "matmul_peak_runs_gflop_per_s": runs,
        }
        for policy, runs in peaks.items()
    }
    auto = {name: cu.choose_precision(network=NETWORKS[name]) for name in args.models}
    record = {
        "machine": machine(),
        "settings": {
            "auto_precision": {name: {"policy": p, "reason": r} for name, (p, r) in auto.items()},
            "xla": args.xla,
            "deterministic": args.deterministic,
            "steps": args.steps,
            "warmup": args.warmup,
            "profile_steps": args.profile,
            "fast_conv": not args.no_fast_conv,
            "fused_batch_norm": not args.no_fused_bn,
            "fast_dropout": not args.no_fast_dropout,
            "matmul_sizes": args.matmul_sizes,
            "conventions": "FLOPs = 2 x MACs of conv/dense layers; training = 3 x forward; "
            "rates from median step times; share of peak against the matmul peak in the "
            "row's precision",
        },
        "precisions": precisions,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(table(rows, precisions))
    print(f"wrote {cu.write_json(args.output, record)}")
    return record


def measure_peak(policy: str, args) -> float:
    """The matmul peak in ``policy``'s compute dtype, GFLOP/s (:func:`matmul_peak`)."""
    return matmul_peak(keras.DTypePolicy(policy).compute_dtype, args.matmul_sizes, 3)


if __name__ == "__main__":
    main()
