"""Faster CPU training for Keras' own layers, the layers and saved model unchanged.

``fast_cpu_training`` does all of it: ``fuse_batch_norm``, ``fast_dropout`` and
``fast_small_conv_gradients``. What Keras 3's TensorFlow backend lacks (figures:
docs/performance.md): BatchNorm in training runs as separate ops over the activations (mean,
squared difference, variance, normalise: one pass over memory each, and casts around them
under mixed precision), where TensorFlow's ``FusedBatchNormV3`` does it in one kernel, 2.5x
to 4x faster; Dropout draws one 32-bit random number per activation, where 16 bits suffice.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .models import switch_layers_on_cpu
from .small_conv import fast_small_conv_gradients


def fast_cpu_training(model) -> dict[str, list[str]]:
    """Apply :func:`fuse_batch_norm`, :func:`fast_dropout` and
    :func:`fast_small_conv_gradients` to ``model`` (built, changed in place, before ``compile``).

    Returns:
        The names of the layers each switched, under ``"batch_norm"``, ``"dropout"`` and
        ``"small_conv"``; all ``[]`` when a GPU is visible (measured on CPUs only).
    """
    return {
        "batch_norm": fuse_batch_norm(model),
        "dropout": fast_dropout(model),
        "small_conv": fast_small_conv_gradients(model),
    }


def fuse_batch_norm(model) -> list[str]:
    """Compute ``model``'s BatchNorm layers in training with TensorFlow's fused kernel.

    Switches ``BatchNormalization`` layers (not subclasses) on 4-D channels-last inputs
    (B, H, W, C) with float32 weights (a float32 or ``mixed_*`` policy), without renorm or
    cross-replica synchronisation. In training they normalise each channel by the batch's mean
    and (biased) variance and move their moving statistics exactly as Keras does; the result
    differs from Keras' by round-off. Inference (``training=False``, a frozen layer) and
    masked calls stay Keras' own, so evaluation, the saved model and its scores are plain
    Keras. Layer types, weights and parameter counts are unchanged. Call on a built model
    (changed in place) before ``compile``; a clone or reloaded model has plain layers.

    Returns:
        Names of the layers switched; ``[]`` when a GPU is visible (measured on CPUs only).
    """

    def matches(layer) -> bool:
        return (
            not layer.renorm
            and not layer.synchronized
            and _input_rank(layer) == 4
            and layer.axis in (-1, 3)
            # the kernel takes float32 scale, offset and statistics: float32 or mixed_* policies
            and layer.dtype_policy.variable_dtype == "float32"
        )

    return switch_layers_on_cpu(
        model, keras.layers.BatchNormalization, matches, "call", _fused_call
    )


def _input_rank(layer) -> int | None:
    """Rank of a layer's (single, static) input; None when unknown."""
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError):
        return None


def _fused_call(layer):
    """A ``call`` for the BatchNorm ``layer`` that trains through ``FusedBatchNormV3``."""
    unfused = layer._keras_call

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


def fast_dropout(model) -> list[str]:
    """Draw ``model``'s Dropout masks in training from 16 random bits per activation.

    Switches ``Dropout`` layers (not subclasses) with 0 < rate < 1 and no ``noise_shape``.
    Each activation is kept with probability ``1 - r``, ``r`` the rate rounded to a multiple
    of 2**-16 (at most 7.6e-6 from it; a rate that rounds to 0 or 1 trains with Keras' own
    call), and scaled by ``1 / (1 - r)`` (in the layer's compute dtype, as Keras scales), so
    the expected output is the input, as in Keras (up to that dtype's rounding of the scale:
    0.2% at most in bfloat16). The masks come from the layer's own seed generator, one draw
    per call as Keras' own, so a seeded run repeats and a resumed run goes on as it would
    have; they are other masks than Keras' would be, and each replica of a distributed run
    draws its own, different from all others' at every step (Keras' give all the same). The
    rate is read at each call, so a changed ``layer.rate`` takes effect as in Keras.
    Inference, the saved model and its layers are Keras' own. Call on a built model (changed
    in place) before ``compile``.

    Returns:
        Names of the layers switched; ``[]`` when a GPU is visible (measured on CPUs only).
    """

    def matches(layer) -> bool:
        return 0 < layer.rate < 1 and not layer.noise_shape

    return switch_layers_on_cpu(model, keras.layers.Dropout, matches, "call", _dropout_call)


def _dropout_call(layer):
    """A ``call`` for the Dropout ``layer`` that draws its mask from 16-bit random numbers."""
    keras_call = layer._keras_call

    def call(inputs, training=False):
        threshold = round(layer.rate * 2**16)  # drop where the 16 bits are below it
        if not training or not 0 < threshold < 2**16:  # a rate 16 bits cannot tell from 0 or 1
            return keras_call(inputs, training=training)
        scale = 2**16 / (2**16 - threshold)  # 1 / (1 - r)
        # stateless ops take int32 seeds (Keras folds its int64 seed state the same way)
        seed = tf.cast(layer.seed_generator.next(), tf.int64)
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context else 0
        if tf.get_static_value(replica) != 0:  # in model.fit a constant tensor, else an int
            # each replica its own masks, hashed apart: adding the replica id to the seed's
            # counter would give replica r the mask replica 0 draws r steps later
            seed = tf.random.experimental.stateless_fold_in(seed, replica)
        n = tf.size(inputs)
        words = tf.random.stateless_uniform(
            [(n + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32
        )
        halves = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:n]  # two per 32-bit word
        keep = tf.reshape(halves >= threshold, tf.shape(inputs))
        return tf.where(keep, inputs * tf.cast(scale, inputs.dtype), tf.zeros_like(inputs))

    return call
