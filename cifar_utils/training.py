"""``train`` (``model.fit``, checkpoints, exact resume, divergence guard), schedule, phases."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import warnings
from pathlib import Path

import keras
import numpy as np

from . import checkpoints
from .callbacks import (
    AlignReplicas,
    CommittedCSVLogger,
    DivergenceGuard,
    EpochCommit,
    LogLearningRate,
)
from .checkpoints import RunState, read_state, restore, seed_states, write_log
from .checks import check_positive_int
from .devices import to_numpy, worker_run_dir
from .errors import ResumeError, TrainingDiverged
from .models import parameter_counts
from .pipelines import TrainingData, steps_per_epoch
from .plans import plan_differences, run_plan, schedule_change


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`, shown by IPython and papermill as one line."""

    def __init__(self, epoch: int, run_dir: Path):
        if epoch:
            said = (f"Training stopped after epoch {epoch} (the last epoch saved in {run_dir}); "
                    "run the same command again to resume it.")  # fmt: skip
        else:
            said = ("Training stopped before its first epoch ended: nothing was saved yet; run "
                    "the same command again to start it.")  # fmt: skip
        super().__init__(said)

    def _render_traceback_(self) -> list[str]:
        return [f"TrainingInterrupted: {self}"]


# fmt: off
def train(model, train_ds, val_ds, *, epochs: int, run_dir, resume: bool = True,
          monitor: str = "val_accuracy", mode: str = "auto", callbacks=(),
          tensorboard: bool = False, plan: dict | None = None, check_every: int = 50,
          epoch_offset: int = 0, verbose="auto") -> RunState:
    # fmt: on
    """``model.fit`` with per-epoch checkpoints, a CSV log, a divergence guard and resume.

    Args:
        model: compiled, with float32 outputs. val_ds: validation batches or ``None``.
        train_ds: a :class:`TrainingData` (exact resume) or a plain ``tf.data.Dataset``.
        epochs: the epoch to end after (int >= 1). run_dir: the folder of the run's files.
        monitor, mode: the metric picking ``best.weights.h5``; ``"auto"``/``"min"``/``"max"``.
        plan: what the code cannot see (:func:`run_plan`). check_every: batches between full
            divergence checks (0: epoch ends). epoch_offset: epochs earlier phases took.

    Returns:
        The :class:`RunState` after the last committed epoch.

    Raises:
        TrainingDiverged, TrainingInterrupted (Ctrl-C: resumable), ResumeError (another plan
        or a bad checkpoint), ValueError (bad ``epochs`` or ``mode``; model not ready).
    """
    _check_model(model, epochs)
    mode = _mode(monitor, mode)
    run_dir = worker_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    full_plan = run_plan(
        model, train_ds, plan, monitor=monitor, mode=mode, epoch_offset=epoch_offset
    )
    state = RunState(str(run_dir), epochs, full_plan, monitor, mode)
    state = _resume(model, state) if resume and (run_dir / "state.json").exists() else _fresh(state)
    state.initial_epoch, state.params = state.epoch, parameter_counts(model)
    guard = DivergenceGuard(_probe(val_ds), check_every)
    if state.epoch < epochs:
        data, steps = _epochs(train_ds, epoch_offset + state.epoch, epoch_offset + epochs)
        log = CommittedCSVLogger(state, str(run_dir / "log.csv"), append=state.epoch > 0)
        keep = [LogLearningRate(), AlignReplicas(), guard, EpochCommit(state, guard), log]
        try:
            model.fit(
                data, validation_data=val_ds, epochs=epochs, initial_epoch=state.epoch,
                steps_per_epoch=steps, verbose=verbose, shuffle=False,  # tf.data shuffles
                callbacks=[*keep, *callbacks, *_tensorboard(run_dir, state.epoch, tensorboard)],
            )  # fmt: skip
        except KeyboardInterrupt:
            stopped = TrainingInterrupted(state.epoch, run_dir)
            # papermill stops on the same Ctrl-C before this reaches the notebook's output:
            # the kernel's own stderr is the terminal it was started from.
            print(stopped, file=sys.__stderr__, flush=True)
            raise stopped from None
    if guard.diverged:
        raise _diverged(*guard.diverged, state)
    return state


def _check_model(model, epochs: int) -> None:
    """Refuse a bad ``epochs``, an uncompiled model, or one whose output is not float32."""
    check_positive_int(epochs, "epochs")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("compile the model (optimizer, loss, metrics) before cu.train")
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in getattr(model, "outputs", [])]
    if any(d != "float32" for d in dtypes):
        raise ValueError(  # the softmax, the loss and the divergence checks stay float32
            f"{model.name}'s output is {dtypes[0]} (its last layer computes under "
            f'{model.layers[-1].dtype_policy.name}): build that layer with dtype="float32", '
            "as the notebooks' models do"
        )


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


def _probe(val_ds):
    """The first 8 validation images, whose outputs the divergence guard checks."""
    return None if val_ds is None else next(iter(val_ds.map(lambda x, _: x[:8]).take(1)), None)


def _epochs(train_ds, first: int, last: int):
    """``(data, steps_per_epoch)`` for ``model.fit`` to train epochs ``first`` to ``last - 1``."""
    if isinstance(train_ds, TrainingData):
        return train_ds.from_epoch(first, last), train_ds.steps_per_epoch
    if first:
        warnings.warn(
            "train_ds is a plain tf.data.Dataset (a transformation of make_dataset's output "
            "returns one), so the resumed epochs restart its iteration instead of continuing "
            "the batches of an uninterrupted run, and what the transformation does is not "
            "checked against the run's. Pass make_dataset's TrainingData for exact resume.",
            stacklevel=3,
        )
    return train_ds, None


def _tensorboard(run_dir: Path, epoch: int, wanted: bool) -> list:
    if not wanted:
        return []
    if epoch == 0:  # a fresh run replaces old logs, like its checkpoints
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    return [keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]


def _diverged(epoch: int, where: str, what: str, state: RunState) -> TrainingDiverged:
    last = f" (epoch {state.epoch})" if state.epoch else " (none: it diverged in epoch 1)"
    return TrainingDiverged(
        f"Training diverged: {what} at epoch {epoch}, {where}. Lower the learning rate or "
        f"check the data. Nothing of epoch {epoch} was saved; the last good checkpoint is "
        f"{Path(state.run_dir) / 'last.weights.h5'}{last}"
    )


def _fresh(state: RunState) -> RunState:
    """``state`` for a run starting over; staged files of an older run are removed."""
    run_dir = Path(state.run_dir)
    checkpoints.settle_checkpoints(run_dir, -1)
    if (run_dir / "state.json").exists():
        old = read_state(run_dir).epoch
        print(
            f"Starting over in {run_dir} (resume=False): its run of {old} epoch(s) "
            "stays until this run's first epoch commits, then is replaced."
        )
    return state


def _resume(model, new: RunState) -> RunState:
    """The run saved in ``new.run_dir``, restored into ``model``; ResumeError if it cannot be."""
    run_dir = Path(new.run_dir)
    saved = read_state(run_dir)
    checkpoints.settle_checkpoints(run_dir, saved.epoch)
    replanned = saved.epochs != new.epochs
    differ = plan_differences(saved.plan, new.plan, replanned)
    if differ:
        raise ResumeError(
            f"{run_dir} holds a run with another plan: {differ}. Its checkpoints mean "
            "something else. Start over with RESUME=False, or use another OUTPUT_DIR to keep "
            "that run"
        )
    restore(model, run_dir)
    step = int(to_numpy(model.optimizer.iterations))
    if saved.step != step:
        raise ResumeError(
            f"{run_dir}: last.weights.h5 is at optimizer step {step} but state.json at step "
            f"{saved.step}: they do not belong together (a file copied or restored by hand?). "
            "Start over with RESUME=False, or put back the pair written together"
        )
    if replanned:
        warnings.warn(
            f"{run_dir} was planned for {saved.epochs} epochs, this run asks for "
            f"{new.epochs}: continuing." + schedule_change(model, saved.plan, step),
            stacklevel=3,
        )
    _restore_seed_states(model, saved.seed_states)
    write_log(run_dir, saved.history)  # log.csv as the committed history has it
    print(f"Resuming from {run_dir} after epoch {saved.epoch}.")
    if saved.epoch >= new.epochs:
        print(
            f"That run already has {saved.epoch} epoch(s), EPOCHS={new.epochs}: nothing to "
            "train. Set RESUME=False (or another OUTPUT_DIR) to train again."
        )
    earlier = [*saved.replanned_from, saved.epochs] if replanned else saved.replanned_from
    return dataclasses.replace(saved, epochs=new.epochs, plan=new.plan, replanned_from=earlier)


def _restore_seed_states(model, saved: list) -> None:
    variables = seed_states(model)
    if len(saved) == len(variables):  # else a run saved before states were kept
        for var, value in zip(variables, saved, strict=True):
            var.assign(np.asarray(value, dtype=str(var.dtype)))


def load_best(model, run: RunState) -> RunState:
    """Load ``run``'s best checkpoint into ``model``; return ``run`` with ``next_phase_from`` set.

    Raises:
        FileNotFoundError: ``run.run_dir`` has no ``best.weights.h5``.
    """
    # keras.io's fine-tuning recipe takes the last epoch; here validation picks the weights.
    path = Path(run.run_dir) / "best.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(f"No best checkpoint {path}: train that phase first (cu.train)")
    model.load_weights(path)
    start = {"epoch": run.best_epoch, "weights": path.name}
    return dataclasses.replace(run, next_phase_from=start)


def join_runs(**runs: RunState) -> RunState:
    """One :class:`RunState` from phases in training order, e.g. ``head=..., finetune=...``.

    Epochs, seconds and history joined (NaN where a phase lacks a metric); ``best``, ``params``
    and ``run_dir`` of the last phase; ``phases`` lists each phase's first epoch and start.

    Raises:
        ValueError: no phase given.
    """
    if not runs:
        raise ValueError("join_runs needs at least one phase, e.g. join_runs(head=run)")
    history, phases, done, previous = {}, [], 0, None
    for name, run in runs.items():
        phase = {"name": name, "first_epoch": done + 1, "epochs": run.epoch,
                 "trainable_params": (run.params or {}).get("trainable")}  # fmt: skip
        if previous is not None:
            ended = {"epoch": previous[1].epoch, "weights": "last.weights.h5"}
            phase["starts_from"] = {"phase": previous[0], **(previous[1].next_phase_from or ended)}
        phases.append(phase)
        for key in set(history) | set(run.history):
            values = list(run.history.get(key, []))
            history.setdefault(key, [np.nan] * done)
            history[key] += values + [np.nan] * (run.epoch - len(values))
        done += run.epoch
        previous = (name, run)
    last = previous[1]
    best_epoch = None if last.best_epoch is None else done - last.epoch + last.best_epoch
    return dataclasses.replace(
        last, epoch=done, epochs=done, seconds=sum(r.seconds for r in runs.values()),
        history=history, best_epoch=best_epoch, phases=phases, next_phase_from=None,
        replanned_from=[n for run in runs.values() for n in run.replanned_from],
    )  # fmt: skip


def exponential_decay(
    train_size: int,
    batch_size: int,
    epochs: int,
    initial_lr: float = 0.1,
    final_lr: float = 1e-3,
):
    """The seed's ``ExponentialDecay`` schedule, per step, reaching ``final_lr`` at the last epoch.

    Args:
        train_size, batch_size, epochs: ints >= 1.
        initial_lr, final_lr: first and last rate (0.1: the seed's; SGD's classic CIFAR range).

    Returns:
        ``keras.optimizers.schedules.ExponentialDecay``; e.g. 100 epochs of 45,000 images at
        batch 128: 352 steps per epoch, decay_rate 0.955.

    Raises:
        ValueError: ``epochs`` < 1, or not ``0 < final_lr <= initial_lr``.
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
        # Not staircase: epoch e starts at initial_lr * rate ** (e - 1). A resumed run continues
        # from the step in its checkpoint; another EPOCHS is another schedule from there on.
        decay_rate=(final_lr / initial_lr) ** (1.0 / epochs),
        staircase=False,
    )
