"""``fuse_batch_norm``: BatchNorm's training step as one fused TensorFlow op on CPUs.

Keras 3 computes ``BatchNormalization`` in training as separate ops over the activations
(mean, squared difference, variance, normalise: one pass over memory each, and casts around
them under mixed precision); TensorFlow's ``FusedBatchNormV3`` does the same in one kernel,
forward and gradient, 2.5x to 4x faster (figures: docs/performance.md).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .models import leaf_layers


def fuse_batch_norm(model) -> list[str]:
    """Compute ``model``'s BatchNorm layers in training with TensorFlow's fused kernel.

    Switches ``BatchNormalization`` layers on 4-D channels-last inputs (B, H, W, C), without
    renorm or cross-replica synchronisation. In training they normalise each channel by the
    batch's mean and (biased) variance and move their moving statistics exactly as Keras does;
    the result differs from Keras' by round-off. Inference (``training=False``, a frozen
    layer) and masked calls stay Keras' own, so evaluation, the saved model and its scores
    are plain Keras. Layer types, weights and parameter counts are unchanged. Call on a built
    model (changed in place) before ``compile``; a clone or reloaded model has plain layers.

    Returns:
        Names of the layers switched; ``[]`` when a GPU is visible (measured on CPUs only).
    """
    if tf.config.list_physical_devices("GPU"):
        return []
    switched = []
    for layer in leaf_layers(model):
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and not getattr(layer, "_unfused_call", None)
            and not layer.renorm
            and not layer.synchronized
            and _input_rank(layer) == 4
            and layer.axis in (-1, 3)
        ):
            layer._unfused_call = layer.call
            layer.call = _fused_call(layer)
            switched.append(layer.name)
    return switched


def _input_rank(layer) -> int | None:
    """Rank of a layer's (single, static) input; None when unknown."""
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError):
        return None


def _fused_call(layer):
    """A ``call`` for the BatchNorm ``layer`` that trains through ``FusedBatchNormV3``."""
    unfused = layer._unfused_call

    def call(inputs, training=None, mask=None):
        if mask is not None or not (training and layer.trainable) or len(inputs.shape) != 4:
            return unfused(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        # Keras normalises float16/bfloat16 activations in float32; the fused kernel does the
        # same inside (its scale, offset and statistics are float32).
        x = inputs if inputs.dtype in (tf.float16, tf.bfloat16) else tf.cast(inputs, "float32")
        scale = layer.gamma if layer.scale else tf.ones((channels,))
        offset = layer.beta if layer.center else tf.zeros((channels,))
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=layer.epsilon, is_training=True
        )
        # The kernel returns the unbiased batch variance (n / (n - 1)); Keras moves its
        # statistics with the biased one it normalised by.
        n = tf.cast(tf.size(x) // channels, "float32")
        variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
        return tf.cast(y, layer.compute_dtype)

    return call
