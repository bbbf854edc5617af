"""Checks that a model's state and outputs are sound: no NaN/inf, rows that are probabilities."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .devices import to_numpy
from .errors import NotProbabilities


def check_probabilities(probs, what: str = "the model's output", atol: float = 1e-3):
    """``probs`` float (N, C) as numpy if rows are finite, >= ``-atol`` and sum to 1 ± ``atol``.

    Raises:
        NotProbabilities: names the first bad row and what is wrong with it.
    """
    # NaN weights give NaN rows on some CPUs and zero rows on others (oneDNN's softmax
    # maps NaN to 0): both are refused here rather than read as a top-1.
    p = np.asarray(probs)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
        raise NotProbabilities(f"{what} must be float rows (N, classes), not {p.dtype} {p.shape}")
    finite = np.isfinite(p).all(axis=1)
    sums = np.where(finite, p.sum(axis=1, dtype=np.float64), np.nan)
    good = finite & (np.abs(sums - 1.0) <= atol) & (np.where(finite[:, None], p, 0) >= -atol).all(1)
    if good.all():
        return p
    i = int(np.flatnonzero(~good)[0])
    why = "holds NaN or inf" if not finite[i] else f"sums to {sums[i]:.6g}, not 1"
    raise NotProbabilities(
        f"{what} is not a probability distribution: {int((~good).sum())} of {len(p)} rows "
        f"are bad (row {i} {why}). The weights are probably NaN (a diverged run: NaN becomes "
        "zeros in some CPUs' softmax) or the model has no softmax output. Retrain with a lower "
        "learning rate, or load another checkpoint"
    )


def nonfinite_variables(model) -> list[str]:
    """Paths of the model's and optimizer's variables holding NaN or inf; ``[]`` if none."""
    # Read from the values, not the loss: with oneDNN a NaN weight can leave the loss finite.
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + (list(optimizer.variables) if optimizer else [])
    variables = [v for v in variables if "float" in str(v.dtype)]
    if not variables:
        return []
    finite = tf.stack(
        [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in variables]
    )
    return [v.path for v, ok in zip(variables, to_numpy(finite), strict=True) if not ok]


def training_state_problem(model, probe=None) -> str | None:
    """Why the state is unfit to checkpoint (NaN/inf variable, ``probe`` outputs), or ``None``."""
    bad = nonfinite_variables(model)
    if bad:
        return f"variable '{bad[0]}' holds NaN or inf"
    if probe is not None:
        try:
            check_probabilities(to_numpy(model(probe, training=False)), "the output")
        except NotProbabilities as exc:
            return str(exc).split(". ")[0]
    return None
