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
import difflib
import gzip
import hashlib
import http.client
import io
import json
import math
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
import weakref
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


class _MessageOnly:
    """Mixin for errors whose message says what to fix: in a notebook, IPython shows the
    message alone (``_render_traceback_``), not a traceback through this module that would
    bury it. Outside IPython the full traceback is printed as usual."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class CifarDataError(_MessageOnly, RuntimeError):
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
    with open(source, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"  # every gzip stream starts with these two bytes
    if not is_gzip:
        raise CifarDataError(_wrong_file(source, "not a gzip/tar archive"))
    if not _holds_a_tar(source):
        raise CifarDataError(_wrong_file(source, "a gzip file that holds no tar archive"))
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


def _holds_a_tar(archive: Path) -> bool:
    """Whether a gzip file starts with a tar header (a damaged stream counts as a tar)."""
    try:
        with gzip.open(archive) as g:
            head = g.read(512)
    except (OSError, EOFError, zlib.error):
        return True  # damaged: reported as truncated or corrupt by the tar reader
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _wrong_file(source: Path, what: str) -> str:
    return (
        f"{source} is {what}: is this the CIFAR-100 file? Expected {ARCHIVE_NAME} "
        f"(md5 {CIFAR100_MD5}, from {CIFAR100_URL}), or a folder holding it or its extracted "
        f"{FOLDER_NAME}/ folder"
    )


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise CifarDataError(
            f"Could not download CIFAR-100 from {url} ({exc}). No local copy was found "
            f"either. Without internet: fetch {CIFAR100_URL} elsewhere, then pass its path as "
            f"data_dir (notebook parameter DATA_DIR), set CIFAR100_DIR to it, or put it at "
            f"{dest}. To try the notebooks without it, see the README's smoke run (a "
            "generated archive in the official layout)"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _extract(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` (atomically: a temp folder renamed at the end)."""
    members = _read_members(archive)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".part", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
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


def load_cifar100(data_dir=None, label_mode: str = "fine", *, provenance=False, **locate_kwargs):
    """Load CIFAR-100 as ``(x_train, y_train), (x_test, y_test)``.

    Args:
        data_dir: a ``cifar-100-python.tar.gz`` file, or a folder holding it, its
            extracted ``cifar-100-python/`` folder, or ``train``/``test``/``meta``
            themselves. ``None``: ``$CIFAR100_DIR``, then the Keras cache, then download
            (see :func:`locate_cifar100`, which takes ``url``, ``md5``, ``cache_dir`` and
            ``timeout`` as keywords).
        label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
        provenance: also return where the data came from (see :func:`data_provenance`),
            as a third element.

    Returns:
        x: uint8 ``(N, 32, 32, 3)`` in [0, 255] (N = 50,000 train, 10,000 test for the
        official archive); y: int64 ``(N,)`` in [0, 99] (fine) or [0, 19] (coarse).
        Pickles are read with a restricted unpickler (numpy arrays only).

    Raises:
        ValueError: ``label_mode`` is neither ``"fine"`` nor ``"coarse"``.
        CifarDataError: see :func:`locate_cifar100`; also a file that is no gzip/tar archive,
            a missing ``train``/``test``/``meta``, an unsafe pickle, wrong array shapes or
            labels out of range.
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
    if not provenance:
        return splits[0], splits[1]
    info = data_provenance(source, members)
    info.update(train_images=len(splits[0][1]), test_images=len(splits[1][1]))
    return splits[0], splits[1], info


def _archive_beside(folder: Path) -> Path | None:
    """The archive an extracted folder came from, where the usual layouts keep it."""
    for archive in (
        folder.parent / ARCHIVE_NAME,  # a user's folder holding both
        folder.parent.parent / ARCHIVE_NAME,  # this module's cache
        folder.parent.parent / f"{folder.parent.name}_archive",  # Keras 3's cache
    ):
        if archive.is_file():
            return archive
    return None


def data_provenance(source, members=None) -> dict:
    """Where CIFAR-100 was read from, and whether it is the official archive's content.

    Args:
        source: the ``.tar.gz`` or extracted folder :func:`locate_cifar100` returned.
        members: the ``train``/``test``/``meta`` bytes already read from it (read if None).

    Returns:
        ``{"source", "archive", "md5", "official", "check"}``: the archive checked (the
        source itself, or for an extracted folder the archive beside it in the usual
        layouts: a user's folder holding both, this module's or Keras 3's cache), its md5
        hex digest, ``official`` True only if that md5 is :data:`CIFAR100_MD5` and the data
        read are that archive's (an extracted folder is compared member by member), and
        ``check``: what was checked, in words. A folder with no archive beside it is not
        official: it cannot be checked.
    """
    source = Path(source)
    members = _read_members(source) if members is None else members
    archive = _archive_beside(source) if source.is_dir() else source
    info = {"source": str(source), "archive": None, "md5": None, "official": False}
    if archive is None:
        info["check"] = "an extracted folder with no archive beside it: md5 not checked"
        return info
    info.update(archive=str(archive), md5=_file_digest(archive, "md5"))
    if info["md5"] != CIFAR100_MD5:
        info["check"] = f"md5 {info['md5']} is not the official archive's {CIFAR100_MD5}"
    elif archive != source and _read_members(archive) != members:
        info["check"] = f"the extracted folder differs from the official archive {archive}"
    else:
        info.update(official=True, check=f"md5 {CIFAR100_MD5}: the official archive")
    return info


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


def derive_seed(seed: int, *names) -> int:
    """An independent seed for one random source of a run, from the run's ``seed``.

    Each source (the shuffle, every augmentation layer, albumentations, ...) gets its own
    stream: ``derive_seed(SEED, "shuffle")`` and ``derive_seed(SEED, "augment", 0)`` are
    unrelated numbers (numpy's ``SeedSequence`` mixes ``seed`` with a CRC-32 of each name),
    so two sources never draw in lockstep, as two layers given the same seed would.

    Returns:
        An int in [0, 2**31), the range every Keras and TensorFlow seed accepts.
    """
    words = [int(seed) % 2**32, *(zlib.crc32(str(n).encode()) for n in names)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and TensorFlow (``keras.utils.set_random_seed``); op determinism.

    With ``deterministic=True`` TensorFlow's ops also run deterministically
    (``tf.config.experimental.enable_op_determinism``): the same ``seed`` on the same
    machine then gives the same weights, history and scores (on a GPU, at some cost in
    speed). With ``False`` the seed still fixes the initialisation, the split, the data
    order and the augmentation, but GPU kernels may add floats in a varying order, so two
    runs drift apart by round-off. Call it before building the model.
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


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
        seed: the run's seed; each layer gets its own stream from it (:func:`derive_seed`),
            so flips, shifts and rotations are drawn independently of each other.

    Returns:
        ``keras.Sequential`` mapping float32 batches (B, H, W, C) to the same shape;
        it only augments when called with ``training=True``. Borders are filled with
        the nearest pixel, as Keras' old ``ImageDataGenerator`` did. Inside
        :func:`make_dataset` the layers draw from seeds given per batch instead, so the
        augmentation of every batch is fixed by the seed, the epoch and the batch index.
    """
    steps = []
    if flip:
        steps.append(lambda s: keras.layers.RandomFlip("horizontal", seed=s))
    if shift:
        steps.append(
            lambda s: keras.layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=s)
        )
    if rotation_degrees:
        steps.append(
            lambda s: keras.layers.RandomRotation(
                rotation_degrees / 360.0, fill_mode="nearest", seed=s
            )
        )
    own = [None if seed is None else derive_seed(seed, "augment", i) for i in range(len(steps))]
    return keras.Sequential(
        [make(s) for make, s in zip(steps, own, strict=True)], name="augmentation"
    )


class _BatchSeeds(keras.random.SeedGenerator):
    """Stateless seeds for one call of a Keras random layer inside ``tf.data``.

    Keras' random layers draw from a ``SeedGenerator`` whose state variable advances at
    each call: in a parallel ``tf.data`` map the calls race for it, and a restarted run
    starts it again. This one holds no state (``SeedGenerator.__init__`` is skipped on
    purpose): its ``k``-th draw is ``seed`` folded with ``k``, ``seed`` being given per batch.
    """

    def __init__(self, seed):  # no super().__init__: it would create the state variable
        self._seed, self._draws = seed, 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def _fold(seed: int, *data):
    """A stateless seed, int64 (2,), from an int seed folded with int tensors ``data``.

    ``stateless_fold_in(s, d)`` returns ``[hash(s), d]``: the last value folded in stays
    apart in the second element. A final fold with 0 mixes it into the first, so the
    first element alone (an int seed for albumentations) depends on every input too.
    """
    out = tf.constant([seed, 0], tf.int64)
    for d in (*data, 0):
        out = tf.random.experimental.stateless_fold_in(out, tf.cast(d, tf.int64))
    return out


def _augment_with_seeds(augment, images, seed: int, batch_key):
    """Apply Keras image layers ``augment`` with draws fixed by ``seed`` and ``batch_key``."""
    layers = augment.layers if isinstance(augment, keras.Sequential) else [augment]
    for i, layer in enumerate(layers):
        if not hasattr(layer, "get_random_transformation"):
            raise TypeError(
                f"augment must be Keras image preprocessing layers (e.g. "
                f"cu.augmentation_layers()), not {type(layer).__name__}"
            )
        draws = _BatchSeeds(_fold(derive_seed(seed, "augment", i), *batch_key))
        transformation = layer.get_random_transformation(images, training=True, seed=draws)
        images = layer.transform_images(images, transformation, training=True)
    return images


def _check_images(x) -> tuple[np.ndarray, float]:
    """Images (N, H, W, 3) as given and the divisor that maps them to [0, 1]."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), not shape {x.shape}")
    if x.dtype == np.uint8:
        return x, 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], not {x.dtype}")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(
            f"images hold {bad} NaN or infinite value(s) (first at index "
            f"{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}); fix the preprocessing "
            "that produced them, or pass the uint8 images from load_cifar100"
        )
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"float images must be in [0, 1], these span [{x.min():g}, {x.max():g}]; "
            "pass 0-255 data as uint8"
        )
    return x.astype(np.float32, copy=False), 1.0


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
        x: images ``(N, H, W, 3)``: uint8 in [0, 255] (as loaded), or float in [0, 1];
            y: int labels ``(N,)`` in [0, num_classes).
        batch_size: images per batch (the last batch of an epoch may be smaller).
        training: shuffle every epoch and apply ``augment`` / ``batch_transform``.
        augment: Keras image preprocessing layers (e.g. :func:`augmentation_layers`), on
            float32 batches in [0, 1].
        seed: the run's seed; the shuffle, each augmentation layer and ``batch_transform``
            each draw from their own stream of it (:func:`derive_seed`).
        batch_transform: a callable ``(images, batch_seed) -> images`` on uint8 batches
            (B, H, W, 3) in [0, 255], applied before normalisation when ``training``, e.g.
            :func:`albumentations_batch_transform`; ``batch_seed`` is an int64 scalar tensor.

    Returns:
        ``tf.data.Dataset`` of ``(images float32 (B, H, W, 3) in [0, 1],
        labels float32 one-hot (B, num_classes))``. A training dataset is one epoch; each
        iteration of it is a new epoch, as ``model.fit(ds, epochs=...)`` expects. Its order
        and augmentation depend only on ``seed``, the epoch and the batch index, never on
        how the parallel map happens to run, so a run repeats exactly. It also carries
        ``steps_per_epoch`` (``ceil(N / batch_size)``), ``plan`` (what :func:`train`
        records: data fingerprint, batch size, seed, augmentation) and
        ``from_epoch(first, last)``: epochs ``first`` to ``last - 1`` (0-based) as one
        dataset, the same batches whichever run asks for them. :func:`train` uses it, so
        a resumed run trains on the batches an uninterrupted one would have seen.

    Raises:
        ValueError: images not (N, H, W, 3), float images with NaN/inf or outside [0, 1],
            labels invalid or not one per image, ``batch_transform`` with float images.
    """
    x, scale = _check_images(x)
    y = _check_labels(y, num_classes, "labels")
    if len(x) != len(y) or not len(x):
        raise ValueError(
            f"need one label per image and at least one image, got {len(x)} "
            f"images and {len(y)} labels"
        )
    steps = steps_per_epoch(len(x), batch_size)

    def prepare(images, labels):
        return tf.cast(images, tf.float32) / scale, tf.one_hot(labels, num_classes)

    if not training:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    if batch_transform is not None and x.dtype != np.uint8:
        raise ValueError("batch_transform takes uint8 batches: pass the uint8 images")
    images, labels = tf.constant(x), tf.constant(y)
    order_seed = derive_seed(seed, "shuffle")
    transform_seed = derive_seed(seed, "batch_transform")

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(x), dtype=tf.int64), seed=_fold(order_seed, epoch)
        )
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda b, idx: (epoch, b, idx))

    def load(epoch, b, idx):
        batch = tf.gather(images, idx)
        if batch_transform is not None:
            batch = batch_transform(batch, _fold(transform_seed, epoch, b)[0])
        batch, onehot = prepare(batch, tf.gather(labels, idx))
        if augment is not None:
            batch = _augment_with_seeds(augment, batch, seed, (epoch, b))
        return batch, onehot

    def stream(epochs, count):
        ds = epochs.flat_map(one_epoch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(count * steps))  # for Keras
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    epoch_keys = tf.data.Dataset.random(
        seed=derive_seed(seed, "epochs"), rerandomize_each_iteration=True
    )
    ds = stream(epoch_keys.take(1), 1)  # a new epoch at every iteration, for model.fit
    ds.steps_per_epoch = steps
    ds.from_epoch = lambda first, last: stream(tf.data.Dataset.range(first, last), last - first)
    ds.plan = {
        "data": data_fingerprint(x, y),
        "images": len(x),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "augmentation": _describe_augmentation(augment, batch_transform),
    }
    return ds


def _describe_augmentation(augment, batch_transform) -> list:
    """JSON-able description of a pipeline's augmentation, for a run's plan."""
    described = []
    layers = [] if augment is None else getattr(augment, "layers", [augment])
    for layer in layers:  # without "seed": the pipeline draws from its own seeds
        described.append({"layer": type(layer).__name__, **_layer_config(layer, "seed")})
    if batch_transform is not None:
        described.append({"batch_transform": getattr(batch_transform, "__name__", "?")})
    return json.loads(json.dumps(described, default=str))


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


class WeightsError(_MessageOnly, RuntimeError):
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


def describe_weights(weights) -> str | None:
    """What a ``WEIGHTS`` value means, for a run's plan: ``"imagenet"``, ``None``, or for a
    file ``"sha256:<first 16 hex digits>"`` of its content (so a copied file is the same)."""
    if weights is None or (isinstance(weights, str) and weights == "imagenet"):
        return weights
    path = Path(weights).expanduser()
    return f"sha256:{_file_digest(path, 'sha256')[:16]}" if path.is_file() else str(weights)


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
        per epoch over all phases (NaN where a phase lacks the metric); ``"best"``,
        ``"best_epoch"`` (counted from the first phase's start), ``"params"`` and
        ``"run_dir"`` of the last phase (whose ``best.weights.h5`` is the final model);
        ``"phases"``: ``[{"name", "first_epoch" (1-based), "epochs", "trainable_params"},
        ...]`` for :func:`plot_history` and the results file. :func:`evaluate_and_save`
        takes it as ``run``.
    """
    if not runs:
        raise ValueError("join_runs needs at least one phase, e.g. join_runs(head=run)")
    history, phases, done = {}, [], 0
    for name, run in runs.items():
        trainable = run["params"]["trainable"] if "params" in run else None
        phases.append(
            {"name": name, "first_epoch": done + 1, "epochs": run["epoch"],
             "trainable_params": trainable}
        )  # fmt: skip
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
        "params": last.get("params"),
        "run_dir": last.get("run_dir"),
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


class TrainingDiverged(_MessageOnly, RuntimeError):
    """Training produced NaN/inf (loss, weights, optimizer state) or outputs that are no
    probabilities; the message says where and what to try."""


class ResumeError(_MessageOnly, ValueError):
    """A run folder's checkpoints cannot be resumed by this run (another plan, another
    model, NaN/inf values, files that do not belong together); the message says the way out."""


class NotProbabilities(_MessageOnly, ValueError):
    """A model's outputs are not probability rows (NaN/inf, or rows not summing to 1)."""


def check_probabilities(probs, what: str = "the model's output", atol: float = 1e-3):
    """Return ``probs`` (float (N, C)) as a numpy array if every row is a distribution.

    A row passes when all its values are finite, none is below ``-atol`` and it sums to 1
    within ``atol``. NaN weights give NaN rows on some CPUs and rows of zeros on others
    (oneDNN's softmax maps NaN to 0), so both are refused here rather than read as a top-1.

    Raises:
        NotProbabilities: names the first bad row and what is wrong with it.
    """
    p = np.asarray(probs)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
        raise NotProbabilities(f"{what} must be float rows (N, classes), not {p.dtype} {p.shape}")
    finite = np.isfinite(p).all(axis=1)
    sums = np.where(finite, p.sum(axis=1, dtype=np.float64), np.nan)
    good = finite & (np.abs(sums - 1.0) <= atol) & (np.where(finite[:, None], p, 0) >= -atol).all(1)
    if good.all():
        return p
    i = int(np.flatnonzero(~good)[0])
    why = "holds NaN or inf" if not finite[i] else f"sums to {sums[i]:.6g}, not 1"
    raise NotProbabilities(
        f"{what} is not a probability distribution: {int((~good).sum())} of {len(p)} rows "
        f"are bad (row {i} {why}). The weights are probably NaN (a diverged run: NaN becomes "
        "zeros in some CPUs' softmax) or the model has no softmax output. Retrain with a lower "
        "learning rate, or load another checkpoint"
    )


def nonfinite_variables(model) -> list[str]:
    """Paths of the model's (and its optimizer's) variables holding NaN or inf; ``[]`` if none.

    Decided from the values themselves (``tf.math.is_finite``), not from the loss: with
    oneDNN a NaN weight can leave the loss finite. Reads the variables as they are now
    (Keras creates optimizer slots at the first step). Works on distributed variables.
    """
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + (list(optimizer.variables) if optimizer else [])
    variables = [v for v in variables if "float" in str(v.dtype)]
    if not variables:
        return []
    finite = tf.stack(
        [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in variables]
    )
    return [v.path for v, ok in zip(variables, to_numpy(finite), strict=True) if not ok]


def training_state_problem(model, probe=None) -> str | None:
    """What makes a model's training state unfit to checkpoint, or ``None`` if nothing.

    The first model or optimizer variable holding NaN/inf (:func:`nonfinite_variables`),
    else, given a ``probe`` batch (float32 (B, H, W, 3) in [0, 1]), outputs of the model in
    inference mode that are no probability rows (:func:`check_probabilities`). What
    :func:`train` checks every ``check_every`` batches and before each checkpoint; the
    benchmark times it.
    """
    bad = nonfinite_variables(model)
    if bad:
        return f"variable '{bad[0]}' holds NaN or inf"
    if probe is not None:
        try:
            check_probabilities(to_numpy(model(probe, training=False)), "the output")
        except NotProbabilities as exc:
            return str(exc).split(". ")[0]
    return None


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path`` (same suffixes); move it over ``path`` on success.

    The file gets the permissions of any new file of the user (0666 less the umask), not the
    0600 of the temporary file.
    """
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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
        raise ResumeError(
            f"The checkpoint in {run_dir} was written by a different model or optimizer "
            "and cannot be resumed. Start fresh (RESUME=False) or use another OUTPUT_DIR"
        ) from None
    bad = nonfinite_variables(model)
    if bad:
        raise ResumeError(
            f"{run_dir / 'last.weights.h5'} holds NaN or inf ({len(bad)} variable(s), e.g. "
            f"'{bad[0]}'): that run diverged and cannot be resumed. Start over with "
            f"RESUME=False (or another OUTPUT_DIR), or evaluate its {run_dir / 'best.weights.h5'}"
        )


def _align_replicas(model) -> None:
    """Give every local replica of a mirrored variable the first replica's value.

    Under ``MirroredStrategy`` BatchNorm's moving statistics are kept per replica (each
    from its own share of the batch) and a checkpoint holds the first replica's. Aligning
    them at each epoch's start makes an uninterrupted run continue from exactly what a
    resumed one restores. Nothing to do on one device or with one replica per worker.
    """
    for variable in model.variables:
        value = getattr(variable, "value", variable)
        if isinstance(value, tf.distribute.DistributedValues) and len(value.values) > 1:
            first = value.values[0].read_value()
            for replica in value.values[1:]:
                replica.assign(first)


def _seed_states(model) -> list:
    """The state variables of the model's random layers (Dropout's seed generators)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _staged(run_dir: Path, epoch: int, name: str) -> Path:
    return run_dir / f".epoch-{epoch:05d}.{name}"


def _settle_checkpoints(run_dir: Path, committed_epoch: int) -> None:
    """Finish or undo staged checkpoint files after ``state.json`` says ``committed_epoch``.

    An epoch's files are written as ``.epoch-NNNNN.<name>`` first, then ``state.json`` (the
    commit), then renamed into place; a crash leaves them staged. Those of the committed
    epoch are moved into place, those of an epoch that never committed are removed.
    """
    for staged in run_dir.glob(".epoch-*.*.weights.h5"):
        epoch, name = staged.name[len(".epoch-") :].split(".", 1)
        if epoch.isdigit() and int(epoch) == committed_epoch:
            os.replace(staged, run_dir / name)
        else:
            staged.unlink()


def _mode(monitor: str, mode: str) -> str:
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f'mode must be "auto", "min" or "max", not {mode!r}')
    if "loss" in monitor or "error" in monitor:
        return "min"
    if "acc" in monitor or "top" in monitor or "auc" in monitor:
        return "max"
    raise ValueError(
        f"Cannot tell whether a higher or lower {monitor!r} is better: pass mode='min' or 'max'"
    )


class _RunKeeper(keras.callbacks.Callback):
    """Guards the run and commits each good epoch (checkpoints, then ``state.json``).

    Every ``check_every`` batches and at each epoch's end, before anything is written: every
    model and optimizer variable must be finite and the model's outputs on a fixed probe
    batch must be probabilities; with the loss checked at every batch. Otherwise training
    stops and nothing of that epoch is written.
    """

    def __init__(self, run_dir, state, monitor, mode, probe, check_every):
        super().__init__()
        self.run_dir, self.state, self.monitor, self.mode = run_dir, state, monitor, mode
        self.probe, self.check_every = probe, check_every
        self.diverged = None
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._epoch = epoch + 1
        _align_replicas(self.model)

    def _stop(self, where: str, what: str) -> None:
        self.diverged = (self._epoch, where, what)
        self.model.stop_training = True

    def _check_state(self, where: str) -> None:
        """Stop if a variable is non-finite or the probe's outputs are no distribution."""
        what = training_state_problem(self.model, self.probe)  # slots may be new
        if _any_worker(self.model.distribute_strategy, what is not None) and not what:
            what = "another worker's weights or outputs hold NaN or inf"
        if what:
            self._stop(where, what)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self._stop(f"batch {batch + 1}", f"loss became {float(loss)}")
        elif self.check_every and (batch + 1) % self.check_every == 0:
            self._check_state(f"batch {batch + 1} (state check)")

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        if logs is not None:  # the dict the later callbacks get: log.csv gets the rate too
            logs.setdefault("learning_rate", float(to_numpy(opt.learning_rate)))
        logs = {k: float(v) for k, v in (logs or {}).items()}
        bad = [k for k in ("loss", "val_loss") if k in logs and not np.isfinite(logs[k])]
        if bad and not self.diverged:
            self._stop(f"the end of the epoch ({bad[0]})", f"loss became {logs[bad[0]]}")
        if not self.diverged:
            self._check_state("the end of the epoch")
        if self.diverged:
            return  # nothing of this epoch is written
        state = self.state
        for key, value in logs.items():
            state["history"].setdefault(key, []).append(value)
        state["seconds"] += time.perf_counter() - self._t0
        state["epoch"], state["step"] = epoch + 1, int(to_numpy(opt.iterations))
        state["seed_states"] = [to_numpy(v).tolist() for v in _seed_states(self.model)]
        score = logs.get(self.monitor)
        best = state.get("best")
        if score is not None and (
            best is None or (score < best if self.mode == "min" else score > best)
        ):
            state["best"], state["best_epoch"] = score, epoch + 1
            save_checkpoint(self.model, _staged(self.run_dir, epoch + 1, "best.weights.h5"))
        elif epoch == 0:  # a fresh run: a best checkpoint left by an older run is not ours
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / "best.weights.h5").unlink()
        save_checkpoint(self.model, _staged(self.run_dir, epoch + 1, "last.weights.h5"))
        write_json(self.run_dir / "state.json", state)  # the commit point
        _settle_checkpoints(self.run_dir, epoch + 1)


class _CommittedCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger, writing only the epochs ``keeper`` committed.

    A fresh log replaces an old one only when its first epoch commits, like the
    checkpoints, so a run that diverges at once leaves the older run's log as it was.
    """

    def __init__(self, keeper: _RunKeeper, filename: str, append: bool):
        super().__init__(filename, append=append)
        self.keeper, self._opened = keeper, False

    def on_train_begin(self, logs=None):
        pass  # opened at the first committed epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.keeper.diverged:
            return
        if not self._opened:
            super().on_train_begin()
            self._opened = True
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._opened:
            super().on_train_end(logs)


def compile_metrics() -> list:
    """Fresh metric objects for ``model.compile``: top-1 ``accuracy`` and ``top5_accuracy``."""
    return ["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy")]


def _flatten(obj, prefix: str = "") -> dict:
    """``{"a.b": value}`` for nested dicts (JSON-normalised), for comparing run plans."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _optimizer_plan(optimizer) -> dict:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under mixed precision
    config = {k: v for k, v in inner.get_config().items() if k != "name"}
    return {"class": type(inner).__name__, **config}


def _layer_config(layer, *also_drop) -> dict:
    """What ``layer`` computes: its config without name, dtype policy, trainable flag (and
    ``also_drop``), so the same layer built again has the same one."""
    drop = ("name", "dtype", "trainable", *also_drop)
    return {k: v for k, v in layer.get_config().items() if k not in drop}


def _layers_plan(model) -> dict:
    """``{"NNN Class": digest}`` of what each layer computes (nested models walked).

    The digest covers the layer's configuration (rates, activations, sizes, ...) without
    its name, dtype policy or trainable flag, so the same network built again matches.
    """
    out, stack = {}, list(model.layers)
    while stack:
        layer = stack.pop(0)
        if getattr(layer, "layers", None):
            stack[:0] = layer.layers
            continue
        blob = json.dumps(_layer_config(layer), sort_keys=True, default=str).encode()
        out[f"{len(out):03d} {type(layer).__name__}"] = hashlib.md5(blob).hexdigest()[:8]
    return out


def _weights_digest(model) -> str:
    digest = hashlib.md5()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(to_numpy(variable)).tobytes())
    return digest.hexdigest()[:12]


def run_plan(model, train_ds, plan: dict | None = None, **training) -> dict:
    """What a checkpoint of ``model`` trained on ``train_ds`` means, as JSON-able dict.

    ``model``: its parameter counts, what each layer computes (:func:`_layers_plan`:
    rates, activations, sizes), its loss, and a digest of the weights it starts from
    (initialisation, or an earlier phase's result); its optimizer and learning-rate
    schedule (class and config); the data pipeline's ``plan`` from :func:`make_dataset`
    (data fingerprint, image count, batch size, seed, augmentation); ``training``: how
    :func:`train` runs (monitor, mode, epoch offset); and ``plan``: what the code cannot
    see (e.g. ``{"weights": "imagenet", "image_size": 224}``), whose keys replace those above.
    """
    loss = (
        model.loss
        if isinstance(model.loss, str | type(None))
        else (keras.saving.serialize_keras_object(model.loss))
    )
    described = {
        "model": {
            "params": parameter_counts(model),
            "layers": _layers_plan(model),
            "loss": loss,
            "start_weights": _weights_digest(model),
        },
        "optimizer": _optimizer_plan(model.optimizer),
        "data": getattr(train_ds, "plan", None),
        "training": training,
        **(plan or {}),
    }
    return json.loads(json.dumps(described, default=str))


#: Plan entries that follow from the epoch count: allowed to differ when ``epochs`` does.
_REPLANNED_WITH_EPOCHS = ("optimizer.learning_rate.config.decay_rate",)


def train(
    model,
    train_ds,
    val_ds,
    *,
    epochs: int,
    run_dir,
    resume: bool = True,
    monitor: str = "val_accuracy",
    mode: str = "auto",
    callbacks=(),
    tensorboard: bool = False,
    plan: dict | None = None,
    check_every: int = 50,
    epoch_offset: int = 0,
    verbose="auto",
) -> dict:
    """Fit a compiled ``model`` with checkpoints, a CSV log, divergence guards and resume.

    Writes into ``run_dir`` (under a multi-worker run, workers other than the chief write
    into ``run_dir/worker-<index>``, see :func:`worker_run_dir`): ``last.weights.h5``
    (weights and optimizer state), ``best.weights.h5`` (best ``monitor`` so far),
    ``state.json`` (history, step, plan, random-layer states) and ``log.csv`` (one row per
    epoch, with the learning rate; see :func:`read_log`). An epoch commits together: its
    checkpoints are staged, ``state.json`` is written (the commit point), then they are
    moved into place; a crash in between is settled at the next start, so a best
    checkpoint never comes from an epoch the history lacks. ``tensorboard=True`` adds
    TensorBoard logs under ``run_dir/tensorboard``.

    Resume (``resume=True`` and a ``state.json``): weights, optimizer state (so its step
    and learning-rate schedule), history and the random layers' states are restored and
    training continues at the next epoch. With ``train_ds`` from :func:`make_dataset` the
    resumed epochs get the batches, order and augmentation an uninterrupted run would
    have, so (with :func:`seed_everything`'s op determinism) an interrupted and resumed
    run ends with the same weights and history as one that never stopped. A plain
    ``tf.data.Dataset`` is iterated anew each epoch instead (its epochs restart).

    The run's plan (:func:`run_plan`: model and the weights it starts from, optimizer and
    schedule, data pipeline, monitor, ``epoch_offset`` and ``plan``) is stored; resuming a
    run with another plan is refused with the entries that differ. Another ``epochs``
    continues with a warning: a schedule built from the epoch count (e.g.
    :func:`exponential_decay`) is the new one from the restored step on, and the warning
    gives the rate there under both plans. A run that already has ``epochs`` epochs trains
    nothing.

    ``epoch_offset``: epochs that earlier phases trained on the same ``train_ds`` (e.g. the
    transfer notebook's head phase): this run's epoch ``e`` gets the data of epoch
    ``epoch_offset + e``, so phases never replay each other's batches.

    Divergence: the loss is checked after every batch; every ``check_every`` batches
    (0: only at epoch ends) and at each epoch's end all model and optimizer variables must
    be finite and the model's outputs on a probe batch (the first 8 validation images)
    must be probabilities. The best checkpoint follows ``monitor`` with ``mode``: "auto"
    (lower is better for losses, higher for accuracies), "min" or "max".

    Returns:
        The run state: ``{"epoch", "history" (metric -> list per epoch, all epochs, with
        ``learning_rate`` at each epoch's end), "seconds" (training wall time, all
        sessions), "best", "best_epoch", "initial_epoch" (where this call started),
        "step" (optimizer steps so far), "params" (counts while training, e.g. the
        trainable ones of a phase), "run_dir", "plan"}``.

    Raises:
        TrainingDiverged: NaN/inf in the loss, a variable, or outputs that are no
            probabilities; the last good checkpoint is kept and nothing of that epoch saved.
        ResumeError: (a ValueError) the saved checkpoint does not fit the model, holds
            NaN/inf, or its plan differs.
        ValueError: ``epochs`` < 1; ``mode`` unknown or undecidable for ``monitor``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, not {epochs!r}")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("compile the model (optimizer, loss, metrics) before cu.train")
    mode = _mode(monitor, mode)
    run_dir = worker_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    full_plan = run_plan(
        model, train_ds, plan, monitor=monitor, mode=mode, epoch_offset=epoch_offset
    )
    state = {"epoch": 0, "history": {}, "seconds": 0.0, "plan": full_plan, "epochs": epochs}
    if resume and state_path.exists():
        state = _resume(model, run_dir, json.loads(state_path.read_text()), full_plan, epochs)
    else:
        _settle_checkpoints(run_dir, -1)  # staged files of an older run that never committed
        if state_path.exists():
            old_epoch = json.loads(state_path.read_text()).get("epoch", "?")
            print(
                f"Starting over in {run_dir} (resume=False): its run of {old_epoch} epoch(s) "
                "stays until this run's first epoch commits, then is replaced."
            )
    state.update(
        initial_epoch=state["epoch"],
        monitor=monitor,
        mode=mode,
        params=parameter_counts(model),
        run_dir=str(run_dir),
    )
    probe = None if val_ds is None else next(iter(val_ds.map(lambda x, _: x[:8]).take(1)), None)
    keeper = _RunKeeper(run_dir, state, monitor, mode, probe, check_every)
    if state["epoch"] < epochs:
        csv = _CommittedCSVLogger(keeper, str(run_dir / "log.csv"), append=state["epoch"] > 0)
        if tensorboard:
            if state["epoch"] == 0:  # a fresh run replaces old logs, like its checkpoints
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            callbacks = [*callbacks, keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]
        exact = hasattr(train_ds, "from_epoch")
        model.fit(
            train_ds.from_epoch(epoch_offset + state["epoch"], epoch_offset + epochs)
            if exact
            else train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=state["epoch"],
            steps_per_epoch=train_ds.steps_per_epoch if exact else None,
            callbacks=[keeper, csv, *callbacks],
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
        )
    if keeper.diverged:
        epoch, where, what = keeper.diverged
        raise TrainingDiverged(
            f"Training diverged: {what} at epoch {epoch}, {where}. Lower the learning rate "
            f"or check the data. Nothing of epoch {epoch} was saved; the last good checkpoint "
            f"is {run_dir / 'last.weights.h5'}"
            + (
                f" (epoch {state['epoch']})"
                if state["epoch"]
                else " (none: it diverged in epoch 1)"
            )
        )
    return state


def _resume(model, run_dir: Path, saved: dict, plan: dict, epochs: int) -> dict:
    """The saved run state of ``run_dir``, restored into ``model``, or why it cannot be."""
    _settle_checkpoints(run_dir, saved["epoch"])
    old, new = _flatten(saved.get("plan")), _flatten(plan)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    replanned = saved.get("epochs", epochs) != epochs
    if replanned:
        differ = [k for k in differ if k not in _REPLANNED_WITH_EPOCHS]
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in differ[:6])
        raise ResumeError(
            f"{run_dir} holds a run with another plan: {shown}"
            + (f" (and {len(differ) - 6} more)" if len(differ) > 6 else "")
            + (
                " (the weights this run starts from differ from that run's: e.g. an earlier "
                "phase trained for another number of epochs, or another SEED)"
                if "model.start_weights" in differ
                else ""
            )
            + ". Its checkpoints mean something else. Start over with RESUME=False, or use "
            "another OUTPUT_DIR to keep that run"
        )
    _restore(model, run_dir)
    step = int(to_numpy(model.optimizer.iterations))
    if "step" in saved and saved["step"] != step:
        raise ResumeError(
            f"{run_dir}: last.weights.h5 is at optimizer step {step} but state.json at step "
            f"{saved['step']}: they do not belong together (a file copied or restored by hand?). "
            "Start over with RESUME=False, or put back the pair written together"
        )
    if replanned:
        warnings.warn(
            f"{run_dir} was planned for {saved.get('epochs')} epochs, this run asks for "
            f"{epochs}: continuing." + _schedule_change(model, saved.get("plan"), step),
            stacklevel=3,
        )
    seed_vars = _seed_states(model)
    if len(saved.get("seed_states", [])) == len(seed_vars):
        for var, value in zip(seed_vars, saved.get("seed_states", []), strict=True):
            var.assign(np.asarray(value, dtype=str(var.dtype)))
    _write_log(run_dir, saved["history"])  # log.csv as the committed history has it
    print(f"Resuming from {run_dir} after epoch {saved['epoch']}.")
    if saved["epoch"] >= epochs:
        print(
            f"That run already has {saved['epoch']} epoch(s), EPOCHS={epochs}: nothing to "
            "train. Set RESUME=False (or another OUTPUT_DIR) to train again."
        )
    return {**saved, "epochs": epochs, "plan": plan}


def _schedule_change(model, saved_plan, step: int) -> str:
    """In words: the learning rate at ``step`` under the saved plan's schedule and the new one."""
    config = ((saved_plan or {}).get("optimizer") or {}).get("learning_rate")
    if not isinstance(config, dict):
        return ""  # a constant rate: the epoch count does not change it
    before = float(keras.saving.deserialize_keras_object(config)(step))
    now = float(to_numpy(model.optimizer.learning_rate))
    return (
        " The learning-rate schedule is the one planned for the new epoch count from here "
        f"on: at the restored step {step} it gives {now:.4g}, where the old plan gave "
        f"{before:.4g}."
    )


def _write_log(run_dir: Path, history: dict) -> None:
    """Rewrite ``log.csv`` from a run's committed history, as Keras' CSVLogger writes it.

    A crash between committing an epoch and logging it (or the reverse) leaves the log a row
    short (or long); a resumed run's log then continues from exactly the committed epochs.
    """
    keys = sorted(history)
    rows = max((len(v) for v in history.values()), default=0)
    with _atomic_path(run_dir / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)  # Keras' CSVLogger: the excel dialect, keys sorted
        writer.writerow(["epoch", *keys])
        writer.writerows([i, *(history[k][i] for k in keys)] for i in range(rows))


def read_log(run_dir) -> dict:
    """The per-epoch history in ``run_dir/log.csv`` (Keras' CSVLogger in :func:`train`).

    Safe while the run is still writing the file: a last line without its line end (a
    row being written) is skipped. Values Keras logs as ``NA`` become NaN.

    Returns:
        Column name -> list of floats, one per complete row (``accuracy``, ``loss``,
        ``learning_rate``, ``val_accuracy``, ...), and ``epoch``: ints from 1 (the file
        counts from 0), as :func:`plot_history` takes.

    Raises:
        FileNotFoundError: no folder ``run_dir``, or it has no ``log.csv`` (no training run).
        ValueError: no complete row yet, or a line is not a CSVLogger row.
    """
    path = Path(run_dir) / "log.csv"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"No folder '{run_dir}'. A run folder is a notebook's OUTPUT_DIR (results/ by "
            "default) followed by the model's name (simple_cnn, complex_cnn, or "
            "efficientnet_b0/head and efficientnet_b0/finetune); it exists once training starts"
        )
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
    run continues the schedule. With a new ``epochs`` it is another schedule (another
    ``decay_rate``), which takes over at the restored step: the rate jumps to what the new
    plan gives there (:func:`train` warns with both rates).

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


def _tf_config() -> tuple[int, str, int] | None:
    """``(workers, task type, task index)`` from ``$TF_CONFIG``; ``None`` if it is unset.

    ``workers`` counts the worker tasks, chief included.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
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
    if "chief" not in cluster and task_type == "worker" and task_index == 0:
        task_type = "chief"  # worker 0 is the chief when the cluster names none
    return n, task_type, task_index


def is_chief() -> bool:
    """Whether this process writes the shared results of a run.

    True on one machine, and under a multi-worker ``$TF_CONFIG`` for the chief (the task
    of type ``"chief"``, else worker 0). Only the chief writes results files, figures and
    exported models; every worker keeps its own checkpoints (:func:`worker_run_dir`).
    """
    config = _tf_config()
    return config is None or config[1] == "chief"


def worker_run_dir(run_dir) -> Path:
    """The checkpoint folder of this worker: ``run_dir`` itself, or for a non-chief worker of a
    multi-worker run ``run_dir/worker-<index>``, so workers sharing a folder never write the
    same file and each resumes from its own checkpoints."""
    run_dir = Path(run_dir)
    return run_dir if is_chief() else run_dir / f"worker-{_tf_config()[2]}"


def to_numpy(value) -> np.ndarray:
    """A variable or tensor as a numpy array, also under ``tf.distribute`` strategies.

    ``int(optimizer.iterations)`` fails on a ``MirroredVariable``; this reads the value
    (all replicas of a mirrored variable hold the same), and the first local replica's
    value of a per-replica result.
    """
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    return np.asarray(tf.convert_to_tensor(getattr(value, "value", value)))


def _any_worker(strategy, flag: bool) -> bool:
    """``flag`` or-ed over all workers of a multi-worker run (a collective: all must call it)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


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


def _split_cpu(n: int) -> list[str]:
    """Split the CPU into ``n`` logical devices (before TensorFlow starts); their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
            )
        except RuntimeError:
            raise RuntimeError(
                f"CIFAR_CPU_DEVICES={n} must take effect before TensorFlow starts: restart "
                "the kernel (or process) and call choose_strategy() before any other "
                "TensorFlow work"
            ) from None
    return [f"/cpu:{i}" for i in range(n)]


def choose_strategy(cpu_devices: int | None = None):
    """The ``tf.distribute`` strategy for the devices and machines at hand.

    - ``MultiWorkerMirroredStrategy`` when ``$TF_CONFIG`` names two or more workers:
      synchronous data-parallel training across machines (all-reduce of gradients;
      every worker ends with the same weights).
    - ``MirroredStrategy`` over all visible GPUs when there are two or more.
    - ``MirroredStrategy`` over ``cpu_devices`` logical CPU devices when that is 2 or more
      and there is no GPU: the same code path as several GPUs, testable on a laptop
      (default: the environment variable ``CIFAR_CPU_DEVICES``, else 1).
    - Else ``OneDeviceStrategy`` on the one GPU, or on the CPU.

    Build and compile the model inside ``with strategy.scope():`` and batch the data at
    :func:`global_batch_size`. Call this first, before any other TensorFlow work:
    multi-worker collectives and logical CPU devices can only be set up at program start.

    Multi-worker launch: start the same notebook or script on every machine, each with
    ``TF_CONFIG`` listing all workers and its own index, e.g. on the first machine
    ``TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
    "task": {"type": "worker", "index": 0}}'`` and ``"index": 1`` on the second. Worker 0
    is the chief; all must reach each other on those ports, read the same data and use
    the same ``SEED``; training starts when all have joined. Only the chief writes the
    results file, figures and exported model (:func:`is_chief`); every worker writes its
    own checkpoints (:func:`worker_run_dir`) and resumes from them. Trainable weights stay
    identical on all workers; BatchNorm moving statistics are updated from each worker's
    own batches (Keras 3 does not all-reduce them), so they differ slightly between workers.

    Raises:
        ValueError: ``$TF_CONFIG`` is set but is not valid JSON of that form, or this
            machine's task is not in its cluster; ``cpu_devices`` (or
            ``CIFAR_CPU_DEVICES``) is not an int >= 1.
        RuntimeError: logical CPU devices asked for after TensorFlow started.
    """
    if cpu_devices is None:
        raw = os.environ.get("CIFAR_CPU_DEVICES", "").strip() or "1"
        cpu_devices = int(raw) if raw.isdigit() else raw
    if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1:
        raise ValueError(
            f"CIFAR_CPU_DEVICES / cpu_devices must be an int >= 1, not {cpu_devices!r}"
        )
    config = _tf_config()
    cpus = _split_cpu(cpu_devices) if cpu_devices > 1 else []
    if config is not None and config[0] > 1:
        return _MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if cpus and not gpus:
        return tf.distribute.MirroredStrategy(cpus)
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


_FORWARD = weakref.WeakKeyDictionary()  # model -> its traced inference function


def predict_proba(model, x, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for images ``x`` (N, H, W, 3): uint8 in [0, 255] or float in [0, 1].

    Images go through the same normalisation as :func:`make_dataset` (no augmentation).
    The model runs batch by batch on this process's first device, in order, so the rows
    match ``x`` under every ``tf.distribute`` strategy (a multi-worker ``model.predict``
    would shard the data between workers).

    Returns:
        float32 ``(N, num_classes)``, each row a probability distribution.

    Raises:
        NotProbabilities: a row holds NaN/inf or does not sum to 1 (e.g. NaN weights).
        ValueError: bad images (see :func:`make_dataset`).
    """
    ds = make_dataset(x, np.zeros(len(x), np.int64), batch_size=batch_size, training=False)
    if model not in _FORWARD:  # traced once per model, not once per call
        ref = weakref.ref(model)  # the cache must not keep the model alive
        _FORWARD[model] = tf.function(
            lambda images: ref()(images, training=False), reduce_retracing=True
        )
    rows = [to_numpy(_FORWARD[model](images)).astype(np.float32) for images, _ in ds]
    return check_probabilities(np.concatenate(rows), f"{model.name}'s output")


def top_k_accuracy(y_true, probs, k: int = 1) -> float:
    """Fraction of rows whose true label (int (N,)) is among the ``k`` highest of ``probs`` (N, C).

    Uses scikit-learn's ``top_k_accuracy_score``; returns a float in [0, 1].
    """
    from sklearn.metrics import top_k_accuracy_score

    return float(top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(np.shape(probs)[1])))


def write_results(output_dir, name: str, **fields) -> Path:
    """Write ``output_dir/<name>.json`` (atomically) with ``fields`` plus a timestamp.

    Only the chief of a multi-worker run writes (:func:`is_chief`); the path is returned
    either way.
    """
    record = {"model": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    path = Path(output_dir) / f"{name}.json"
    return write_json(path, record) if is_chief() else path


def evaluate_and_save(
    model, run: dict, output_dir, name: str, train, val, test, *, data=None, settings=None, **extra
):
    """Load the best checkpoint, score it once on validation and test, write the results file.

    Args:
        model: the trained model; its weights are replaced by ``best.weights.h5`` from
            ``run["run_dir"]``.
        run: the state :func:`train` returned (or :func:`join_runs` of several phases).
        train, val, test: ``(x uint8 (N, 32, 32, 3), y int (N,))`` pairs; ``train`` only
            counts images.
        data: the provenance from ``load_cifar100(..., provenance=True)``. The record is
            ``full_cifar100`` only if the data are the official archive's (md5 checked)
            and the run trained on all its training images (train + validation: no
            ``TRAIN_LIMIT``) and tested on all its test images. Without ``data``: never.
        settings: the notebook's checked parameters (:func:`check_parameters`), recorded
            whole and as the ones that differ from the notebook's defaults.
        extra: more JSON-able fields for the record (batch size, weights source, ...).

    Returns:
        ``(record, test_probs)``: the record written to ``output_dir/<name>.json`` (by the
        chief only: :func:`is_chief`): parameter counts while training (``params``; its
        ``trainable`` is the last phase's), ``phases`` (name, epochs and trainable
        parameters of each), epochs, training seconds, history, best epoch, hardware, data
        provenance, settings and :func:`evaluation_summary` of validation and test
        (``val_top1``, ``test_top5``, ... floats in [0, 1]), and the test-set probabilities,
        float32 (N, 100).

    Raises:
        NotProbabilities: the model's outputs are no probabilities (a diverged model).
    """
    model.load_weights(Path(run["run_dir"]) / "best.weights.h5")
    val_probs, test_probs = predict_proba(model, val[0]), predict_proba(model, test[0])
    n_train, n_val, n_test = len(train[0]), len(val[0]), len(test[0])
    whole = data is not None and (n_train + n_val, n_test) == (
        data.get("train_images"),
        data.get("test_images"),
    )
    params = run.get("params") or parameter_counts(model)
    phases = run.get("phases") or [
        {"name": "train", "epochs": run["epoch"], "trainable_params": params["trainable"]}
    ]
    record = {
        "params": params,
        "phases": phases,
        "epochs": run["epoch"],
        "best_epoch": run.get("best_epoch"),
        "seconds": round(run["seconds"], 1),
        "hardware": describe_hardware(),
        "train_images": n_train,
        "full_cifar100": bool(whole and data.get("official")),
        "data": data,
        "settings": dict(settings) if settings is not None else None,
        "settings_changed": settings.changed() if hasattr(settings, "changed") else None,
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
                f"'{path}' is not a readable image ({type(exc).__name__}: {exc}). Give a "
                "PNG, JPEG, BMP or GIF file (RGB, RGBA or greyscale)"
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


def _why_not_full(record) -> str | None:
    """Why a results record may not stand in the README table; ``None`` if it may."""
    if not isinstance(record, dict) or "model" not in record:
        return "not a model's results file (no 'model' field)"
    if "val_top1" not in record and "test_top1" not in record:
        return "holds no val_top1 or test_top1"
    data = record.get("data")
    if not isinstance(data, dict):
        return "records no data provenance, so nothing shows it ran on CIFAR-100"
    if not data.get("official") or data.get("md5") != CIFAR100_MD5:
        return f"not the official CIFAR-100 archive ({data.get('check', 'md5 not checked')})"
    seen = record.get("train_images", 0) + record.get("val_images", 0)
    if seen != data.get("train_images"):
        return (
            f"trained on {seen:,} of the {data.get('train_images'):,} training images (TRAIN_LIMIT)"
        )
    if record.get("test_images") != data.get("test_images"):
        return f"tested on {record.get('test_images')} of {data.get('test_images')} test images"
    if record.get("full_cifar100") is not True:
        return "not marked full_cifar100"
    return None


def full_runs(results_dir="results") -> tuple[list[dict], list[tuple[str, str]]]:
    """The results records of runs on all of official CIFAR-100 in ``results_dir``.

    A record counts when it has ``"model"``, a ``val_top1`` or ``test_top1``, data
    provenance showing the official archive (md5 :data:`CIFAR100_MD5`, see
    :func:`data_provenance`) and image counts showing all of its training and test images
    were used (no ``TRAIN_LIMIT``), and ``"full_cifar100": true`` (written by
    :func:`evaluate_and_save`). Nothing else reaches the README table.

    Returns:
        ``(records, skipped)``: the dicts of the ``*.json`` files that count, and
        ``(file name, why it does not count)`` for every other ``.json`` file (quick runs,
        runs on other data such as the generated archive, ``benchmark.json``).

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    records, skipped = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        why = _why_not_full(record)
        if why:
            skipped.append((path.name, why))
        else:
            records.append(record)
    return records, skipped


#: Notebook parameters that say where files go or how to watch a run, not what is trained.
RUN_ONLY_PARAMETERS = ("DATA_DIR", "OUTPUT_DIR", "RESUME", "TENSORBOARD", "PHOTO")


def _settings_cell(record: dict) -> str | None:
    changed = record.get("settings_changed") or {}
    shown = [f"{k}={v}" for k, v in sorted(changed.items()) if k not in RUN_ONLY_PARAMETERS]
    return ", ".join(shown) if shown else "defaults"


def results_table(results_dir="results") -> str:
    """Markdown table comparing the full CIFAR-100 runs recorded in ``results_dir/*.json``.

    Only records that :func:`full_runs` accepts count. Columns come from their fields:
    ``params`` (int, or the dict of :func:`parameter_counts`), ``epochs``, ``seconds``
    (training wall time), ``val_top1``, ``val_top5``, ``test_top1``, ``test_top5``,
    ``hardware`` (see :func:`describe_hardware`), and the notebook settings that differ
    from its defaults (``settings_changed``, without where files went: "defaults" if
    none); a missing field shows as an em dash. One more column gives the seed's
    published test top-1 (:data:`PUBLISHED_TEST_TOP1`), clearly labelled; models with a
    published figure but no run get a row with only that figure.

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
            "settings": _settings_cell(record),
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
        ("settings", "Settings (not the notebook's defaults)"),
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


# ------------------------------------------------------------ notebook parameters


class ParameterError(_MessageOnly, ValueError):
    """A notebook parameter is unknown or has a bad value; the message names each one."""


class NotebookParameters(dict):
    """The checked parameters of a notebook run (name -> value), with the notebook's defaults."""

    def __init__(self, values: dict, defaults: dict):
        super().__init__(values)
        self.defaults = dict(defaults)

    def changed(self) -> dict:
        """The parameters whose value differs from the notebook's default (JSON-able)."""
        return {k: _jsonable(v) for k, v in self.items() if v != self.defaults.get(k)}


def _jsonable(value):
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)


def _notebook_cells(notebook) -> list[dict]:
    path = Path(notebook)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent / path
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
            if c["cell_type"] == "code"]  # fmt: skip


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def notebook_defaults(notebook) -> dict:
    """The parameters of ``notebook`` (name -> default), read from its cell tagged "parameters".

    Each ``NAME = literal`` line of that cell is a parameter; papermill's ``-p NAME VALUE``
    overrides it in the cell it injects after.

    Raises:
        ValueError: the notebook has no cell tagged "parameters", or a default is no literal.
    """
    import ast

    cells = [c for c in _notebook_cells(notebook) if "parameters" in c["metadata"].get("tags", [])]
    if not cells:
        raise ValueError(f"{notebook} has no code cell tagged 'parameters'")
    defaults = {}
    for node in ast.parse(_source(cells[0])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def _assigned_names(notebook) -> set[str]:
    """Every name a code cell of ``notebook`` assigns, imports or defines."""
    import ast

    names = set()
    for cell in _notebook_cells(notebook):
        for node in ast.walk(ast.parse(_source(cell))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
    return names


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _existing_file(v) -> bool:
    return isinstance(v, str | os.PathLike) and Path(v).expanduser().is_file()


def _readable_image(v) -> bool:
    if not _existing_file(v):
        return False
    try:
        _rgb_array(Path(v).expanduser())
    except ValueError:
        return False
    return True


#: (test on the name, test on the value, what the value must be), first match wins.
_PARAMETER_RULES = (
    (lambda n: n.endswith("EPOCHS"), lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    (lambda n: n == "LR" or n.endswith("_LR"), lambda v: _is_real(v) and v > 0, "a number > 0"),
    (lambda n: n == "BATCH_SIZE", lambda v: _is_int(v) and 1 <= v <= 50_000,
     "an int in [1, 50000] (images per batch and device)"),
    (lambda n: n == "VAL_SIZE", lambda v: _is_int(v) and 100 <= v <= 49_900,
     "an int in [100, 49900]: at least one image per class, at most all but 100 of the 50,000"),
    (lambda n: n.endswith("_LIMIT"), lambda v: v is None or (_is_int(v) and 100 <= v <= 49_900),
     "None (all images) or an int in [100, 49900]: at least one image per class, and "
     "VAL_SIZE of the 50,000 left for validation"),
    (lambda n: n == "SEED", lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
    (lambda n: n == "IMAGE_SIZE", lambda v: _is_int(v) and 32 <= v <= 1024,
     "an int in [32, 1024] (pixels; 224 is EfficientNet's ImageNet size)"),
    (lambda n: n == "XLA", lambda v: v is True or v is False or v == "auto",
     'True, False or "auto"'),
    (lambda n: n == "WEIGHTS", lambda v: v is None or v == "imagenet" or _existing_file(v),
     '"imagenet", None (random weights) or the path of an existing .h5 weights file'),
    (lambda n: n == "PHOTO", lambda v: v is None or _readable_image(v),
     "None (the sample photo) or the path of an image file Pillow reads (PNG, JPEG, BMP, GIF)"),
    (lambda n: n == "DATA_DIR", lambda v: v is None or Path(str(v)).expanduser().exists(),
     "None (CIFAR100_DIR, the Keras cache, or a download) or an existing file or folder"),
    (lambda n: n.endswith("_DIR"), lambda v: isinstance(v, str | os.PathLike) and str(v) != "",
     "a folder path"),
)  # fmt: skip


def _expected(name: str, default) -> tuple:
    """(value test, description) of parameter ``name`` from its name, else its default's type."""
    for applies, test, what in _PARAMETER_RULES:
        if applies(name):
            return test, what
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "True or False"
    if _is_int(default):
        return _is_int, "an int"
    if isinstance(default, float):
        return _is_real, "a number"
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    return (lambda v: True), "anything"


_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def check_parameters(namespace: dict, notebook) -> NotebookParameters:
    """Check a notebook run's parameters before anything is read or written.

    The parameters and their defaults come from the notebook's own cell tagged
    "parameters" (:func:`notebook_defaults`), so a new parameter is checked without more
    code. Call it first thing after that cell: ``cu.check_parameters(globals(),
    "simple_image_clasifier.ipynb")``.

    - Unknown names (``-p EPOCH 2``: papermill only warns and runs on) are refused with the
      closest known name ("EPOCH: no such parameter; did you mean EPOCHS?"): any global
      in ``namespace`` written like a parameter (upper case) or close to one, that no
      cell of the notebook assigns.
    - Values by name: ``*EPOCHS`` ints >= 1; ``*_LR`` numbers > 0; ``BATCH_SIZE``,
      ``VAL_SIZE``, ``*_LIMIT``, ``SEED``, ``IMAGE_SIZE`` ints in range for CIFAR-100
      (50,000 training images; the loaded data are checked again by
      :func:`train_val_split`); ``XLA`` True/False/"auto"; ``WEIGHTS`` "imagenet", None or
      an existing file; ``PHOTO`` None or a readable image file; ``DATA_DIR`` None or an
      existing path; other ``*_DIR`` paths; any other parameter must have its default's
      type (bool, int, number, string). ``TRAIN_LIMIT`` must leave ``VAL_SIZE`` out.

    Args:
        namespace: the notebook's globals (``globals()``).
        notebook: the notebook's file name (relative to this module's folder) or path.

    Returns:
        :class:`NotebookParameters`: name -> value, with ``.defaults`` and ``.changed()``.

    Raises:
        ParameterError: every problem found, one per line, each naming the parameter.
    """
    defaults = notebook_defaults(notebook)
    known = _assigned_names(notebook)
    problems = []
    for name in namespace:
        if name.startswith("_") or name in known or name in _IPYTHON_NAMES:
            continue
        close = difflib.get_close_matches(name.upper(), defaults, n=1, cutoff=0.6)
        if name.isupper() or close:
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(
                f"{name}: no such parameter{hint} The parameters are {', '.join(defaults)}"
            )
    values = {name: namespace.get(name, default) for name, default in defaults.items()}
    for name, value in values.items():
        test, what = _expected(name, defaults[name])
        if not test(value):
            problems.append(f"{name} = {value!r}: must be {what}")
    limit, val = values.get("TRAIN_LIMIT"), values.get("VAL_SIZE")
    if _is_int(limit) and _is_int(val) and limit + val > 50_000:
        problems.append(
            f"TRAIN_LIMIT = {limit} with VAL_SIZE = {val}: together more than CIFAR-100's "
            "50,000 training images"
        )
    if problems:
        raise ParameterError("Bad notebook parameters:\n  " + "\n  ".join(problems))
    return NotebookParameters(values, defaults)


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
    below 1e-5). No optimizer state is saved. The file is written atomically, and only by
    the chief of a multi-worker run (:func:`is_chief`).

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
    if not is_chief():
        return path  # a multi-worker run: the chief writes the file
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
        beside = sorted(p.name for p in path.parent.glob("*.keras")) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"No model file at '{path}'. "
            + (f"That folder holds {', '.join(beside)}. " if beside else "")
            + "A notebook writes OUTPUT_DIR/<model>.keras when it ends (simple_cnn.keras, "
            "complex_cnn.keras or efficientnet_b0.keras; OUTPUT_DIR is results/ by default)"
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a file it cannot read
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"'{path}' is not a Keras model file that plain Keras can load "
            f"({type(exc).__name__}: {detail}). Give the .keras file a notebook wrote "
            "at its end (OUTPUT_DIR/<model>.keras, e.g. results/simple_cnn.keras)"
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
    """Save ``fig`` to ``path`` (atomically, creating its folder) if given; return ``fig``.

    Under a multi-worker run only the chief saves (:func:`is_chief`).
    """
    if path is not None and is_chief():
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
    ``phases``: ``[{"name", "first_epoch"}, ...]`` (1-based epochs, e.g. from
    :func:`join_runs`), each marked by a dashed line and its name inside the axes. Values
    are printed without an offset.
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
        for name, start in ((p["name"], p["first_epoch"]) for p in phases):
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
        + ("" if Path(args.results_dir).is_dir() else " (the folder does not exist yet)")
        + "".join(f"\n  not listed: {name}: {why}" for name, why in skipped)
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


def _image_files(arguments) -> tuple[list[Path], list[dict]]:
    """The photos named on the command line, and the folders that hold none.

    A folder stands for its image files (sorted; subfolders are not searched). Entries in
    it that are no image file Pillow reads by suffix are skipped, and stderr says how many
    and what they are, so a folder of HEIC photos or of subfolders is not silently empty.
    Returns ``(files, errors)``: errors as ``{"image": folder, "error": message}``.
    """
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files, errors = [], []
    for argument in map(Path, arguments):
        if not argument.is_dir():
            files.append(argument)
            continue
        entries = sorted(argument.iterdir())
        found = [p for p in entries if p.is_file() and p.suffix.lower() in readable]
        skipped = [p for p in entries if p not in found]
        if skipped:
            kinds = sorted({_entry_kind(p) for p in skipped})
            print(
                f"note: skipped {len(skipped)} entries in '{argument}' that are no image "
                f"files Pillow reads ({', '.join(kinds)})",
                file=sys.stderr,
            )
        if not found:
            message = f"Folder '{argument}' holds no image files (PNG, JPEG, BMP, GIF, ...)"
            print(f"error: {message}", file=sys.stderr)
            errors.append({"image": str(argument), "error": message})
        files += found
    return files, errors


def _entry_kind(path: Path) -> str:
    """What a folder entry is, in a word: "subfolder", "broken link" or its suffix."""
    if path.is_dir():
        return "subfolder"
    if not path.exists():
        return "broken link"
    return path.suffix.lower() or "no suffix"


def _predict_command(args) -> int:
    if not 1 <= args.top_k <= 100:
        raise ValueError(f"--top-k must be between 1 and 100, not {args.top_k}")
    model, names, _ = load_exported_model(args.model)
    images, errors = _image_files(args.photos)
    predictions = []
    for image in images:
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
        cannot be read (or a folder holds none), then returns 2. Wrong usage exits through
        argparse (status 2).
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
