"""Augmentation: Keras layers (float32 in [0, 1]), albumentations (uint8) and per-batch seeds."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import zlib

import keras
import numpy as np
import tensorflow as tf

from .checks import check_pixels
from .models import layer_config
from .published import AUGMENTATION


def derive_seed(seed: int, *names) -> int:
    """An int seed in [0, 2**31) for one random source, unrelated to other ``names``' seeds."""
    # SeedSequence mixes seed with each name's CRC-32: sources never draw in lockstep, as two
    # layers given one seed would.
    words = [int(seed) % 2**32, *(zlib.crc32(str(n).encode()) for n in names)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def augmentation_layers(
    flip: bool = True,
    shift: float = 0.1,
    rotation_degrees: float = 0.0,
    seed: int | None = None,
):
    """A ``keras.Sequential`` augmenting float32 (B, H, W, C) batches when ``training``.

    Args:
        flip: random horizontal flip.
        shift: maximum shift as a fraction of the image size (0.1 = 3 px on 32x32); 0: off.
        rotation_degrees: maximum rotation either way, in degrees; 0: off.
        seed: the run's seed, or ``None``.
    """
    steps, f32 = [], "float32"  # the pipeline's images, whatever the global dtype policy
    if flip:
        steps.append(lambda s: keras.layers.RandomFlip("horizontal", seed=s, dtype=f32))
    if shift:
        steps.append(
            lambda s: keras.layers.RandomTranslation(
                shift, shift, fill_mode="nearest", seed=s, dtype=f32
            )
        )
    if rotation_degrees:
        steps.append(
            lambda s: keras.layers.RandomRotation(
                rotation_degrees / 360.0, fill_mode="nearest", seed=s, dtype=f32
            )
        )
    # One stream per layer. Borders: nearest pixel, as the old ImageDataGenerator. Inside
    # make_dataset the draws come per batch instead (augment_with_seeds).
    own = [None if seed is None else derive_seed(seed, "augment", i) for i in range(len(steps))]
    return keras.Sequential(
        [make(s) for make, s in zip(steps, own, strict=True)], name="augmentation"
    )


# Keras' SeedGenerator state races in a parallel tf.data map and restarts with the run.
class _BatchSeeds(keras.random.SeedGenerator):
    """Stateless seeds for one call of a Keras random layer: ``seed`` folded with the draw count."""

    def __init__(self, seed):  # no super().__init__: it would create the state variable
        self._seed, self._draws = seed, 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def fold_seed(seed: int, *data):
    """A stateless seed, int64 (2,), from an int seed folded with int tensors ``data``."""
    out = tf.constant([seed, 0], tf.int64)
    # fold_in(s, d) is [hash(s), d]; the final fold with 0 mixes d into element 0 too, which
    # albumentations uses alone.
    for d in (*data, 0):
        out = tf.random.experimental.stateless_fold_in(out, tf.cast(d, tf.int64))
    return out


def augment_with_seeds(augment, images, seed: int, batch_key):
    """Apply Keras image layers ``augment`` with draws fixed by ``seed`` and ``batch_key``.

    Raises:
        TypeError: a layer is not a Keras image preprocessing layer.
    """
    layers = augment.layers if isinstance(augment, keras.Sequential) else [augment]
    for i, layer in enumerate(layers):
        if not hasattr(layer, "get_random_transformation"):
            raise TypeError(
                f"augment must be Keras image preprocessing layers (e.g. "
                f"cu.augmentation_layers()), not {type(layer).__name__}"
            )
        draws = _BatchSeeds(fold_seed(derive_seed(seed, "augment", i), *batch_key))
        transformation = layer.get_random_transformation(images, training=True, seed=draws)
        images = layer.transform_images(images, transformation, training=True)
    return images


def describe_augmentation(augment, batch_transform) -> list:
    """JSON-able description of a pipeline's augmentation, for a run's plan."""
    described = []
    layers = [] if augment is None else getattr(augment, "layers", [augment])
    for layer in layers:  # without "seed": the pipeline draws from its own seeds
        described.append({"layer": type(layer).__name__, **layer_config(layer, "seed")})
    if batch_transform is not None:
        described.append(_describe_callable(batch_transform))
    return json.loads(json.dumps(described, default=str))


def _describe_callable(fn) -> dict:
    """A batch transform as a plan sees it: its name, and what it is bound to where that can
    change without the name changing (a ``functools.partial``'s arguments, a lambda's or a
    closure's code and captured values), so a resume with other arguments is refused."""
    if isinstance(fn, functools.partial):
        return {**_describe_callable(fn.func), "args": repr(fn.args),
                "keywords": repr(sorted(fn.keywords.items()))}  # fmt: skip
    described = {"batch_transform": getattr(fn, "__qualname__", type(fn).__name__)}
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is not None and (code.co_name == "<lambda>" or cells):
        source = code.co_code + repr(code.co_consts).encode()
        described["code"] = hashlib.sha256(source).hexdigest()[:12]
        described["captured"] = repr([cell.cell_contents for cell in cells])
    return described


def albumentations_transform(seed: int | None = None):
    """The seed's albumentations augmentation for 32x32 uint8 images (albumentations 2.0.8)."""
    import albumentations as A
    import cv2

    # ShiftScaleRotate's reflect border made explicit (albumentations 2.x defaults to black);
    # ElasticTransform alpha 80, sigma 4 moves ~1.7 px on 32x32 (the default alpha 1 moves nothing).
    seed_values, border = AUGMENTATION["efficientnet_b0"], cv2.BORDER_REFLECT_101
    shift = seed_values["width_shift"]
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                translate_percent={"x": (-shift, shift), "y": (0.0, 0.0)},
                scale=1.0,
                rotate=0.0,
                shear=0.0,
                border_mode=border,
                p=0.5,
            ),
            A.GridDistortion(border_mode=border, p=seed_values["GridDistortion"]),
            A.ElasticTransform(
                alpha=80.0, sigma=4.0, border_mode=border, p=seed_values["ElasticTransform"]
            ),
        ],
        seed=seed,
    )


_AUGMENTERS = threading.local()  # one Compose per tf.data worker thread


def albumentations_batch(images, seed: int) -> np.ndarray:
    """Augment a batch with :func:`albumentations_transform`, repeatably for a given int ``seed``.

    Args:
        images: uint8 (N, H, W, 3) in [0, 255], or float in [0, 1] (rounded to uint8 first).

    Returns:
        uint8 (N, H, W, 3) for uint8 input, else float32 in [0, 1].

    Raises:
        ValueError: not (N, H, W, 3), neither uint8 nor float, or floats outside [0, 1].
    """
    images = check_pixels(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (N, H, W, 3), got shape {images.shape}")
    # albumentations treats float images as [0, 1]; 0-255 floats would saturate.
    batch = images if images.dtype == np.uint8 else np.round(images * 255).astype(np.uint8)
    if not hasattr(_AUGMENTERS, "transform"):
        _AUGMENTERS.transform = albumentations_transform()
    transform = _AUGMENTERS.transform
    transform.set_random_seed(int(seed) % 2**63)
    out = np.stack([transform(image=image)["image"] for image in batch]) if len(batch) else batch
    return out if images.dtype == np.uint8 else out.astype(np.float32) / 255.0


def albumentations_batch_transform(images, seed):
    """:func:`albumentations_batch` on a uint8 (B, H, W, 3) tensor inside ``tf.data``; same shape.

    Raises:
        TypeError: ``images`` is not uint8 (augment before normalising).
    """
    if images.dtype != tf.uint8:
        raise TypeError(
            f"albumentations_batch_transform takes uint8 batches in [0, 255], not {images.dtype}: "
            "apply it before normalisation (make_dataset's batch_transform does)"
        )
    # numpy_function holds the GIL (OpenCV releases it) and loses the static shape fit needs.
    out = tf.numpy_function(albumentations_batch, [images, seed], tf.uint8, stateful=False)
    return tf.ensure_shape(out, images.shape)
