"""The package's error classes; each message says what was wrong and how to fix it."""

from __future__ import annotations


class _MessageOnly:
    """Mixin: IPython shows the message alone (``_render_traceback_``), not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class CifarDataError(_MessageOnly, RuntimeError):
    """CIFAR-100 could not be found, downloaded or read."""


class WeightsError(_MessageOnly, RuntimeError):
    """EfficientNetB0 weights could not be found, downloaded or loaded."""


class TrainingDiverged(_MessageOnly, RuntimeError):
    """Training produced NaN/inf or outputs that are not probabilities."""


class ResumeError(_MessageOnly, ValueError):
    """A run folder's checkpoints cannot be resumed by this run."""


class NotProbabilities(_MessageOnly, ValueError):
    """A model's outputs are not probability rows (NaN/inf, or rows not summing to 1)."""


class ParameterError(_MessageOnly, ValueError):
    """A notebook parameter is unknown or has a bad value."""


class OutputDirInUse(_MessageOnly, RuntimeError):
    """Another run of the same notebook is writing into this ``OUTPUT_DIR``."""
