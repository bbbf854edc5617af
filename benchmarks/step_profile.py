"""Where a training step's time goes: ``throughput.py --profile``.

TensorFlow's profiler (``tf.profiler.experimental``) traces a few ``model.fit`` steps on the
notebook's own input pipeline; this module reads the trace (the XSpace protobuf it writes)
and shares each step's wall time out among kinds of operation. xprof / TensorBoard's profile
plugin would show the ops too, but it is not installed with the project, groups by TensorFlow
op type only (not by the Keras layer an op belongs to: BatchNorm and dropout are plain Mul,
Mean and Select ops in Keras 3), and does not say what the step waited on while no op ran.

How the time is shared: the ops of the step's threads (TensorFlow's inter-op pool, and the
step's wait for its next batch, but not the tf.data threads preparing batches ahead) are
laid on one time line; where two run at once, each gets half of that stretch; what no op
covers is "no op running" (Python, the executor, waiting). The shares
therefore sum to the traced steps' wall time by construction, and the traced step time can
be compared with the benchmark's own median step (both are printed).
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from pathlib import Path

import tensorflow as tf

#: The kinds of operation, in the order they are tried and shown.
KINDS = (
    "input pipeline", "conv gradients", "conv forward", "matmul", "casts", "optimizer update",
    "BatchNorm", "pooling", "dropout", "resize", "element-wise and other", "no op running",
)  # fmt: skip
#: Keras layer classes -> the kind their remaining (non-conv, non-matmul, non-cast) ops are.
LAYER_KINDS = {
    "BatchNormalization": "BatchNorm",
    "MaxPooling2D": "pooling",
    "AveragePooling2D": "pooling",
    "GlobalAveragePooling2D": "pooling",
    "GlobalMaxPooling2D": "pooling",
    "Dropout": "dropout",
    "SpatialDropout2D": "dropout",
    "Resizing": "resize",
}
_OPTIMIZER_SCOPES = {"adam", "sgd", "adamw", "rmsprop", "loss_scale_optimizer"}


def _layer_kinds(model) -> dict[str, str]:
    """Layer name -> its kind, for every layer (nested ones too) with a kind of its own."""
    from cifar_utils.models import leaf_layers

    return {
        layer.name: LAYER_KINDS[type(layer).__name__]
        for layer in leaf_layers(model)
        if type(layer).__name__ in LAYER_KINDS
    }


def op_kind(name: str, op_type: str, layers: dict[str, str]) -> str:
    """The kind (one of :data:`KINDS`) of the op ``name`` of type ``op_type``."""
    scopes = name.split("/")
    if op_type in ("IteratorGetNext", "IteratorGetNextSync", "IteratorGetNextAsOptional"):
        return "input pipeline"
    if "Backprop" in op_type or "small_conv_gradient" in scopes:
        return "conv gradients"
    if "Conv2D" in op_type or "DepthwiseConv2dNative" in op_type:
        return "conv forward"
    if "MatMul" in op_type or "Einsum" in op_type:
        return "matmul"
    if op_type in ("Cast", "_MklCast"):
        return "casts"
    if op_type.startswith("ResourceApply") or _OPTIMIZER_SCOPES & {s.lower() for s in scopes}:
        return "optimizer update"
    for scope in reversed(scopes):  # the innermost layer the op is in
        for candidate in (scope, re.sub(r"_\d+$", "", scope)):  # Keras' call scopes add _N
            if candidate in layers:
                return layers[candidate]
    if "Pool" in op_type:
        return "pooling"
    return "element-wise and other"


def _op_events(space, layers: dict[str, str]) -> tuple[list, tuple[float, float] | None]:
    """``[(start s, end s, kind)]`` of the ops on the step's threads, and the traced steps'
    window ``(first start, last end)`` in seconds (None if the trace holds no step)."""
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = plane.event_metadata
    ops, steps = [], []
    for line in plane.lines:
        thread = line.name.split("/")[0]
        base = line.timestamp_ns * 1e-9
        outer_end = -1.0
        for event in sorted(line.events, key=lambda e: e.offset_ps):
            name = names[event.metadata_id].name
            start = base + event.offset_ps * 1e-12
            end = start + event.duration_ps * 1e-12
            if thread == "python" and "step_on_" in name and "Execute" not in name:
                steps.append((start, end))
            if thread == "tf_data_iterator_get_next" and name == "IteratorGetNextOp::DoCompute":
                ops.append((start, end, "input pipeline"))  # the step waiting for its batch
                continue
            if thread != "tf_Compute" or ":" not in name or "::" in name or start < outer_end:
                continue  # not an op, or inside one already counted
            op, op_type = name.rsplit(":", 1)
            ops.append((start, end, op_kind(op, op_type, layers)))
            outer_end = end
    window = (min(s for s, _ in steps), max(e for _, e in steps)) if steps else None
    return ops, window


def share_time(ops: list, window: tuple[float, float]) -> dict[str, float]:
    """Seconds per kind inside ``window``: overlapping ops split their common stretch evenly,
    and stretches with no op go to "no op running". The values sum to the window's length."""
    marks = []
    for start, end, kind in ops:
        start, end = max(start, window[0]), min(end, window[1])
        if end > start:
            marks += [(start, 1, kind), (end, -1, kind)]
    marks.sort(key=lambda m: (m[0], m[1]))
    seconds = collections.Counter()
    active = collections.Counter()
    now = window[0]
    for at, change, kind in marks + [(window[1], 0, None)]:
        running = sum(active.values())
        for each, count in active.items():
            seconds[each] += (at - now) * count / running
        if not running:
            seconds["no op running"] += at - now
        now = at
        if kind is not None:
            active[kind] += change
            if not active[kind]:
                del active[kind]
    return {kind: seconds.get(kind, 0.0) for kind in KINDS}


def profile_fit(model, dataset, steps: int, warmup: int) -> dict:
    """Trace ``steps`` ``model.fit`` steps on ``dataset`` (after ``warmup`` untraced ones).

    Returns:
        ``{"step_seconds": traced wall time per step, "wall_step_seconds": the fit call's
        own wall time per step, "shares": {kind: fraction of the step}}``; the shares sum to 1.

    Raises:
        ValueError: the model is compiled with XLA (its ops are not traced one by one).
        RuntimeError: the trace holds no training step or no op in it.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    if model.jit_compile:
        raise ValueError("the profile needs XLA off: XLA-compiled steps show no ops one by one")
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0, shuffle=False)
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        begun = time.perf_counter()
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
        wall = time.perf_counter() - begun
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(folder).rglob("*.xplane.pb")).read_bytes())
    ops, window = _op_events(space, _layer_kinds(model))
    if window is None or not any(s < window[1] and e > window[0] for s, e, _ in ops):
        raise RuntimeError("the profiler's trace holds no training step, or no op in it")
    seconds = share_time(ops, window)
    total = window[1] - window[0]
    return {
        "step_seconds": total / steps,
        "wall_step_seconds": wall / steps,
        "shares": {kind: value / total for kind, value in seconds.items()},
    }
