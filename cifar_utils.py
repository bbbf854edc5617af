"""Shared helpers for the CIFAR-100 classifier notebooks.

Sections: data (loading, label names, splits), pipelines (``tf.data`` and
augmentation), models, training glue (checkpoints, resume, results), evaluation,
plots. Every notebook imports this module as ``cu``; the heavy lifting lives here.

Image conventions: uint8 NHWC ``(N, 32, 32, 3)`` in [0, 255] as loaded; the
pipelines hand the models float32 in [0, 1] unless stated otherwise. Labels are
int64 ``(N,)`` in [0, 99] (fine) or [0, 19] (coarse).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
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
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}': a CIFAR-100 pickle holds only "
                "dicts, lists, strings and numpy arrays"
            )
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor
        return getattr(np, name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
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


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        if md5 is not None and (got := _file_md5(Path(tmp))) != md5:
            raise CifarDataError(
                f"Checksum mismatch for {url}: md5 {got}, expected {md5}. The download is "
                "corrupt or not the official archive; nothing was kept. Run again to retry"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
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
    if archive.is_file() and md5 is not None and _file_md5(archive) != md5:
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
):
    """A ``tf.data`` pipeline: (shuffle), batch, (augment), normalise, one-hot, prefetch.

    Args:
        x: uint8 ``(N, H, W, 3)`` in [0, 255]; y: int labels ``(N,)`` in
            [0, num_classes).
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle every epoch (seeded) and apply ``augment``.
        augment: a callable on float32 batches in [0, 1], e.g.
            :func:`augmentation_layers`; called with ``training=True``.

    Returns:
        ``tf.data.Dataset`` of ``(images float32 (B, H, W, 3) in [0, 1],
        labels float32 one-hot (B, num_classes))``.
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

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
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
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


# ---------------------------------------------- transfer learning (EfficientNetB0)


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


def _restore(model, run_dir: Path) -> None:
    """Load the last checkpoint's weights and optimizer state into a compiled ``model``."""
    if not model.optimizer.built:  # else Keras skips the saved optimizer variables
        model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(run_dir / "last.weights.h5")
            ok = not any("Skipping variable loading" in str(w.message) for w in caught)
        except ValueError:
            ok = False
    if not ok:
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
            self.diverged = (len(self.state["history"].get("loss", [])) + 1, batch + 1, loss)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return  # never checkpoint NaN weights
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for key, value in logs.items():
            self.state["history"].setdefault(key, []).append(value)
        self.state["seconds"] += time.perf_counter() - self._t0
        self.state["epoch"] = epoch + 1
        score = logs.get(self.monitor)
        if score is not None and score > self.state.get("best", -np.inf):
            self.state["best"], self.state["best_epoch"] = score, epoch + 1
            save_checkpoint(self.model, self.run_dir / "best.weights.h5")
        save_checkpoint(self.model, self.run_dir / "last.weights.h5")  # with optimizer state
        write_json(self.run_dir / "state.json", self.state)


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
    verbose="auto",
) -> dict:
    """Fit a compiled ``model`` with checkpoints, a CSV log and resume after interruption.

    Writes into ``run_dir``: ``best.weights.h5`` (best ``monitor`` so far),
    ``last.weights.h5`` (weights and optimizer state) + ``state.json`` (after every
    epoch, each written atomically) and ``log.csv`` (one row per epoch). With ``resume=True``
    and a ``state.json`` present, the weights, the optimizer state (so its step count
    and learning-rate schedule) and the history are restored and training continues at
    the next epoch; ``resume=False`` starts from scratch and overwrites them.

    Returns:
        The run state: ``{"epoch", "history" (metric -> list per epoch, all epochs),
        "seconds" (training wall time, all sessions), "best", "best_epoch",
        "initial_epoch" (where this call started)}``.

    Raises:
        TrainingDiverged: the loss became NaN/inf; the last good checkpoint is kept.
        ValueError: a saved optimizer state does not fit the model.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    state = {"epoch": 0, "history": {}, "seconds": 0.0}
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        _restore(model, run_dir)
        print(f"Resuming from {run_dir} after epoch {state['epoch']}.")
    state["initial_epoch"] = state["epoch"]
    keeper = _RunKeeper(run_dir, state, monitor)
    if state["epoch"] < epochs:
        csv = keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=state["epoch"] > 0)
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=state["epoch"],
            callbacks=[keeper, csv, *callbacks],
            verbose=verbose,
        )
    if keeper.diverged:
        epoch, batch, loss = keeper.diverged
        raise TrainingDiverged(
            f"Training diverged: loss became {loss} at epoch {epoch}, batch {batch}. Lower the "
            "learning rate or check the data; the last good checkpoint is "
            f"{run_dir / 'last.weights.h5'}"
        )
    return state


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
    the same ``SEED``; training starts when all have joined.

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
    2x2x512, batch 128) it took 1.0 s against 0.03 s for the same product done as one
    matmul, and it dominated the training step. For every stride-1, undilated,
    ungrouped ``Conv2D`` (nested models included) whose output has at most
    ``max_output_pixels`` pixels, this routes the input gradient through one
    ``tf.matmul`` of ``dy`` (B*OH*OW, Cout) by the kernel (Cout, KH*KW*Cin) followed by
    KH*KW shifted adds (col2im). The forward pass, the kernel gradient, the weights and
    the saved model are unchanged; only the arithmetic order of the input gradient
    differs (float round-off). Larger outputs keep TensorFlow's kernel, which is as
    fast there. Does nothing when a GPU is visible (cuDNN has no such gap).

    Call it on a built model, before ``compile``/``fit``. It changes the layer objects
    in place; ``keras.models.clone_model`` and reloading from ``.keras`` give plain
    layers again (call it again on those).

    Returns:
        Names of the layers switched (empty on GPU machines).
    """
    if tf.config.list_physical_devices("GPU"):
        return []
    switched = []
    stack = list(model.layers)
    while stack:
        layer = stack.pop(0)
        if hasattr(layer, "layers"):
            stack[:0] = layer.layers
            continue
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


# --------------------------------------------------------------------- plots


def _finish(fig, path):
    """Save ``fig`` to ``path`` (creating its folder) when a path is given; return ``fig``."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
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


def plot_history(history: dict, title: str = "", path=None):
    """Training curves: accuracy and loss per epoch, train vs validation.

    ``history`` maps metric names (``accuracy``, ``val_accuracy``, ``loss``,
    ``val_loss``) to per-epoch lists, as :func:`train` returns in ``state["history"]``.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)
