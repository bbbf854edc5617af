"""``fast_small_conv_gradients``: a faster input gradient for CPU convolutions with tiny outputs.

Without oneDNN (TensorFlow's Eigen kernels: the Linux default on CPUs without AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX, or ``TF_ENABLE_ONEDNN_OPTS=0``), its ``Conv2DBackpropInput`` is
very slow for them; with oneDNN the matmul costs about the same (figures: docs/performance.md).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .models import switch_layers_on_cpu


def _col2im_input_grad(dy, kernel, input_shape, padding: str):
    """Stride-1 NHWC conv input gradient: dy (B, OH, OW, Cout), kernel -> (B, H, W, Cin)."""
    kh, kw, cin, cout = kernel.shape
    oh, ow = dy.shape[1], dy.shape[2]
    # dy (B*OH*OW, Cout) times the kernel (Cout, KH*KW*Cin), then KH*KW shifted adds (col2im).
    cols = tf.matmul(
        tf.reshape(dy, (-1, cout)),
        tf.reshape(tf.transpose(kernel, (3, 0, 1, 2)), (cout, kh * kw * cin)),
    )
    cols = tf.reshape(cols, (-1, oh, ow, kh, kw, cin))
    dx = tf.add_n(
        [
            tf.pad(cols[:, :, :, i, j, :], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
            for i in range(kh)
            for j in range(kw)
        ]
    )
    if padding == "SAME":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        dx = dx[:, top : top + input_shape[1], left : left + input_shape[2], :]
    return dx


def _conv2d_col2im_backprop(x, kernel, padding: str):
    """``tf.nn.conv2d`` (stride 1, NHWC, VALID/SAME) with the col2im input gradient."""

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            with tf.name_scope("small_conv_gradient"):  # named so a profile can tell it apart
                dx = _col2im_input_grad(dy, kernel, x.shape, padding)
                dk = tf.compat.v1.nn.conv2d_backprop_filter(
                    x, tf.shape(kernel), dy, (1, 1, 1, 1), padding
                )
            return dx, dk

        return tf.nn.conv2d(x, kernel, 1, padding), grad

    return conv(x, tf.cast(tf.convert_to_tensor(kernel), x.dtype))


def fast_small_conv_gradients(model, max_output_pixels: int = 16) -> list[str]:
    """Route the input gradient of ``model``'s small-output convolutions through one matmul.

    Stride-1, undilated, ungrouped, non-1x1 ``Conv2D`` layers (not subclasses) with output at most
    ``max_output_pixels`` (OH*OW) pixels; forward pass, weights and saved model are unchanged,
    the input gradient differs by round-off. Call on a built model (changed in place) before
    ``compile``; a clone or reloaded model has plain layers.

    Returns:
        Names of the layers switched; ``[]`` when a GPU is visible (measured on CPUs only).
    """

    def matches(layer) -> bool:
        return (
            tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1
            and layer.data_format == "channels_last"
            and tuple(layer.kernel_size) != (1, 1)
            and _output_pixels(layer) <= max_output_pixels
        )

    return switch_layers_on_cpu(
        model,
        keras.layers.Conv2D,
        matches,
        "convolution_op",
        lambda layer: _small_conv_op(layer, max_output_pixels),
    )


def _output_pixels(layer) -> float:
    """OH*OW of a layer's (single, static) output; infinity when unknown."""
    try:
        h, w = layer.output.shape[1:3]
    except (AttributeError, ValueError):
        return float("inf")
    return float("inf") if h is None or w is None else h * w


def _small_conv_op(layer, max_output_pixels: int):
    """A ``convolution_op`` for ``layer`` that takes the col2im path on small static outputs."""
    native, padding = layer._keras_convolution_op, layer.padding.upper()
    kh, kw = layer.kernel_size

    def convolution_op(inputs, kernel):
        h, w = inputs.shape[1], inputs.shape[2]
        if h is None or w is None:
            return native(inputs, kernel)
        oh, ow = (h, w) if padding == "SAME" else (h - kh + 1, w - kw + 1)
        if oh * ow > max_output_pixels:
            return native(inputs, kernel)
        return _conv2d_col2im_backprop(inputs, kernel, padding)

    return convolution_op
