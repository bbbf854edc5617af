"""Where training runs: strategies (devices, workers), precision, XLA, seeds, CPU speed-ups.

Used by each notebook's "Setup" step (call :func:`choose_strategy` before any other
TensorFlow work) and by training, results and export (which process is the chief).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from .checks import check_positive_int
from .models import leaf_layers


def cpu_info() -> dict:
    """This machine's CPU: ``{"model": str, "flags": frozenset of str, "cores": int}``.

    ``model`` and ``flags`` (e.g. ``"avx2"``, ``"avx512_bf16"``, ``"amx_bf16"``) come from
    ``/proc/cpuinfo`` on Linux; elsewhere ``model`` is ``platform.processor()`` (or the
    machine type) and ``flags`` is empty. ``cores``: logical CPUs (``os.cpu_count()``).
    """
    import platform

    model, flags = "", frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and TensorFlow (``keras.utils.set_random_seed``); op determinism.

    With ``deterministic=True`` TensorFlow's ops also run deterministically
    (``tf.config.experimental.enable_op_determinism``): the same ``seed`` on the same
    machine then gives the same weights, history and scores (on a GPU, at some cost in
    speed). With ``False`` the seed still fixes the initialisation, the split, the data
    order and the augmentation, but GPU kernels may add floats in a varying order, so two
    runs drift apart by round-off. Call it before building the model.
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


#: ``MIXED_PRECISION`` values that force a precision -> Keras dtype policy.
PRECISION_POLICIES = {
    True: "mixed_float16",
    False: "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
}


def is_precision_setting(value) -> bool:
    """Whether ``value`` is one of the six ``MIXED_PRECISION`` values :func:`choose_precision`
    takes: ``"auto"`` or a key of :data:`PRECISION_POLICIES` (a bool or its string)."""
    return isinstance(value, bool | str) and (value == "auto" or value in PRECISION_POLICIES)


#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX512_BF16 or AMX.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _native(policy: str, cpu_flags, gpus: list) -> bool:
    """Whether this hardware computes ``policy`` natively (so at least as fast as float32)."""
    if policy == "mixed_float16":
        return bool(gpus) and all(cc and cc[0] >= 7 for cc in gpus)
    if policy == "mixed_bfloat16":
        if gpus:
            return all(cc and cc[0] >= 8 for cc in gpus)
        return bool(set(BF16_CPU_FLAGS) & set(cpu_flags))
    return True


def _gpu_capabilities() -> list:
    """Compute capability ``(major, minor)`` of each visible GPU (``None`` where unknown)."""
    return [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def _auto_precision(cpu_flags, gpus: list) -> tuple[str, str]:
    """``(policy, reason)`` that ``MIXED_PRECISION = "auto"`` picks for this hardware."""
    if gpus:
        if not all(gpus):
            return "float32", "a GPU whose compute capability TensorFlow does not report"
        major, minor = min(tuple(cc) for cc in gpus)
        cc = f"GPU compute capability {major}.{minor}"
        if _native("mixed_bfloat16", cpu_flags, gpus):
            return "mixed_bfloat16", f"{cc} (8.0 or newer: native bfloat16)"
        if _native("mixed_float16", cpu_flags, gpus):
            return "mixed_float16", f"{cc} (7.x: float16 tensor cores, with loss scaling)"
        return "float32", f"{cc} (below 7.0: no fast low-precision units)"
    if not cpu_flags:
        return "float32", "no GPU, and the CPU's flags are unknown (no /proc/cpuinfo)"
    if _native("mixed_bfloat16", cpu_flags, gpus):
        native = ", ".join(sorted(set(BF16_CPU_FLAGS) & set(cpu_flags)))
        return "mixed_bfloat16", f"no GPU; the CPU has native bfloat16 ({native})"
    return "float32", (
        "no GPU, and the CPU has no avx512_bf16 or amx_bf16 flag (bfloat16 would be emulated "
        "and slower)"
    )


def choose_precision(setting="auto", *, cpu_flags=None, gpus=None) -> tuple[str, str]:
    """The Keras dtype policy for the ``MIXED_PRECISION`` parameter, and why, in words.

    ``"auto"`` decides from the hardware: on GPUs (the lowest compute capability of all
    visible ones) ``"mixed_bfloat16"`` from 8.0 (Ampere) on, ``"mixed_float16"`` on 7.x
    (Volta, Turing; Keras adds loss scaling at ``compile``), ``"float32"`` below or when the
    capability is unknown; without a GPU ``"mixed_bfloat16"`` when the CPU has the
    ``avx512_bf16`` or ``amx_bf16`` flag, else ``"float32"`` (also when the flags cannot be
    read, e.g. not on Linux). ``True``/``"float16"``, ``"bfloat16"`` and ``False``/
    ``"float32"`` force ``"mixed_float16"``, ``"mixed_bfloat16"`` and ``"float32"``.

    Args:
        setting: ``"auto"``, ``True``, ``False``, ``"float16"``, ``"bfloat16"`` or
            ``"float32"``.
        cpu_flags: the CPU's flags (default: :func:`cpu_info`'s).
        gpus: compute capability ``(major, minor)`` per visible GPU, ``None`` where unknown
            (default: TensorFlow's device details; ``[]``: no GPU).

    Returns:
        ``(policy, reason)``: the policy name and one phrase saying why (for a forced
        choice: what ``"auto"`` would pick here).

    Raises:
        ValueError: ``setting`` is none of the six values.
    """
    gpus = _gpu_capabilities() if gpus is None else list(gpus)
    cpu_flags = cpu_info()["flags"] if cpu_flags is None else frozenset(cpu_flags)
    auto, why = _auto_precision(cpu_flags, gpus)
    if isinstance(setting, str) and setting == "auto":
        return auto, f'MIXED_PRECISION = "auto": {why}'
    if not is_precision_setting(setting):
        raise ValueError(
            f'MIXED_PRECISION = {setting!r}: must be "auto" (decide from the hardware), '
            'True or "float16", "bfloat16", or False or "float32"'
        )
    return PRECISION_POLICIES[setting], (
        f'MIXED_PRECISION = {setting!r} forces it; "auto" would pick {auto} here ({why})'
    )


def configure_precision(setting="auto", *, cpu_flags=None, gpus=None) -> str:
    """Set Keras' global dtype policy from ``MIXED_PRECISION``; call it before building models.

    The policy is :func:`choose_precision`'s (``cpu_flags``, ``gpus``: see there); one line
    says which and why, e.g. ``Precision: mixed_bfloat16 (MIXED_PRECISION = "auto": no GPU;
    the CPU has native bfloat16 (amx_bf16, avx512_bf16))``. Under a mixed policy layers
    compute in bfloat16 or float16 and keep float32 variables; the models' final softmax
    ``Dense`` is float32 (so are predictions and the loss), and under ``mixed_float16``
    ``model.compile`` wraps the optimizer in a ``LossScaleOptimizer`` (Keras'
    ``auto_scale_loss``). Models built earlier keep their policy. A forced choice the
    hardware does not compute natively warns (``UserWarning``): float16 without a GPU of
    compute capability 7.0+, bfloat16 without a GPU of 8.0+ or a CPU flag of
    :data:`BF16_CPU_FLAGS`; they run slower than float32 there.

    Returns:
        The policy name now in force: ``"float32"``, ``"mixed_bfloat16"`` or
        ``"mixed_float16"``.

    Raises:
        ValueError: ``setting`` is none of the values :func:`choose_precision` takes.
    """
    gpus = _gpu_capabilities() if gpus is None else list(gpus)
    cpu_flags = cpu_info()["flags"] if cpu_flags is None else frozenset(cpu_flags)
    policy, reason = choose_precision(setting, cpu_flags=cpu_flags, gpus=gpus)
    print(f"Precision: {policy} ({reason})")
    if not _native(policy, cpu_flags, gpus):
        where = "a CPU" if not gpus else "this GPU"
        warnings.warn(
            f"{policy} on {where} without native {policy.removeprefix('mixed_')} runs slower "
            'than float32, not faster. Set MIXED_PRECISION = "auto" here.',
            stacklevel=2,
        )
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _tf_config() -> tuple[int, str, int] | None:
    """``(workers, task type, task index)`` from ``$TF_CONFIG``; ``None`` if it is unset.

    ``workers`` counts the worker tasks, chief included. TensorFlow's
    ``TFConfigClusterResolver`` reads the same variable, but raises a bare ``JSONDecodeError``
    on a typo and accepts a task index outside the cluster; this says what to fix.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"TF_CONFIG is not valid multi-worker JSON ({type(exc).__name__}: {exc}). It must "
            'look like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}, with this machine\'s own index; '
            "unset TF_CONFIG to train on one machine"
        ) from None
    if task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG's task {task_type!r} #{task_index} is not in its cluster "
            f"{sorted(cluster)}; give each machine its own index into the worker list"
        )
    if "chief" not in cluster and task_type == "worker" and task_index == 0:
        task_type = "chief"  # worker 0 is the chief when the cluster names none
    return n, task_type, task_index


def is_chief() -> bool:
    """Whether this process writes the shared results of a run.

    True on one machine, and under a multi-worker ``$TF_CONFIG`` for the chief (the task
    of type ``"chief"``, else worker 0). Only the chief writes results files, figures and
    exported models; every worker keeps its own checkpoints (:func:`worker_run_dir`).
    """
    config = _tf_config()
    return config is None or config[1] == "chief"


def worker_run_dir(run_dir) -> Path:
    """The checkpoint folder of this worker: ``run_dir`` itself, or for a non-chief worker of a
    multi-worker run ``run_dir/worker-<index>``, so workers sharing a folder never write the
    same file and each resumes from its own checkpoints."""
    run_dir = Path(run_dir)
    return run_dir if is_chief() else run_dir / f"worker-{_tf_config()[2]}"


def to_numpy(value) -> np.ndarray:
    """A variable or tensor as a numpy array, also under ``tf.distribute`` strategies.

    ``int(optimizer.iterations)`` fails on a ``MirroredVariable``; this reads the value
    (all replicas of a mirrored variable hold the same), and the first local replica's
    value of a per-replica result.
    """
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    return np.asarray(tf.convert_to_tensor(getattr(value, "value", value)))


def any_worker(strategy, flag: bool) -> bool:
    """``flag`` or-ed over all workers of a multi-worker run (a collective: all must call it)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` with a ``reduce`` that Keras 3.15's ``fit`` can use.

    ``fit`` calls ``strategy.reduce`` on a whole ``(images, labels)`` tuple, and with
    ``axis=0`` on scalar losses and metrics; the multi-worker strategy refuses both
    ("Attempt to convert a value (PerReplica...)", "Invalid reduction dimension 0 for
    input with 0 dimensions"). This reduces each part of a structure separately, and a
    scalar across replicas (``axis=None``), which is what ``fit`` means there.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(v):
            local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            rank = tf.convert_to_tensor(local).shape.rank
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def _split_cpu(n: int) -> list[str]:
    """Split the CPU into ``n`` logical devices (before TensorFlow starts); their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
            )
        except RuntimeError:
            raise RuntimeError(
                f"CIFAR_CPU_DEVICES={n} must take effect before TensorFlow starts: restart "
                "the kernel (or process) and call choose_strategy() before any other "
                "TensorFlow work"
            ) from None
    return [f"/cpu:{i}" for i in range(n)]


def choose_strategy(cpu_devices: int | None = None):
    """The ``tf.distribute`` strategy for the devices and machines at hand.

    - ``MultiWorkerMirroredStrategy`` when ``$TF_CONFIG`` names two or more workers:
      synchronous data-parallel training across machines (all-reduce of gradients;
      every worker ends with the same weights).
    - ``MirroredStrategy`` over all visible GPUs when there are two or more.
    - ``MirroredStrategy`` over ``cpu_devices`` logical CPU devices when that is 2 or more
      and there is no GPU: the same code path as several GPUs, testable on a laptop
      (default: the environment variable ``CIFAR_CPU_DEVICES``, else 1).
    - Else ``OneDeviceStrategy`` on the one GPU, or on the CPU.

    Build and compile the model inside ``with strategy.scope():`` and batch the data at
    :func:`global_batch_size`. Call this first, before any other TensorFlow work:
    multi-worker collectives and logical CPU devices can only be set up at program start.

    Multi-worker launch: start the same notebook or script on every machine, each with
    ``TF_CONFIG`` listing all workers and its own index, e.g. on the first machine
    ``TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
    "task": {"type": "worker", "index": 0}}'`` and ``"index": 1`` on the second. Worker 0
    is the chief; all must reach each other on those ports, read the same data and use
    the same ``SEED``; training starts when all have joined. Only the chief writes the
    results file, figures and exported model (:func:`is_chief`); every worker writes its
    own checkpoints (:func:`worker_run_dir`) and resumes from them. Trainable weights stay
    identical on all workers; BatchNorm moving statistics are updated from each worker's
    own batches (Keras 3 does not all-reduce them), and :func:`train` gives every worker the
    chief's before each validation, so all workers validate and save the chief's weights.

    Raises:
        ValueError: ``$TF_CONFIG`` is set but is not valid JSON of that form, or this
            machine's task is not in its cluster; ``cpu_devices`` (or
            ``CIFAR_CPU_DEVICES``) is not an int >= 1.
        RuntimeError: logical CPU devices asked for after TensorFlow started.
    """
    if cpu_devices is None:
        raw = os.environ.get("CIFAR_CPU_DEVICES", "").strip() or "1"
        cpu_devices = int(raw) if raw.isdigit() else raw
    cpu_devices = check_positive_int(cpu_devices, "CIFAR_CPU_DEVICES / cpu_devices")
    config = _tf_config()
    cpus = _split_cpu(cpu_devices) if cpu_devices > 1 else []
    if config is not None and config[0] > 1:
        return _MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if cpus and not gpus:
        return tf.distribute.MirroredStrategy(cpus)
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def global_batch_size(per_replica: int, strategy) -> int:
    """The batch size to give ``tf.data``: ``per_replica`` times the strategy's replica count.

    A ``MirroredStrategy`` over 4 GPUs with ``BATCH_SIZE = 128`` takes batches of 512 and
    hands each GPU 128, so each GPU does the work it would do alone. Over several workers
    the count is the total over all machines; each worker batches at this global size
    and keeps its share (Keras shards the data by element).

    Raises:
        ValueError: ``per_replica`` is not a positive int.
    """
    return check_positive_int(per_replica, "per_replica batch size") * strategy.num_replicas_in_sync


def resolve_jit_compile(xla) -> bool:
    """The ``jit_compile`` value for ``model.compile`` from a notebook's ``XLA`` parameter.

    ``True``/``False`` force XLA on or off. ``"auto"`` (the notebooks' default) turns it
    on only when a GPU is visible: on this project's CPU benchmark XLA made training
    slower (see README, Performance), on GPUs it usually fuses BatchNorm/ReLU/pooling
    into the convolutions and helps.

    Raises:
        ValueError: ``xla`` is none of ``True``, ``False``, ``"auto"``.
    """
    if xla == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    if isinstance(xla, bool):
        return xla
    raise ValueError(f'XLA must be True, False or "auto", not {xla!r}')


def _col2im_input_grad(dy, kernel, input_shape, padding: str):
    """Input gradient of a stride-1 NHWC convolution: one matmul, then shifted adds.

    ``dy`` (B, OH, OW, Cout), ``kernel`` (KH, KW, Cin, Cout) -> (B, H, W, Cin).
    """
    kh, kw, cin, cout = kernel.shape
    oh, ow = dy.shape[1], dy.shape[2]
    cols = tf.matmul(
        tf.reshape(dy, (-1, cout)),
        tf.reshape(tf.transpose(kernel, (3, 0, 1, 2)), (cout, kh * kw * cin)),
    )
    cols = tf.reshape(cols, (-1, oh, ow, kh, kw, cin))
    dx = tf.add_n(
        [
            tf.pad(cols[:, :, :, i, j, :], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
            for i in range(kh)
            for j in range(kw)
        ]
    )
    if padding == "SAME":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        dx = dx[:, top : top + input_shape[1], left : left + input_shape[2], :]
    return dx


def _conv2d_col2im_backprop(x, kernel, padding: str):
    """``tf.nn.conv2d`` (stride 1, NHWC, ``"VALID"``/``"SAME"``) with the col2im input gradient."""

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = _col2im_input_grad(dy, kernel, x.shape, padding)
            dk = tf.compat.v1.nn.conv2d_backprop_filter(
                x, tf.shape(kernel), dy, (1, 1, 1, 1), padding
            )
            return dx, dk

        return tf.nn.conv2d(x, kernel, 1, padding), grad

    return conv(x, tf.cast(tf.convert_to_tensor(kernel), x.dtype))


def fast_small_conv_gradients(model, max_output_pixels: int = 16) -> list[str]:
    """On CPU, compute the input gradient of small-output convolutions with one matmul.

    TensorFlow's CPU kernel for a convolution's input gradient (``Conv2DBackpropInput``,
    oneDNN and Eigen alike, and XLA's) is pathologically slow when the output is a few
    pixels and the channels are many: for the simple network's last conv (4x4x256 ->
    2x2x512, batch 128) it took 1.0 s against 0.04 s for the same product done as one
    matmul, and it dominated the training step. For every stride-1, undilated,
    ungrouped ``Conv2D`` (nested models included) whose output has at most
    ``max_output_pixels`` pixels, this routes the input gradient through one
    ``tf.matmul`` of ``dy`` (B*OH*OW, Cout) by the kernel (Cout, KH*KW*Cin) followed by
    KH*KW shifted adds (col2im). The forward pass, the kernel gradient, the weights and
    the saved model are unchanged; only the arithmetic order of the input gradient
    differs (float round-off). Larger outputs keep TensorFlow's kernel, which is as
    fast there. Does nothing when a GPU is visible: GPUs use cuDNN's own kernels, and
    this path was measured on CPUs only.

    Call it on a built model, before ``compile``/``fit``. It changes the layer objects
    in place; ``keras.models.clone_model`` and reloading from ``.keras`` give plain
    layers again (call it again on those).

    Returns:
        Names of the layers switched (empty on GPU machines).
    """
    if tf.config.list_physical_devices("GPU"):
        return []
    switched = []
    for layer in leaf_layers(model):
        if (
            isinstance(layer, keras.layers.Conv2D)
            and not getattr(layer, "_col2im_native", None)
            and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1
            and layer.data_format == "channels_last"
            and tuple(layer.kernel_size) != (1, 1)
            and _output_pixels(layer) <= max_output_pixels
        ):
            layer._col2im_native = layer.convolution_op
            layer.convolution_op = _small_conv_op(layer, max_output_pixels)
            switched.append(layer.name)
    return switched


def _output_pixels(layer) -> float:
    """OH*OW of a layer's (single, static) output; infinity when unknown."""
    try:
        h, w = layer.output.shape[1:3]
    except (AttributeError, ValueError):
        return float("inf")
    return float("inf") if h is None or w is None else h * w


def _small_conv_op(layer, max_output_pixels: int):
    """A ``convolution_op`` for ``layer`` that takes the col2im path on small static outputs."""
    native, padding = layer._col2im_native, layer.padding.upper()
    kh, kw = layer.kernel_size

    def convolution_op(inputs, kernel):
        h, w = inputs.shape[1], inputs.shape[2]
        if h is None or w is None:
            return native(inputs, kernel)
        oh, ow = (h, w) if padding == "SAME" else (h - kh + 1, w - kw + 1)
        if oh * ow > max_output_pixels:
            return native(inputs, kernel)
        return _conv2d_col2im_backprop(inputs, kernel, padding)

    return convolution_op
