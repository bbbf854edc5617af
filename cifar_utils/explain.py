"""Grad-CAM heatmaps (Selvaraju et al. 2017): where in an image a model found its class.

Each map cell is placed at the centre of its receptive field, derived from the layers: an
unpadded network's map covers only the image's centre, so stretching it would shift heatmaps.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from .devices import to_numpy
from .models import leaf_layers
from .photos import load_image, model_image_size
from .pipelines import model_input, scaled

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
_POOLINGS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
_EXPLAINERS = weakref.WeakKeyDictionary()  # model -> its traced Grad-CAM function


# Keras has no public API to walk a functional graph: ``_keras_history`` and
# ``_inbound_nodes`` are what its own ``clone_model`` and ``Functional`` use.
def _node(tensor):
    """The graph node that produced the symbolic ``tensor``."""
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def _output(layer):
    """``layer``'s output in the model it was built in (its first call)."""
    return layer._inbound_nodes[0].output_tensors[0]


def _container(model, layer):
    """The (nested) model whose own layers hold ``layer``."""
    if any(child is layer for child in model.layers):
        return model
    for child in model.layers:
        if hasattr(child, "layers") and any(leaf is layer for leaf in leaf_layers(child)):
            return _container(child, layer)
    raise ValueError(f"layer '{layer.name}' is not in model '{model.name}'")


def feature_map_layer(model):
    """The last convolutional feature map, followed through shape-keeping layers (BN, activation).

    E.g. ``bn4`` (simple), ``relu12`` (complex), ``top_activation`` (EfficientNetB0).

    Raises:
        ValueError: the model has no 2-D convolution.
    """
    convs = [layer for layer in leaf_layers(model) if isinstance(layer, _CONVOLUTIONS)]
    if not convs:
        raise ValueError(
            f"model '{model.name}' has no 2-D convolution, so Grad-CAM has no feature map "
            "to explain; give it a convolutional network (e.g. cu.build_simple_cnn())"
        )
    layer = convs[-1]
    siblings = _container(model, layer).layers
    for following in siblings[siblings.index(layer) + 1 :]:
        node = following._inbound_nodes[0]
        if node.input_tensors[0] is not _output(layer) or following.output.shape != (
            _output(layer).shape
        ):
            break
        layer = following
    return layer


def _main_input(tensor):
    """The input of ``tensor``'s node carrying the image: the first of its spatial size."""
    inputs = _node(tensor).input_tensors
    same = [t for t in inputs if len(t.shape) == 4 and t.shape[1:3] == tensor.shape[1:3]]
    return (same or inputs)[0]


def _path(model, layer) -> list:
    """The layers from ``model``'s input to ``layer``, in order, through nested models."""
    inner = _container(model, layer)
    path, tensor = [], _output(layer)
    while not isinstance(_node(tensor).operation, keras.layers.InputLayer):
        path.append(_node(tensor).operation)
        tensor = _main_input(tensor)
    # A nested model: the layers that feed it, then its own (the container call left out).
    return (_path(model, inner)[:-1] if inner is not model else []) + path[::-1]


def _axis_step(layer, size: int, axis: int) -> tuple[float, float, float, int]:
    """``(stride, offset, extent, out size)`` on one axis: input at stride * i + offset."""
    if isinstance(layer, _CONVOLUTIONS + _POOLINGS):
        is_pool = isinstance(layer, _POOLINGS)
        kernel = (layer.pool_size if is_pool else layer.kernel_size)[axis]
        stride = layer.strides[axis]
        dilation = 1 if is_pool else layer.dilation_rate[axis]
        extent = dilation * (kernel - 1) + 1
        if layer.padding == "same":  # TensorFlow pads the odd pixel after, not before
            out = -(-size // stride)
            before = max((out - 1) * stride + extent - size, 0) // 2
        else:
            out, before = (size - extent) // stride + 1, 0
        return stride, (extent - 1) / 2 - before, extent, out
    if isinstance(layer, keras.layers.ZeroPadding2D):
        before, after = layer.padding[axis]
        return 1, -before, 1, size + before + after
    if isinstance(layer, keras.layers.Cropping2D):
        before, after = layer.cropping[axis]
        return 1, before, 1, size - before - after
    if isinstance(layer, keras.layers.Resizing):
        out = (layer.height, layer.width)[axis]
        scale = size / out  # half-pixel centres, as tf.image.resize; bilinear reads 2 pixels
        return scale, (scale - 1) / 2, 2, out
    return 1, 0.0, 1, size


def feature_map_grid(model) -> dict:
    """Where the Grad-CAM map's cells lie in the input image.

    Returns:
        ``{"layer", "cells": (rows, cols), "first_centre": (y, x), "spacing": (dy, dx),
        "receptive_field": (h, w)}`` in input pixels (pixel centres at 0, 1, ..., H - 1).

    Raises:
        ValueError: no convolution, or a layer changes the size in a way not modelled.
    """
    layer = feature_map_layer(model)
    size = model_image_size(model)
    path = _path(model, layer)
    geometry = []
    for axis in (0, 1):
        start, jump, field, n = 0.0, 1.0, 1.0, size[axis]
        for step in path:
            stride, offset, extent, out = _axis_step(step, n, axis)
            if step.output.shape[1 + axis] not in (None, out):
                raise ValueError(
                    f"layer '{step.name}' ({type(step).__name__}) changes the image size in "
                    "a way Grad-CAM cannot place; explain a model without it"
                )
            start, field = start + jump * offset, field + (extent - 1) * jump
            jump, n = jump * stride, out
        geometry.append((start, jump, field, n))
    (y0, dy, fy, rows), (x0, dx, fx, cols) = geometry
    return {
        "layer": layer.name,
        "cells": (rows, cols),
        "first_centre": (y0, x0),
        "spacing": (dy, dx),
        "receptive_field": (fy, fx),
    }


def _placement(size: int, start: float, spacing: float, cells: int) -> np.ndarray:
    """float32 (size, cells): linear interpolation from cell centres to pixels, held beyond."""
    at = np.clip((np.arange(size) - start) / spacing, 0, cells - 1)
    low = np.minimum(np.floor(at).astype(int), cells - 1)
    high = np.minimum(low + 1, cells - 1)
    # Pixels beyond the outermost centres take the outermost cell's value.
    weights = np.zeros((size, cells), np.float32)
    np.add.at(weights, (np.arange(size), low), 1 - (at - low))
    np.add.at(weights, (np.arange(size), high), at - low)
    return weights


def _tapped(model, layer, head_input: bool = True):
    """A model on ``model``'s layers: image -> (``layer``'s output, head input or output)."""
    inner = _container(model, layer)
    if inner is model:
        feature = _output(layer)
    else:  # rebuild the outer graph with the container also returning the feature map
        taps = []
        sub = _tapped(inner, layer, head_input=False)

        def call(op, *args, **kwargs):
            if op is inner:
                feature, out = sub(*args, **kwargs)
                taps.append(feature)
                return out
            return op(*args, **kwargs)

        model = keras.models.clone_model(model, clone_function=lambda op: op, call_function=call)
        feature = taps[0]
    last = _node(model.outputs[0]).input_tensors[0] if head_input else model.outputs[0]
    return keras.Model(model.inputs, [feature, last])


def _explainer(model):
    """The traced function ``(images in [0, 1], classes or -1) -> (cams, classes)``."""
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(
            f"model '{model.name}' ends in a {type(head).__name__}, not a Dense layer: "
            "Grad-CAM needs the class scores before the softmax"
        )
    tapped = _tapped(model, feature_map_layer(model))

    def explain(images, classes):
        with tf.GradientTape() as tape:
            tape.watch(images)  # records every op from the image, frozen layers too
            feature, hidden = tapped(images, training=False)
            # The class scores before the softmax, from the head's own (live) weights.
            logits = tf.matmul(tf.cast(hidden, tf.float32), tf.cast(head.kernel, tf.float32))
            if head.use_bias:
                logits += tf.cast(head.bias, tf.float32)
            classes = tf.where(
                classes < 0, tf.argmax(logits, axis=1, output_type=tf.int32), classes
            )
            score = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
        # Channels weighted by the mean gradient of the class score; ReLU keeps what counts for it.
        grads = tf.cast(tape.gradient(score, feature), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * tf.cast(feature, tf.float32), axis=-1)), classes

    height, width = model_image_size(model)
    return tf.function(  # one trace per model, whatever the batch size
        explain,
        input_signature=[
            tf.TensorSpec((None, height, width, 3), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ],
    )


def grad_cam(model, images, class_index=None, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM heatmaps of ``images`` for their top-1 class, or the classes given.

    Args:
        model: a built classifier, input float32 (B, H, W, 3) in [0, 1], ending in a Dense layer.
        images: (N, H, W, 3), uint8 in [0, 255] or float in [0, 1], the model's input size.
        class_index: ``None`` (top-1), one int, or int (N,), in [0, C).
        batch_size: images per gradient computation (memory only).

    Returns:
        float32 (N, H, W) in [0, 1], each image divided by its maximum (all 0 if none).

    Raises:
        ValueError: no convolution or Dense head; images not (N, H, W, 3) of the model's size,
            not pixels, or none; a class index outside [0, C).
    """
    x, scale = model_input(images)
    height, width = model_image_size(model)
    if not len(x):
        raise ValueError("no images to explain: images holds 0 images")
    if x.shape[1:3] != (height, width):
        raise ValueError(
            f"images are {x.shape[2]}x{x.shape[1]} but model '{model.name}' takes "
            f"{width}x{height}: resize them first, e.g. cu.load_image(photo, size="
            f"({height}, {width}))"
        )
    classes = _check_classes(class_index, len(x), model.output_shape[-1])
    if model not in _EXPLAINERS:
        _EXPLAINERS[model] = _explainer(model)
    grid = feature_map_grid(model)
    rows = _placement(height, grid["first_centre"][0], grid["spacing"][0], grid["cells"][0])
    cols = _placement(width, grid["first_centre"][1], grid["spacing"][1], grid["cells"][1])
    maps = []
    for i in range(0, len(x), batch_size):
        cams, _ = _EXPLAINERS[model](
            scaled(x[i : i + batch_size], scale), tf.constant(classes[i : i + batch_size])
        )
        maps.append(to_numpy(cams).astype(np.float32))
    # Placed at the receptive-field centres (feature_map_grid), linear between them.
    heat = np.einsum("yi,nij,xj->nyx", rows, np.concatenate(maps), cols)
    peak = heat.max(axis=(1, 2), keepdims=True)
    return np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0).astype(np.float32)


def _check_classes(class_index, n: int, num_classes: int) -> np.ndarray:
    """int32 (n,) class indices, -1 meaning the top-1 class."""
    if class_index is None:
        return np.full(n, -1, np.int32)
    classes = np.asarray(class_index)
    if not np.issubdtype(classes.dtype, np.integer) or classes.ndim > 1:
        raise ValueError(
            f"class_index must be an int or ints (N,), not {classes.dtype} {classes.shape}"
        )
    classes = np.broadcast_to(classes, (n,)) if classes.ndim == 0 else classes
    if len(classes) != n:
        raise ValueError(f"class_index holds {len(classes)} classes for {n} images")
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(
            f"class_index must be in [0, {num_classes - 1}], not {classes.min()}..{classes.max()}"
        )
    return classes.astype(np.int32)


def explain_photo(
    model, path_or_array, max_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A photo of any size and its top-1 Grad-CAM heatmap stretched back to its size.

    Args:
        max_side: if given, the photo returned (and its heatmap) is shrunk to at most this
            many pixels a side; the network still sees the whole photo squashed to its input
            size, as ``predict_image`` does, so the heatmap explains the class it lists first.

    Returns:
        ``(photo uint8 (H, W, 3), heatmap float32 (H, W) in [0, 1])``.
    """
    from PIL import Image

    photo = load_image(path_or_array)
    height, width = model_image_size(model)
    small = load_image(photo, size=(height, width))
    heat = grad_cam(model, small[None])[0]
    if max_side is not None:
        shown = Image.fromarray(photo)
        shown.thumbnail((max_side, max_side))
        photo = np.asarray(shown)
    # Photo pixel p lies at (p + 0.5) * h / H - 0.5 of the h pixels the model saw.
    rows, cols = (
        _placement(big, (big / n - 1) / 2, big / n, n)
        for big, n in ((photo.shape[0], height), (photo.shape[1], width))
    )
    return photo, (rows @ heat @ cols.T).astype(np.float32)


def overlay_heatmap(image, heatmap, alpha: float = 0.45) -> np.ndarray:
    """``heatmap`` (H, W) in [0, 1] blended in jet colours over ``image``: uint8 (H, W, 3).

    Raises:
        ValueError: ``image`` not uint8 (H, W, 3), sizes differ, or ``heatmap`` outside [0, 1].
    """
    from matplotlib import colormaps

    image, heatmap = np.asarray(image), np.asarray(heatmap, np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != heatmap.shape:
        raise ValueError(
            f"image ({image.dtype} {image.shape}) and heatmap {heatmap.shape} must be uint8 "
            "(H, W, 3) and (H, W), as explain_photo returns them"
        )
    if heatmap.size and not 0 <= heatmap.min() <= heatmap.max() <= 1:
        raise ValueError("heatmap must be in [0, 1], as grad_cam returns it")
    colour = colormaps["jet"](heatmap)[..., :3] * 255
    return np.round((1 - alpha) * image + alpha * colour).astype(np.uint8)
