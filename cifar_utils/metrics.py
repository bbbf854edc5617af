"""Top-k hits with one tie rule, and the metrics the notebooks compile with."""

from __future__ import annotations

import keras


def top_k_hits(labels, scores, k: int):
    """float32 (N,): 1.0 where the int label (N,) is among the ``k`` highest ``scores`` (N, C).

    Ties rank by class index, lower first, as ``argmax``; a row holding NaN or inf never hits.
    """
    # Keras' in_top_k counts every class tied at the k-th place and sklearn ranks ties the
    # other way: one rule here, so history, results and per-class figures agree.
    label = keras.ops.cast(labels, "int32")[:, None]
    p_true = keras.ops.take_along_axis(scores, label, axis=-1)
    index = keras.ops.arange(keras.ops.shape(scores)[-1], dtype="int32")[None, :]
    ahead = (scores > p_true) | ((scores == p_true) & (index < label))
    hit = keras.ops.sum(keras.ops.cast(ahead, "int32"), axis=-1) < k
    finite = keras.ops.all(keras.ops.isfinite(scores), axis=-1)  # NaN compares as False
    return keras.ops.cast(hit & finite, "float32")


@keras.saving.register_keras_serializable(package="cifar_utils")
def top5_hits(y_true, y_pred):
    """:func:`top_k_hits` with ``k=5`` for ``model.compile``: one-hot ``y_true`` (N, C)."""
    return top_k_hits(keras.ops.argmax(y_true, axis=-1), y_pred, 5)


def compile_metrics() -> list:
    """Fresh metrics for ``model.compile``: ``"accuracy"`` and ``top5_accuracy``."""
    return ["accuracy", keras.metrics.MeanMetricWrapper(top5_hits, name="top5_accuracy")]
