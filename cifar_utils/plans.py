"""Run plans: what a checkpoint means (model, starting weights, optimizer, data, settings), and
in words how two plans differ, for refusing a resume that would mix them.
"""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np

from .devices import to_numpy
from .models import layer_config, leaf_layers, parameter_counts
from .numerics import PRECISION_POLICIES
from .pipelines import TrainingData

#: Plan entries that follow from the epoch count: allowed to differ when ``epochs`` does.
REPLANNED_WITH_EPOCHS = ("optimizer.learning_rate.config.decay_rate",)


def _flatten(obj, prefix: str = "") -> dict:
    """``{"a.b": value}`` for nested dicts, for comparing run plans."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _optimizer_plan(optimizer) -> dict:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under mixed precision
    config = {k: v for k, v in inner.get_config().items() if k != "name"}
    return {"class": type(inner).__name__, **config}


def _layers_plan(model) -> dict:
    """``{"NNN Class": digest}`` of each layer's config, without name, dtype policy, trainable."""
    out = {}
    for layer in leaf_layers(model):
        blob = json.dumps(layer_config(layer), sort_keys=True, default=str).encode()
        out[f"{len(out):03d} {type(layer).__name__}"] = hashlib.md5(blob).hexdigest()[:8]
    return out


def network_digest(model) -> str:
    """12 hex digits naming ``model``'s architecture: its layers' configs, in order."""
    blob = json.dumps(_layers_plan(model), sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest()[:12]


def _weights_digest(model) -> str:
    digest = hashlib.md5()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(to_numpy(variable)).tobytes())
    return digest.hexdigest()[:12]


def run_plan(model, train_ds, plan: dict | None = None, **training) -> dict:
    """What a checkpoint of ``model`` trained on ``train_ds`` means, as a JSON-able dict.

    Args:
        model: compiled; its counts, layers, loss, starting-weights digest, dtype policy and
            optimizer config are recorded.
        train_ds: a :class:`TrainingData` (its ``plan``) or a plain dataset (``data``: None).
        plan: what the code cannot see (e.g. ``{"weights": "imagenet"}``); its keys win.
        training: how :func:`train` runs (monitor, mode, epoch offset).

    Returns:
        ``{"model", "optimizer", "data", "training", **plan}``.
    """
    loss = model.loss
    if not isinstance(loss, str | type(None)):
        loss = keras.saving.serialize_keras_object(loss)
    described = {
        "model": {
            "params": parameter_counts(model),
            "layers": _layers_plan(model),
            "loss": loss,
            "start_weights": _weights_digest(model),
            "dtype_policy": model.dtype_policy.name,
        },
        "optimizer": _optimizer_plan(model.optimizer),
        "data": _data_plan(train_ds),
        "training": training,
        **(plan or {}),
    }
    return json.loads(json.dumps(described, default=str))


def _data_plan(train_ds) -> dict | None:
    """The plan of the :class:`TrainingData` ``train_ds`` is, or was transformed from
    (``"transformed": True``), or None: a resume can then still check the data under it."""
    pending = [train_ds]
    while pending:
        ds = pending.pop()
        if isinstance(ds, TrainingData):
            return ds.plan if ds is train_ds else {**ds.plan, "transformed": True}
        inputs = getattr(ds, "_inputs", None)  # tf.data has no public way to walk a pipeline
        pending += list(inputs()) if callable(inputs) else []
    return None


def plan_differences(old: dict | None, new: dict, replanned: bool) -> str | None:
    """How plan ``old`` differs from ``new``, in words, or ``None``; ``replanned``: new epochs."""
    old, new = _flatten(old), _flatten(new)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    differ = [k for k in differ if not (replanned and k in REPLANNED_WITH_EPOCHS)]
    if not differ:
        return None
    shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in differ[:6])
    if len(differ) > 6:
        shown += f" (and {len(differ) - 6} more)"
    if "model.start_weights" in differ:
        shown += (
            " (the weights this run starts from differ from that run's: e.g. an earlier "
            "phase trained for another number of epochs, or another SEED)"
        )
    if "model.dtype_policy" in differ:
        shown += _precision_hint(old.get("model.dtype_policy"))
    return shown


def _precision_hint(then: str | None) -> str:
    """Why a resume under another dtype policy is refused, and how to resume that run."""
    setting = {p: n for n, p in PRECISION_POLICIES.items() if isinstance(n, str)}.get(then)
    if setting is None:
        return " (that run was planned before runs recorded their precision)"
    return (
        f" (the precision differs: that run trained under {then}; set "
        f'MIXED_PRECISION = "{setting}" to resume it)'
    )


def schedule_change(model, saved_plan, step: int) -> str:
    """In words: the learning rate at ``step`` under the saved plan's schedule and the new one."""
    config = ((saved_plan or {}).get("optimizer") or {}).get("learning_rate")
    if not isinstance(config, dict):
        return ""  # a constant rate: the epoch count does not change it
    before = float(keras.saving.deserialize_keras_object(config)(step))
    now = float(to_numpy(model.optimizer.learning_rate))
    return (
        " The learning-rate schedule is the one planned for the new epoch count from here "
        f"on: at the restored step {step} it gives {now:.4g}, where the old plan gave "
        f"{before:.4g}."
    )
