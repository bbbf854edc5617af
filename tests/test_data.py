"""Loading CIFAR-100: local copies, the Keras cache, the download path, and every bad input."""

import functools
import hashlib
import http.server
import io
import os
import pickle
import pickletools
import re
import socket
import tarfile
import threading

import numpy as np
import pytest
import synthetic_cifar
from conftest import peak_memory

import cifar_utils as cu
import cifar_utils.data


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _extract(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "cifar-100-python"


def _rewrite(archive, dest, **replace):
    """Copy ``archive`` to ``dest`` with members replaced (bytes, or a file object that has
    a ``len``) or dropped (None)."""
    with tarfile.open(archive) as src, tarfile.open(dest, "w:gz") as out:
        for info in src.getmembers():
            name = info.name.split("/")[-1]
            if name in replace:
                if replace[name] is None:
                    continue
                content = replace[name]
                info.size = len(content)
                out.addfile(info, content if hasattr(content, "read") else io.BytesIO(content))
            else:
                out.addfile(info, src.extractfile(info) if info.isfile() else None)
    return dest


def _member(archive, name):
    with tarfile.open(archive) as tar:
        return pickle.loads(tar.extractfile(f"cifar-100-python/{name}").read(), encoding="bytes")


# ----------------------------------------------------------------- label names


def test_label_names_and_fine_to_coarse_mapping():
    assert len(cu.FINE_LABEL_NAMES) == 100 and len(set(cu.FINE_LABEL_NAMES)) == 100
    assert len(cu.COARSE_LABEL_NAMES) == 20
    assert cu.FINE_LABEL_NAMES[:3] == ("apple", "aquarium_fish", "baby")
    assert cu.FINE_LABEL_NAMES[-1] == "worm"
    assert cu.COARSE_LABEL_NAMES[0] == "aquatic_mammals"
    assert cu.COARSE_LABEL_NAMES[-1] == "vehicles_2"
    assert np.bincount(cu.FINE_TO_COARSE).tolist() == [5] * 20

    def coarse_of(fine):
        return cu.COARSE_LABEL_NAMES[cu.FINE_TO_COARSE[cu.FINE_LABEL_NAMES.index(fine)]]

    assert coarse_of("whale") == "aquatic_mammals"
    assert coarse_of("lawn_mower") == "vehicles_2"
    assert coarse_of("maple_tree") == "trees"
    assert coarse_of("sweet_pepper") == "fruit_and_vegetables"


# ---------------------------------------------------------- the test archive


def test_fixture_is_written_like_the_official_python2_pickles(cifar_archive, tmp_path):
    with tarfile.open(cifar_archive) as tar:
        assert sorted(tar.getnames()) == [
            "cifar-100-python",
            "cifar-100-python/meta",
            "cifar-100-python/test",
            "cifar-100-python/train",
        ]
        blob = tar.extractfile("cifar-100-python/train").read()
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    globals_ = {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    assert blob[:2] == b"\x80\x02"  # protocol 2, as cPickle wrote
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops
    assert not {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"} & ops
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    # Keras' own CIFAR reader (a restricted unpickler) accepts it.
    from keras.src.datasets.cifar import load_batch

    data, labels = load_batch(_extract(cifar_archive, tmp_path) / "train", "fine_labels")
    assert data.shape == (3000, 3, 32, 32) and data.dtype == np.uint8
    assert min(labels) == 0 and max(labels) == 99

    d = _member(cifar_archive, "train")
    assert set(d) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    assert d[b"data"].shape == (3000, 3072) and d[b"data"].dtype == np.uint8
    meta = _member(cifar_archive, "meta")
    assert meta[b"fine_label_names"][0] == b"apple"


def test_python3_protocol2_bytes_are_not_the_official_stream():
    ours = synthetic_cifar.py2_pickle_bytes({b"data": b"x"})
    plain = pickle.dumps({b"data": b"x"}, protocol=2)
    assert b"_codecs" in plain and b"_codecs" not in ours


# --------------------------------------------------------------- local copies


def test_the_generated_archive_is_the_same_bytes_for_the_same_seed(tmp_path):
    # So the results file's data md5 names the data, not the time it was generated.
    first = synthetic_cifar.write_archive(tmp_path / "a", 100, 100, seed=3).read_bytes()
    again = synthetic_cifar.write_archive(tmp_path / "b", 100, 100, seed=3).read_bytes()
    other = synthetic_cifar.write_archive(tmp_path / "c", 100, 100, seed=4).read_bytes()
    assert first == again and first != other


def test_load_from_archive_file(cifar_archive):
    (x_tr, y_tr), (x_te, y_te) = cu.load_cifar100(cifar_archive)
    assert x_tr.shape == (3000, 32, 32, 3) and x_tr.dtype == np.uint8
    assert x_te.shape == (1000, 32, 32, 3)
    assert y_tr.shape == (3000,) and y_tr.dtype == np.int64
    assert y_tr.min() == 0 and y_tr.max() == 99
    assert np.bincount(y_tr).tolist() == [30] * 100
    d = _member(cifar_archive, "train")
    # channel-first rows become NHWC: red plane first, row-major.
    assert np.array_equal(x_tr[7, :, :, 0].ravel(), d[b"data"][7, :1024])
    assert np.array_equal(x_tr[7, :, :, 2].ravel(), d[b"data"][7, 2048:])
    assert y_tr[:50].tolist() == d[b"fine_labels"][:50]


def test_all_local_layouts_and_the_environment_variable(cifar_archive, tmp_path, monkeypatch):
    expected = cu.load_cifar100(cifar_archive)[1][1]
    extracted = _extract(cifar_archive, tmp_path / "x")
    for where in (cifar_archive.parent, extracted, extracted.parent):
        assert np.array_equal(cu.load_cifar100(where)[1][1], expected), where
    monkeypatch.setenv("CIFAR100_DIR", str(extracted.parent))
    assert np.array_equal(cu.load_cifar100()[1][1], expected)


def test_coarse_labels_match_the_mapping(cifar_archive):
    (_, fine), _ = cu.load_cifar100(cifar_archive)
    (_, coarse), _ = cu.load_cifar100(cifar_archive, label_mode="coarse")
    assert coarse.max() == 19
    assert np.array_equal(coarse, cu.FINE_TO_COARSE[fine])


def test_unknown_label_mode_is_a_value_error(cifar_archive):
    with pytest.raises(ValueError, match='"fine" or "coarse"'):
        cu.load_cifar100(cifar_archive, label_mode="superclass")


def test_named_location_without_data(tmp_path):
    with pytest.raises(cu.CifarDataError, match="No CIFAR-100 copy at .*DATA_DIR"):
        cu.load_cifar100(tmp_path)


# ------------------------------------------------------------------ bad input


class _Payload:
    """Unpickling this would create a folder: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused(cifar_archive, tmp_path):
    marker = tmp_path / "pwned"
    evil = synthetic_cifar.py2_pickle_bytes({b"fine_label_names": _Payload(marker)})
    pickle.loads(evil, encoding="bytes")  # a naive load really runs the payload
    assert marker.is_dir()
    marker.rmdir()
    bad = _rewrite(cifar_archive, tmp_path / "cifar-100-python.tar.gz", meta=evil)
    with pytest.raises(
        cu.CifarDataError, match=r"not a safe CIFAR-100 pickle .*refusing to load '\w+\.mkdir'"
    ):
        cu.load_cifar100(bad)
    assert not marker.exists()


def test_truncated_archive(cifar_archive, tmp_path):
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(cifar_archive.read_bytes()[: cifar_archive.stat().st_size // 2])
    with pytest.raises(cu.CifarDataError, match="truncated or corrupt"):
        cu.load_cifar100(bad)


def test_the_wrong_file_is_told_apart_from_a_damaged_archive(cifar_archive, tmp_path):
    import gzip

    text = tmp_path / "notes.txt"
    text.write_text("my notes, not a dataset\n")
    wrong_file = (
        "is not a gzip/tar archive: is this the CIFAR-100 file\\? "
        f"Expected {cu.ARCHIVE_NAME} \\(md5 {cu.CIFAR100_MD5}"
    )
    page = tmp_path / "cifar-100-python.tar.gz"  # an HTML error page saved as the archive
    page.write_text("<html>404</html>")
    for bad in (text, page):
        with pytest.raises(cu.CifarDataError, match=wrong_file) as err:
            cu.load_cifar100(bad)
        assert "truncated" not in str(err.value)
    other_gzip = tmp_path / "other.tar.gz"
    other_gzip.write_bytes(gzip.compress(b"a gzip file, but no tar inside" * 40))
    with pytest.raises(cu.CifarDataError, match="a gzip file that holds no tar archive"):
        cu.load_cifar100(other_gzip)
    cut = tmp_path / "cut.tar.gz"  # a real archive, cut at 5% and at 50%
    for share in (20, 2):
        cut.write_bytes(cifar_archive.read_bytes()[: cifar_archive.stat().st_size // share])
        with pytest.raises(cu.CifarDataError, match="truncated or corrupt"):
            cu.load_cifar100(cut)


@pytest.mark.parametrize("member", ["train", "test", "meta"])
def test_missing_member(cifar_archive, tmp_path, member):
    bad = _rewrite(cifar_archive, tmp_path / "c.tar.gz", **{member: None})
    with pytest.raises(cu.CifarDataError, match=f"no \\['cifar-100-python/{member}'\\] member"):
        cu.load_cifar100(bad)
    folder = _extract(bad, tmp_path / "x")
    with pytest.raises(cu.CifarDataError, match=f"missing \\['{member}'\\].*incomplete"):
        cu.load_cifar100(folder)


class _Zeros:
    """``size`` zero bytes to read like a file, never all in memory."""

    def __init__(self, size):
        self.size = self.left = size

    def __len__(self):
        return self.size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


@pytest.fixture(scope="module")
def archive_bomb(cifar_archive, tmp_path_factory):
    """The test archive with a ``train`` member of 200,000,000 zero bytes (195 KB of gzip)."""
    folder = tmp_path_factory.mktemp("bomb")
    return _rewrite(cifar_archive, folder / cu.ARCHIVE_NAME, train=_Zeros(200_000_000))


def test_a_member_larger_than_any_cifar100_file_is_never_read(archive_bomb, tmp_path):
    too_large = (
        " is 200,000,000 bytes, more than any CIFAR-100 train file (170,000,000 at most; the "
        "official one is about 155 MB): not the CIFAR-100 archive"
    )
    load = f"data.load_cifar100({str(archive_bomb)!r})"
    grew, result = peak_memory("import cifar_utils.data as data", load)
    assert result.startswith(f"CifarDataError: {archive_bomb}:cifar-100-python/train{too_large}")
    assert grew < 50, f"peak memory rose by {grew:.0f} MB"
    folder = _extract(_rewrite(archive_bomb, tmp_path / "c.tar.gz", train=b""), tmp_path / "x")
    os.truncate(folder / "train", 200_000_000)  # sparse: no disk space taken
    with pytest.raises(cu.CifarDataError, match=re.escape(f"{folder / 'train'}{too_large}")):
        cu.load_cifar100(folder)


def test_each_member_is_bounded_near_the_official_size(cifar_archive, tmp_path):
    """meta is 2 KB in the official archive: a 1 MB one is refused unread."""
    bad = _rewrite(cifar_archive, tmp_path / "c.tar.gz", meta=_Zeros(1_000_000))
    expected = (
        f"{bad}:cifar-100-python/meta is 1,000,000 bytes, more than any CIFAR-100 meta file "
        "(65,536 at most; the official one is about 2 KB)"
    )
    with pytest.raises(cu.CifarDataError, match=re.escape(expected)):
        cu.load_cifar100(bad)


@pytest.mark.parametrize("folder", ["other/", ""])
def test_members_outside_the_official_folder_are_not_read(cifar_archive, tmp_path, folder):
    moved = tmp_path / cu.ARCHIVE_NAME
    with tarfile.open(cifar_archive) as src, tarfile.open(moved, "w:gz") as out:
        for info in filter(tarfile.TarInfo.isfile, src.getmembers()):
            content = src.extractfile(info)
            info.name = folder + info.name.split("/")[-1]  # e.g. other/train, or train
            out.addfile(info, content)
    expected = (
        "has no ['cifar-100-python/train', 'cifar-100-python/test', 'cifar-100-python/meta'] "
        f"member(s): not a complete {cu.ARCHIVE_NAME}"
    )
    with pytest.raises(cu.CifarDataError, match=re.escape(expected)):
        cu.load_cifar100(moved)


def test_an_archive_of_many_entries_is_refused_without_reading_them_all(tmp_path):
    """A 2 MB gzip can hold a million empty entries; tarfile keeps one object per entry read.
    The official archive holds a handful: reading stops after MAX_ARCHIVE_ENTRIES."""
    many = tmp_path / cu.ARCHIVE_NAME
    with tarfile.open(many, "w:gz") as out:
        for i in range(10_000):
            out.addfile(tarfile.TarInfo(f"x{i}"))
    with pytest.raises(cu.CifarDataError, match=r"holds more than 64 entries without all of"):
        cu.load_cifar100(many)
    assert cifar_utils.data.MAX_ARCHIVE_ENTRIES == 64


def test_truncated_pickle_member(cifar_archive, tmp_path):
    with tarfile.open(cifar_archive) as tar:
        blob = tar.extractfile("cifar-100-python/test").read()
    bad = _rewrite(cifar_archive, tmp_path / "c.tar.gz", test=blob[:5000])
    with pytest.raises(cu.CifarDataError, match="test is truncated or corrupt"):
        cu.load_cifar100(bad)


def _with_train(cifar_archive, tmp_path, **changes):
    d = _member(cifar_archive, "train")
    d.update({k.encode(): v for k, v in changes.items()})
    blob = synthetic_cifar.py2_pickle_bytes(d)
    return _rewrite(cifar_archive, tmp_path / "c.tar.gz", train=blob)


def test_wrong_array_shape(cifar_archive, tmp_path):
    d = _member(cifar_archive, "train")
    bad = _with_train(cifar_archive, tmp_path, data=d[b"data"][:, :3000].copy())
    with pytest.raises(cu.CifarDataError, match=r"'data' is uint8 \(3000, 3000\)"):
        cu.load_cifar100(bad)


def test_wrong_dtype(cifar_archive, tmp_path):
    d = _member(cifar_archive, "train")
    bad = _with_train(cifar_archive, tmp_path, data=d[b"data"][:10].astype(np.float32))
    with pytest.raises(cu.CifarDataError, match="'data' is float32"):
        cu.load_cifar100(bad)


def test_labels_out_of_range(cifar_archive, tmp_path):
    labels = _member(cifar_archive, "train")[b"coarse_labels"]
    labels[3] = 20
    bad = _with_train(cifar_archive, tmp_path, coarse_labels=labels)
    cu.load_cifar100(bad)  # fine labels are fine
    with pytest.raises(cu.CifarDataError, match=r"1 coarse label\(s\) outside \[0, 19\]"):
        cu.load_cifar100(bad, label_mode="coarse")


def test_label_count_mismatch(cifar_archive, tmp_path):
    labels = _member(cifar_archive, "train")[b"fine_labels"][:-1]
    bad = _with_train(cifar_archive, tmp_path, fine_labels=labels)
    with pytest.raises(cu.CifarDataError, match="2999 fine labels for 3000 images"):
        cu.load_cifar100(bad)


def test_foreign_label_names(cifar_archive, tmp_path):
    meta = {b"fine_label_names": [b"cat"] * 100, b"coarse_label_names": [b"x"] * 20}
    bad = _rewrite(
        cifar_archive, tmp_path / "c.tar.gz", meta=synthetic_cifar.py2_pickle_bytes(meta)
    )
    with pytest.raises(cu.CifarDataError, match="not a CIFAR-100 archive"):
        cu.load_cifar100(bad)


def _nested(depth: int) -> list:
    """``[x, x]`` nested ``depth`` times: a few hundred bytes pickled (the pickle's memo
    shares ``x``), 2**depth labels once numpy unfolds it."""
    x = [0]
    for _ in range(depth):
        x = [x, x]
    return x


def test_nested_labels_are_refused_before_numpy_unfolds_them(cifar_archive, tmp_path):
    """As fine_labels, depth 24 cost +500 MB and depth 40 4.9 GB in 37 s, then a bare
    MemoryError: the labels are checked to be ints before numpy sees them."""
    bad = _with_train(cifar_archive, tmp_path, fine_labels=_nested(40))
    load = f"data.load_cifar100({str(bad)!r})"
    grew, result = peak_memory("import cifar_utils.data as data", load)
    assert result == f"CifarDataError: {bad}:train: 2 fine labels for 3000 images; they must match"
    assert grew < 50, f"peak memory rose by {grew:.0f} MB"
    labels = _member(cifar_archive, "train")[b"fine_labels"]
    labels[5] = _nested(24)
    bad = _with_train(cifar_archive, tmp_path, fine_labels=labels)
    with pytest.raises(cu.CifarDataError, match=r"train: fine label 5 is a list \(\[\[\[\["):
        cu.load_cifar100(bad)


@pytest.mark.parametrize(
    ("value", "what"),
    [(3.7, "a float (3.7)"), (b"cat", "a bytes (b'cat')"), ({1: 2}, "a dict ({1: 2})"),
     (None, "a NoneType (None)"), (True, "a bool (True)")],
)  # fmt: skip
def test_labels_that_are_not_ints_are_refused(cifar_archive, tmp_path, value, what):
    """3.7 became 3 silently; bytes, a dict or None raised a bare ValueError/TypeError."""
    labels = _member(cifar_archive, "train")[b"fine_labels"]
    labels[7] = value
    bad = _with_train(cifar_archive, tmp_path, fine_labels=labels)
    expected = f"{bad}:train: fine label 7 is {what}, not an int; the file is corrupt"
    with pytest.raises(cu.CifarDataError, match=re.escape(expected)):
        cu.load_cifar100(bad)


def test_a_huge_label_is_out_of_range_not_an_overflow(cifar_archive, tmp_path):
    labels = _member(cifar_archive, "train")[b"fine_labels"]
    labels[2] = 2**70
    bad = _with_train(cifar_archive, tmp_path, fine_labels=labels)
    expected = r"1 fine label\(s\) outside \[0, 99\] \(e.g. 1180591620717411303424\)"
    with pytest.raises(cu.CifarDataError, match=expected):
        cu.load_cifar100(bad)


@pytest.mark.parametrize("data", [[[0] * 3072], np.zeros((3000, 3072), np.int64)])
def test_data_that_is_not_a_uint8_array_is_refused(cifar_archive, tmp_path, data):
    bad = _with_train(cifar_archive, tmp_path, data=data)
    what = "a list" if isinstance(data, list) else "int64 (3000, 3072)"
    with pytest.raises(cu.CifarDataError, match=re.escape(f"train: 'data' is {what};")):
        cu.load_cifar100(bad)


@pytest.mark.parametrize("names", [7, [b"apple"] * 99, None])
def test_label_names_that_are_not_a_list_of_names_are_refused(cifar_archive, tmp_path, names):
    """Meta names given as an int raised a bare TypeError."""
    meta = {b"fine_label_names": names, b"coarse_label_names": list(cu.COARSE_LABEL_NAMES)}
    blob = synthetic_cifar.py2_pickle_bytes(meta)
    bad = _rewrite(cifar_archive, tmp_path / "c.tar.gz", meta=blob)
    count = {7: "int", None: "NoneType"}.get(names, 99) if not isinstance(names, list) else 99
    expected = f"meta: 'fine_label_names' holds {count} names, not CIFAR-100's 100 fine labels"
    with pytest.raises(cu.CifarDataError, match=re.escape(expected)):
        cu.load_cifar100(bad)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_a_huge_extended_tar_header_is_never_read(cifar_archive, tmp_path, kind):
    """A 300 MB GNU long name or PAX header (1.4 MB of gzip) made tarfile hold 1.63 GB."""
    import gzip

    bomb = tmp_path / cu.ARCHIVE_NAME
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, 300_000_000
    with gzip.open(bomb, "wb", compresslevel=1) as out:
        out.write(header.tobuf(tarfile.GNU_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(header.size // len(zeros)):
            out.write(zeros)
        out.write(bytes(header.size % len(zeros) + 1024))
    load = f"data.load_cifar100({str(bomb)!r})"
    grew, result = peak_memory("import cifar_utils.data as data", load)
    assert result.startswith(
        f"CifarDataError: {bomb}: the entry after '././@LongLink' has a 300,000,000-byte "
        "extended header (name or PAX), more than the 65,536 read"
    ), result
    assert grew < 50, f"peak memory rose by {grew:.0f} MB"


# -------------------------------------------------- download (loopback server)


class _Server:
    """An HTTP server on 127.0.0.1 serving one folder; ``truncate`` cuts bodies short."""

    def __init__(self, folder, truncate=False):
        cls = type("Handler", (_Handler,), {"truncate": truncate})
        handler = functools.partial(cls, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_port}/cifar-100-python.tar.gz"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        data = source.read()
        outputfile.write(data[: len(data) // 3] if self.truncate else data)


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_download_checks_md5_and_fills_the_keras_cache(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    with _Server(cifar_archive.parent) as url:
        (x, y), _ = cu.load_cifar100(url=url, md5=_md5(cifar_archive), cache_dir=cache)
    assert x.shape == (3000, 32, 32, 3)
    target = cache / "cifar-100-python-target" / "cifar-100-python"
    assert sorted(p.name for p in target.iterdir()) == ["meta", "test", "train"]
    assert _leftovers(cache) == sorted(
        ["cifar-100-python.tar.gz", "cifar-100-python-target", "cifar-100-python"]
        + ["meta", "test", "train"]
    )
    # Second call: served from the cache, no network needed.
    (x2, _), _ = cu.load_cifar100(url=_closed_port_url(), cache_dir=cache)
    assert np.array_equal(x, x2)


def test_download_with_wrong_checksum_keeps_nothing(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    with (
        _Server(cifar_archive.parent) as url,
        pytest.raises(cu.CifarDataError, match=f"Checksum mismatch .* expected {cu.CIFAR100_MD5}"),
    ):
        cu.load_cifar100(url=url, cache_dir=cache)
    assert _leftovers(cache) == []


def test_download_cut_short_keeps_nothing(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    with (
        _Server(cifar_archive.parent, truncate=True) as url,
        pytest.raises(cu.CifarDataError, match="stopped after .* bytes"),
    ):
        cu.load_cifar100(url=url, md5=_md5(cifar_archive), cache_dir=cache)
    assert _leftovers(cache) == []


def test_no_network_and_no_copy_says_where_to_put_the_file(tmp_path):
    cache = tmp_path / "cache"
    url = _closed_port_url()
    with pytest.raises(cu.CifarDataError) as err:
        cu.load_cifar100(url=url, cache_dir=cache, timeout=5)
    message = str(err.value)
    assert f"Could not download CIFAR-100 from {url}" in message
    assert cu.CIFAR100_URL in message and "DATA_DIR" in message and "CIFAR100_DIR" in message
    assert str(cache / "cifar-100-python.tar.gz") in message
    assert _leftovers(cache) == []


def test_default_cache_is_under_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert cu.default_cache_dir() == tmp_path / "kh" / "datasets"


# --------------------------------------------- field case 3: the Keras cache


def test_existing_keras3_cache_is_found_offline(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    _extract(cifar_archive, cache / "cifar-100-python-target")
    (x, _), _ = cu.load_cifar100(url=_closed_port_url(), cache_dir=cache)
    assert x.shape == (3000, 32, 32, 3)


def test_existing_keras2_cache_is_found_offline(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    _extract(cifar_archive, cache)
    (x, _), _ = cu.load_cifar100(url=_closed_port_url(), cache_dir=cache)
    assert x.shape == (3000, 32, 32, 3)


def test_partial_cache_is_rebuilt_from_the_cached_archive(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    folder = _extract(cifar_archive, cache / "cifar-100-python-target")
    (folder / "meta").unlink()  # an interrupted extraction
    (cache / "cifar-100-python.tar.gz").write_bytes(cifar_archive.read_bytes())
    with pytest.warns(UserWarning, match=r"incomplete \(missing \['meta'\]\).*rebuilding"):
        (x, _), _ = cu.load_cifar100(
            url=_closed_port_url(), md5=_md5(cifar_archive), cache_dir=cache
        )
    assert x.shape == (3000, 32, 32, 3) and (folder / "meta").is_file()


def test_partial_cache_is_rebuilt_by_download(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    folder = _extract(cifar_archive, cache / "cifar-100-python-target")
    (folder / "train").unlink()
    with _Server(cifar_archive.parent) as url, pytest.warns(UserWarning, match="incomplete"):
        (x, _), _ = cu.load_cifar100(url=url, md5=_md5(cifar_archive), cache_dir=cache)
    assert x.shape == (3000, 32, 32, 3)


def test_partial_cache_offline_gives_a_clear_error(cifar_archive, tmp_path):
    cache = tmp_path / "cache"
    folder = _extract(cifar_archive, cache / "cifar-100-python-target")
    (folder / "test").unlink()
    with (
        pytest.warns(UserWarning, match="incomplete"),
        pytest.raises(cu.CifarDataError, match="Could not download"),
    ):
        cu.load_cifar100(url=_closed_port_url(), cache_dir=cache, timeout=5)


# -------------------------------------------------------------------- split


def test_stratified_seeded_split(cifar_archive):
    (x, y), _ = cu.load_cifar100(cifar_archive)
    (x_tr, y_tr), (x_val, y_val) = cu.train_val_split(x, y, val_size=500, seed=1)
    assert len(x_tr) == 2500 and len(x_val) == 500
    assert np.bincount(y_val, minlength=100).tolist() == [5] * 100
    assert np.bincount(y_tr, minlength=100).tolist() == [25] * 100
    (_, y_tr2), (x_val2, _) = cu.train_val_split(x, y, val_size=500, seed=1)
    assert np.array_equal(x_val, x_val2) and np.array_equal(y_tr, y_tr2)
    train_rows = {row.tobytes() for row in x_tr}
    assert not any(row.tobytes() in train_rows for row in x_val)
    (x_lim, y_lim), _ = cu.train_val_split(x, y, val_size=500, seed=1, train_limit=1000)
    assert len(x_lim) == 1000 and np.bincount(y_lim).tolist() == [10] * 100


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"val_size": 50}, "VAL_SIZE = 50: this data has 3,000 training images in 100 classes; "
                           "VAL_SIZE must be an int between 100 (one image per class) and 2,900 "
                           "(one per class left to train on)"),
        ({"val_size": 4000}, "VAL_SIZE = 4000: this data has 3,000 training images in 100"),
        ({"train_limit": 5000}, "TRAIN_LIMIT = 5000: this data has 3,000 training images, 2,500 "
                                "left to train on after VAL_SIZE = 500; TRAIN_LIMIT must be None "
                                "(all of them) or an int between 100 (one image per class) and "
                                "2,500"),
        ({"train_limit": 10}, "TRAIN_LIMIT = 10: this data has 3,000 training images, 2,500 left"),
    ],
)  # fmt: skip
def test_split_sizes_that_do_not_fit_the_data_name_the_notebook_parameter(sizes, message):
    y = np.arange(3000) % 100
    with pytest.raises(cu.ParameterError) as err:
        cu.train_val_split(np.zeros((3000, 1)), y, **{"val_size": 500, **sizes})
    assert str(err.value).startswith(message)
    assert err.value._render_traceback_() == [f"ParameterError: {err.value}"]  # in a notebook


def test_split_sizes_at_their_bounds():
    x, y = np.arange(3000)[:, None], np.arange(3000) % 100
    (x_tr, _), (x_val, _) = cu.train_val_split(x, y, val_size=2900)
    assert (len(x_tr), len(x_val)) == (100, 2900)
    (x_tr, _), _ = cu.train_val_split(x, y, val_size=500, train_limit=2500)
    assert len(x_tr) == 2500
    (x_tr, y_tr), _ = cu.train_val_split(x, y, val_size=500, train_limit=2450)
    assert len(x_tr) == 2450 and len(np.unique(x_tr)) == 2450  # 50 left out: fewer than classes
    assert np.bincount(y_tr, minlength=100).min() > 0


# ------------------------------------------------------------------ provenance


def test_provenance_of_an_archive_that_is_not_the_official_one(cifar_archive):
    *_, info = cu.load_cifar100(cifar_archive, provenance=True)
    assert info["official"] is False and info["md5"] == _md5(cifar_archive)
    assert info["source"] == str(cifar_archive) and info["archive"] == str(cifar_archive)
    assert f"not the official archive's {cu.CIFAR100_MD5}" in info["check"]
    assert (info["train_images"], info["test_images"]) == (3000, 1000)


def test_provenance_of_each_local_layout(cifar_archive, tmp_path, monkeypatch):
    # Pretend the generated archive is the official one, to reach the checks that follow.
    monkeypatch.setattr(cifar_utils.data, "CIFAR100_MD5", _md5(cifar_archive))
    assert cu.load_cifar100(cifar_archive, provenance=True)[2]["official"] is True
    both = tmp_path / "both"  # a user's folder holding the archive and its extraction
    both.mkdir()
    (both / cu.ARCHIVE_NAME).write_bytes(cifar_archive.read_bytes())
    folder = _extract(cifar_archive, both)
    info = cu.load_cifar100(folder, provenance=True)[2]
    assert info["official"] is True and info["archive"] == str(both / cu.ARCHIVE_NAME)
    keras3 = tmp_path / "keras3" / "cifar-100-python-target"  # Keras 3's own cache layout
    _extract(cifar_archive, keras3)
    (keras3.parent / "cifar-100-python-target_archive").write_bytes(cifar_archive.read_bytes())
    assert cu.load_cifar100(keras3 / "cifar-100-python", provenance=True)[2]["official"] is True
    alone = _extract(cifar_archive, tmp_path / "alone")  # nothing to check it against
    info = cu.load_cifar100(alone, provenance=True)[2]
    assert info["official"] is False and "no archive beside it" in info["check"]
    train = folder / "train"  # the extracted files edited beside an official archive
    d = _member(cifar_archive, "train")
    d[b"fine_labels"] = [(label + 1) % 100 for label in d[b"fine_labels"]]
    train.write_bytes(synthetic_cifar.py2_pickle_bytes(d))
    info = cu.load_cifar100(folder, provenance=True)[2]
    assert info["official"] is False and "differs from the official archive" in info["check"]


def test_download_then_cache_is_official_and_new_files_follow_the_umask(
    cifar_archive, tmp_path, monkeypatch
):
    monkeypatch.setattr(cifar_utils.data, "CIFAR100_MD5", _md5(cifar_archive))
    cache = tmp_path / "cache"
    old = os.umask(0o002)  # a group-writable umask, as on shared machines
    try:
        with _Server(cifar_archive.parent) as url:
            md5 = _md5(cifar_archive)
            info = cu.load_cifar100(url=url, md5=md5, cache_dir=cache, provenance=True)[2]
        json_file = cu.write_json(tmp_path / "out" / "state.json", {"epoch": 1})
    finally:
        os.umask(old)
    assert info["official"] is True  # read from the extracted cache, checked against its archive
    assert info["source"].endswith("cifar-100-python-target/cifar-100-python")
    target = cache / "cifar-100-python-target"
    for path, mode in [
        (cache / cu.ARCHIVE_NAME, 0o664),  # written through mkstemp (0600) and renamed
        (target, 0o775),  # extracted into a mkdtemp folder (0700) and renamed
        (target / "cifar-100-python" / "train", 0o664),
        (json_file, 0o664),
    ]:
        assert path.stat().st_mode & 0o777 == mode, path
