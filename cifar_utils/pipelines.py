"""``make_dataset``: the notebooks' ``tf.data`` pipelines; uint8 images to float32 in [0, 1]."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .augment import augment_with_seeds, derive_seed, describe_augmentation, fold_seed
from .checks import check_labels, check_pixels, check_positive_int
from .data import data_fingerprint


def model_input(x) -> tuple[np.ndarray, float]:
    """``(images, scale)``: uint8 (N, H, W, 3) with 255.0, or float ones as float32 with 1.0.

    Raises:
        ValueError: not (N, H, W, 3); another dtype; NaN/inf or floats outside [0, 1].
    """
    x = check_pixels(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), not shape {x.shape}")
    if x.dtype == np.uint8:
        return x, 255.0
    return x.astype(np.float32, copy=False), 1.0


def scaled(images, scale: float):
    """A batch from :func:`model_input` as the models take it: float32 in [0, 1]."""
    return tf.cast(images, tf.float32) / scale


# A transformation returns a plain dataset, which train takes with a warning.
class TrainingData(tf.data.Dataset):
    """A training dataset that knows its epochs, ``steps_per_epoch`` and ``plan`` (exact resume)."""

    def __init__(self, stream, steps_per_epoch: int, plan: dict, epoch_seed: int):
        self._stream, self.steps_per_epoch, self.plan = stream, steps_per_epoch, plan
        keys = tf.data.Dataset.random(seed=epoch_seed, rerandomize_each_iteration=True)
        self._base = stream(keys.take(1), 1)
        # tf.data has no public way to subclass a dataset: this wraps one as its own
        # unchanged-structure datasets do.
        super().__init__(self._base._variant_tensor)

    def _inputs(self):
        return [self._base]

    @property
    def element_spec(self):
        return self._base.element_spec

    def from_epoch(self, first: int, last: int) -> tf.data.Dataset:
        """Epochs ``first`` to ``last - 1`` (0-based) as one dataset, the same whoever asks."""
        return self._stream(tf.data.Dataset.range(first, last), last - first)


def make_dataset(
    x,
    y,
    *,
    batch_size: int,
    training: bool,
    augment=None,
    num_classes: int = 100,
    seed: int = 0,
    batch_transform=None,
):
    """A ``tf.data`` pipeline: (shuffle), batch, (augment), normalise, one-hot, prefetch.

    Args:
        x: images (N, H, W, 3), uint8 in [0, 255] or float in [0, 1].
        y: int labels (N,) in [0, num_classes).
        batch_size: images per batch (an epoch's last may be smaller).
        training: shuffle every epoch and apply ``augment`` and ``batch_transform``.
        augment: Keras preprocessing layers on float32 batches in [0, 1].
        seed: fixes order and augmentation with the epoch and batch index.
        batch_transform: ``(uint8 (B, H, W, 3), int64 seed) -> images``, before normalising.

    Returns:
        Batches ``(float32 (B, H, W, 3) in [0, 1], float32 one-hot (B, num_classes))``: a
        :class:`TrainingData` when ``training``, else a ``tf.data.Dataset``.

    Raises:
        ValueError: bad images or labels, not one label per image, or ``batch_transform`` with
            float images.
    """
    x, scale = model_input(x)
    y = check_labels(y, num_classes, "labels")
    if len(x) != len(y) or not len(x):
        raise ValueError(
            f"need one label per image and at least one image, got {len(x)} "
            f"images and {len(y)} labels"
        )

    def prepare(images, labels):
        return scaled(images, scale), tf.one_hot(labels, num_classes)

    if not training:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    if batch_transform is not None and x.dtype != np.uint8:
        raise ValueError("batch_transform takes uint8 batches: pass the uint8 images")
    steps = steps_per_epoch(len(x), batch_size)
    stream = _epoch_stream(x, y, batch_size, steps, prepare, augment, seed, batch_transform)
    plan = {  # what train records: a resume with another plan is refused
        "data": data_fingerprint(x, y),
        "images": len(x),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "augmentation": describe_augmentation(augment, batch_transform),
    }
    return TrainingData(stream, steps, plan, derive_seed(seed, "epochs"))


def _epoch_stream(x, y, batch_size, steps, prepare, augment, seed, batch_transform):
    """``stream(epoch_numbers, count)``: those epochs' batches, fixed by seed, epoch, batch."""
    images, labels = tf.constant(x), tf.constant(y)
    order_seed = derive_seed(seed, "shuffle")
    transform_seed = derive_seed(seed, "batch_transform")

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(x), dtype=tf.int64), seed=fold_seed(order_seed, epoch)
        )
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda b, idx: (epoch, b, idx))

    def load(epoch, b, idx):
        batch = tf.gather(images, idx)
        if batch_transform is not None:
            batch = batch_transform(batch, fold_seed(transform_seed, epoch, b)[0])
        batch, onehot = prepare(batch, tf.gather(labels, idx))
        if augment is not None:
            batch = augment_with_seeds(augment, batch, seed, (epoch, b))
        return batch, onehot

    def stream(epochs, count):
        ds = epochs.flat_map(one_epoch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(count * steps))  # for Keras
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    return stream


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps in one epoch, ``ceil(train_size / batch_size)`` (352 for 45,000 at 128).

    Raises:
        ValueError: ``train_size`` or ``batch_size`` not a positive int.
    """
    train_size = check_positive_int(train_size, "train_size")
    return -(-train_size // check_positive_int(batch_size, "batch_size"))
