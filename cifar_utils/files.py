"""Writing files safely: atomic writes (a file or folder is whole or absent), digests, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_digest(path, algorithm: str) -> str:
    """Hex digest (``"md5"``, ``"sha256"``, ...) of the file at ``path``, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The standard library has the pieces (tempfile, os.replace) but no such context manager.
@contextlib.contextmanager
def atomic_path(path, *, folder: bool = False, replace: bool = True):
    """Yield a temporary path beside ``path`` (its suffixes kept); on success it replaces ``path``.

    ``folder=True`` yields an empty folder, replacing only an empty ``path`` folder. On error
    ``path`` is left as it was. A symbolic link is written through. The result keeps the
    replaced file's permissions, else 0666/0777 less the umask. The parent is created.
    ``replace=False`` (files only) never replaces anything, not even what appears at ``path``
    while the caller writes: the file is then created only if ``path`` is still free.

    Raises:
        FileExistsError: ``path`` is no regular file (folder): a device, a pipe, ...; or
            ``replace=False`` and something (a file, a link) is or comes to be at ``path``.
        OSError: ``folder=True`` and ``path`` is a folder holding anything.
    """
    path = Path(path)
    taken = f"'{path}' exists: it is never replaced. Delete it or write to another path"
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(taken)
    if path.is_symlink():  # write where the link points, and keep the link
        path = path.resolve()
    if path.exists() and not (path.is_dir() if folder else path.is_file()):
        raise FileExistsError(
            f"'{path}' is not a regular {'folder' if folder else 'file'} (a device, a pipe, "
            "...): it is never replaced. Write to another path"
        )
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode if mode is not None else (0o777 if folder else 0o666) & ~_umask())
        if folder and path.is_dir():
            os.rmdir(path)  # only an empty folder is replaced: nothing of the user's is lost
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike a rename, fails if anything is there, even a link
            except FileExistsError:
                raise FileExistsError(taken) from None
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (floats for numpy scalars)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path
