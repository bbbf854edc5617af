"""Small Keras callbacks, one job each, that :func:`train` wires together.

Keras calls them in list order: at an epoch's end :class:`LogLearningRate`,
:class:`DivergenceGuard`, :class:`EpochCommit`, then :class:`CommittedCSVLogger`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import keras
import numpy as np

from . import checkpoints
from .checkpoints import RunState, align_replicas, save_checkpoint, seed_states, staged_path
from .devices import any_worker, to_numpy
from .divergence import training_state_problem


class LogLearningRate(keras.callbacks.Callback):
    """Adds the optimizer's ``learning_rate`` (float) to each epoch's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.setdefault("learning_rate", float(to_numpy(self.model.optimizer.learning_rate)))


# So validation scores the weights the checkpoint saves, and a resume continues from them.
class AlignReplicas(keras.callbacks.Callback):
    """Gives every replica the first one's BatchNorm statistics (epoch start, before validation)."""

    def on_epoch_begin(self, epoch, logs=None):
        align_replicas(self.model)

    def on_test_begin(self, logs=None):
        align_replicas(self.model)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at a non-finite loss, or NaN/inf variables or probe outputs not probabilities.

    The state is checked every ``check_every`` batches (0: never) and at each epoch's end;
    ``diverged`` is ``(epoch, where, what)`` once stopped.
    """

    def __init__(self, probe=None, check_every: int = 50):
        super().__init__()
        self.probe, self.check_every, self.diverged, self._epoch = probe, check_every, None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def _check(self, where: str, what: str | None = None) -> None:
        what = what or training_state_problem(self.model, self.probe)
        if any_worker(self.model.distribute_strategy, what is not None) and not what:
            what = "another worker's weights or outputs hold NaN or inf"  # a collective vote
        if what:
            self.diverged = (self._epoch, where, what)
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self._check(f"batch {batch + 1}", f"loss became {float(loss)}")
        elif self.check_every and (batch + 1) % self.check_every == 0:
            self._check(f"batch {batch + 1} (state check)")

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return
        bad = [k for k in ("loss", "val_loss") if not np.isfinite((logs or {}).get(k, 0.0))]
        where = f"the end of the epoch ({bad[0]})" if bad else "the end of the epoch"
        self._check(where, f"loss became {float(logs[bad[0]])}" if bad else None)


class EpochCommit(keras.callbacks.Callback):
    """Commits each epoch ``guard`` let through: stage checkpoints, write ``state.json``, settle."""

    def __init__(self, state: RunState, guard: DivergenceGuard | None = None):
        super().__init__()
        self.state, self.guard, self._t0 = state, guard, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged:
            return  # nothing of this epoch is written
        run_dir, state = Path(self.state.run_dir), self.state
        step = int(to_numpy(self.model.optimizer.iterations))
        seeds = [to_numpy(v).tolist() for v in seed_states(self.model)]
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if state.add_epoch(logs, time.perf_counter() - self._t0, step, seeds):
            save_checkpoint(self.model, staged_path(run_dir, epoch + 1, "best.weights.h5"))
        elif epoch == 0:  # a fresh run: a best checkpoint left by an older run is not ours
            with contextlib.suppress(FileNotFoundError):
                (run_dir / "best.weights.h5").unlink()
        save_checkpoint(self.model, staged_path(run_dir, epoch + 1, "last.weights.h5"))
        # state.json is the commit point; settle_checkpoints finishes a crash after it.
        checkpoints.write_state(state)
        checkpoints.settle_checkpoints(run_dir, epoch + 1)


class CommittedCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger, writing only the epochs ``state`` committed."""

    def __init__(self, state: RunState, filename: str, append: bool):
        super().__init__(filename, append=append)
        self.state, self._opened = state, False

    # A fresh log replaces the old one only at its first committed epoch.
    def on_train_begin(self, logs=None):
        pass  # opened at the first committed epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.state.epoch != epoch + 1:
            return
        if not self._opened:
            super().on_train_begin()
            self._opened = True
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._opened:
            super().on_train_end(logs)
