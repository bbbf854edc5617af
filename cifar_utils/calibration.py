"""Calibration and flip test-time augmentation: ECE, NLL, temperature scaling, mirrored TTA.

Used by the notebooks' evaluation, the results record and the export. Labels are int
``(N,)`` in [0, C); probabilities float ``(N, C)`` rows summing to 1 (from
:func:`predict_proba`). Temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks") divides the class scores before the softmax by one scalar ``T > 0``
fitted on the validation set; it never changes a row's ranking, so no top-k changes.
"""

from __future__ import annotations

import keras
import numpy as np

from .checks import check_labels, check_positive_int
from .evaluation import predict_proba, top_k_accuracy

#: Bins of the expected calibration error, as Guo et al. 2017.
ECE_BINS = 15
#: The temperatures :func:`fit_temperature` searches, as (lowest, highest).
TEMPERATURE_RANGE = (0.05, 20.0)


def _check_probs(probs) -> np.ndarray:
    """``probs`` as float64 (N, C), each row divided by its sum, if its rows are probability
    distributions (within 1e-3)."""
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

    Bin ``b`` holds the rows whose top-1 probability lies in ``(b / bins, (b + 1) / bins]``.
    scikit-learn's ``calibration_curve`` is for one class's probability and drops the bin
    counts that the expected calibration error weights by, hence this.

    Returns:
        ``{"edges"`` float64 (bins + 1,), ``"count"`` int64 (bins,), ``"confidence"`` and
        ``"accuracy"`` float64 (bins,) (mean top-1 probability and share right in each bin;
        NaN where empty)``}``.

    Raises:
        ValueError: labels or probabilities invalid, or ``bins`` not an int >= 1.
    """
    y_true, probs = _checked(y_true, probs)
    bins = check_positive_int(bins, "bins")
    confidence = probs.max(axis=1)
    right = probs.argmax(axis=1) == y_true
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
    """Expected calibration error of the top-1 confidence (Guo et al. 2017, 15 bins).

    The mean over bins of ``|accuracy - mean confidence|`` weighted by each bin's share of
    the rows (:func:`reliability_bins`).

    Returns:
        A float in [0, 1]: 0 when every bin's accuracy equals its confidence.

    Raises:
        ValueError: labels or probabilities invalid.
    """
    table = reliability_bins(y_true, probs, bins)
    full = table["count"] > 0
    gaps = np.abs(table["accuracy"][full] - table["confidence"][full])
    return float(np.sum(table["count"][full] * gaps) / table["count"].sum())


def negative_log_likelihood(y_true, probs) -> float:
    """Mean negative log-likelihood of the true labels (natural log), scikit-learn's
    ``log_loss`` over all C classes; probabilities are clipped to [2.2e-16, 1 - 2.2e-16]
    (float64's epsilon), so one image costs at most 36.

    Raises:
        ValueError: labels or probabilities invalid.
    """
    from sklearn.metrics import log_loss

    y_true, probs = _checked(y_true, probs)
    return float(log_loss(y_true, probs, labels=np.arange(probs.shape[1])))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """Probabilities with the scores before the softmax divided by ``temperature``.

    ``softmax(z / T)`` computed from ``p = softmax(z)`` as ``softmax(log p / T)`` (the
    two differ by a constant per row, which the softmax ignores), in float64. A class
    whose float32 probability underflowed to 0 (a score more than about 100 below the
    top one) stays 0.

    Returns:
        float64 (N, C) (float32 could round two near probabilities into a tie), rows
        summing to 1, each row ranked as before.

    Raises:
        ValueError: probabilities invalid, or ``temperature`` not a finite number > 0.
    """
    from scipy.special import softmax

    probs = _check_probs(probs)
    temperature = _check_temperature(temperature)
    with np.errstate(divide="ignore"):
        logs = np.log(probs)
    return softmax(logs / temperature, axis=1)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise ValueError(f"temperature must be a number > 0, not {temperature!r}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, not {temperature}")
    return float(temperature)


def fit_temperature(y_val, val_probs) -> float:
    """The temperature that minimises the validation set's negative log-likelihood.

    A bounded 1-D search (scipy's ``minimize_scalar``) over ``log T`` in
    :data:`TEMPERATURE_RANGE`; ``T > 1`` softens an overconfident model, ``T < 1``
    sharpens an underconfident one. Fit it on the validation set, never the test set.

    Returns:
        A float in :data:`TEMPERATURE_RANGE`.

    Raises:
        ValueError: labels or probabilities invalid.
    """
    from scipy.optimize import minimize_scalar

    y_val, val_probs = _checked(y_val, val_probs)
    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(y_val, apply_temperature(val_probs, np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(found.x))


def calibration_summary(y_val, val_probs, y_test, test_probs, prefix: str = "test") -> dict:
    """Temperature fitted on the validation set, and the test ECE and NLL before and after.

    Returns:
        A JSON-able dict: ``"temperature"``, ``"val_nll"``, ``"val_nll_calibrated"``,
        ``f"{prefix}_ece"``, ``f"{prefix}_nll"``, ``f"{prefix}_ece_calibrated"``,
        ``f"{prefix}_nll_calibrated"`` (floats, 6 decimals; ECE over :data:`ECE_BINS` bins).

    Raises:
        ValueError: labels or probabilities invalid.
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
    """A copy of ``model`` whose probabilities are ``softmax(z / temperature)``.

    The temperature is folded into the last Dense layer (kernel and bias divided by it),
    so the copy has the same Keras built-in layers as ``model`` and plain
    ``keras.saving.load_model`` loads its export (:func:`export_model`) without this
    package; record the temperature in the export's metadata. Its top-k equal ``model``'s.
    ``model`` itself is left as it was.

    Args:
        model: a built classifier whose last layer is a Dense with softmax activation.
        temperature: a finite number > 0 (from :func:`fit_temperature`).

    Raises:
        ValueError: the last layer is not a softmax Dense, or ``temperature`` is invalid.
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
    twin = keras.models.clone_model(model, recursive=True)
    twin.set_weights(model.get_weights())
    folded = twin.layers[-1]
    folded.kernel.assign(head.kernel / temperature)
    if head.use_bias:
        folded.bias.assign(head.bias / temperature)
    return twin


def flip_tta_proba(model, x, batch_size: int = 256) -> np.ndarray:
    """Class probabilities averaged over each image and its left-right mirror.

    Args:
        model, x, batch_size: as :func:`predict_proba` (x: (N, H, W, 3), uint8 in
            [0, 255] or float in [0, 1]).

    Returns:
        float32 (N, C), rows summing to 1.

    Raises:
        As :func:`predict_proba`.
    """
    x = np.asarray(x)
    plain = predict_proba(model, x, batch_size)
    mirrored = predict_proba(model, x[:, :, ::-1] if x.ndim == 4 else x, batch_size)
    return ((plain + mirrored) / 2).astype(np.float32)


def tta_summary(y_true, probs, tta_probs, prefix: str = "test") -> dict:
    """What flip test-time augmentation changed, for the results record.

    Args:
        y_true: int labels (N,); probs: the plain probabilities (N, C) (the headline
            figures); tta_probs: :func:`flip_tta_proba` of the same images.

    Returns:
        ``{f"{prefix}_tta_top1", f"{prefix}_tta_top5"`` (floats in [0, 1]),
        ``f"{prefix}_tta_right_to_wrong"``, ``f"{prefix}_tta_wrong_to_right"`` (how many
        top-1 predictions it turned; ints)``}``.

    Raises:
        ValueError: labels or probabilities invalid or of different shapes.
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
