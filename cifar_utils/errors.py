"""The package's error classes. Bottom layer: imports nothing of the package.

Each says in its message what was wrong and how to fix it; in a notebook, IPython shows that
message alone instead of a traceback through the package.
"""

from __future__ import annotations


class _MessageOnly:
    """Mixin for errors whose message says what to fix: in a notebook, IPython shows the
    message alone (``_render_traceback_``), not a traceback through this module that would
    bury it. Outside IPython the full traceback is printed as usual."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class CifarDataError(_MessageOnly, RuntimeError):
    """The CIFAR-100 data could not be found, downloaded or read; the message says how to fix it."""


class WeightsError(_MessageOnly, RuntimeError):
    """EfficientNetB0 weights could not be found, downloaded or loaded; the message says how."""


class TrainingDiverged(_MessageOnly, RuntimeError):
    """Training produced NaN/inf (loss, weights, optimizer state) or outputs that are no
    probabilities; the message says where and what to try."""


class ResumeError(_MessageOnly, ValueError):
    """A run folder's checkpoints cannot be resumed by this run (another plan, another
    model, NaN/inf values, files that do not belong together); the message says the way out."""


class NotProbabilities(_MessageOnly, ValueError):
    """A model's outputs are not probability rows (NaN/inf, or rows not summing to 1)."""


class ParameterError(_MessageOnly, ValueError):
    """A notebook parameter is unknown or has a bad value; the message names each one."""


class OutputDirInUse(_MessageOnly, RuntimeError):
    """Another run of the same notebook is writing into this ``OUTPUT_DIR``; the message
    names it (process id, host, start time) and the way out."""
