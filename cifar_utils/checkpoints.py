"""A run folder's files: run state, ``.weights.h5`` checkpoints (commit, restore), ``log.csv``."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import tensorflow as tf

from . import files
from .checks import RUN_FOLDERS, check_run_folder
from .devices import worker_run_dir
from .divergence import nonfinite_variables
from .errors import ResumeError
from .files import atomic_path
from .models import load_weights_strictly
from .numerics import PRECISION_POLICIES


@dataclasses.dataclass
class RunState:
    """A training run as ``state.json`` holds it: what :func:`train` returns.

    ``history``: metric -> one float per committed epoch; ``epoch``, ``step``: epochs and
    optimizer steps done; ``seconds``: training wall time; ``best``/``best_epoch`` (1-based)
    follow ``monitor`` under ``mode``; ``phases`` only from :func:`join_runs`.
    """

    run_dir: str
    epochs: int
    plan: dict
    monitor: str = "val_accuracy"
    mode: str = "max"
    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    history: dict = dataclasses.field(default_factory=dict)
    best: float | None = None
    best_epoch: int | None = None
    initial_epoch: int = 0
    seed_states: list = dataclasses.field(default_factory=list)
    params: dict | None = None
    phases: list | None = None
    replanned_from: list = dataclasses.field(default_factory=list)  # epochs planned before
    next_phase_from: dict | None = None

    def improves(self, score) -> bool:
        """Whether ``score`` of ``monitor`` beats :attr:`best` under :attr:`mode`."""
        if score is None:
            return False
        return self.best is None or (score < self.best if self.mode == "min" else score > self.best)

    def add_epoch(self, logs: dict, seconds: float, step: int, seed_states: list) -> bool:
        """Append one epoch's ``logs`` (metric -> float); whether it is the new best."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.epoch, self.step, self.seed_states = self.epoch + 1, step, seed_states
        self.seconds += seconds
        better = self.improves(logs.get(self.monitor))
        if better:
            self.best, self.best_epoch = logs[self.monitor], self.epoch
        return better


def read_state(run_dir: Path) -> RunState:
    """The :class:`RunState` in ``run_dir/state.json`` (also as older versions wrote it).

    Raises:
        ResumeError: the file is not JSON, or lacks ``epoch`` or ``history``.
    """
    path = run_dir / "state.json"
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not {"epoch", "history"} <= saved.keys():
        raise ResumeError(  # the two keys every version wrote
            f"{path} is no run state (no JSON object with 'epoch' and 'history'): start over "
            "with RESUME=False, or use another OUTPUT_DIR to keep that folder"
        )
    known = {f.name for f in dataclasses.fields(RunState)}
    saved.setdefault("epochs", saved["epoch"])
    saved.setdefault("plan", {})
    return RunState(**{**{k: v for k, v in saved.items() if k in known}, "run_dir": str(run_dir)})


def recorded_precision(*run_dirs) -> str | None:
    """The dtype policy (e.g. ``"mixed_bfloat16"``) of the run :func:`train` would resume
    from these run folders: this worker's ``state.json`` in the last of them that holds one
    (give a notebook's phases in order). None if none does, or that state is unreadable or
    names no policy of ours (resuming it then says why).
    """
    for run_dir in reversed(run_dirs):
        folder = worker_run_dir(run_dir)
        if not (folder / "state.json").is_file():
            continue
        try:
            policy = read_state(folder).plan.get("model", {}).get("dtype_policy")
        except (ResumeError, AttributeError):
            return None
        return policy if policy in set(PRECISION_POLICIES.values()) else None
    return None


def write_state(state: RunState) -> Path:
    """Write ``state`` to its ``state.json`` atomically: the commit point of an epoch."""
    return files.write_json(Path(state.run_dir) / "state.json", dataclasses.asdict(state))


def check_checkpoint_path(path) -> Path:
    """``path`` as a Path; ValueError unless it ends in ``.weights.h5`` (Keras 3)."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(
            f"Weights-only checkpoint '{path}' must end in '.weights.h5' in Keras 3 "
            f"(e.g. '{path.name.split('.')[0]}.weights.h5')"
        )
    return path


def save_checkpoint(model, path) -> Path:
    """Save weights and optimizer state to ``path`` (``.weights.h5``) atomically."""
    path = check_checkpoint_path(path)
    with atomic_path(path) as tmp:
        model.save_weights(tmp)
    return path


def restore(model, run_dir: Path) -> None:
    """Load the last checkpoint into a compiled ``model``; ResumeError if unfit or NaN."""
    if not model.optimizer.built:  # else Keras skips the saved optimizer variables
        with model.distribute_strategy.scope():  # the strategy the model was built under
            model.optimizer.build(model.trainable_variables)
    if load_weights_strictly(model, run_dir / "last.weights.h5"):
        raise ResumeError(
            f"The checkpoint in {run_dir} was written by a different model or optimizer "
            "and cannot be resumed. Start fresh (RESUME=False) or use another OUTPUT_DIR"
        ) from None
    bad = nonfinite_variables(model)
    if bad:
        raise ResumeError(
            f"{run_dir / 'last.weights.h5'} holds NaN or inf ({len(bad)} variable(s), e.g. "
            f"'{bad[0]}'): that run diverged and cannot be resumed. Start over with "
            f"RESUME=False (or another OUTPUT_DIR), or evaluate its {run_dir / 'best.weights.h5'}"
        )


def align_replicas(model) -> None:
    """Give every replica's non-trainable variables the first replica's (a collective)."""
    # Keras 3 keeps BatchNorm's moving statistics per replica; a checkpoint holds the first's.
    # One all-reduce (other replicas give zeros) spreads them.
    strategy = model.distribute_strategy
    variables = [getattr(v, "value", v) for v in model.non_trainable_variables]
    if strategy.num_replicas_in_sync == 1 or not variables:
        return

    def first_replica_values():
        context = tf.distribute.get_replica_context()
        first = context.replica_id_in_sync_group == 0
        return context.all_reduce(
            tf.distribute.ReduceOp.SUM,
            [tf.where(first, v.read_value(), tf.zeros_like(v)) for v in variables],
        )

    local = strategy.experimental_local_results(strategy.run(first_replica_values))
    for i, variable in enumerate(variables):
        for component, values in zip(variable.values, local, strict=True):
            component.assign(values[i])


def seed_states(model) -> list:
    """The state variables of the model's random layers (Dropout's seed generators)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def staged_path(run_dir: Path, epoch: int, name: str) -> Path:
    return run_dir / f".epoch-{epoch:05d}.{name}"


def settle_checkpoints(run_dir: Path, committed_epoch: int) -> None:
    """Move ``committed_epoch``'s staged files into place; remove those never committed."""
    for staged in run_dir.glob(".epoch-*.*.weights.h5"):
        epoch, name = staged.name[len(".epoch-") :].split(".", 1)
        if epoch.isdigit() and int(epoch) == committed_epoch:
            os.replace(staged, run_dir / name)
        else:
            staged.unlink()


def write_log(run_dir: Path, history: dict) -> None:
    """Rewrite ``log.csv`` from the committed ``history`` as Keras' CSVLogger writes it."""
    # A crash between commit and log row left log.csv a row short or long.
    keys = sorted(history)
    rows = max((len(v) for v in history.values()), default=0)
    with atomic_path(run_dir / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)  # Keras' CSVLogger: the excel dialect, keys sorted
        writer.writerow(["epoch", *keys])
        writer.writerows([i, *(history[k][i] for k in keys)] for i in range(rows))


#: Where the notebooks train, for the messages of :func:`read_log`.


def read_log(run_dir) -> dict:
    """The per-epoch history in ``run_dir/log.csv``, safe while the run still writes it.

    Returns:
        Column -> list of floats (``NA``: NaN), and ``epoch``: ints from 1.

    Raises:
        FileNotFoundError: no folder ``run_dir``, or no ``log.csv`` in it.
        ValueError: no complete row yet, or a line is not a CSVLogger row.
    """
    path = Path(run_dir) / "log.csv"
    check_run_folder(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no log.csv: it is no run folder. {RUN_FOLDERS}")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]  # the row being written
    header, *rows = list(csv.reader(lines)) or [[]]
    if "epoch" not in header or not rows:
        raise ValueError(f"{path} has no complete row yet: wait until the first epoch ends")
    history = {name: [] for name in header}
    for number, row in enumerate(rows, start=2):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields, the header has {len(header)}")
            for name, value in zip(header, row, strict=True):
                history[name].append(float("nan") if value == "NA" else float(value))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}, is not a CSVLogger row ({exc})") from None
    history["epoch"] = [int(e) + 1 for e in history["epoch"]]
    return history
