"""CIFAR-100 itself: finding, downloading and reading the archive; label names; the split."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import keras
import numpy as np

from .checks import is_int
from .errors import CifarDataError, ParameterError
from .files import atomic_path, file_digest

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"
#: Training images in the official archive (its test set has 10,000).
TRAIN_IMAGES = 50_000


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
    names = meta.get(key, [])
    # checked before anything is built from it: a list of strings, as many as CIFAR-100's
    if not isinstance(names, list | tuple) or len(names) != len(expected):
        count = len(names) if isinstance(names, list | tuple) else type(names).__name__
        raise CifarDataError(
            f"{where}: '{key}' holds {count} names, not CIFAR-100's {len(expected)} "
            f"{key.split('_')[0]} labels; this is not a CIFAR-100 archive"
        )
    names = [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]
    if tuple(names) != expected:
        raise CifarDataError(
            f"{where}: '{key}' holds {len(names)} names that are not CIFAR-100's "
            f"{len(expected)} {key.split('_')[0]} labels; this is not a CIFAR-100 archive"
        )


def _labels(values, count: int, mode: str, where: str) -> np.ndarray:
    """``values`` as int64 (count,), each checked to be an int in range before numpy sees it."""
    # A few hundred bytes of nested shared references would make numpy build gigabytes, and
    # floats would be truncated silently: hence the element-by-element check.
    n_classes = 100 if mode == "fine" else 20
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, list):
        raise CifarDataError(
            f"{where}: the {mode} labels are a {type(values).__name__}, not the list of ints "
            "CIFAR-100 stores; the file is corrupt"
        )
    if len(values) != count:
        raise CifarDataError(
            f"{where}: {len(values)} {mode} labels for {count} images; they must match"
        )
    for i, value in enumerate(values):
        if type(value) is not int:
            raise CifarDataError(
                f"{where}: {mode} label {i} is a {type(value).__name__} ({repr(value)[:40]}), not "
                "an int; the file is corrupt"
            )
    bad = [v for v in values if not 0 <= v < n_classes]
    if bad:
        raise CifarDataError(
            f"{where}: {len(bad)} {mode} label(s) outside [0, {n_classes - 1}] "
            f"(e.g. {str(bad[0])[:30]}); the file is corrupt"
        )
    return np.array(values, dtype=np.int64)


def _parse_split(d: dict, where: str, label_mode: str) -> tuple[np.ndarray, np.ndarray]:
    missing = {"data", "fine_labels", "coarse_labels"} - set(d)
    if missing:
        raise CifarDataError(f"{where} lacks the key(s) {sorted(missing)}: not a CIFAR-100 split")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (
            f"{data.dtype} {data.shape}"
            if isinstance(data, np.ndarray)
            else "a " + type(data).__name__
        )
        raise CifarDataError(
            f"{where}: 'data' is {what}; CIFAR-100 stores a uint8 array of rows of 3072 "
            "values (N, 3072), i.e. 32x32 images in 3 channel-first planes"
        )
    if data.shape[1] != 3072 or len(data) > TRAIN_IMAGES:
        raise CifarDataError(
            f"{where}: 'data' is {data.dtype} {data.shape}; CIFAR-100 stores uint8 rows of "
            f"3072 values (N, 3072), N at most {TRAIN_IMAGES:,}, i.e. 32x32 images in 3 "
            "channel-first planes"
        )
    labels = _labels(d[f"{label_mode}_labels"], len(data), label_mode, where)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


#: The three files of the official archive, under ``cifar-100-python/`` in the ``.tar.gz``.
_MEMBERS = ("train", "test", "meta")
#: The largest member read: the official ``train`` pickle is about 155 MB (``test`` 31 MB,
#: ``meta`` 2 KB). A larger one is no CIFAR-100 file, and reading it first would take memory
#: and time (a 2 MB ``.tar.gz`` can expand to gigabytes) before failing.
MAX_MEMBER_BYTES = 170_000_000
#: Each member's bound, and the official file's size: unpickling takes up to about 4 bytes of
#: memory a byte of pickle (a list of shared references), so each is bounded near its size.
_MEMBER_BYTES = {
    "train": (MAX_MEMBER_BYTES, "155 MB"),
    "test": (35_000_000, "31 MB"),
    "meta": (65_536, "2 KB"),
}
#: Entries read from an archive before giving up: the official one holds a handful (its
#: folder, train, test, meta and a stray text file), and each entry read costs memory and time.
MAX_ARCHIVE_ENTRIES = 64
#: Largest extended header read (a GNU long name or a PAX header): tarfile reads one whole
#: before the entry it names, so a 1 MB archive could make it hold hundreds of MB.
MAX_TAR_HEADER_BYTES = 64 * 1024


# tarfile reads an extended header whole, unbounded.
class _BoundedTarInfo(tarfile.TarInfo):
    """A tar entry refusing an extended header past :data:`MAX_TAR_HEADER_BYTES`."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)  # fmt: skip
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise CifarDataError(
                f"{tarfile_.name}: the entry after '{self.name}' has a {self.size:,}-byte "
                f"extended header (name or PAX), more than the {MAX_TAR_HEADER_BYTES:,} "
                f"read: not the CIFAR-100 archive. Get {ARCHIVE_NAME} from {CIFAR100_URL}"
            )
        return super()._proc_member(tarfile_)


def _missing(present) -> list[str]:
    """The members of :data:`_MEMBERS` not in ``present`` (names), in their order."""
    return [m for m in _MEMBERS if m not in present]


def _too_large(where: str, member: str, size: int) -> CifarDataError | None:
    """The error for a ``member`` (train, test, meta) of ``size`` bytes, or None if it fits."""
    limit, official = _MEMBER_BYTES[member]
    if size <= limit:
        return None
    return CifarDataError(
        f"{where} is {size:,} bytes, more than any CIFAR-100 {member} file ({limit:,} at most; "
        f"the official one is about {official}): not the CIFAR-100 archive. Get "
        f"{ARCHIVE_NAME} from {CIFAR100_URL}"
    )


def _read_members(source: Path) -> dict[str, bytes]:
    """Bytes of train/test/meta from an extracted folder or a ``.tar.gz``, sizes bounded."""
    if source.is_dir():
        missing = _missing({p.name for p in source.iterdir() if p.is_file()})
        if missing:
            raise CifarDataError(
                f"{source} is missing {missing}: the folder is incomplete. Extract "
                f"{ARCHIVE_NAME} again (it holds {FOLDER_NAME}/train, test and meta)"
            )
        for m in _MEMBERS:
            if error := _too_large(str(source / m), m, (source / m).stat().st_size):
                raise error
        return {m: (source / m).read_bytes() for m in _MEMBERS}
    with open(source, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"  # every gzip stream starts with these two bytes
    if not is_gzip:
        raise CifarDataError(_wrong_file(source, "not a gzip/tar archive"))
    try:
        if not _is_tar(source) and _gzip_is_whole(source):
            raise CifarDataError(_wrong_file(source, "a gzip file that holds no tar archive"))
        # Each member's declared size is checked against its bound before it is read.
        with tarfile.open(source, "r:gz", tarinfo=_BoundedTarInfo) as tar:
            found, wanted = {}, {f"{FOLDER_NAME}/{m}" for m in _MEMBERS}
            for count, info in enumerate(tar, start=1):  # official layout: cifar-100-python/*
                name = info.name.removeprefix("./")
                if info.isfile() and name in wanted:
                    member = name.split("/")[1]
                    if error := _too_large(f"{source}:{name}", member, info.size):
                        raise error
                    found[member] = info
                if len(found) == len(_MEMBERS):
                    break  # the rest is never read
                if count >= MAX_ARCHIVE_ENTRIES:
                    raise CifarDataError(
                        f"{source} holds more than {MAX_ARCHIVE_ENTRIES} entries without all of "
                        f"{sorted(wanted)}: not the CIFAR-100 archive (it holds a handful). Get "
                        f"{ARCHIVE_NAME} from {CIFAR100_URL}"
                    )
            missing = _missing(found)
            if missing:
                raise CifarDataError(
                    f"{source} has no {[f'{FOLDER_NAME}/{m}' for m in missing]} member(s): "
                    f"not a complete {ARCHIVE_NAME}"
                )
            return {m: tar.extractfile(found[m]).read() for m in _MEMBERS}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarDataError(
            f"{source} is truncated or corrupt ({type(exc).__name__}: {exc}). "
            f"Download it again from {CIFAR100_URL}"
        ) from None


def _is_tar(archive: Path) -> bool:
    """``tarfile.is_tarfile`` for a ``.tar.gz``, headers bounded by :class:`_BoundedTarInfo`."""
    try:
        with tarfile.open(archive, "r:gz", tarinfo=_BoundedTarInfo):
            return True
    except tarfile.TarError:
        return False


def _gzip_is_whole(archive: Path) -> bool:
    """Whether the gzip stream's first 512 bytes decompress (else it is damaged)."""
    # is_tarfile says False both for a non-tar gzip and a damaged stream; tell them apart.
    try:
        with gzip.open(archive) as g:
            g.read(512)
    except (OSError, EOFError, zlib.error):
        return False
    return True


def _wrong_file(source: Path, what: str) -> str:
    return (
        f"{source} is {what}: is this the CIFAR-100 file? Expected {ARCHIVE_NAME} "
        f"(md5 {CIFAR100_MD5}, from {CIFAR100_URL}), or a folder holding it or its extracted "
        f"{FOLDER_NAME}/ folder"
    )


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
    """Download ``url`` to ``dest`` (timeout, md5 checked); ``dest`` appears only if whole."""
    # keras.utils.get_file has no timeout, writes in place and keeps a file failing its hash.
    try:
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                bar = keras.utils.Progbar(total, unit_name="byte")
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.add(len(chunk))
            out.flush()
            if total is not None and out.tell() != total:
                raise CifarDataError(
                    f"Download of {url} stopped after {out.tell()} of {total} bytes; "
                    "run again to retry"
                )
            if md5 is not None and (got := file_digest(tmp, "md5")) != md5:
                raise CifarDataError(
                    f"Checksum mismatch for {url}: md5 {got}, expected {md5}. The download is "
                    "corrupt or not the official archive; nothing was kept. Run again to retry"
                )
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise CifarDataError(
            f"Could not download CIFAR-100 from {url} ({exc}). No local copy was found "
            f"either. Without internet: fetch {CIFAR100_URL} elsewhere, then pass its path as "
            f"data_dir (notebook parameter DATA_DIR), set CIFAR100_DIR to it, or put it at "
            f"{dest}. To try the notebooks without it, see the README's smoke run (a "
            "generated archive in the official layout)"
        ) from None


def _extract(archive: Path, target: Path) -> Path:
    """Extract ``archive``'s members into ``target/cifar-100-python/``, atomically."""
    members = _read_members(archive)
    with atomic_path(target, folder=True) as tmp:
        (tmp / FOLDER_NAME).mkdir()
        for name, blob in members.items():
            (tmp / FOLDER_NAME / name).write_bytes(blob)
    return target / FOLDER_NAME


def locate_cifar100(
    data_dir=None,
    *,
    url: str = CIFAR100_URL,
    md5: str | None = CIFAR100_MD5,
    cache_dir=None,
    timeout: float = 60.0,
) -> Path:
    """Find or download CIFAR-100; returns the folder or ``.tar.gz`` to read it from.

    Order: ``data_dir``, ``$CIFAR100_DIR``, the Keras cache (``cache_dir``), then a download of
    ``url`` into the cache. A named location is never replaced by a download.

    Raises:
        CifarDataError: nothing found and the download failed, md5 mismatch, or a corrupt
            archive; nothing partial is left behind.
    """
    named = data_dir if data_dir is not None else os.environ.get("CIFAR100_DIR") or None
    if named is not None:
        return _find_local(Path(named).expanduser())
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = _cached_folder(cache)
    if folder is not None:
        missing = _missing({p.name for p in folder.iterdir() if p.is_file()})
        if not missing:
            return folder
        # Probably an interrupted extraction: rebuild it from the archive.
        warnings.warn(
            f"The CIFAR-100 cache {folder} is incomplete (missing {missing}), probably from an "
            "interrupted extraction; rebuilding it from the archive.",
            stacklevel=2,
        )
        shutil.rmtree(folder)
    archive = cache / ARCHIVE_NAME
    if archive.is_file() and md5 is not None and file_digest(archive, "md5") != md5:
        warnings.warn(f"{archive} fails its md5 check; downloading it again.", stacklevel=2)
        archive.unlink()
    if not archive.is_file():
        _download(url, archive, md5, timeout)
    return _extract(archive, cache / f"{FOLDER_NAME}-target")


def load_cifar100(data_dir=None, label_mode: str = "fine", *, provenance=False, **locate_kwargs):
    """Load CIFAR-100 as ``(x_train, y_train), (x_test, y_test)`` (+ provenance dict if asked).

    Args:
        data_dir: the ``.tar.gz``, or a folder holding it, ``cifar-100-python/`` or its files;
            ``None``: as :func:`locate_cifar100` (which takes the ``locate_kwargs``).
        label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
        provenance: also return :func:`data_provenance` as a third element.

    Returns:
        x: uint8 (N, 32, 32, 3) in [0, 255] (N 50,000 train, 10,000 test);
        y: int64 (N,) in [0, 99] (fine) or [0, 19] (coarse).

    Raises:
        ValueError: ``label_mode`` neither ``"fine"`` nor ``"coarse"``.
        CifarDataError: as :func:`locate_cifar100`; or not a gzip/tar, a member missing, an
            unsafe pickle, wrong shapes or labels out of range.
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
        source: what :func:`locate_cifar100` returned; members: its bytes, if already read.

    Returns:
        ``{"source", "archive", "md5", "official", "check"}``: ``official`` is True only if the
        archive (``source`` or the one beside a folder) has :data:`CIFAR100_MD5` and the data
        read are its content; ``check`` says what was checked.
    """
    source = Path(source)
    members = _read_members(source) if members is None else members
    archive = _archive_beside(source) if source.is_dir() else source
    info = {"source": str(source), "archive": None, "md5": None, "official": False}
    if archive is None:
        info["check"] = "an extracted folder with no archive beside it: md5 not checked"
        return info
    info.update(archive=str(archive), md5=file_digest(archive, "md5"))
    if info["md5"] != CIFAR100_MD5:
        info["check"] = f"md5 {info['md5']} is not the official archive's {CIFAR100_MD5}"
    elif archive != source and _read_members(archive) != members:
        info["check"] = f"the extracted folder differs from the official archive {archive}"
    else:
        info.update(official=True, check=f"md5 {CIFAR100_MD5}: the official archive")
    return info


def split_problem(
    n_images: int, n_classes: int, val_size, train_limit, data: str = "this data"
) -> str | None:
    """What is wrong with ``VAL_SIZE``/``TRAIN_LIMIT`` for these data, in words, or None."""
    low, high = n_classes, n_images - n_classes
    if not (is_int(val_size) and low <= val_size <= high):
        return (
            f"VAL_SIZE = {val_size!r}: {data} has {n_images:,} training images in {n_classes} "
            f"classes; VAL_SIZE must be an int between {low:,} (one image per class) and "
            f"{high:,} (one per class left to train on)"
        )
    left = n_images - val_size
    if train_limit is None or (is_int(train_limit) and low <= train_limit <= left):
        return None
    return (
        f"TRAIN_LIMIT = {train_limit!r}: {data} has {n_images:,} training images, {left:,} "
        f"left to train on after VAL_SIZE = {val_size:,}; TRAIN_LIMIT must be None (all of "
        f"them) or an int between {low:,} (one image per class) and {left:,}"
    )


def train_val_split(x, y, val_size: int = 5000, seed: int = 0, train_limit: int | None = None):
    """Seeded, stratified split of the training set into ``(x_train, y_train), (x_val, y_val)``.

    Args:
        x: images (N, ...), any dtype; y: int labels (N,).
        val_size: images held out for validation (``VAL_SIZE``).
        seed: the split's random seed.
        train_limit: training images kept (stratified), ``None``: all (``TRAIN_LIMIT``).

    Raises:
        ParameterError: ``val_size`` or ``train_limit`` out of bounds (:func:`split_problem`).
    """
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y))
    problem = split_problem(len(y), n_classes, val_size, train_limit)
    if problem:
        raise ParameterError(problem)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_size, random_state=seed, stratify=y
    )
    if train_limit is not None and train_limit < len(y_tr):
        # Fewer left out than classes: those few are drawn at random.
        stratify = y_tr if len(y_tr) - train_limit >= n_classes else None  # as sklearn needs
        x_tr, _, y_tr, _ = train_test_split(
            x_tr, y_tr, train_size=train_limit, random_state=seed, stratify=stratify
        )
    return (x_tr, y_tr), (x_val, y_val)


def data_fingerprint(x, y) -> str:
    """md5 hex digest (12 characters) of images ``x`` and labels ``y``, in order."""
    digest = hashlib.md5(np.ascontiguousarray(x).data)
    digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return digest.hexdigest()[:12]
