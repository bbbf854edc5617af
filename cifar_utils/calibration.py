"""Calibration (ECE, NLL, temperature scaling) and flip test-time augmentation.

Guo et al. 2017, "On Calibration of Modern Neural Networks". Labels int (N,) in [0, C),
probabilities float (N, C), rows summing to 1; functions taking them raise ValueError if invalid.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from .checks import check_labels, check_positive_int
from .evaluation import predict_proba, top_k_accuracy

#: Bins of the expected calibration error, as Guo et al. 2017.
ECE_BINS = 15
#: The temperatures :func:`fit_temperature` searches, as (lowest, highest).
TEMPERATURE_RANGE = (0.05, 20.0)


def _check_probs(probs) -> np.ndarray:
    """``probs`` as float64 (N, C), rows renormalised; ValueError if not probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not len(probs):
        raise ValueError(f"probs must be (N, classes) with N >= 1, not shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or np.abs(probs.sum(1) - 1).max() > 1e-3:
        raise ValueError("probs must be probabilities: finite, >= 0, each row summing to 1")
    # float32 rows sum to 1 only within ~1e-7; scikit-learn's log_loss warns beyond 1.5e-8.
    return probs / probs.sum(axis=1, keepdims=True)


def _checked(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Labels int64 (N,) and float64 probabilities (N, C), checked against each other."""
    probs = _check_probs(probs)
    y_true = check_labels(y_true, probs.shape[1], "y_true")
    if len(y_true) != len(probs):
        raise ValueError(f"{len(y_true)} labels for {len(probs)} rows of probabilities")
    return y_true, probs


def reliability_bins(y_true, probs, bins: int = ECE_BINS) -> dict:
    """Top-1 confidence against accuracy in ``bins`` equal-width bins of (0, 1].

    Returns:
        dict: ``edges`` float64 (bins + 1,), ``count`` int64 (bins,), ``confidence`` and
        ``accuracy`` float64 (bins,), NaN where a bin is empty.
    """
    y_true, probs = _checked(y_true, probs)
    bins = check_positive_int(bins, "bins")
    confidence = probs.max(axis=1)
    right = probs.argmax(axis=1) == y_true
    # Bin b holds confidences in (b/bins, (b+1)/bins]; sklearn's calibration_curve is per
    # class and drops the counts ECE weights by.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, right, minlength=bins) / count
    return {
        "edges": np.linspace(0, 1, bins + 1),
        "count": count,
        "confidence": mean_conf,
        "accuracy": accuracy,
    }


def expected_calibration_error(y_true, probs, bins: int = ECE_BINS) -> float:
    """Expected calibration error in [0, 1] of the top-1 confidence (Guo et al. 2017)."""
    table = reliability_bins(y_true, probs, bins)
    full = table["count"] > 0
    gaps = np.abs(table["accuracy"][full] - table["confidence"][full])
    return float(np.sum(table["count"][full] * gaps) / table["count"].sum())


def negative_log_likelihood(y_true, probs) -> float:
    """Mean NLL (natural log) of the true labels, float >= 0, at most 36 per image."""
    from sklearn.metrics import log_loss

    y_true, probs = _checked(y_true, probs)
    return float(log_loss(y_true, probs, labels=np.arange(probs.shape[1])))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)``: float64 (N, C), each row ranked as before.

    Raises:
        ValueError: ``temperature`` not a finite number > 0.
    """
    from scipy.special import softmax

    probs = _check_probs(probs)
    temperature = _check_temperature(temperature)
    with np.errstate(divide="ignore"):
        logs = np.log(probs)
    # softmax(log p / T) == softmax(z / T): they differ by a per-row constant. Classes that
    # underflowed to 0 stay 0; float64 so near probabilities don't tie.
    return softmax(logs / temperature, axis=1)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise ValueError(f"temperature must be a number > 0, not {temperature!r}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, not {temperature}")
    return float(temperature)


def fit_temperature(y_val, val_probs) -> float:
    """Temperature in :data:`TEMPERATURE_RANGE` minimising the validation NLL.

    Warns (UserWarning) when a row's true class has probability 0: its score fell so far
    behind that float32 underflowed, the clipped NLL no longer depends on T, and the fit
    cannot see that confidently wrong row (it may then sharpen an overconfident model).
    Warns too when the fit ends at either end of the range.
    """
    from scipy.optimize import minimize_scalar

    y_val, val_probs = _checked(y_val, val_probs)
    lost = int(np.sum(val_probs[np.arange(len(y_val)), y_val] == 0))
    if lost:
        warnings.warn(
            f"{lost} of {len(y_val)} validation images give their true class probability 0 "
            "(float32 underflow): the temperature fit cannot see them and may come out too "
            "low; treat the calibrated figures with care",
            stacklevel=2,
        )
    # T > 1 softens an overconfident model, T < 1 sharpens one. Fit on validation, never test.
    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(y_val, apply_temperature(val_probs, np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    if min(found.x - low, high - found.x) < 1e-3:  # the bounded search stops ~xatol short of it
        warnings.warn(
            f"the fitted temperature {np.exp(found.x):.4g} sits at the end of the range "
            f"{TEMPERATURE_RANGE}: the validation NLL still falls beyond it, so the model's "
            "scores are far from calibrated (or the validation set too small to tell); treat "
            "the calibrated figures with care",
            stacklevel=2,
        )
    return float(np.exp(found.x))


def calibration_summary(y_val, val_probs, y_test, test_probs, prefix: str = "test") -> dict:
    """Temperature fitted on validation, and test ECE and NLL before and after it.

    Returns:
        dict of floats (6 decimals): ``temperature``, ``val_nll``, ``val_nll_calibrated``,
        ``{prefix}_ece``, ``{prefix}_nll`` and both ``{prefix}_..._calibrated``.
    """
    temperature = fit_temperature(y_val, val_probs)
    calibrated = apply_temperature(test_probs, temperature)
    figures = {
        "temperature": temperature,
        "val_nll": negative_log_likelihood(y_val, val_probs),
        "val_nll_calibrated": negative_log_likelihood(
            y_val, apply_temperature(val_probs, temperature)
        ),
        f"{prefix}_ece": expected_calibration_error(y_test, test_probs),
        f"{prefix}_nll": negative_log_likelihood(y_test, test_probs),
        f"{prefix}_ece_calibrated": expected_calibration_error(y_test, calibrated),
        f"{prefix}_nll_calibrated": negative_log_likelihood(y_test, calibrated),
    }
    return {key: round(value, 6) for key, value in figures.items()}


def with_temperature(model, temperature: float):
    """A copy of ``model`` (left unchanged) giving ``softmax(z / temperature)``; same top-k.

    Raises:
        ValueError: the last layer is not a softmax Dense, or ``temperature`` is not > 0.
    """
    temperature = _check_temperature(temperature)
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.activation is not (
        keras.activations.softmax
    ):
        raise ValueError(
            f"model '{model.name}' must end in a Dense layer with softmax activation to take "
            f"a temperature, not its '{head.name}' ({type(head).__name__})"
        )
    # T folded into the Dense kernel and bias: built-in layers only, so plain load_model reads
    # the export without this package.
    twin = keras.models.clone_model(model, recursive=True)
    twin.set_weights(model.get_weights())
    folded = twin.layers[-1]
    folded.kernel.assign(head.kernel / temperature)
    if head.use_bias:
        folded.bias.assign(head.bias / temperature)
    return twin


def flip_tta_proba(model, x, batch_size: int = 256) -> np.ndarray:
    """float32 (N, C) probabilities averaged over each image and its left-right mirror."""
    x = np.asarray(x)
    plain = predict_proba(model, x, batch_size)
    mirrored = predict_proba(model, x[:, :, ::-1] if x.ndim == 4 else x, batch_size)
    return ((plain + mirrored) / 2).astype(np.float32)


def tta_summary(y_true, probs, tta_probs, prefix: str = "test") -> dict:
    """What flip TTA changed: ``{prefix}_tta_top1``/``_top5`` in [0, 1], and int counts
    ``{prefix}_tta_right_to_wrong``/``_wrong_to_right``.

    Raises:
        ValueError: ``probs`` and ``tta_probs`` shapes differ.
    """
    y_true, probs = _checked(y_true, probs)
    _, tta_probs = _checked(y_true, tta_probs)
    if probs.shape != tta_probs.shape:
        raise ValueError(f"probs {probs.shape} and tta_probs {tta_probs.shape} differ")
    before = probs.argmax(axis=1) == y_true
    after = tta_probs.argmax(axis=1) == y_true
    return {
        f"{prefix}_tta_top1": round(top_k_accuracy(y_true, tta_probs, 1), 6),
        f"{prefix}_tta_top5": round(top_k_accuracy(y_true, tta_probs, min(5, probs.shape[1])), 6),
        f"{prefix}_tta_right_to_wrong": int(np.sum(before & ~after)),
        f"{prefix}_tta_wrong_to_right": int(np.sum(~before & after)),
    }
