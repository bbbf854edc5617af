"""Shared helpers for the CIFAR-100 classifier notebooks.

Sections: data (loading, label names, splits), pipelines (``tf.data`` and
augmentation), models, training glue (checkpoints, resume, results), evaluation,
plots, export of a trained model, and the command line (``python cifar_utils.py --help``:
``report``, ``curves``, ``export``, ``predict``). Every notebook imports this module as
``cu``; the heavy lifting lives here.

Image conventions: uint8 NHWC ``(N, 32, 32, 3)`` in [0, 255] as loaded; the
pipelines hand the models float32 in [0, 1] unless stated otherwise. Labels are
int64 ``(N,)`` in [0, 99] (fine) or [0, 19] (coarse).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# --------------------------------------------------------------------------- data

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"

# Superclass -> its five classes, as listed on https://www.cs.toronto.edu/~kriz/cifar.html.
_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: The 20 coarse label names (superclasses), in the order of the official ``meta`` file.
COARSE_LABEL_NAMES = tuple(sorted(_SUPERCLASSES))
#: The 100 fine label names, in the order of the official ``meta`` file (alphabetical).
FINE_LABEL_NAMES = tuple(sorted(n for names in _SUPERCLASSES.values() for n in names))
#: ``FINE_TO_COARSE[fine_label]`` is the coarse label: int64 (100,) in [0, 19].
FINE_TO_COARSE = np.array(
    [
        COARSE_LABEL_NAMES.index(next(s for s, names in _SUPERCLASSES.items() if fine in names))
        for fine in FINE_LABEL_NAMES
    ],
    dtype=np.int64,
)


class CifarDataError(RuntimeError):
    """The CIFAR-100 data could not be found, downloaded or read; the message says how to fix it."""


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a callable outside the numpy-array allow-list."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for untrusted archives: rebuilds numpy arrays and refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise _RefusedGlobal(
                f"refusing to load '{module}.{name}': a CIFAR-100 pickle holds only "
                "dicts, lists, strings and numpy arrays"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor
        return getattr(np, name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise CifarDataError(
            f"{where} is not a safe CIFAR-100 pickle ({exc}). It may have been tampered with: "
            f"delete it and get the official archive from {CIFAR100_URL}"
        ) from None
    except Exception as exc:  # truncated or garbage streams raise many types
        raise CifarDataError(
            f"{where} is truncated or corrupt ({type(exc).__name__}: {exc}). "
            f"Delete it and get the official archive again from {CIFAR100_URL}"
        ) from None
    if not isinstance(obj, dict):
        raise CifarDataError(f"{where} holds a {type(obj).__name__}, not the dict CIFAR-100 uses")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(meta: dict, key: str, expected: tuple, where: str) -> None:
    names = [n.decode() if isinstance(n, bytes) else n for n in meta.get(key, [])]
    if tuple(names) != expected:
        raise CifarDataError(
            f"{where}: '{key}' holds {len(names)} names that are not CIFAR-100's "
            f"{len(expected)} {key.split('_')[0]} labels; this is not a CIFAR-100 archive"
        )


def _parse_split(d: dict, where: str, label_mode: str) -> tuple[np.ndarray, np.ndarray]:
    missing = {"data", "fine_labels", "coarse_labels"} - set(d)
    if missing:
        raise CifarDataError(f"{where} lacks the key(s) {sorted(missing)}: not a CIFAR-100 split")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CifarDataError(
            f"{where}: 'data' is {data.dtype} {data.shape}; CIFAR-100 stores uint8 rows of "
            "3072 values (N, 3072), i.e. 32x32 images in 3 channel-first planes"
        )
    labels = np.asarray(d[f"{label_mode}_labels"], dtype=np.int64)
    n_classes = 100 if label_mode == "fine" else 20
    if labels.shape != (len(data),):
        raise CifarDataError(
            f"{where}: {labels.size} {label_mode} labels for {len(data)} images; they must match"
        )
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        raise CifarDataError(
            f"{where}: {int(bad.sum())} {label_mode} label(s) outside [0, {n_classes - 1}] "
            f"(e.g. {int(labels[bad][0])}); the file is corrupt"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_members(source: Path) -> dict[str, bytes]:
    """Bytes of train/test/meta from an extracted folder or a ``.tar.gz`` archive."""
    if source.is_dir():
        missing = [m for m in ("train", "test", "meta") if not (source / m).is_file()]
        if missing:
            raise CifarDataError(
                f"{source} is missing {missing}: the folder is incomplete. Extract "
                f"{ARCHIVE_NAME} again (it holds {FOLDER_NAME}/train, test and meta)"
            )
        return {m: (source / m).read_bytes() for m in ("train", "test", "meta")}
    try:
        with tarfile.open(source, "r:gz") as tar:
            found = {Path(i.name).name: i for i in tar.getmembers() if i.isfile()}
            missing = [m for m in ("train", "test", "meta") if m not in found]
            if missing:
                raise CifarDataError(
                    f"{source} has no {missing} member(s): not a complete {ARCHIVE_NAME}"
                )
            return {m: tar.extractfile(found[m]).read() for m in ("train", "test", "meta")}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarDataError(
            f"{source} is truncated or corrupt ({type(exc).__name__}: {exc}). "
            f"Download it again from {CIFAR100_URL}"
        ) from None


def _file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (``"md5"``, ``"sha256"``, ...) of the file at ``path``, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _find_local(path: Path) -> Path:
    """The folder or archive inside a user-named location, else a CifarDataError."""
    if path.is_file():
        return path
    candidates = [path, path / FOLDER_NAME, path / ARCHIVE_NAME]
    for cand in candidates:
        if cand.is_file() or (cand / "train").exists() or (cand / "meta").exists():
            return cand
    raise CifarDataError(
        f"No CIFAR-100 copy at '{path}'. Point DATA_DIR / CIFAR100_DIR at the "
        f"{ARCHIVE_NAME} file, or at a folder holding it or its extracted "
        f"{FOLDER_NAME}/ folder (train, test, meta). The archive is at {CIFAR100_URL}"
    )


def default_cache_dir() -> Path:
    """Keras' dataset cache: ``$KERAS_HOME/datasets`` or ``~/.keras/datasets``."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "datasets"


def _cached_folder(cache: Path) -> Path | None:
    """An existing extracted copy in the Keras cache (Keras 3 layout first, then Keras 2)."""
    for folder in (cache / f"{FOLDER_NAME}-target" / FOLDER_NAME, cache / FOLDER_NAME):
        if folder.is_dir():
            return folder
    return None


def _download(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Download ``url`` to ``dest`` through a temporary file; ``dest`` appears only if complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = keras.utils.Progbar(total, unit_name="byte")
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                bar.add(len(chunk))
        if total is not None and os.path.getsize(tmp) != total:
            raise CifarDataError(
                f"Download of {url} stopped after {os.path.getsize(tmp)} of {total} bytes; "
                "run again to retry"
            )
        if md5 is not None and (got := _file_digest(Path(tmp), "md5")) != md5:
            raise CifarDataError(
                f"Checksum mismatch for {url}: md5 {got}, expected {md5}. The download is "
                "corrupt or not the official archive; nothing was kept. Run again to retry"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise CifarDataError(
            f"Could not download CIFAR-100 from {url} ({exc}). No local copy was found "
            f"either. Without internet: fetch {CIFAR100_URL} elsewhere, then pass its path as "
            f"data_dir (notebook parameter DATA_DIR), set CIFAR100_DIR to it, or put it at "
            f"{dest}"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _extract(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` (atomically: a temp folder renamed at the end)."""
    members = _read_members(archive)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".part", dir=target.parent))
    try:
        (tmp / FOLDER_NAME).mkdir()
        for name, blob in members.items():
            (tmp / FOLDER_NAME / name).write_bytes(blob)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / FOLDER_NAME


def locate_cifar100(
    data_dir=None,
    *,
    url: str = CIFAR100_URL,
    md5: str | None = CIFAR100_MD5,
    cache_dir=None,
    timeout: float = 60.0,
) -> Path:
    """Find (or download) CIFAR-100 and return the folder or ``.tar.gz`` to read it from.

    Order: ``data_dir``; else the ``CIFAR100_DIR`` environment variable; else the Keras
    cache (``cache_dir``, default :func:`default_cache_dir`, extracted as
    ``cifar-100-python-target/cifar-100-python/``); else download ``url`` into the cache,
    check its md5 and extract it there. A named location must hold the data: it is
    never silently replaced by a download. A cache folder missing files is rebuilt from
    the cached archive or a new download, with a warning.

    Raises:
        CifarDataError: nothing found and the download failed (no network), checksum
            mismatch, or a truncated/corrupt archive. Failed downloads and extractions
            leave no partial file or folder behind.
    """
    named = data_dir if data_dir is not None else os.environ.get("CIFAR100_DIR") or None
    if named is not None:
        return _find_local(Path(named).expanduser())
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = _cached_folder(cache)
    if folder is not None:
        missing = [m for m in ("train", "test", "meta") if not (folder / m).is_file()]
        if not missing:
            return folder
        warnings.warn(
            f"The CIFAR-100 cache {folder} is incomplete (missing {missing}), probably from an "
            "interrupted extraction; rebuilding it from the archive.",
            stacklevel=2,
        )
        shutil.rmtree(folder)
    archive = cache / ARCHIVE_NAME
    if archive.is_file() and md5 is not None and _file_digest(archive, "md5") != md5:
        warnings.warn(f"{archive} fails its md5 check; downloading it again.", stacklevel=2)
        archive.unlink()
    if not archive.is_file():
        _download(url, archive, md5, timeout)
    return _extract(archive, cache / f"{FOLDER_NAME}-target")


def load_cifar100(data_dir=None, label_mode: str = "fine", **locate_kwargs):
    """Load CIFAR-100 as ``(x_train, y_train), (x_test, y_test)``.

    Args:
        data_dir: a ``cifar-100-python.tar.gz`` file, or a folder holding it, its
            extracted ``cifar-100-python/`` folder, or ``train``/``test``/``meta``
            themselves. ``None``: ``$CIFAR100_DIR``, then the Keras cache, then download
            (see :func:`locate_cifar100`, which takes ``url``, ``md5``, ``cache_dir`` and
            ``timeout`` as keywords).
        label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
        x: uint8 ``(N, 32, 32, 3)`` in [0, 255] (N = 50,000 train, 10,000 test for the
        official archive); y: int64 ``(N,)`` in [0, 99] (fine) or [0, 19] (coarse).
        Pickles are read with a restricted unpickler (numpy arrays only).

    Raises:
        ValueError: ``label_mode`` is neither ``"fine"`` nor ``"coarse"``.
        CifarDataError: see :func:`locate_cifar100`; also a missing ``train``/``test``/
            ``meta``, an unsafe pickle, wrong array shapes or labels out of range.
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f'label_mode must be "fine" or "coarse", not {label_mode!r}')
    source = locate_cifar100(data_dir, **locate_kwargs)
    members = _read_members(source)
    meta = _unpickle(members["meta"], f"{source}:meta")
    _names(meta, "fine_label_names", FINE_LABEL_NAMES, f"{source}:meta")
    _names(meta, "coarse_label_names", COARSE_LABEL_NAMES, f"{source}:meta")
    splits = []
    for split in ("train", "test"):
        d = _unpickle(members[split], f"{source}:{split}")
        splits.append(_parse_split(d, f"{source}:{split}", label_mode))
    return splits[0], splits[1]


def train_val_split(x, y, val_size: int = 5000, seed: int = 0, train_limit: int | None = None):
    """Seeded, stratified split of the training set into train and validation parts.

    Args:
        x: images (N, ...) of any dtype; y: int labels (N,).
        val_size: images held out for validation (model selection); CIFAR-100's test
            set is kept for the final number only.
        seed: the split's random seed.
        train_limit: keep only this many training images (stratified), for quick runs.

    Returns:
        ``(x_train, y_train), (x_val, y_val)``; each class keeps its share in both.

    Raises:
        ValueError: ``val_size`` or ``train_limit`` leave fewer images than classes.
    """
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y))
    if not n_classes <= val_size <= len(y) - n_classes:
        raise ValueError(
            f"val_size={val_size} must be between {n_classes} (one per class) and "
            f"{len(y) - n_classes} for {len(y)} images"
        )
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_size, random_state=seed, stratify=y
    )
    if train_limit is not None and train_limit < len(y_tr):
        if train_limit < n_classes:
            raise ValueError(f"train_limit={train_limit} is below the {n_classes} classes")
        x_tr, _, y_tr, _ = train_test_split(
            x_tr, y_tr, train_size=train_limit, random_state=seed, stratify=y_tr
        )
    return (x_tr, y_tr), (x_val, y_val)


def data_fingerprint(x, y) -> str:
    """Short md5 hex digest (12 characters) of images ``x`` and labels ``y``, in order.

    Identifies the exact training set of a run (data, split, ``TRAIN_LIMIT``), e.g. for
    :func:`train`'s ``plan``; about 0.3 s for CIFAR-100's 45,000 training images.
    """
    digest = hashlib.md5(np.ascontiguousarray(x).data)
    digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return digest.hexdigest()[:12]


# --------------------------------------------------------------- pipelines


def augmentation_layers(
    flip: bool = True,
    shift: float = 0.1,
    rotation_degrees: float = 0.0,
    seed: int | None = None,
):
    """Keras preprocessing layers for training-time augmentation.

    Args:
        flip: random horizontal flip.
        shift: maximum width/height shift as a fraction of the image size (0.1 = 3 px
            on 32x32); 0 disables it.
        rotation_degrees: maximum rotation either way, in degrees; 0 disables it.
        seed: seeds each layer, for repeatable augmentation.

    Returns:
        ``keras.Sequential`` mapping float32 batches (B, H, W, C) to the same shape;
        it only augments when called with ``training=True``. Borders are filled with
        the nearest pixel, as Keras' old ``ImageDataGenerator`` did.
    """
    steps = []
    if flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if shift:
        steps.append(keras.layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed))
    if rotation_degrees:
        steps.append(
            keras.layers.RandomRotation(rotation_degrees / 360.0, fill_mode="nearest", seed=seed)
        )
    return keras.Sequential(steps, name="augmentation")


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
        x: uint8 ``(N, H, W, 3)`` in [0, 255]; y: int labels ``(N,)`` in
            [0, num_classes).
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle every epoch (seeded) and apply ``augment``.
        augment: a callable on float32 batches in [0, 1], e.g.
            :func:`augmentation_layers`; called with ``training=True``.
        batch_transform: a callable ``(images, batch_seed) -> images`` on uint8 batches
            (B, H, W, 3) in [0, 255], applied before normalisation when ``training``, e.g.
            :func:`albumentations_batch_transform`. ``batch_seed`` is an int64 scalar tensor,
            new for every batch and epoch, drawn from ``seed`` (so repeatable).

    Returns:
        ``tf.data.Dataset`` of ``(images float32 (B, H, W, 3) in [0, 1],
        labels float32 one-hot (B, num_classes))``.
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and batch_transform is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, s: (batch_transform(batch[0], s), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def prepare(images, labels):
        images = tf.cast(images, tf.float32) / 255.0
        if training and augment is not None:
            images = augment(images, training=True)
        return images, tf.one_hot(labels, num_classes)

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------ models


def build_simple_cnn(num_classes: int = 100, input_shape=(32, 32, 3)):
    """The seed's simple network: 4 conv (64-128-256-512, 3x3 valid) + dense 256-256-100.

    Conv -> BatchNorm -> ReLU blocks, max-pooling after the first two (spatial size
    32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2), Dropout, GlobalAveragePooling, Dropout, Dense 256,
    Dense 256, Dense ``num_classes`` softmax. For 100 classes: 1,777,636 parameters,
    1,775,716 trainable and 1,920 non-trainable (BatchNorm moving statistics), as in
    the seed notebook's summary. Input: float32 (B, 32, 32, 3) in [0, 1].
    """
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, (width, pool, drop) in enumerate(
        [(64, True, 0.0), (128, True, 0.2), (256, False, 0.3), (512, False, 0.4)], start=1
    ):
        h = keras.layers.Conv2D(width, 3, padding="valid", use_bias=True, name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.Activation("relu", name=f"relu{i}")(h)
        if pool:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
        if drop:
            h = keras.layers.Dropout(drop, name=f"drop{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(0.5, name="drop_gap")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense1")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense2")(h)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(h)
    return keras.Model(inputs, outputs, name="simple_cnn")


def parameter_counts(model) -> dict:
    """``{"total", "trainable", "non_trainable"}`` parameter counts of a built model (ints)."""
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    non_trainable = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }


#: Widths of the complex network's twelve 3x3 'same' convolutions.
COMPLEX_CONV_WIDTHS = (64, 64, 128, 384, 384, 384, 384, 384, 512, 512, 512, 512)
#: 1-based conv indices followed by 2x2 max-pooling (32 -> 16 -> 8 -> 4 -> 2 -> 1), mapped to
#: the Dropout rate after that pool.
COMPLEX_POOL_DROPOUT = {2: 0.2, 3: 0.3, 5: 0.3, 8: 0.4, 12: 0.4}


def build_complex_cnn(
    num_classes: int = 100, input_shape=(32, 32, 3), l2: float = 5e-4, width_scale: float = 1.0
):
    """The seed's complex network: 12 conv layers + Dense 512 + Dense ``num_classes``.

    Twelve 3x3 'same' convolutions of widths :data:`COMPLEX_CONV_WIDTHS` (with bias, the
    Keras default), each followed by BatchNorm and ReLU; 2x2 max-pooling and Dropout after
    convs 2, 3, 5, 8 and 12 (:data:`COMPLEX_POOL_DROPOUT`), so 32x32 inputs end at 1x1x512;
    Flatten, Dense 512 + BatchNorm + ReLU + Dropout 0.5, Dense ``num_classes`` softmax.
    ``l2`` is the L2 factor on both dense kernels (the convs are unregularised). BatchNorm
    momentum is 0.9 (as in :func:`build_simple_cnn`), so the inference statistics settle
    within the first epoch.

    For 100 classes: 15,047,588 parameters, 15,038,116 trainable and 9,472 non-trainable
    (the moving mean and variance of the 13 BatchNorm layers: 2 x (4,224 + 512)), the
    figures of the seed notebook. The seed did not print its layer table; these widths
    are one 12-conv design that reproduces all three counts exactly.

    ``width_scale`` multiplies every conv and dense width (at least 1 unit each); the
    counts above hold only for 1.0, smaller values keep the depth for quick CPU checks.

    Input: float32 (B, 32, 32, 3) in [0, 1] (other sizes must be divisible by 32).
    Output: float32 (B, num_classes) probabilities.
    """
    if input_shape[0] % 32 or input_shape[1] % 32:
        raise ValueError(
            f"input_shape {input_shape}: height and width must be multiples of 32 for the "
            "five 2x2 poolings (CIFAR images are 32x32)"
        )

    def scaled(width):
        return max(1, round(width * width_scale))

    reg = keras.regularizers.L2(l2)
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, width in enumerate(COMPLEX_CONV_WIDTHS, start=1):
        h = keras.layers.Conv2D(scaled(width), 3, padding="same", name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.Activation("relu", name=f"relu{i}")(h)
        if i in COMPLEX_POOL_DROPOUT:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
            h = keras.layers.Dropout(COMPLEX_POOL_DROPOUT[i], name=f"drop{i}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(scaled(512), kernel_regularizer=reg, name="dense1")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn_dense1")(h)
    h = keras.layers.Activation("relu", name="relu_dense1")(h)
    h = keras.layers.Dropout(0.5, name="drop_dense1")(h)
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_regularizer=reg,
        dtype="float32",  # float32 probabilities under mixed precision
        name="predictions",
    )(h)
    return keras.Model(inputs, outputs, name="complex_cnn")


# ---------------------------------------------- transfer learning (EfficientNetB0)

#: The no-top ImageNet weights that ``efficientnet`` 1.1.1 downloads for EfficientNetB0.
EFFICIENTNET_B0_WEIGHTS = "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5"
EFFICIENTNET_B0_URL = (
    "https://github.com/Callidior/keras-applications/releases/download/efficientnet/"
    + EFFICIENTNET_B0_WEIGHTS
)
#: sha256 the package checks (``efficientnet.weights.IMAGENET_WEIGHTS_HASHES``).
EFFICIENTNET_B0_SHA256 = "c1421ad80a9fc67c2cc4000f666aa50789ce39eedb4e06d531b0c593890ccff3"
#: Per-channel RGB mean and standard deviation for images in [0, 1]: what
#: ``efficientnet.tfkeras.preprocess_input`` (keras_applications mode "torch") applies after
#: dividing 0-255 pixels by 255, i.e. the normalisation the package's ImageNet weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Name of the EfficientNetB0 base inside :func:`build_efficientnet_b0`'s model.
EFFICIENTNET_BASE = "efficientnet-b0"


class WeightsError(RuntimeError):
    """EfficientNetB0 weights could not be found, downloaded or loaded; the message says how."""


def _weights_howto(dest: Path) -> str:
    return (
        f"On a machine with internet, download {EFFICIENTNET_B0_URL}, check that its sha256 is "
        f"{EFFICIENTNET_B0_SHA256} (sha256sum), and put it at {dest}, or pass its path as "
        "weights (notebook parameter WEIGHTS)."
    )


def efficientnet_b0_weights_file(*, origin: str = EFFICIENTNET_B0_URL, cache_dir=None) -> Path:
    """Path of EfficientNetB0's no-top ImageNet weights in the Keras cache; download if absent.

    The file is ``cache_dir/`` :data:`EFFICIENTNET_B0_WEIGHTS` (default ``cache_dir``:
    ``$KERAS_HOME/models`` or ``~/.keras/models``, where the ``efficientnet`` package looks).
    A file already there must have the sha256 :data:`EFFICIENTNET_B0_SHA256`: the package
    itself would silently download a mismatching file again, which fails offline.

    Raises:
        WeightsError: the cached file has another sha256 (says what to do), or the download
            from ``origin`` failed (no network, wrong hash), with how to install it by hand.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "models"
    dest = folder / EFFICIENTNET_B0_WEIGHTS
    if dest.is_file():
        got = _file_digest(dest, "sha256")
        if got != EFFICIENTNET_B0_SHA256:
            raise WeightsError(
                f"{dest} has sha256 {got}, not {EFFICIENTNET_B0_SHA256}: it is truncated or "
                "another file (e.g. the with-top weights). The efficientnet package would "
                "silently download it again, which fails offline. Delete or replace it. "
                + _weights_howto(dest)
            )
        return dest
    try:
        path = keras.utils.get_file(
            EFFICIENTNET_B0_WEIGHTS,
            origin,
            cache_subdir=folder.name,
            cache_dir=str(folder.parent),
            file_hash=EFFICIENTNET_B0_SHA256,
        )
    except Exception as exc:  # Keras turns URL errors into a bare Exception
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # a download that failed its hash check; nothing was there before
        raise WeightsError(
            f"Could not download the EfficientNetB0 ImageNet weights from {origin} "
            f"({type(exc).__name__}: {exc}). " + _weights_howto(dest)
        ) from None
    return Path(path)


def _load_base_weights(base, path) -> None:
    """Load a weights file into the EfficientNetB0 base, or raise a WeightsError saying why not."""
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"No weights file at '{path}'. WEIGHTS must be 'imagenet', None or the path of a "
            f"file. " + _weights_howto(path.parent / EFFICIENTNET_B0_WEIGHTS)
        )
    if path.suffix != ".h5":
        raise WeightsError(
            f"'{path}' is not an .h5 weights file: pass {EFFICIENTNET_B0_WEIGHTS} or a file "
            "written by save_weights('....weights.h5') from this base"
        )
    if not h5py.is_hdf5(path):
        raise WeightsError(
            f"'{path}' is not a readable HDF5 file (a truncated download or an HTML error page?). "
            + _weights_howto(path.parent / EFFICIENTNET_B0_WEIGHTS)
        )
    problem = _load_weights_strictly(base, path)
    if problem:
        problem = problem.strip().splitlines()[0][:300]
        raise WeightsError(
            f"'{path}' does not fit EfficientNetB0 without its top ({problem}). Use the no-top "
            f"file {EFFICIENTNET_B0_WEIGHTS} (sha256 {EFFICIENTNET_B0_SHA256}) or weights saved "
            "from the base of build_efficientnet_b0"
        )


def build_efficientnet_b0(weights="imagenet", num_classes: int = 100, image_size: int = 224):
    """EfficientNetB0 (``efficientnet`` 1.1.1, no top) with a new head, for 32x32 images.

    Input float32 (B, 32, 32, 3) in [0, 1] (as :func:`make_dataset` gives) -> Resizing to
    ``image_size`` (bilinear, inside the model, so the input pipeline never holds 224x224
    images) -> Normalization with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (the package's
    own ``preprocess_input``, mode "torch", for [0, 1] input; no weights) -> the base (layer
    :data:`EFFICIENTNET_BASE`) -> GlobalAveragePooling -> Dropout 0.2 -> Dense ``num_classes``
    softmax. For 100 classes: 4,177,664 parameters, 4,135,648 trainable, 42,016 non-trainable
    (BatchNorm moving statistics), the base 4,049,564, as in the seed notebook.

    Args:
        weights: ``"imagenet"`` (the Keras cache, else downloaded; see
            :func:`efficientnet_b0_weights_file`), a path to an ``.h5`` file holding the base's
            weights (the package's no-top file, or a ``.weights.h5`` saved from this base), or
            ``None`` (random initialisation, for quick checks).

    Raises:
        WeightsError: weights missing, offline, wrong hash, unreadable or not fitting the base.
    """
    import efficientnet.tfkeras as efn

    base = efn.EfficientNetB0(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    if isinstance(weights, str) and weights == "imagenet":
        _load_base_weights(base, efficientnet_b0_weights_file())
    elif weights is not None:
        _load_base_weights(base, weights)
    inputs = keras.Input((32, 32, 3), name="image")
    h = keras.layers.Resizing(image_size, image_size, name="resize")(inputs)
    h = keras.layers.Normalization(
        mean=IMAGENET_MEAN, variance=np.square(IMAGENET_STD), name="imagenet_normalization"
    )(h)
    h = base(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(0.2, name="top_dropout")(h)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(h)
    return keras.Model(inputs, outputs, name="efficientnet_b0_transfer")


def set_base_trainable(model, trainable: bool):
    """Freeze (head phase) or unfreeze (fine-tuning) the EfficientNetB0 base of ``model``.

    BatchNormalization layers stay frozen either way, which in Keras 3 also runs them in
    inference mode (ImageNet statistics), as keras.io's "Image classification via fine-tuning
    with EfficientNet" recommends. For :func:`build_efficientnet_b0` with 100 classes the
    trainable count becomes 128,100 (head) or 4,093,632 (fine-tuning). Compile ``model``
    again afterwards. Returns ``model``.
    """
    base = model.get_layer(EFFICIENTNET_BASE)
    base.trainable = trainable
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def join_runs(**runs) -> dict:
    """One run state from consecutive training phases, e.g. ``head=..., finetune=...``.

    Args:
        runs: phase name -> the state :func:`train` returned for it, in training order.

    Returns:
        ``{"epoch", "seconds"}`` summed over the phases; ``"history"``: metric -> values
        per epoch over all phases (NaN where a phase lacks the metric); ``"best"`` and
        ``"best_epoch"`` of the last phase (whose ``best.weights.h5`` is the final model),
        counted from the first phase's start; ``"phases"``: ``[(name, first epoch), ...]``
        (1-based) for :func:`plot_history`. :func:`evaluate_and_save` takes it as ``run``
        with the last phase's run folder.
    """
    if not runs:
        raise ValueError("join_runs needs at least one phase, e.g. join_runs(head=run)")
    history, phases, done = {}, [], 0
    for name, run in runs.items():
        phases.append((name, done + 1))
        for key in set(history) | set(run["history"]):
            values = list(run["history"].get(key, []))
            history.setdefault(key, [np.nan] * done)
            history[key] += values + [np.nan] * (run["epoch"] - len(values))
        done += run["epoch"]
    last = list(runs.values())[-1]
    return {
        "epoch": done,
        "seconds": sum(r["seconds"] for r in runs.values()),
        "history": history,
        "best": last.get("best"),
        "best_epoch": done - last["epoch"] + last["best_epoch"] if "best_epoch" in last else None,
        "phases": phases,
    }


def albumentations_transform(seed: int | None = None):
    """The seed's albumentations augmentation for 32x32 uint8 images, as an ``A.Compose``.

    HorizontalFlip (p 0.5); Affine shifting the width by up to 50% (p 0.5; no rotation,
    scale or shear; the old ShiftScaleRotate's reflect border, ``cv2.BORDER_REFLECT_101``,
    given explicitly since albumentations 2.x defaults to black); GridDistortion (p 0.2) and
    ElasticTransform (p 0.2, ``alpha`` 80, ``sigma`` 4: about 1.7 pixels' mean displacement
    on 32x32, where the default ``alpha`` 1 moves nothing), both with the same border. Written
    for albumentations 2.0.8. ``seed`` makes the sequence of augmentations repeatable.
    """
    import albumentations as A
    import cv2

    border = cv2.BORDER_REFLECT_101
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                translate_percent={"x": (-0.5, 0.5), "y": (0.0, 0.0)},
                scale=1.0,
                rotate=0.0,
                shear=0.0,
                border_mode=border,
                p=0.5,
            ),
            A.GridDistortion(border_mode=border, p=0.2),
            A.ElasticTransform(alpha=80.0, sigma=4.0, border_mode=border, p=0.2),
        ],
        seed=seed,
    )


_AUGMENTERS = threading.local()  # one Compose per tf.data worker thread


def albumentations_batch(images, seed: int) -> np.ndarray:
    """Augment a batch with :func:`albumentations_transform`, repeatably for a given ``seed``.

    Args:
        images: uint8 (N, H, W, 3) in [0, 255], or float (N, H, W, 3) in [0, 1] (e.g. for
            :func:`plot_augmentation`), which is rounded to uint8 first: albumentations treats
            float images as [0, 1], so 0-255 floats would saturate.
        seed: any int (reduced modulo 2**63); per batch, so parallel calls stay repeatable.

    Returns:
        uint8 (N, H, W, 3) in [0, 255] for uint8 input, else float32 in [0, 1].

    Raises:
        ValueError: not (N, H, W, 3), or float values outside [0, 1].
        TypeError: neither uint8 nor float.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images (N, H, W, 3), got shape {images.shape}")
    if np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(
                f"float images must be in [0, 1] (albumentations' convention), these span "
                f"[{images.min():g}, {images.max():g}]; pass 0-255 data as uint8"
            )
        batch = np.round(images * 255).astype(np.uint8)
    elif images.dtype == np.uint8:
        batch = images
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], not {images.dtype}")
    if not hasattr(_AUGMENTERS, "transform"):
        _AUGMENTERS.transform = albumentations_transform()
    transform = _AUGMENTERS.transform
    transform.set_random_seed(int(seed) % 2**63)
    out = np.stack([transform(image=image)["image"] for image in batch]) if len(batch) else batch
    return out if images.dtype == np.uint8 else out.astype(np.float32) / 255.0


def albumentations_batch_transform(images, seed):
    """:func:`albumentations_batch` inside ``tf.data``: ``make_dataset(batch_transform=...)``.

    Runs through ``tf.numpy_function`` (Python, so parallel ``map`` calls share the GIL; the
    OpenCV work inside releases it) and restores the static shape with ``tf.ensure_shape``,
    which ``numpy_function`` loses and ``fit`` needs.

    Args:
        images: uint8 tensor (B, H, W, 3) in [0, 255]; seed: int64 scalar tensor.

    Returns:
        uint8 tensor of ``images``' shape, static shape included.

    Raises:
        TypeError: ``images`` is not uint8 (augment before normalising).
    """
    if images.dtype != tf.uint8:
        raise TypeError(
            f"albumentations_batch_transform takes uint8 batches in [0, 255], not {images.dtype}: "
            "apply it before normalisation (make_dataset's batch_transform does)"
        )
    out = tf.numpy_function(albumentations_batch, [images, seed], tf.uint8, stateful=False)
    return tf.ensure_shape(out, images.shape)


# ------------------------------------------------------------ training glue


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


def check_checkpoint_path(path, weights_only: bool) -> Path:
    """Return ``path`` as a Path if its suffix suits Keras 3, else raise ValueError.

    Keras 3 saves whole models to ``.keras`` (or legacy ``.h5``) and weights alone to
    ``.weights.h5``; any other suffix (``.hdf5``, ``.ckpt``, ...) is refused.
    """
    path = Path(path)
    if weights_only and not path.name.endswith(".weights.h5"):
        raise ValueError(
            f"Weights-only checkpoint '{path}' must end in '.weights.h5' in Keras 3 "
            f"(e.g. '{path.name.split('.')[0]}.weights.h5')"
        )
    if not weights_only and (
        path.suffix not in (".keras", ".h5") or path.name.endswith(".weights.h5")
    ):
        raise ValueError(
            f"Whole-model checkpoint '{path}' must end in '.keras' (or legacy '.h5') in "
            f"Keras 3 (e.g. '{path.name.split('.')[0]}.keras'); '.hdf5' is not accepted"
        )
    return path


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path`` (same suffixes); move it over ``path`` on success."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_checkpoint(model, path, weights_only: bool = True) -> Path:
    """Save ``model`` to ``path`` atomically: the old file stays intact until the new one is whole.

    Raises:
        ValueError: wrong suffix for Keras 3 (see :func:`check_checkpoint_path`).
    """
    path = check_checkpoint_path(path, weights_only)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as tmp:
        if weights_only:
            model.save_weights(tmp)
        else:
            model.save(tmp)
    return path


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def _load_weights_strictly(model, path) -> str | None:
    """``model.load_weights(path)``; returns why the file does not fit, else ``None``.

    Keras only warns ("Skipping variable loading ...") when a saved layer or optimizer does
    not match and leaves those variables as they were: a silent wrong result. Here that
    warning, like a ValueError/KeyError from a mismatched file, becomes the returned reason.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as exc:
            return str(exc)
    return next((str(w.message) for w in caught if "Skipping" in str(w.message)), None)


def _restore(model, run_dir: Path) -> None:
    """Load the last checkpoint's weights and optimizer state into a compiled ``model``."""
    if not model.optimizer.built:  # else Keras skips the saved optimizer variables
        with model.distribute_strategy.scope():  # the strategy the model was built under
            model.optimizer.build(model.trainable_variables)
    if _load_weights_strictly(model, run_dir / "last.weights.h5"):
        raise ValueError(
            f"The checkpoint in {run_dir} was written by a different model or optimizer "
            "and cannot be resumed. Start fresh (RESUME=False) or use another OUTPUT_DIR"
        ) from None


class _RunKeeper(keras.callbacks.Callback):
    """Each epoch: atomic last checkpoint (weights, optimizer, state.json) and best checkpoint."""

    def __init__(self, run_dir: Path, state: dict, monitor: str):
        super().__init__()
        self.run_dir, self.state, self.monitor = run_dir, state, monitor
        self.diverged = None
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            epoch = len(self.state["history"].get("loss", [])) + 1
            self.diverged = (epoch, f"batch {batch + 1} (loss)", loss)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # the dict the later callbacks get: log.csv gets the rate too
            lr = self.model.optimizer.learning_rate  # the schedule's value at the current step
            logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(lr)))
        logs = {k: float(v) for k, v in (logs or {}).items()}
        bad = [k for k in ("loss", "val_loss") if k in logs and not np.isfinite(logs[k])]
        if bad and not self.diverged:  # e.g. NaN weights after the epoch's last update
            self.diverged = (epoch + 1, f"the end of the epoch ({bad[0]})", logs[bad[0]])
            self.model.stop_training = True
        if self.diverged:
            return  # never checkpoint NaN weights
        for key, value in logs.items():
            self.state["history"].setdefault(key, []).append(value)
        self.state["seconds"] += time.perf_counter() - self._t0
        self.state["epoch"] = epoch + 1
        self.state["step"] = int(self.model.optimizer.iterations)
        score = logs.get(self.monitor)
        if score is not None and score > self.state.get("best", -np.inf):
            self.state["best"], self.state["best_epoch"] = score, epoch + 1
            save_checkpoint(self.model, self.run_dir / "best.weights.h5")
        save_checkpoint(self.model, self.run_dir / "last.weights.h5")  # with optimizer state
        write_json(self.run_dir / "state.json", self.state)


def compile_metrics() -> list:
    """Fresh metric objects for ``model.compile``: top-1 ``accuracy`` and ``top5_accuracy``."""
    return ["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy")]


def train(
    model,
    train_ds,
    val_ds,
    *,
    epochs: int,
    run_dir,
    resume: bool = True,
    monitor: str = "val_accuracy",
    callbacks=(),
    tensorboard: bool = False,
    plan: dict | None = None,
    verbose="auto",
) -> dict:
    """Fit a compiled ``model`` with checkpoints, a CSV log and resume after interruption.

    Writes into ``run_dir``: ``best.weights.h5`` (best ``monitor`` so far),
    ``last.weights.h5`` (weights and optimizer state) + ``state.json`` (after every
    epoch, each written atomically) and ``log.csv`` (one row per epoch, with the learning
    rate; see :func:`read_log`). With ``resume=True``
    and a ``state.json`` present, the weights, the optimizer state (so its step count
    and learning-rate schedule) and the history are restored and training continues at
    the next epoch; ``resume=False`` starts from scratch and overwrites them.
    ``tensorboard=True`` adds TensorBoard logs (per-epoch metrics and learning rate) under
    ``run_dir/tensorboard``; a resumed run continues their epoch axis (view them with
    ``tensorboard --logdir OUTPUT_DIR``).

    ``plan`` (JSON-able, e.g. ``{"data": data_fingerprint(x, y), "batch_size": 128}``) is
    stored with the run; resuming a run whose plan differs (other data, ``TRAIN_LIMIT`` or
    batch size) is refused, so old checkpoints never pass for a new run. Resuming with
    another ``epochs`` continues with a warning (a schedule planned from ``epochs`` is then
    re-planned from the restored step); a run that already has ``epochs`` epochs trains
    nothing and says so.

    Returns:
        The run state: ``{"epoch", "history" (metric -> list per epoch, all epochs),
        "seconds" (training wall time, all sessions), "best", "best_epoch",
        "initial_epoch" (where this call started), "step" (optimizer steps so far)}``.
        The history also holds
        ``learning_rate``: the optimizer's rate at the end of each epoch.

    Raises:
        TrainingDiverged: the loss (or val_loss) became NaN/inf; the last good checkpoint
            is kept and nothing from the diverged epoch is saved.
        ValueError: a saved optimizer state does not fit the model, or the saved run's
            ``plan`` differs from this one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    state = {"epoch": 0, "history": {}, "seconds": 0.0, "plan": plan, "epochs": epochs}
    if resume and state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved.get("plan") != plan:
            raise ValueError(
                f"{run_dir} holds a run with another plan ({saved.get('plan')}) than this one "
                f"({plan}): other data, TRAIN_LIMIT or batch size. Start over with "
                "RESUME=False, or use another OUTPUT_DIR to keep that run"
            )
        if saved.get("epochs", epochs) != epochs:
            warnings.warn(
                f"{run_dir} was planned for {saved.get('epochs')} epochs, this run asks for "
                f"{epochs}: continuing, with any learning-rate schedule re-planned from the "
                f"restored step.",
                stacklevel=2,
            )
        state = {**saved, "epochs": epochs}
        _restore(model, run_dir)
        if "step" in state and state["step"] != int(model.optimizer.iterations):
            warnings.warn(  # stopped between writing last.weights.h5 and state.json
                f"{run_dir}: last.weights.h5 is at optimizer step "
                f"{int(model.optimizer.iterations)} but state.json at step {state.get('step')}; "
                "the run was cut while checkpointing, so the weights are one epoch ahead of "
                "the history. Continuing from them.",
                stacklevel=2,
            )
        print(f"Resuming from {run_dir} after epoch {state['epoch']}.")
        if state["epoch"] >= epochs:
            print(
                f"That run already has {state['epoch']} epoch(s), EPOCHS={epochs}: nothing to "
                "train. Set RESUME=False (or another OUTPUT_DIR) to train again."
            )
    state["initial_epoch"] = state["epoch"]
    keeper = _RunKeeper(run_dir, state, monitor)
    if state["epoch"] < epochs:
        csv = keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=state["epoch"] > 0)
        if tensorboard:
            if state["epoch"] == 0:  # a fresh run replaces old logs, like its checkpoints
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            callbacks = [*callbacks, keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=state["epoch"],
            callbacks=[keeper, csv, *callbacks],
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
        )
    if keeper.diverged:
        epoch, where, loss = keeper.diverged
        raise TrainingDiverged(
            f"Training diverged: loss became {loss} at epoch {epoch}, {where}. Lower the "
            "learning rate or check the data; the last good checkpoint is "
            f"{run_dir / 'last.weights.h5'}"
        )
    return state


def read_log(run_dir) -> dict:
    """The per-epoch history in ``run_dir/log.csv`` (Keras' CSVLogger in :func:`train`).

    Safe while the run is still writing the file: a last line without its line end (a
    row being written) is skipped. Values Keras logs as ``NA`` become NaN.

    Returns:
        Column name -> list of floats, one per complete row (``accuracy``, ``loss``,
        ``learning_rate``, ``val_accuracy``, ...), and ``epoch``: ints from 1 (the file
        counts from 0), as :func:`plot_history` takes.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``log.csv`` (it is no training run).
        ValueError: no complete row yet, or a line is not a CSVLogger row.
    """
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{run_dir}' is not a training run: it has no log.csv (cu.train writes one "
            "into its run_dir, e.g. results/simple_cnn)"
        )
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]  # the row being written
    header, *rows = list(csv.reader(lines)) or [[]]
    if "epoch" not in header or not rows:
        raise ValueError(f"{path} has no complete row yet: wait until the first epoch ends")
    history = {name: [] for name in header}
    for number, row in enumerate(rows, start=2):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields, the header has {len(header)}")
            for name, value in zip(header, row, strict=True):
                history[name].append(float("nan") if value == "NA" else float(value))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}, is not a CSVLogger row ({exc})") from None
    history["epoch"] = [int(e) + 1 for e in history["epoch"]]
    return history


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(train_size / batch_size)``.

    :func:`make_dataset` keeps the last, smaller batch, and every batch is one optimizer
    step: 391 steps for 50,000 images at batch 128, 352 for a 45,000/5,000 split.

    Raises:
        ValueError: ``train_size`` or ``batch_size`` is not a positive integer.
    """
    if train_size < 1 or batch_size < 1:
        raise ValueError(
            f"train_size ({train_size}) and batch_size ({batch_size}) must both be >= 1"
        )
    return -(-int(train_size) // int(batch_size))


def exponential_decay(
    train_size: int,
    batch_size: int,
    epochs: int,
    initial_lr: float = 0.1,
    final_lr: float = 1e-3,
):
    """The seed's ``ExponentialDecay`` schedule, planned so training ends at ``final_lr``.

    Keras schedules count optimizer steps (batches), not epochs. Here
    ``decay_steps = steps_per_epoch(train_size, batch_size)`` and
    ``decay_rate = (final_lr / initial_lr) ** (1 / epochs)``, without staircase: the
    rate is a per-epoch factor applied smoothly at every step, so step ``s`` trains at
    ``initial_lr * decay_rate ** (s / decay_steps)``, epoch ``e`` (1-based) starts at
    ``initial_lr * decay_rate ** (e - 1)`` and the last step is at ``final_lr``. The
    defaults take SGD from 0.1 (the seed's rate) to 0.001, two decades, the range of the
    classic step schedules for VGG-style nets on CIFAR; e.g. 100 epochs of 45,000 images at
    batch 128: 352 steps per epoch, decay_rate 0.955 per epoch, the last epoch at
    about 0.00105. Use it as ``keras.optimizers.SGD(schedule, momentum=0.9)``; the step
    counter is part of the optimizer state that :func:`train` checkpoints, so a resumed
    run continues the schedule (with the same ``epochs``; a new ``epochs`` re-plans the
    decay from the restored step on).

    Returns:
        ``keras.optimizers.schedules.ExponentialDecay`` (float32 learning rates).

    Raises:
        ValueError: ``epochs`` < 1, or rates not with ``0 < final_lr <= initial_lr``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, not {epochs}")
    if not 0 < final_lr <= initial_lr:
        raise ValueError(
            f"need 0 < final_lr <= initial_lr for a decay, got final_lr={final_lr}, "
            f"initial_lr={initial_lr}"
        )
    return keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=initial_lr,
        decay_steps=steps_per_epoch(train_size, batch_size),
        decay_rate=(final_lr / initial_lr) ** (1.0 / epochs),
        staircase=False,
    )


# ----------------------------------------- performance (precision, XLA, devices)


def configure_precision(mixed: bool) -> str:
    """Set Keras' global dtype policy; call it before building the model.

    Args:
        mixed: ``True`` for ``"mixed_float16"`` (layers compute in float16, variables
            stay float32; about 2-3x faster on NVIDIA GPUs with tensor cores, Volta or
            newer), ``False`` for plain ``"float32"``.

    Returns:
        The policy name now in force. Under ``mixed_float16`` the models' final softmax
        ``Dense`` is built with ``dtype="float32"``, so predictions and the loss stay
        float32, and ``model.compile`` wraps the optimizer in a ``LossScaleOptimizer``
        itself (Keras' ``auto_scale_loss``). Models built earlier keep their policy.
        A ``UserWarning`` says so when mixed precision is asked for without a GPU: CPUs
        gain nothing from float16 and usually run it slower.
    """
    name = "mixed_float16" if mixed else "float32"
    if mixed and not tf.config.list_physical_devices("GPU"):
        warnings.warn(
            "mixed_float16 on a machine without a GPU: CPUs run float16 slower, not faster. "
            "Set MIXED_PRECISION = False here.",
            stacklevel=2,
        )
    keras.mixed_precision.set_global_policy(name)
    return name


def _tf_config_workers() -> int:
    """Number of worker tasks (chief included) that ``$TF_CONFIG`` names; 0 if it is unset."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"TF_CONFIG is not valid multi-worker JSON ({type(exc).__name__}: {exc}). It must "
            'look like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}, with this machine\'s own index; '
            "unset TF_CONFIG to train on one machine"
        ) from None
    if task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG's task {task_type!r} #{task_index} is not in its cluster "
            f"{sorted(cluster)}; give each machine its own index into the worker list"
        )
    return n


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` with a ``reduce`` that Keras 3.15's ``fit`` can use.

    ``fit`` calls ``strategy.reduce`` on a whole ``(images, labels)`` tuple, and with
    ``axis=0`` on scalar losses and metrics; the multi-worker strategy refuses both
    ("Attempt to convert a value (PerReplica...)", "Invalid reduction dimension 0 for
    input with 0 dimensions"). This reduces each part of a structure separately, and a
    scalar across replicas (``axis=None``), which is what ``fit`` means there.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(v):
            local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            rank = tf.convert_to_tensor(local).shape.rank
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def choose_strategy():
    """The ``tf.distribute`` strategy for the devices and machines at hand.

    - ``MultiWorkerMirroredStrategy`` when ``$TF_CONFIG`` names two or more workers:
      synchronous data-parallel training across machines (all-reduce of gradients;
      every worker ends with the same weights).
    - ``MirroredStrategy`` over all visible GPUs when there are two or more.
    - Else ``OneDeviceStrategy`` on the one GPU, or on the CPU.

    Build and compile the model inside ``with strategy.scope():`` and batch the data at
    :func:`global_batch_size`. Call this first, before any other TensorFlow work:
    multi-worker collectives can only be set up at program start.

    Multi-worker launch: start the same notebook or script on every machine, each with
    ``TF_CONFIG`` listing all workers and its own index, e.g. on the first machine
    ``TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
    "task": {"type": "worker", "index": 0}}'`` and ``"index": 1`` on the second. Worker 0
    is the chief; all must reach each other on those ports, read the same data and use
    the same ``SEED``; training starts when all have joined. Every worker writes its own
    checkpoints, so give each a local ``OUTPUT_DIR`` (not one shared folder) and keep
    the chief's. Trainable weights stay identical on all workers; BatchNorm moving
    statistics are updated from each worker's own batches (Keras 3 does not all-reduce
    them), so they differ slightly between workers.

    Raises:
        ValueError: ``$TF_CONFIG`` is set but is not valid JSON of that form, or this
            machine's task is not in its cluster.
    """
    if _tf_config_workers() > 1:
        return _MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def global_batch_size(per_replica: int, strategy) -> int:
    """The batch size to give ``tf.data``: ``per_replica`` times the strategy's replica count.

    A ``MirroredStrategy`` over 4 GPUs with ``BATCH_SIZE = 128`` takes batches of 512 and
    hands each GPU 128, so each GPU does the work it would do alone. Over several workers
    the count is the total over all machines; each worker batches at this global size
    and keeps its share (Keras shards the data by element).

    Raises:
        ValueError: ``per_replica`` is not a positive int.
    """
    if isinstance(per_replica, bool) or not isinstance(per_replica, int) or per_replica < 1:
        raise ValueError(f"per_replica batch size must be a positive int, not {per_replica!r}")
    return per_replica * strategy.num_replicas_in_sync


def resolve_jit_compile(xla) -> bool:
    """The ``jit_compile`` value for ``model.compile`` from a notebook's ``XLA`` parameter.

    ``True``/``False`` force XLA on or off. ``"auto"`` (the notebooks' default) turns it
    on only when a GPU is visible: on this project's CPU benchmark XLA made training
    slower (see README, Performance), on GPUs it usually fuses BatchNorm/ReLU/pooling
    into the convolutions and helps.

    Raises:
        ValueError: ``xla`` is none of ``True``, ``False``, ``"auto"``.
    """
    if xla == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    if isinstance(xla, bool):
        return xla
    raise ValueError(f'XLA must be True, False or "auto", not {xla!r}')


def _col2im_input_grad(dy, kernel, input_shape, padding: str):
    """Input gradient of a stride-1 NHWC convolution: one matmul, then shifted adds.

    ``dy`` (B, OH, OW, Cout), ``kernel`` (KH, KW, Cin, Cout) -> (B, H, W, Cin).
    """
    kh, kw, cin, cout = kernel.shape
    oh, ow = dy.shape[1], dy.shape[2]
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
    """``tf.nn.conv2d`` (stride 1, NHWC, ``"VALID"``/``"SAME"``) with the col2im input gradient."""

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = _col2im_input_grad(dy, kernel, x.shape, padding)
            dk = tf.compat.v1.nn.conv2d_backprop_filter(
                x, tf.shape(kernel), dy, (1, 1, 1, 1), padding
            )
            return dx, dk

        return tf.nn.conv2d(x, kernel, 1, padding), grad

    return conv(x, tf.cast(tf.convert_to_tensor(kernel), x.dtype))


def fast_small_conv_gradients(model, max_output_pixels: int = 16) -> list[str]:
    """On CPU, compute the input gradient of small-output convolutions with one matmul.

    TensorFlow's CPU kernel for a convolution's input gradient (``Conv2DBackpropInput``,
    oneDNN and Eigen alike, and XLA's) is pathologically slow when the output is a few
    pixels and the channels are many: for the simple network's last conv (4x4x256 ->
    2x2x512, batch 128) it took 1.0 s against 0.04 s for the same product done as one
    matmul, and it dominated the training step. For every stride-1, undilated,
    ungrouped ``Conv2D`` (nested models included) whose output has at most
    ``max_output_pixels`` pixels, this routes the input gradient through one
    ``tf.matmul`` of ``dy`` (B*OH*OW, Cout) by the kernel (Cout, KH*KW*Cin) followed by
    KH*KW shifted adds (col2im). The forward pass, the kernel gradient, the weights and
    the saved model are unchanged; only the arithmetic order of the input gradient
    differs (float round-off). Larger outputs keep TensorFlow's kernel, which is as
    fast there. Does nothing when a GPU is visible: GPUs use cuDNN's own kernels, and
    this path was measured on CPUs only.

    Call it on a built model, before ``compile``/``fit``. It changes the layer objects
    in place; ``keras.models.clone_model`` and reloading from ``.keras`` give plain
    layers again (call it again on those).

    Returns:
        Names of the layers switched (empty on GPU machines).
    """
    if tf.config.list_physical_devices("GPU"):
        return []
    switched = []
    for layer in _leaf_layers(model):
        if (
            isinstance(layer, keras.layers.Conv2D)
            and not getattr(layer, "_col2im_native", None)
            and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1
            and layer.data_format == "channels_last"
            and tuple(layer.kernel_size) != (1, 1)
            and _output_pixels(layer) <= max_output_pixels
        ):
            layer._col2im_native = layer.convolution_op
            layer.convolution_op = _small_conv_op(layer, max_output_pixels)
            switched.append(layer.name)
    return switched


def _leaf_layers(model) -> list:
    """All layers of ``model`` that are not models themselves, nested models flattened, in order."""
    leaves, stack = [], list(model.layers)
    while stack:
        layer = stack.pop(0)
        if hasattr(layer, "layers"):
            stack[:0] = layer.layers
        else:
            leaves.append(layer)
    return leaves


def _output_pixels(layer) -> float:
    """OH*OW of a layer's (single, static) output; infinity when unknown."""
    try:
        h, w = layer.output.shape[1:3]
    except (AttributeError, ValueError):
        return float("inf")
    return float("inf") if h is None or w is None else h * w


def _small_conv_op(layer, max_output_pixels: int):
    """A ``convolution_op`` for ``layer`` that takes the col2im path on small static outputs."""
    native, padding = layer._col2im_native, layer.padding.upper()
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


# ---------------------------------------------------------------- evaluation


def predict_proba(model, x, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for uint8 images ``x`` (N, 32, 32, 3) in [0, 255].

    Images go through the same normalisation as :func:`make_dataset` (no augmentation).
    Returns float32 ``(N, num_classes)``, rows summing to 1.
    """
    ds = make_dataset(x, np.zeros(len(x), np.int64), batch_size=batch_size, training=False)
    return model.predict(ds.map(lambda images, _: images), verbose=0)


def top_k_accuracy(y_true, probs, k: int = 1) -> float:
    """Fraction of rows whose true label (int (N,)) is among the ``k`` highest of ``probs`` (N, C).

    Uses scikit-learn's ``top_k_accuracy_score``; returns a float in [0, 1].
    """
    from sklearn.metrics import top_k_accuracy_score

    return float(top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(np.shape(probs)[1])))


def write_results(output_dir, name: str, **fields) -> Path:
    """Write ``output_dir/<name>.json`` (atomically) with ``fields`` plus a timestamp."""
    record = {"model": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    return write_json(Path(output_dir) / f"{name}.json", record)


def evaluate_and_save(model, run: dict, run_dir, output_dir, name: str, train, val, test, **extra):
    """Load the best checkpoint, score it once on validation and test, write the results file.

    Args:
        model: the trained model; its weights are replaced by ``run_dir/best.weights.h5``.
        run: the state :func:`train` returned.
        train, val, test: ``(x uint8 (N, 32, 32, 3), y int (N,))`` pairs; ``train`` only
            counts images (``full_cifar100`` is true for 50,000 train + val and 10,000 test).
        extra: more JSON-able fields for the record (batch size, data source, ...).

    Returns:
        ``(record, test_probs)``: the record written to ``output_dir/<name>.json``
        (parameter counts, epochs, training seconds, history, best epoch, hardware and
        :func:`evaluation_summary` of validation and test: ``val_top1``, ``test_top5``, ...
        floats in [0, 1]) and the test-set probabilities, float32 (N, 100).
    """
    model.load_weights(Path(run_dir) / "best.weights.h5")
    val_probs, test_probs = predict_proba(model, val[0]), predict_proba(model, test[0])
    record = {
        "params": parameter_counts(model),
        "epochs": run["epoch"],
        "best_epoch": run.get("best_epoch"),
        "seconds": round(run["seconds"], 1),
        "hardware": describe_hardware(),
        "train_images": len(train[0]),
        "full_cifar100": len(train[0]) + len(val[0]) == 50_000 and len(test[0]) == 10_000,
        **evaluation_summary(val[1], val_probs, "val"),
        **evaluation_summary(test[1], test_probs, "test"),
        **extra,
        "history": run["history"],
    }
    write_results(output_dir, name, **record)
    return record, test_probs


def _check_labels(y, num_classes: int, what: str) -> np.ndarray:
    """``y`` as int64 (N,) in [0, num_classes), else a ValueError saying what is wrong."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{what} must be integer class indices of shape (N,), not {y.dtype} {y.shape}; "
            "for one-hot or probability rows pass `.argmax(axis=1)`"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} holds values outside [0, {num_classes - 1}]")
    return y.astype(np.int64)


def _check_pair(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = _check_labels(y_true, num_classes, "y_true")
    y_pred = _check_labels(y_pred, num_classes, "y_pred")
    if len(y_true) != len(y_pred) or not len(y_true):
        raise ValueError(
            f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must be non-empty and equally long"
        )
    return y_true, y_pred


def per_class_accuracy(y_true, y_pred, num_classes: int = 100) -> np.ndarray:
    """Accuracy within each true class (= its recall): float64 ``(num_classes,)`` in [0, 1].

    ``y_true``, ``y_pred``: int labels (N,) in [0, num_classes). A class absent from
    ``y_true`` gets NaN. Computed with scikit-learn's ``recall_score(average=None)``.

    Raises:
        ValueError: labels not integer (N,), out of range, or of different lengths.
    """
    from sklearn.metrics import recall_score

    y_true, y_pred = _check_pair(y_true, y_pred, num_classes)
    return recall_score(
        y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=np.nan
    ).astype(np.float64)


def to_superclass(fine_labels) -> np.ndarray:
    """Map fine labels (int (N,) in [0, 99]) to their superclass: int64 (N,) in [0, 19]."""
    return FINE_TO_COARSE[_check_labels(fine_labels, 100, "fine labels")]


def superclass_accuracy(y_true, y_pred) -> tuple[float, np.ndarray]:
    """Superclass accuracy of fine predictions.

    A prediction counts as right when its fine label's superclass (one of the 20 coarse
    labels, :data:`FINE_TO_COARSE`) equals the true label's superclass, e.g. true
    ``beaver``, predicted ``dolphin``: both ``aquatic_mammals``, right.

    Args:
        y_true, y_pred: fine labels, int (N,) in [0, 99].

    Returns:
        ``(overall, per_superclass)``: a float in [0, 1] and float64 ``(20,)`` in [0, 1]
        in :data:`COARSE_LABEL_NAMES` order (NaN for a superclass absent from ``y_true``).
    """
    y_true, y_pred = _check_pair(y_true, y_pred, 100)
    coarse_true, coarse_pred = FINE_TO_COARSE[y_true], FINE_TO_COARSE[y_pred]
    overall = float(np.mean(coarse_true == coarse_pred))
    return overall, per_class_accuracy(coarse_true, coarse_pred, num_classes=20)


def classification_report(y_true, y_pred, output_dict: bool = False, digits: int = 3):
    """scikit-learn's ``classification_report`` over the 100 fine classes, with their names.

    Precision, recall (= per-class accuracy), F1 and support per class, plus accuracy and
    macro/weighted averages. ``y_true``, ``y_pred``: fine labels, int (N,) in [0, 99].
    Classes never predicted (or absent) score 0 instead of raising warnings.

    Returns:
        A text table (``output_dict=False``) or scikit-learn's dict of dicts.
    """
    from sklearn.metrics import classification_report as sk_report

    y_true, y_pred = _check_pair(y_true, y_pred, 100)
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
    """A float for JSON: rounded to 6 decimals, NaN -> None (JSON has no NaN)."""
    return None if np.isnan(value) else round(float(value), 6)


def evaluation_summary(y_true, probs, prefix: str = "test") -> dict:
    """The metrics a results file keeps for one split, as a JSON-able dict.

    Args:
        y_true: fine labels, int (N,) in [0, 99].
        probs: class probabilities, float (N, 100) (e.g. from :func:`predict_proba`).
        prefix: the split's name, prepended to every key (``"val"``, ``"test"``).

    Returns:
        ``{f"{prefix}_top1", f"{prefix}_top5", f"{prefix}_superclass_top1"}`` (floats in
        [0, 1]), ``f"{prefix}_per_superclass"`` and ``f"{prefix}_per_class"`` (label name ->
        accuracy, ``None`` for a class absent from ``y_true``) and ``f"{prefix}_images"`` (N).
        Merge it into :func:`write_results`, e.g. ``write_results(dir, name, **summary)``.

    Raises:
        ValueError: ``probs`` is not (N, 100) or the labels are invalid.
    """
    probs = np.asarray(probs)
    y_true = _check_labels(y_true, 100, "y_true")
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
    """The ``n`` most frequent mistakes as (true class -> predicted class) pairs.

    Pairs are directed: ``maple_tree`` taken for ``oak_tree`` and the reverse are two rows.
    Counts come from scikit-learn's ``confusion_matrix`` with its diagonal zeroed; ties are
    broken by class index, and pairs that never occur are left out.

    Args:
        y_true, y_pred: int labels (N,) in [0, len(label_names)).
        n: how many pairs to return (at most).

    Returns:
        A list of dicts, most frequent first: ``{"true", "predicted"`` (names), ``"count"``
        (int), ``"share"`` (count / images of the true class, float in [0, 1])``}``.
        :func:`markdown_table` prints it.
    """
    from sklearn.metrics import confusion_matrix

    num_classes = len(label_names)
    y_true, y_pred = _check_pair(y_true, y_pred, num_classes)
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


def markdown_table(rows: list[dict], columns=None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` picks and orders the keys.

    ``columns`` is a list of keys, or of ``(key, header)`` pairs; default: the first row's
    keys. Floats print with 3 decimals, missing values as an em dash.
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    columns = [c if isinstance(c, tuple) else (c, c) for c in columns]

    def cell(value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def load_image(source, size=None) -> np.ndarray:
    """Read a photo as uint8 RGB ``(H, W, 3)`` in [0, 255], whatever its format and mode.

    Args:
        source: path of any image Pillow reads (PNG, JPEG, ...; RGB, RGBA, greyscale,
            16-bit greyscale, palette, CMYK), or an array ``(H, W)``, ``(H, W, 1)``,
            ``(H, W, 3)`` or ``(H, W, 4)``: uint8 in [0, 255] or float in [0, 1].
            Transparent pixels are composited onto white; greyscale is repeated over the
            three channels; JPEG EXIF orientation is applied.
        size: ``(height, width)`` in pixels to resize to (squashed, not cropped, with
            Pillow's antialiasing Lanczos filter, like Keras' image_dataset_from_directory);
            ``None`` keeps the original size.

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: the file is not a readable image (corrupt, truncated, not an image, or
            over Pillow's decompression-bomb limit of about 179 million pixels), or the array
            has another shape, dtype or value range.
    """
    from PIL import Image

    image = _rgb_array(source)
    if size is not None and image.shape[:2] != tuple(size):
        resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS)
        image = np.asarray(resized)
    return image


def _rgb_array(source) -> np.ndarray:
    """:func:`load_image` without resizing."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No image file at '{path}'")
        try:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as exc:
            raise ValueError(
                f"'{path}' is too large to open safely ({exc}). Shrink it (a few thousand "
                "pixels a side is plenty: the model sees 32x32) and try again"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(
                f"'{path}' is not a readable image ({type(exc).__name__}: {exc}). Give a PNG or "
                "JPEG file (RGB, RGBA or greyscale), or a uint8 array (H, W, 3)"
            ) from None
        if im.mode.startswith("I"):  # 16/32-bit greyscale: scale 0..65535 to 0..255
            array = np.asarray(im, dtype=np.float64) / 257.0
            return np.repeat(np.clip(array, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        if "A" in im.mode or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)

    array = np.asarray(source)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"An image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not "
            f"{array.shape}; for a batch, call this once per image"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("A float image array must hold values in [0, 1]; scale it first")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(
            f"An image array must be uint8 [0, 255] or float [0, 1], not {array.dtype}"
        )
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float64) / 255.0
        array = np.round(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _model_image_size(model) -> tuple[int, int]:
    """(height, width) a single-input image model takes; 32x32 where the model leaves it open."""
    shape = model.input_shape
    if isinstance(shape, list | dict) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"An image classifier here takes one batch of RGB images (B, H, W, 3); this "
            f"model's input_shape is {shape}"
        )
    return shape[1] or 32, shape[2] or 32


def predict_image(
    model, path_or_array, top_k: int = 5, class_names=FINE_LABEL_NAMES
) -> list[tuple[str, float]]:
    """Classify one photo of any size into the 100 CIFAR-100 fine classes.

    The image is read with :func:`load_image` (PNG/JPEG/..., RGB/RGBA/greyscale, or an
    array), resized (squashed, like Keras' ``image_dataset_from_directory``, with Pillow's
    antialiasing Lanczos filter) to the model's input ``(H, W)`` from ``model.input_shape``
    (32x32 where it is ``None``), and normalised as in training (float32 [0, 1], see
    :func:`predict_proba`). ``class_names``: the 100 names of the model's outputs, in order
    (:data:`FINE_LABEL_NAMES`, or those :func:`load_exported_model` read from a file).

    Returns:
        ``[(class_name, probability), ...]``: the ``top_k`` classes, most probable
        first (probabilities are floats in [0, 1] summing to at most 1).

    Raises:
        FileNotFoundError, ValueError: see :func:`load_image`; also ``top_k`` outside
            [1, 100] or a model that does not output 100 classes.
    """
    if not 1 <= top_k <= 100:
        raise ValueError(f"top_k must be between 1 and 100, not {top_k}")
    image = load_image(path_or_array, size=_model_image_size(model))
    probs = predict_proba(model, image[None])[0]
    if probs.shape != (100,):
        raise ValueError(
            f"The model outputs {probs.shape[0]} values; predict_image needs CIFAR-100's 100 "
            "fine-class probabilities"
        )
    best = np.argsort(-probs, kind="stable")[:top_k]
    return [(class_names[i], float(probs[i])) for i in best]


#: Photos that ship inside scikit-image (``skimage/data``, no download needed):
#: name -> (file, the CIFAR-100 class it shows or None, description from scikit-image).
SAMPLE_PHOTOS = {
    "rocket": ("rocket.jpg", "rocket", "Launch photo of DSCOVR on Falcon 9 by SpaceX"),
    "coffee": ("coffee.png", "cup", "Coffee cup, courtesy of Pikolo Espresso Bar"),
    "chelsea": ("chelsea.png", None, "Chelsea the cat (CIFAR-100 has no cat class)"),
    "astronaut": ("astronaut.png", "woman", "Astronaut Eileen Collins, NASA"),
}


def sample_photo(name: str = "rocket") -> Path:
    """Path of a real photo shipped with scikit-image (:data:`SAMPLE_PHOTOS`), for demos.

    The default, ``rocket.jpg`` (640x427 RGB JPEG, SpaceX's DSCOVR launch), shows a
    CIFAR-100 class (``rocket``). Other names: ``coffee`` (a cup), ``chelsea`` (a cat,
    not a CIFAR-100 class), ``astronaut`` (a woman).

    Raises:
        ValueError: unknown ``name``. FileNotFoundError: scikit-image lacks the file.
    """
    from importlib.resources import files

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"Unknown sample photo {name!r}; choose one of {sorted(SAMPLE_PHOTOS)}")
    path = Path(str(files("skimage.data") / SAMPLE_PHOTOS[name][0]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall scikit-image (requirements.txt)")
    return path


def describe_hardware() -> str:
    """One line naming this machine's CPU (model, logical cores) and visible GPUs.

    E.g. ``"AMD EPYC (2 logical CPUs); GPU: NVIDIA H200"``. GPU names come from
    ``tf.config.experimental.get_device_details``; the CPU model from ``/proc/cpuinfo``
    (Linux) or ``platform.processor()``. Store it in results files (``hardware=...``).
    """
    import platform

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    text = f"{cpu} ({os.cpu_count()} logical CPUs)"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        ]
        text += "; GPU: " + ", ".join(names)
    return text


#: Test top-1 accuracies published by the seed project's notebooks, keyed by results
#: ``model`` name. Shown in their own README column only, never mixed with measured runs.
PUBLISHED_TEST_TOP1 = {"simple_cnn": 0.483, "complex_cnn": 0.629, "efficientnet_b0": 0.797}
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"


def _format_seconds(seconds) -> str | None:
    if seconds is None:
        return None
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def full_runs(results_dir="results") -> tuple[list[dict], list[str]]:
    """The results records of runs on all of CIFAR-100 in ``results_dir``, and what was skipped.

    Returns:
        ``(records, skipped)``: the dicts of ``*.json`` files with ``"model"``, a ``val_top1``
        or ``test_top1`` and ``"full_cifar100": true``; the names of the other ``.json`` files
        (quick runs with ``TRAIN_LIMIT``, runs on other data, ``benchmark.json``).

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    records, skipped = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        full = (
            isinstance(record, dict)
            and "model" in record
            and ("val_top1" in record or "test_top1" in record)
            and record.get("full_cifar100") is True
        )
        (records if full else skipped).append(record if full else path.name)
    return records, skipped


def results_table(results_dir="results") -> str:
    """Markdown table comparing the runs recorded in ``results_dir/*.json``.

    A results file (from :func:`write_results`) counts when it has ``"model"`` and at least
    one of ``val_top1``, ``test_top1`` and was trained and tested on all of CIFAR-100
    (``"full_cifar100": true``, set by :func:`evaluate_and_save`); others (quick runs
    with ``TRAIN_LIMIT``, runs on other data, ``benchmark.json``) are skipped.
    Columns come from its fields: ``params`` (int, or the dict of :func:`parameter_counts`),
    ``epochs``, ``seconds`` (training wall time), ``val_top1``, ``val_top5``, ``test_top1``,
    ``test_top5``, ``hardware`` (see :func:`describe_hardware`); a missing field shows as
    an em dash. One more column gives the seed's published test top-1
    (:data:`PUBLISHED_TEST_TOP1`), clearly labelled; models with a published figure but no
    run get a row with only that figure.

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    rows = {}
    for record in full_runs(results_dir)[0]:
        params = record.get("params")
        if isinstance(params, dict):
            params = params.get("total")
        rows[record["model"]] = {
            "model": record["model"],
            "params": f"{params:,}" if isinstance(params, int) else None,
            "epochs": record.get("epochs"),
            "time": _format_seconds(record.get("seconds")),
            **{k: record.get(k) for k in ("val_top1", "val_top5", "test_top1", "test_top5")},
            "hardware": record.get("hardware"),
        }
    for model in PUBLISHED_TEST_TOP1:
        rows.setdefault(model, {"model": model})
    for row in rows.values():
        row["published"] = PUBLISHED_TEST_TOP1.get(row["model"])
    columns = [
        ("model", "Model"),
        ("params", "Params"),
        ("epochs", "Epochs"),
        ("time", "Train time"),
        ("val_top1", "Val top-1"),
        ("val_top5", "Val top-5"),
        ("test_top1", "Test top-1"),
        ("test_top5", "Test top-5"),
        ("hardware", "Hardware"),
        ("published", "Seed's published test top-1 (not measured here)"),
    ]
    return markdown_table(list(rows.values()), columns)


def update_readme_results(results_dir="results", readme="README.md") -> str:
    """Write :func:`results_table` into ``readme`` between the results markers.

    Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` changes
    (the file is rewritten atomically); everything else is kept byte for byte.

    Returns:
        The table written.

    Raises:
        FileNotFoundError: no ``readme``.
        ValueError: the markers are missing, repeated or out of order.
    """
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(RESULTS_START) != 1 or text.count(RESULTS_END) != 1:
        raise ValueError(
            f"{readme} must hold the lines '{RESULTS_START}' and '{RESULTS_END}' exactly once "
            "each (found them "
            f"{text.count(RESULTS_START)} and {text.count(RESULTS_END)} times); add them where "
            "the results table belongs"
        )
    start = text.index(RESULTS_START) + len(RESULTS_START)
    end = text.index(RESULTS_END)
    if end < start:
        raise ValueError(f"In {readme}, '{RESULTS_END}' comes before '{RESULTS_START}'")
    table = results_table(results_dir)
    with _atomic_path(readme) as tmp:
        tmp.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    return table


# -------------------------------------------------------------------- export

#: Members that :func:`export_model` adds to a ``.keras`` zip (and :func:`export_saved_model`
#: to a SavedModel's ``assets.extra/``): the JSON list of class names, one per output unit,
#: and a JSON object of metadata.
CLASS_NAMES_MEMBER = "class_names.json"
METADATA_MEMBER = "export_metadata.json"


def _plain_keras_layer(layer):
    """``clone_function`` for :func:`export_model`: ``layer`` rebuilt from Keras built-ins only.

    A subclass of ``Dropout`` (such as the ``efficientnet`` package's ``FixedDropout``,
    identical at inference) becomes a plain ``Dropout`` of the same rate; a custom activation
    function becomes the Keras built-in of the same name (the package's ``swish`` -> Keras'
    ``swish``); any other custom layer is refused.
    """
    config = layer.get_config()
    activation = getattr(layer, "activation", None)
    if callable(activation) and not isinstance(keras.activations.serialize(activation), str):
        name = getattr(activation, "__name__", repr(activation))
        try:
            builtin = keras.activations.get(name)
        except ValueError:
            builtin = None
        if builtin is None or not isinstance(keras.activations.serialize(builtin), str):
            raise ValueError(
                f"Layer '{layer.name}' uses the custom activation {name!r}, which Keras "
                "cannot load without your code; rebuild it with a built-in activation"
            )
        config["activation"] = keras.activations.serialize(builtin)
    cls = type(layer)
    if not cls.__module__.startswith("keras."):
        if not isinstance(layer, keras.layers.Dropout):
            raise ValueError(
                f"Layer '{layer.name}' is a {cls.__module__}.{cls.__name__}, not a Keras "
                "built-in: a file holding it cannot be loaded without that code"
            )
        cls = keras.layers.Dropout
    return cls.from_config(config)


def export_model(model, path, /, class_names=FINE_LABEL_NAMES, **metadata) -> Path:
    """Save ``model`` whole to a ``.keras`` file that plain Keras loads, with its class names.

    The file is a copy of ``model`` made of Keras built-in layers only (see
    :func:`_plain_keras_layer`; the ``efficientnet`` package's ``FixedDropout`` and ``swish``
    are replaced by their Keras equivalents, and :func:`fast_small_conv_gradients` is not
    carried over), with the same weights, so ``keras.saving.load_model(path)`` works in a
    Python process that never imports this module or ``efficientnet``. Its outputs are
    checked against ``model`` on two random images before writing (max abs difference
    below 1e-5). No optimizer state is saved. The file is written atomically.

    Inside the ``.keras`` zip, beside Keras' own members, ``class_names.json`` holds the JSON
    list of class names (one per output unit) and ``export_metadata.json`` the JSON object
    ``metadata``. Read them without Keras::

        import json, zipfile
        with zipfile.ZipFile("results/simple_cnn.keras") as z:
            names = json.loads(z.read("class_names.json"))
            metadata = json.loads(z.read("export_metadata.json"))

    Args:
        model: a built single-input image classifier; input float32 (B, H, W, 3) in [0, 1]
            (uint8 pixels / 255, as :func:`predict_proba` feeds it), output (B, C).
        path: the ``.keras`` file to write (its folder is created).
        class_names: C names, in output order.
        metadata: JSON-able extra fields, e.g. ``model="simple_cnn", test_top1=0.48``
            (``model`` and ``path`` are positional-only, so these names are free).

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: ``path`` does not end in ``.keras``; ``class_names`` does not match the
            model's outputs; ``metadata`` is not JSON-able; the model holds a custom layer
            or activation that has no Keras equivalent; the copy's outputs differ.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Export to a '.keras' file (e.g. '{path.stem}.keras'), not '{path}'")
    names = [str(n) for n in class_names]
    if len(names) != model.output_shape[-1]:
        raise ValueError(
            f"{len(names)} class names for a model with {model.output_shape[-1]} outputs"
        )
    try:
        metadata_json = json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-able (str, number, list, dict): {exc}") from None
    plain = keras.models.clone_model(model, clone_function=_plain_keras_layer, recursive=True)
    plain.set_weights(model.get_weights())
    height, width = _model_image_size(model)
    probe = np.random.default_rng(0).random((2, height, width, 3), dtype=np.float32)
    outputs = [np.asarray(m(probe, training=False)) for m in (plain, model)]  # keeps BN stats
    gap = float(np.max(np.abs(outputs[0] - outputs[1])))
    if gap >= 1e-5:
        raise ValueError(f"The exported copy's outputs differ from the model's by {gap:.3g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as tmp:
        plain.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(CLASS_NAMES_MEMBER, json.dumps(names))
            archive.writestr(METADATA_MEMBER, metadata_json)
    return path


def load_exported_model(path) -> tuple:
    """Load a CIFAR-100 model file; returns ``(model, class_names, metadata)``.

    Reads a ``.keras`` file from :func:`export_model` (class names and metadata from inside
    it) or any other whole-model Keras file (``model.save``: then the names are
    :data:`FINE_LABEL_NAMES` and the metadata ``{}``). The model is loaded uncompiled.

    Returns:
        The Keras model (input float32 (B, H, W, 3) in [0, 1], output (B, 100)
        probabilities), the list of its 100 class names, and the metadata dict.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a Keras model file, or the model does not output
            100 classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No model file at '{path}'")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a file it cannot read
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"'{path}' is not a Keras model file that plain Keras can load "
            f"({type(exc).__name__}: {detail}). Give a "
            ".keras file written by cu.export_model (the notebooks write "
            "OUTPUT_DIR/<model>.keras)"
        ) from None
    outputs = model.output_shape
    if not isinstance(outputs, tuple) or outputs[-1] != 100:
        raise ValueError(
            f"'{path}' holds a model with output shape {outputs}; a CIFAR-100 classifier "
            "outputs 100 class probabilities (B, 100)"
        )
    names, metadata = list(FINE_LABEL_NAMES), {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            if CLASS_NAMES_MEMBER in members:
                names = json.loads(archive.read(CLASS_NAMES_MEMBER))
            if METADATA_MEMBER in members:
                metadata = json.loads(archive.read(METADATA_MEMBER))
    if len(names) != 100:
        raise ValueError(f"'{path}' holds {len(names)} class names, not 100")
    return model, names, metadata


def export_saved_model(model_path, out_dir) -> Path:
    """Write the model in ``model_path`` as a TensorFlow SavedModel folder, for TF Serving.

    Uses Keras' ``model.export(out_dir, format="tf_saved_model")``: the serving signature
    ``serve`` takes float32 (B, H, W, 3) in [0, 1] and returns (B, 100) probabilities
    (``tf.saved_model.load(out_dir).serve(x)``). The class names and metadata go to
    ``out_dir/assets.extra/`` (the files of :data:`CLASS_NAMES_MEMBER` and
    :data:`METADATA_MEMBER`). Written into a temporary folder beside ``out_dir`` that is
    renamed when complete.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_exported_model`.
        FileExistsError: ``out_dir`` exists and is not an empty folder.
    """
    model, names, metadata = load_exported_model(model_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"'{out}' already exists and is not an empty folder; choose a new folder, or "
            "remove it first to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / CLASS_NAMES_MEMBER).write_text(json.dumps(names))
        (extra / METADATA_MEMBER).write_text(json.dumps(metadata))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------- plots


def _finish(fig, path):
    """Save ``fig`` to ``path`` (atomically, creating its folder) if given; return ``fig``."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=100, bbox_inches="tight")
    return fig


def plot_samples(x, y, label_names=FINE_LABEL_NAMES, n: int = 25, seed: int = 0, path=None):
    """Grid of ``n`` random images (uint8 (N, H, W, 3)) titled with their label names."""
    import matplotlib.pyplot as plt

    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    cols = int(np.ceil(np.sqrt(len(idx))))
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), idx, strict=False):
        ax.imshow(x[i])
        ax.set_title(label_names[int(y[i])], fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_augmentation(image, augment, n: int = 7, path=None):
    """The original uint8 image (H, W, 3) beside ``n`` augmented versions of it.

    ``augment`` maps a float32 batch in [0, 1] to an augmented batch (e.g.
    :func:`augmentation_layers`, called with ``training=True``).
    """
    import matplotlib.pyplot as plt

    batch = np.repeat(image[None].astype(np.float32) / 255.0, n, axis=0)
    out = np.clip(np.asarray(augment(batch, training=True)), 0, 1)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.6 * (n + 1), 1.9))
    axes[0].imshow(image)
    axes[0].set_title("original", fontsize=8)
    for i, ax in enumerate(axes[1:]):
        ax.imshow(out[i])
        ax.set_title(f"augmented {i + 1}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _finish(fig, path)


def plot_history(history: dict, title: str = "", path=None, phases=()):
    """Training curves: accuracy and loss (train vs validation), and the learning rate.

    ``history`` maps metric names (``accuracy``, ``val_accuracy``, ``loss``, ``val_loss``,
    ``learning_rate``) to per-epoch lists, as :func:`train` returns in ``state["history"]``
    or :func:`read_log` reads from a run's ``log.csv``; its ``epoch`` list (1-based), when
    present, places the points, else they are epochs 1, 2, ... A third panel shows
    ``learning_rate`` on a log scale when the history has it. Epoch ticks are integers.
    ``phases``: ``[(name, first epoch), ...]`` marked by dashed lines, labelled inside the
    axes, e.g. from :func:`join_runs`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["accuracy", "loss"] + (["learning_rate"] if history.get("learning_rate") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
    last = 1
    for ax, metric in zip(axes, panels, strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                epochs = history.get("epoch") or np.arange(1, len(values) + 1)
                ax.plot(epochs, values, marker=".", label=label)
                last = max(last, int(epochs[-1]))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        if metric == "learning_rate":
            ax.set_yscale("log")
            ax.set_ylabel("learning rate")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_ylabel(metric)
            ax.legend()
    for ax in axes:
        ax.set_xlim(0.5, last + 0.5)
        for name, start in phases:
            ax.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
            left = start - 0.5 < (last + 1) / 2  # label on the side with more room
            ax.text(
                start - 0.5,
                0.98,
                f" {name} ",
                ha="left" if left else "right",
                va="top",
                fontsize=8,
                transform=ax.get_xaxis_transform(),
                clip_on=True,
            )
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def plot_superclass_confusion(y_true, y_pred, normalize: str | None = "true", path=None):
    """Confusion matrix over the 20 superclasses of fine predictions (scikit-learn display).

    ``y_true``, ``y_pred``: fine labels, int (N,) in [0, 99], mapped to superclasses with
    :data:`FINE_TO_COARSE`. ``normalize="true"`` shows each row as shares of that
    superclass's images (rows sum to 1); ``None`` shows counts.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    y_true, y_pred = _check_pair(y_true, y_pred, 100)
    fig, ax = plt.subplots(figsize=(10, 9))
    ConfusionMatrixDisplay.from_predictions(
        FINE_TO_COARSE[y_true],
        FINE_TO_COARSE[y_pred],
        labels=np.arange(20),
        display_labels=COARSE_LABEL_NAMES,
        normalize=normalize,
        include_values=False,
        xticks_rotation="vertical",
        ax=ax,
    )
    ax.set_title("Superclass confusion" + (" (share of each true superclass)" if normalize else ""))
    fig.tight_layout()
    return _finish(fig, path)


def plot_misclassified(x, y_true, probs, n: int = 16, label_names=FINE_LABEL_NAMES, path=None):
    """Grid of the ``n`` most confidently misclassified images, titled true / predicted (p).

    Args:
        x: uint8 images (N, H, W, 3) in [0, 255]; y_true: int labels (N,);
        probs: class probabilities (N, C), e.g. from :func:`predict_proba`.

    Raises:
        ValueError: mismatched lengths, or no image is misclassified.
    """
    import matplotlib.pyplot as plt

    probs = np.asarray(probs)
    y_true = _check_labels(y_true, len(label_names), "y_true")
    if not len(x) == len(y_true) == len(probs):
        raise ValueError(f"x ({len(x)}), y_true ({len(y_true)}) and probs ({len(probs)}) differ")
    y_pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    if not len(wrong):
        raise ValueError("No image is misclassified: nothing to show")
    idx = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    cols = int(np.ceil(np.sqrt(len(idx))))
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx, strict=False):
        ax.imshow(x[i])
        ax.set_title(
            f"true: {label_names[y_true[i]]}\npred: {label_names[y_pred[i]]} ({confidence[i]:.2f})",
            fontsize=7,
        )
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    return _finish(fig, path)


def plot_prediction(model, path_or_array, top_k: int = 5, path=None):
    """The photo beside a bar chart of the model's ``top_k`` classes (see :func:`predict_image`)."""
    import matplotlib.pyplot as plt

    image = load_image(path_or_array)
    top = predict_image(model, image, top_k=top_k)
    fig, (ax_img, ax_bar) = plt.subplots(
        1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    ax_img.imshow(image)
    ax_img.axis("off")
    height, width = _model_image_size(model)
    ax_img.set_title(f"{image.shape[1]}x{image.shape[0]} photo, seen at {width}x{height}")
    names, values = zip(*top, strict=True)
    ax_bar.barh(np.arange(len(top)), values)
    ax_bar.set_yticks(np.arange(len(top)), names)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    for i, v in enumerate(values):
        ax_bar.text(min(v + 0.01, 0.9), i, f"{v:.2f}", va="center", fontsize=8)
    ax_bar.set_title(f"top-{top_k} of 100 classes")
    fig.tight_layout()
    return _finish(fig, path)


# -------------------------------------------------------------- command line


def _report_command(args) -> int:
    before = Path(args.readme).read_text(encoding="utf-8")
    table = update_readme_results(args.results_dir, args.readme)
    print(table)
    runs, skipped = full_runs(args.results_dir)
    print(
        f"{len(runs)} run(s) on all of CIFAR-100 in '{args.results_dir}'"
        + (f"; not listed: {', '.join(skipped)}" if skipped else "")
        + ("" if Path(args.results_dir).is_dir() else " (the folder does not exist yet)")
    )
    changed = Path(args.readme).read_text(encoding="utf-8") != before
    print(f"Updated {args.readme}" if changed else f"{args.readme} was already up to date")
    return 0


def _curves_command(args) -> int:
    import matplotlib.pyplot as plt

    history = read_log(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "curves.png"
    epochs = history["epoch"]
    plt.close(plot_history(history, title=str(args.run_dir), path=out))
    print(f"Wrote {out}: {len(epochs)} epoch(s) from {Path(args.run_dir) / 'log.csv'}")
    return 0


def _export_command(args) -> int:
    out = export_saved_model(args.model, args.out)
    print(f"Wrote TensorFlow SavedModel {out} (signature 'serve': float32 images in [0, 1])")
    return 0


def _image_files(arguments) -> list[Path]:
    """The photos named on the command line; a folder stands for its image files, sorted."""
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = []
    for argument in map(Path, arguments):
        if not argument.is_dir():
            files.append(argument)
            continue
        found = sorted(p for p in argument.iterdir() if p.suffix.lower() in readable)
        if not found:
            raise ValueError(f"Folder '{argument}' holds no image files")
        files += found
    return files


def _predict_command(args) -> int:
    if not 1 <= args.top_k <= 100:
        raise ValueError(f"--top-k must be between 1 and 100, not {args.top_k}")
    model, names, _ = load_exported_model(args.model)
    predictions, errors = [], []
    for image in _image_files(args.photos):
        try:
            top = predict_image(model, image, top_k=args.top_k, class_names=names)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            errors.append({"image": str(image), "error": str(exc)})
            continue
        predictions.append(
            {"image": str(image), "top": [{"class": n, "probability": p} for n, p in top]}
        )
        if not args.json:
            print(str(image))
            for name, probability in top:
                print(f"  {name:<16} {probability:.4f}")
    if args.json:
        document = {"model": str(args.model), "predictions": predictions, "errors": errors}
        print(json.dumps(document, indent=2))
    return 2 if errors else 0


def main(argv=None) -> int:
    """The command line; ``python cifar_utils.py COMMAND --help`` describes each command.

    - ``report [--results-dir DIR] [--readme FILE]``: the results table into README.md
      (:func:`update_readme_results`).
    - ``curves RUN_DIR [--out PNG]``: accuracy, loss and learning-rate curves of a run,
      also while it trains (:func:`read_log`, :func:`plot_history`); default
      ``RUN_DIR/curves.png``.
    - ``export MODEL.keras --format saved_model --out DIR``: a TensorFlow SavedModel
      (:func:`export_saved_model`).
    - ``predict --model MODEL.keras PHOTO|FOLDER ... [--top-k 5] [--json]``: the top-k
      classes of each photo (:func:`predict_image`); a folder means its image files.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success; on an error, a one-line ``error: ...`` on stderr
        and 2 (1 for ``report``). ``predict`` still classifies the other photos when one
        cannot be read, then returns 2. Wrong usage exits through argparse (status 2).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="cifar_utils.py", description="CIFAR-100 notebook helpers"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="write the results/*.json comparison table into README.md"
    )
    report.add_argument("--results-dir", default="results", help="folder of results JSON files")
    report.add_argument("--readme", default="README.md", help="file holding the results markers")
    report.set_defaults(run=_report_command, error_status=1)
    curves = commands.add_parser("curves", help="plot a run's log.csv, also while it trains")
    curves.add_argument("run_dir", help="the run folder holding log.csv, e.g. results/simple_cnn")
    curves.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    curves.set_defaults(run=_curves_command)
    export = commands.add_parser("export", help="convert a .keras model for TF Serving")
    export.add_argument("model", help="a .keras file, e.g. results/simple_cnn.keras")
    export.add_argument("--format", choices=["saved_model"], default="saved_model")
    export.add_argument("--out", required=True, help="new folder for the SavedModel")
    export.set_defaults(run=_export_command)
    predict = commands.add_parser("predict", help="classify photos with a .keras model")
    predict.add_argument("--model", required=True, help="e.g. results/simple_cnn.keras")
    predict.add_argument("photos", nargs="+", help="image files, or folders of them")
    predict.add_argument("--top-k", type=int, default=5, help="classes per photo (1 to 100)")
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.set_defaults(run=_predict_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(args, "error_status", 2)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window
    sys.exit(main())
