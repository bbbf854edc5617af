"""Write a small, learnable archive in the exact official ``cifar-100-python`` layout.

Real CIFAR-100 cannot be downloaded on the test machines, so the tests (and anyone
without internet who wants a smoke run) use this generator instead.

Layout, as in the official ``cifar-100-python.tar.gz``::

    cifar-100-python/train   dict: b'filenames', b'batch_label', b'fine_labels',
                                   b'coarse_labels', b'data' (N, 3072) uint8
    cifar-100-python/test    same keys
    cifar-100-python/meta    dict: b'fine_label_names', b'coarse_label_names'

``data`` rows are channel-first (1024 red, 1024 green, 1024 blue values, each a
row-major 32x32 plane); labels are Python lists of ints.

The official files were written by Python 2's ``cPickle`` with protocol 2, where
every string is a byte string stored with the ``SHORT_BINSTRING``/``BINSTRING``
opcodes and numpy arrays are rebuilt through ``numpy.core.multiarray._reconstruct``.
Python 3's pickler, even at protocol 2, writes ``bytes`` through a call to
``_codecs.encode`` instead, which restricted unpicklers (ours, and Keras' CIFAR
reader) rightly refuse. :class:`Py2Pickler` therefore writes byte and text strings
with the Python 2 opcodes and names numpy's reconstructor by its Python 2 module path,
so the stream has the same opcodes as the official files (checked with
``pickletools.dis``: only PROTO, EMPTY_DICT, BINPUT/BINGET, MARK, SHORT_BINSTRING,
BINSTRING, GLOBAL, BININT*, TUPLE*, REDUCE, BUILD, LIST/APPENDS, SETITEMS, NEWFALSE,
NONE and STOP).

Images are learnable per class: each fine label gets a shape (5 kinds), a
foreground colour (5) and a background texture (4), 5 * 5 * 4 = 100 classes, drawn
at a jittered position and size, with per-image colour jitter and Gaussian noise.

Command line: ``python tests/synthetic_cifar.py OUT_DIR [--train N] [--test N]``
writes ``OUT_DIR/cifar-100-python.tar.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import cifar_utils  # noqa: E402


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes strings the way Python 2's cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", "") == "numpy._core.multiarray":
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + name.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type] = save_global


def py2_pickle_bytes(obj) -> bytes:
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) would have."""
    buf = io.BytesIO()
    Py2Pickler(buf).dump(obj)
    return buf.getvalue()


_BACKGROUNDS = 4
_COLOURS = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 40], [230, 60, 230]],
    dtype=np.float32,
)


def _background(kind: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # flat grey
        plane = np.full((32, 32), 0.5, np.float32)
    elif kind == 1:  # horizontal stripes
        plane = 0.5 + 0.4 * np.sin(yy * 1.2 + phase)
    elif kind == 2:  # vertical stripes
        plane = 0.5 + 0.4 * np.sin(xx * 1.2 + phase)
    else:  # checkerboard
        plane = 0.5 + 0.4 * np.sign(np.sin(xx * 0.8 + phase) * np.sin(yy * 0.8))
    return np.repeat(plane[..., None] * 120.0, 3, axis=2)


def _mask(kind: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    cy, cx = rng.uniform(12, 20, size=2)
    r = rng.uniform(7, 11)
    dy, dx = yy - cy, xx - cx
    if kind == 0:  # disc
        return dy**2 + dx**2 <= r**2
    if kind == 1:  # square
        return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
    if kind == 2:  # triangle
        return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == 3:  # ring
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    bar_h = (np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)
    bar_v = (np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)
    return bar_h | bar_v  # cross


def make_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Images for ``labels`` (N,) int in [0, 99]: uint8 (N, 32, 32, 3) in [0, 255]."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), 32, 32, 3), np.uint8)
    for i, label in enumerate(labels):
        shape, rest = divmod(int(label), 20)
        colour, texture = divmod(rest, _BACKGROUNDS)
        img = _background(texture, rng)
        fg = _COLOURS[colour] * rng.uniform(0.8, 1.1) + rng.normal(0, 12, 3)
        img[_mask(shape, rng)] = fg
        img += rng.normal(0, 18, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _split(n: int, seed: int, name: str) -> dict:
    rng = np.random.default_rng(seed)
    fine = np.resize(np.arange(100), n)
    rng.shuffle(fine)
    images = make_images(fine, seed=seed + 1)
    coarse = cifar_utils.FINE_TO_COARSE[fine]
    return {
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(n)],
        b"batch_label": f"{name} batch 1 of 1".encode(),
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) for v in coarse],
        b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072).copy(),
    }


def write_archive(out_dir, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> Path:
    """Write ``out_dir/cifar-100-python.tar.gz`` with ``n_train``/``n_test`` images.

    Labels are balanced over the 100 fine classes (``n`` need not be a multiple of
    100). Returns the archive's path. Deterministic for a given ``seed``.
    """
    meta = {
        b"fine_label_names": [n.encode() for n in cifar_utils.FINE_LABEL_NAMES],
        b"coarse_label_names": [n.encode() for n in cifar_utils.COARSE_LABEL_NAMES],
    }
    members = {
        "train": _split(n_train, seed, "training"),
        "test": _split(n_test, seed + 100, "testing"),
        "meta": meta,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cifar-100-python.tar.gz"
    # gzip's header would hold the time of writing: mtime=0 makes the archive's md5 repeat too
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        tar = tarfile.open(fileobj=gz, mode="w")
        info = tarfile.TarInfo("cifar-100-python")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, obj in members.items():
            payload = py2_pickle_bytes(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
        tar.close()
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write cifar-100-python.tar.gz into")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    args = parser.parse_args(argv)
    print(write_archive(args.out_dir, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
