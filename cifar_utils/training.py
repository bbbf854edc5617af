"""``train``: fitting with checkpoints, exact resume, run plans and a divergence guard; the
learning-rate schedule; joining training phases.

Used by each notebook's "Train" step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from . import checkpoints, files
from .checkpoints import (
    align_replicas,
    restore,
    save_checkpoint,
    seed_states,
    staged_path,
    write_log,
)
from .checks import check_positive_int
from .devices import PRECISION_POLICIES, any_worker, to_numpy, worker_run_dir
from .divergence import training_state_problem
from .errors import ResumeError, TrainingDiverged
from .models import layer_config, leaf_layers, parameter_counts
from .pipelines import steps_per_epoch


def load_best(model, run: dict) -> dict:
    """Load a finished phase's best checkpoint into ``model``, to start the next phase from.

    The transfer notebook fine-tunes from the head phase's best-validation epoch, not from
    its last as keras.io's fine-tuning recipe does: validation picks the weights everywhere
    in this project (the final model is the fine-tuning's best epoch too), and a later head
    epoch that validated worse has no claim to be the better start.

    Args:
        model: the model ``run`` trained (its weights are replaced).
        run: the state :func:`train` returned, with a ``best_epoch``.

    Returns:
        ``run`` with ``"next_phase_from": {"epoch": best_epoch, "weights": "best.weights.h5"}``,
        which :func:`join_runs` records as the next phase's ``starts_from``.

    Raises:
        FileNotFoundError: ``run["run_dir"]`` has no ``best.weights.h5``.
    """
    path = Path(run["run_dir"]) / "best.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(f"No best checkpoint {path}: train that phase first (cu.train)")
    model.load_weights(path)
    return {**run, "next_phase_from": {"epoch": run["best_epoch"], "weights": path.name}}


def join_runs(**runs) -> dict:
    """One run state from consecutive training phases, e.g. ``head=..., finetune=...``.

    Args:
        runs: phase name -> the state :func:`train` returned for it, in training order.

    Returns:
        ``{"epoch", "seconds"}`` summed over the phases; ``"history"``: metric -> values
        per epoch over all phases (NaN where a phase lacks the metric); ``"best"``,
        ``"best_epoch"`` (counted from the first phase's start), ``"params"`` and
        ``"run_dir"`` of the last phase (whose ``best.weights.h5`` is the final model);
        ``"phases"``: ``[{"name", "first_epoch" (1-based), "epochs", "trainable_params"},
        ...]`` for :func:`plot_history` and the results file; every phase after the first
        also has ``"starts_from": {"phase", "epoch" (1-based, within that phase),
        "weights"}``: the previous phase's best epoch if it went through
        :func:`load_best`, else its last (``train`` leaves the model there).
        :func:`evaluate_and_save` takes it as ``run``.
    """
    if not runs:
        raise ValueError("join_runs needs at least one phase, e.g. join_runs(head=run)")
    history, phases, done, previous = {}, [], 0, None
    for name, run in runs.items():
        trainable = run["params"]["trainable"] if "params" in run else None
        phases.append(
            {"name": name, "first_epoch": done + 1, "epochs": run["epoch"],
             "trainable_params": trainable}
        )  # fmt: skip
        if previous is not None:
            ended = {"epoch": previous[1]["epoch"], "weights": "last.weights.h5"}
            phases[-1]["starts_from"] = {
                "phase": previous[0],
                **previous[1].get("next_phase_from", ended),
            }
        for key in set(history) | set(run["history"]):
            values = list(run["history"].get(key, []))
            history.setdefault(key, [np.nan] * done)
            history[key] += values + [np.nan] * (run["epoch"] - len(values))
        done += run["epoch"]
        previous = (name, run)
    last = list(runs.values())[-1]
    return {
        "epoch": done,
        "seconds": sum(r["seconds"] for r in runs.values()),
        "history": history,
        "best": last.get("best"),
        "best_epoch": done - last["epoch"] + last["best_epoch"] if "best_epoch" in last else None,
        "params": last.get("params"),
        "run_dir": last.get("run_dir"),
        "phases": phases,
    }


def _mode(monitor: str, mode: str) -> str:
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f'mode must be "auto", "min" or "max", not {mode!r}')
    if "loss" in monitor or "error" in monitor:
        return "min"
    if "acc" in monitor or "top" in monitor or "auc" in monitor:
        return "max"
    raise ValueError(
        f"Cannot tell whether a higher or lower {monitor!r} is better: pass mode='min' or 'max'"
    )


class _RunKeeper(keras.callbacks.Callback):
    """Guards the run and commits each good epoch (checkpoints, then ``state.json``).

    Replicas are aligned (:func:`align_replicas`) at each epoch's start and before its
    validation, so the validation numbers (the history, ``log.csv``, the best epoch) are those
    of the weights the epoch's checkpoints save, under every strategy.

    Every ``check_every`` batches and at each epoch's end, before anything is written: every
    model and optimizer variable must be finite and the model's outputs on a fixed probe
    batch must be probabilities; with the loss checked at every batch. Otherwise training
    stops and nothing of that epoch is written.
    """

    def __init__(self, run_dir, state, monitor, mode, probe, check_every):
        super().__init__()
        self.run_dir, self.state, self.monitor, self.mode = run_dir, state, monitor, mode
        self.probe, self.check_every = probe, check_every
        self.diverged = None
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._epoch = epoch + 1
        align_replicas(self.model)

    def on_test_begin(self, logs=None):
        """Before ``fit`` validates: every replica gets the weights the checkpoint will hold."""
        align_replicas(self.model)

    def _stop(self, where: str, what: str) -> None:
        self.diverged = (self._epoch, where, what)
        self.model.stop_training = True

    def _check_state(self, where: str) -> None:
        """Stop if a variable is non-finite or the probe's outputs are no distribution."""
        what = training_state_problem(self.model, self.probe)  # slots may be new
        if any_worker(self.model.distribute_strategy, what is not None) and not what:
            what = "another worker's weights or outputs hold NaN or inf"
        if what:
            self._stop(where, what)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self._stop(f"batch {batch + 1}", f"loss became {float(loss)}")
        elif self.check_every and (batch + 1) % self.check_every == 0:
            self._check_state(f"batch {batch + 1} (state check)")

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        if logs is not None:  # the dict the later callbacks get: log.csv gets the rate too
            logs.setdefault("learning_rate", float(to_numpy(opt.learning_rate)))
        logs = {k: float(v) for k, v in (logs or {}).items()}
        bad = [k for k in ("loss", "val_loss") if k in logs and not np.isfinite(logs[k])]
        if bad and not self.diverged:
            self._stop(f"the end of the epoch ({bad[0]})", f"loss became {logs[bad[0]]}")
        if not self.diverged:
            self._check_state("the end of the epoch")
        if self.diverged:
            return  # nothing of this epoch is written
        state = self.state
        for key, value in logs.items():
            state["history"].setdefault(key, []).append(value)
        state["seconds"] += time.perf_counter() - self._t0
        state["epoch"], state["step"] = epoch + 1, int(to_numpy(opt.iterations))
        state["seed_states"] = [to_numpy(v).tolist() for v in seed_states(self.model)]
        score = logs.get(self.monitor)
        best = state.get("best")
        if score is not None and (
            best is None or (score < best if self.mode == "min" else score > best)
        ):
            state["best"], state["best_epoch"] = score, epoch + 1
            save_checkpoint(self.model, staged_path(self.run_dir, epoch + 1, "best.weights.h5"))
        elif epoch == 0:  # a fresh run: a best checkpoint left by an older run is not ours
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / "best.weights.h5").unlink()
        save_checkpoint(self.model, staged_path(self.run_dir, epoch + 1, "last.weights.h5"))
        files.write_json(self.run_dir / "state.json", state)  # the commit point
        checkpoints.settle_checkpoints(self.run_dir, epoch + 1)


class _CommittedCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger, writing only the epochs ``keeper`` committed.

    A fresh log replaces an old one only when its first epoch commits, like the
    checkpoints, so a run that diverges at once leaves the older run's log as it was.
    """

    def __init__(self, keeper: _RunKeeper, filename: str, append: bool):
        super().__init__(filename, append=append)
        self.keeper, self._opened = keeper, False

    def on_train_begin(self, logs=None):
        pass  # opened at the first committed epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.keeper.diverged:
            return
        if not self._opened:
            super().on_train_begin()
            self._opened = True
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._opened:
            super().on_train_end(logs)


def top_k_hits(labels, scores, k: int):
    """1.0 where the label is among the ``k`` highest scores of its row, else 0.0.

    ``labels``: int ``(N,)`` class indices; ``scores``: float ``(N, C)``; returns float32
    ``(N,)`` (a Keras tensor; numpy arrays are accepted); a row holding NaN or inf is never
    a hit (comparisons with NaN are all false). Equal scores rank by class index,
    lower first, as ``argmax`` (Keras' ``accuracy``) ranks them: the one rule for ties of
    every metric here (:func:`cifar_utils.evaluation.top_k_accuracy`, the compiled
    ``top5_accuracy``). Keras' ``TopKCategoricalAccuracy`` (``in_top_k``) counts every class
    tied at the k-th place instead, and scikit-learn's ``top_k_accuracy_score`` ranks ties
    the other way, so a saturated softmax (exact zeros) would score differently in the
    history, the results file and the per-class figures.
    """
    label = keras.ops.cast(labels, "int32")[:, None]
    p_true = keras.ops.take_along_axis(scores, label, axis=-1)
    index = keras.ops.arange(keras.ops.shape(scores)[-1], dtype="int32")[None, :]
    ahead = (scores > p_true) | ((scores == p_true) & (index < label))
    hit = keras.ops.sum(keras.ops.cast(ahead, "int32"), axis=-1) < k
    finite = keras.ops.all(keras.ops.isfinite(scores), axis=-1)  # NaN compares as False
    return keras.ops.cast(hit & finite, "float32")


@keras.saving.register_keras_serializable(package="cifar_utils")
def top5_hits(y_true, y_pred):
    """:func:`top_k_hits` with ``k=5`` for ``model.compile``: one-hot ``y_true`` ``(N, C)``."""
    return top_k_hits(keras.ops.argmax(y_true, axis=-1), y_pred, 5)


def compile_metrics() -> list:
    """Fresh metric objects for ``model.compile``: top-1 ``accuracy`` and ``top5_accuracy``.

    Both break ties as the results files do (:func:`top5_hits`), so the history's
    validation numbers are those :func:`evaluate_and_save` finds for the same weights.
    """
    return ["accuracy", keras.metrics.MeanMetricWrapper(top5_hits, name="top5_accuracy")]


def _flatten(obj, prefix: str = "") -> dict:
    """``{"a.b": value}`` for nested dicts (JSON-normalised), for comparing run plans."""
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
    """``{"NNN Class": digest}`` of what each layer computes (nested models walked).

    The digest covers the layer's configuration (rates, activations, sizes, ...) without
    its name, dtype policy or trainable flag, so the same network built again matches.
    """
    out = {}
    for layer in leaf_layers(model):
        blob = json.dumps(layer_config(layer), sort_keys=True, default=str).encode()
        out[f"{len(out):03d} {type(layer).__name__}"] = hashlib.md5(blob).hexdigest()[:8]
    return out


def _weights_digest(model) -> str:
    digest = hashlib.md5()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(to_numpy(variable)).tobytes())
    return digest.hexdigest()[:12]


def run_plan(model, train_ds, plan: dict | None = None, **training) -> dict:
    """What a checkpoint of ``model`` trained on ``train_ds`` means, as JSON-able dict.

    ``model``: its parameter counts, what each layer computes (:func:`_layers_plan`:
    rates, activations, sizes), its loss, a digest of the weights it starts from
    (initialisation, or an earlier phase's result) and its dtype policy (the precision it
    was built under: ``"float32"``, ``"mixed_bfloat16"``, ``"mixed_float16"``); its
    optimizer and learning-rate schedule (class and config); the data pipeline's ``plan``
    from :func:`make_dataset` (data fingerprint, image count, batch size, seed,
    augmentation); ``training``: how :func:`train` runs (monitor, mode, epoch offset); and
    ``plan``: what the code cannot see (e.g. ``{"weights": "imagenet", "image_size":
    224}``), whose keys replace those above.
    """
    loss = (
        model.loss
        if isinstance(model.loss, str | type(None))
        else (keras.saving.serialize_keras_object(model.loss))
    )
    described = {
        "model": {
            "params": parameter_counts(model),
            "layers": _layers_plan(model),
            "loss": loss,
            "start_weights": _weights_digest(model),
            "dtype_policy": model.dtype_policy.name,
        },
        "optimizer": _optimizer_plan(model.optimizer),
        "data": getattr(train_ds, "plan", None),
        "training": training,
        **(plan or {}),
    }
    return json.loads(json.dumps(described, default=str))


#: Plan entries that follow from the epoch count: allowed to differ when ``epochs`` does.
_REPLANNED_WITH_EPOCHS = ("optimizer.learning_rate.config.decay_rate",)


def train(
    model,
    train_ds,
    val_ds,
    *,
    epochs: int,
    run_dir,
    resume: bool = True,
    monitor: str = "val_accuracy",
    mode: str = "auto",
    callbacks=(),
    tensorboard: bool = False,
    plan: dict | None = None,
    check_every: int = 50,
    epoch_offset: int = 0,
    verbose="auto",
) -> dict:
    """Fit a compiled ``model`` with checkpoints, a CSV log, divergence guards and resume.

    Writes into ``run_dir`` (under a multi-worker run, workers other than the chief write
    into ``run_dir/worker-<index>``, see :func:`worker_run_dir`): ``last.weights.h5``
    (weights and optimizer state), ``best.weights.h5`` (best ``monitor`` so far),
    ``state.json`` (history, step, plan, random-layer states) and ``log.csv`` (one row per
    epoch, with the learning rate; see :func:`read_log`). An epoch commits together: its
    checkpoints are staged, ``state.json`` is written (the commit point), then they are
    moved into place; a crash in between is settled at the next start, so a best
    checkpoint never comes from an epoch the history lacks. ``tensorboard=True`` adds
    TensorBoard logs under ``run_dir/tensorboard``.

    Resume (``resume=True`` and a ``state.json``): weights, optimizer state (so its step
    and learning-rate schedule), history and the random layers' states are restored and
    training continues at the next epoch. With ``train_ds`` from :func:`make_dataset` the
    resumed epochs get the batches, order and augmentation an uninterrupted run would
    have, so (with :func:`seed_everything`'s op determinism) an interrupted and resumed
    run ends with the same weights and history as one that never stopped. A plain
    ``tf.data.Dataset`` is iterated anew each epoch instead (its epochs restart).

    The run's plan (:func:`run_plan`: model and the weights it starts from, optimizer and
    schedule, data pipeline, monitor, ``epoch_offset`` and ``plan``) is stored; resuming a
    run with another plan is refused with the entries that differ. Another ``epochs``
    continues with a warning: a schedule built from the epoch count (e.g.
    :func:`exponential_decay`) is the new one from the restored step on, and the warning
    gives the rate there under both plans. A run that already has ``epochs`` epochs trains
    nothing.

    ``epoch_offset``: epochs that earlier phases trained on the same ``train_ds`` (e.g. the
    transfer notebook's head phase): this run's epoch ``e`` gets the data of epoch
    ``epoch_offset + e``, so phases never replay each other's batches.

    Divergence: the loss is checked after every batch; every ``check_every`` batches
    (0: only at epoch ends) and at each epoch's end all model and optimizer variables must
    be finite and the model's outputs on a probe batch (the first 8 validation images)
    must be probabilities. The best checkpoint follows ``monitor`` with ``mode``: "auto"
    (lower is better for losses, higher for accuracies), "min" or "max".

    Returns:
        The run state: ``{"epoch", "history" (metric -> list per epoch, all epochs, with
        ``learning_rate`` at each epoch's end), "seconds" (training wall time, all
        sessions), "best", "best_epoch", "initial_epoch" (where this call started),
        "step" (optimizer steps so far), "params" (counts while training, e.g. the
        trainable ones of a phase), "run_dir", "plan"}``.

    Raises:
        TrainingDiverged: NaN/inf in the loss, a variable, or outputs that are no
            probabilities; the last good checkpoint is kept and nothing of that epoch saved.
        ResumeError: (a ValueError) the saved checkpoint does not fit the model, holds
            NaN/inf, or its plan differs.
        ValueError: ``epochs`` < 1; ``mode`` unknown or undecidable for ``monitor``; the
            model's output is not float32 (a mixed-precision model whose last layer lacks
            ``dtype="float32"``).
    """
    check_positive_int(epochs, "epochs")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("compile the model (optimizer, loss, metrics) before cu.train")
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in getattr(model, "outputs", [])]
    if any(d != "float32" for d in dtypes):
        raise ValueError(
            f"{model.name}'s output is {dtypes[0]} (its last layer computes under "
            f'{model.layers[-1].dtype_policy.name}): build that layer with dtype="float32", '
            "so the softmax, the loss and the divergence guard's checks stay float32 (the "
            "notebooks' models do)"
        )
    mode = _mode(monitor, mode)
    run_dir = worker_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    full_plan = run_plan(
        model, train_ds, plan, monitor=monitor, mode=mode, epoch_offset=epoch_offset
    )
    state = {"epoch": 0, "history": {}, "seconds": 0.0, "plan": full_plan, "epochs": epochs}
    if resume and state_path.exists():
        state = _resume(model, run_dir, json.loads(state_path.read_text()), full_plan, epochs)
    else:
        # staged files of an older run that never committed:
        checkpoints.settle_checkpoints(run_dir, -1)
        if state_path.exists():
            old_epoch = json.loads(state_path.read_text()).get("epoch", "?")
            print(
                f"Starting over in {run_dir} (resume=False): its run of {old_epoch} epoch(s) "
                "stays until this run's first epoch commits, then is replaced."
            )
    state.update(
        initial_epoch=state["epoch"],
        monitor=monitor,
        mode=mode,
        params=parameter_counts(model),
        run_dir=str(run_dir),
    )
    probe = None if val_ds is None else next(iter(val_ds.map(lambda x, _: x[:8]).take(1)), None)
    keeper = _RunKeeper(run_dir, state, monitor, mode, probe, check_every)
    if state["epoch"] < epochs:
        csv = _CommittedCSVLogger(keeper, str(run_dir / "log.csv"), append=state["epoch"] > 0)
        if tensorboard:
            if state["epoch"] == 0:  # a fresh run replaces old logs, like its checkpoints
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            callbacks = [*callbacks, keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]
        exact = hasattr(train_ds, "from_epoch")
        model.fit(
            train_ds.from_epoch(epoch_offset + state["epoch"], epoch_offset + epochs)
            if exact
            else train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=state["epoch"],
            steps_per_epoch=train_ds.steps_per_epoch if exact else None,
            callbacks=[keeper, csv, *callbacks],
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
        )
    if keeper.diverged:
        epoch, where, what = keeper.diverged
        raise TrainingDiverged(
            f"Training diverged: {what} at epoch {epoch}, {where}. Lower the learning rate "
            f"or check the data. Nothing of epoch {epoch} was saved; the last good checkpoint "
            f"is {run_dir / 'last.weights.h5'}"
            + (
                f" (epoch {state['epoch']})"
                if state["epoch"]
                else " (none: it diverged in epoch 1)"
            )
        )
    return state


def _resume(model, run_dir: Path, saved: dict, plan: dict, epochs: int) -> dict:
    """The saved run state of ``run_dir``, restored into ``model``, or why it cannot be."""
    checkpoints.settle_checkpoints(run_dir, saved["epoch"])
    old, new = _flatten(saved.get("plan")), _flatten(plan)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    replanned = saved.get("epochs", epochs) != epochs
    if replanned:
        differ = [k for k in differ if k not in _REPLANNED_WITH_EPOCHS]
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in differ[:6])
        raise ResumeError(
            f"{run_dir} holds a run with another plan: {shown}"
            + (f" (and {len(differ) - 6} more)" if len(differ) > 6 else "")
            + (
                " (the weights this run starts from differ from that run's: e.g. an earlier "
                "phase trained for another number of epochs, or another SEED)"
                if "model.start_weights" in differ
                else ""
            )
            + (
                _precision_hint(old.get("model.dtype_policy"))
                if "model.dtype_policy" in differ
                else ""
            )
            + ". Its checkpoints mean something else. Start over with RESUME=False, or use "
            "another OUTPUT_DIR to keep that run"
        )
    restore(model, run_dir)
    step = int(to_numpy(model.optimizer.iterations))
    if "step" in saved and saved["step"] != step:
        raise ResumeError(
            f"{run_dir}: last.weights.h5 is at optimizer step {step} but state.json at step "
            f"{saved['step']}: they do not belong together (a file copied or restored by hand?). "
            "Start over with RESUME=False, or put back the pair written together"
        )
    if replanned:
        warnings.warn(
            f"{run_dir} was planned for {saved.get('epochs')} epochs, this run asks for "
            f"{epochs}: continuing." + _schedule_change(model, saved.get("plan"), step),
            stacklevel=3,
        )
    seed_vars = seed_states(model)
    if len(saved.get("seed_states", [])) == len(seed_vars):
        for var, value in zip(seed_vars, saved.get("seed_states", []), strict=True):
            var.assign(np.asarray(value, dtype=str(var.dtype)))
    write_log(run_dir, saved["history"])  # log.csv as the committed history has it
    print(f"Resuming from {run_dir} after epoch {saved['epoch']}.")
    if saved["epoch"] >= epochs:
        print(
            f"That run already has {saved['epoch']} epoch(s), EPOCHS={epochs}: nothing to "
            "train. Set RESUME=False (or another OUTPUT_DIR) to train again."
        )
    return {**saved, "epochs": epochs, "plan": plan}


def _precision_hint(then: str | None) -> str:
    """Why a resume under another dtype policy is refused, and how to resume that run."""
    setting = {p: n for n, p in PRECISION_POLICIES.items() if isinstance(n, str)}.get(then)
    if setting is None:
        return " (that run was planned before runs recorded their precision)"
    return (
        f" (the precision differs: that run trained under {then}; set "
        f'MIXED_PRECISION = "{setting}" to resume it)'
    )


def _schedule_change(model, saved_plan, step: int) -> str:
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


def exponential_decay(
    train_size: int,
    batch_size: int,
    epochs: int,
    initial_lr: float = 0.1,
    final_lr: float = 1e-3,
):
    """The seed's ``ExponentialDecay`` schedule, planned so training ends at ``final_lr``.

    Keras schedules count optimizer steps (batches), not epochs. Here
    ``decay_steps = steps_per_epoch(train_size, batch_size)`` and
    ``decay_rate = (final_lr / initial_lr) ** (1 / epochs)``, without staircase: the
    rate is a per-epoch factor applied smoothly at every step, so step ``s`` trains at
    ``initial_lr * decay_rate ** (s / decay_steps)``, epoch ``e`` (1-based) starts at
    ``initial_lr * decay_rate ** (e - 1)`` and the last step is at ``final_lr``. The
    defaults take SGD from 0.1 (the seed's rate) to 0.001, two decades, the range of the
    classic step schedules for VGG-style nets on CIFAR; e.g. 100 epochs of 45,000 images at
    batch 128: 352 steps per epoch, decay_rate 0.955 per epoch, the last epoch at
    about 0.00105. Use it as ``keras.optimizers.SGD(schedule, momentum=0.9)``; the step
    counter is part of the optimizer state that :func:`train` checkpoints, so a resumed
    run continues the schedule. With a new ``epochs`` it is another schedule (another
    ``decay_rate``), which takes over at the restored step: the rate jumps to what the new
    plan gives there (:func:`train` warns with both rates).

    Returns:
        ``keras.optimizers.schedules.ExponentialDecay`` (float32 learning rates).

    Raises:
        ValueError: ``epochs`` < 1, or rates not with ``0 < final_lr <= initial_lr``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, not {epochs}")
    if not 0 < final_lr <= initial_lr:
        raise ValueError(
            f"need 0 < final_lr <= initial_lr for a decay, got final_lr={final_lr}, "
            f"initial_lr={initial_lr}"
        )
    return keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=initial_lr,
        decay_steps=steps_per_epoch(train_size, batch_size),
        decay_rate=(final_lr / initial_lr) ** (1.0 / epochs),
        staircase=False,
    )
