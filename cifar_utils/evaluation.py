"""Metrics: top-k accuracy, per class and per superclass, reports, most confused pairs.

Labels are fine labels, int (N,) in [0, 99] (ValueError if invalid); probabilities float
(N, 100). Ties: the lower class index wins, everywhere.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from .checks import check_label_pair, check_labels
from .data import COARSE_LABEL_NAMES, FINE_LABEL_NAMES, FINE_TO_COARSE
from .devices import to_numpy
from .divergence import check_probabilities
from .metrics import top_k_hits
from .pipelines import model_input

_FORWARD = weakref.WeakKeyDictionary()  # model -> its traced inference function


def predict_proba(model, x, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for images ``x`` (N, H, W, 3), uint8 in [0, 255] or float in [0, 1].

    Returns:
        float32 (N, num_classes), rows summing to 1.

    Raises:
        NotProbabilities: a row holds NaN/inf or does not sum to 1 (e.g. NaN weights).
        ValueError: no images, or bad ones (:func:`cifar_utils.pipelines.model_input`).
    """
    x, scale = model_input(x)
    if not len(x):
        raise ValueError("no images to classify: x holds 0 images")
    # Batch by batch on this process's first device, in order, so rows match x under every
    # strategy (a multi-worker model.predict would shard the data between workers).
    if model not in _FORWARD:  # traced once per model, not once per call
        ref = weakref.ref(model)  # the cache must not keep the model alive
        _FORWARD[model] = tf.function(
            lambda images: ref()(images, training=False), reduce_retracing=True
        )
    # Plain slices, not a tf.data pipeline: a new pipeline per call kept memory (the demo
    # calls this once per photo).
    batches = (
        tf.cast(x[i : i + batch_size], tf.float32) / scale for i in range(0, len(x), batch_size)
    )
    rows = [to_numpy(_FORWARD[model](batch)).astype(np.float32) for batch in batches]
    return check_probabilities(np.concatenate(rows), f"{model.name}'s output")


def top_k_accuracy(y_true, probs, k: int = 1) -> float:
    """Fraction in [0, 1] of rows whose true label is among the ``k`` highest of ``probs`` (N, C).

    Raises:
        ValueError: not one label per row, ``probs`` not (N, C), or ``k`` outside [1, C].
    """
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, classes), not shape {probs.shape}")
    n, classes = probs.shape
    y_true = check_labels(y_true, classes, "y_true")
    if len(y_true) != n or not n:
        raise ValueError(f"need one label per row and at least one row: {len(y_true)} and {n}")
    if not 1 <= k <= classes:
        raise ValueError(f"k must be in [1, {classes}], not {k}")
    return float(np.mean(keras.ops.convert_to_numpy(top_k_hits(y_true, probs, k))))


def per_class_accuracy(y_true, y_pred, num_classes: int = 100) -> np.ndarray:
    """Recall of each true class: float64 (num_classes,) in [0, 1], NaN if absent."""
    from sklearn.metrics import recall_score

    y_true, y_pred = check_label_pair(y_true, y_pred, num_classes)
    return recall_score(
        y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=np.nan
    ).astype(np.float64)


def to_superclass(fine_labels) -> np.ndarray:
    """Map fine labels (int (N,) in [0, 99]) to their superclass: int64 (N,) in [0, 19]."""
    return FINE_TO_COARSE[check_labels(fine_labels, 100, "fine labels")]


def superclass_accuracy(y_true, y_pred) -> tuple[float, np.ndarray]:
    """Accuracy of fine predictions judged by superclass (e.g. beaver for dolphin: right).

    Returns:
        ``(overall, per_superclass)``: float in [0, 1] and float64 (20,) in
        :data:`COARSE_LABEL_NAMES` order, NaN for an absent superclass.
    """
    y_true, y_pred = check_label_pair(y_true, y_pred, 100)
    coarse_true, coarse_pred = to_superclass(y_true), to_superclass(y_pred)
    overall = float(np.mean(coarse_true == coarse_pred))
    return overall, per_class_accuracy(coarse_true, coarse_pred, num_classes=20)


def classification_report(y_true, y_pred, output_dict: bool = False, digits: int = 3):
    """scikit-learn's ``classification_report`` (text or dict) over the 100 named classes."""
    # zero_division=0: classes never predicted score 0 instead of warning.
    from sklearn.metrics import classification_report as sk_report

    y_true, y_pred = check_label_pair(y_true, y_pred, 100)
    return sk_report(
        y_true,
        y_pred,
        labels=np.arange(100),
        target_names=list(FINE_LABEL_NAMES),
        digits=digits,
        output_dict=output_dict,
        zero_division=0,
    )


def _json_float(value: float):
    """A float for JSON: rounded to 6 decimals, NaN -> None."""
    return None if np.isnan(value) else round(float(value), 6)


def evaluation_summary(y_true, probs, prefix: str = "test") -> dict:
    """One split's metrics for a results file, keys prefixed by ``prefix`` (``"val"``, ``"test"``).

    Returns:
        dict: ``{prefix}_images`` (N); ``_top1``, ``_top5``, ``_superclass_top1`` floats in
        [0, 1]; ``_per_superclass`` and ``_per_class`` (name -> accuracy or None if absent).

    Raises:
        ValueError: ``probs`` not (N, 100).
    """
    probs = np.asarray(probs)
    y_true = check_labels(y_true, 100, "y_true")
    if probs.shape != (len(y_true), 100):
        raise ValueError(
            f"probs must be (N, 100) = ({len(y_true)}, 100) class probabilities, not {probs.shape}"
        )
    y_pred = probs.argmax(axis=1)
    coarse, per_coarse = superclass_accuracy(y_true, y_pred)
    per_fine = per_class_accuracy(y_true, y_pred)
    return {
        f"{prefix}_images": len(y_true),
        f"{prefix}_top1": _json_float(top_k_accuracy(y_true, probs, k=1)),
        f"{prefix}_top5": _json_float(top_k_accuracy(y_true, probs, k=5)),
        f"{prefix}_superclass_top1": _json_float(coarse),
        f"{prefix}_per_superclass": {
            n: _json_float(a) for n, a in zip(COARSE_LABEL_NAMES, per_coarse, strict=True)
        },
        f"{prefix}_per_class": {
            n: _json_float(a) for n, a in zip(FINE_LABEL_NAMES, per_fine, strict=True)
        },
    }


def most_confused(y_true, y_pred, n: int = 10, label_names=FINE_LABEL_NAMES) -> list[dict]:
    """The ``n`` most frequent directed (true -> predicted) mistakes, most frequent first.

    Returns:
        list of ``{"true", "predicted"`` (names), ``"count"`` (int), ``"share"`` (of the true
        class's images, in [0, 1])``}``; pairs that never occur are left out.
    """
    from sklearn.metrics import confusion_matrix

    num_classes = len(label_names)
    y_true, y_pred = check_label_pair(y_true, y_pred, num_classes)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None, kind="stable")[:n]
    rows = []
    for t, p in zip(*np.unravel_index(flat, cm.shape), strict=True):
        if cm[t, p] == 0:
            break
        rows.append(
            {
                "true": label_names[t],
                "predicted": label_names[p],
                "count": int(cm[t, p]),
                "share": round(float(cm[t, p] / support[t]), 4),
            }
        )
    return rows
