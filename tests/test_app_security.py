"""The web demo's server, through its HTTP API on loopback: it reads only the sample photos
and files a visitor's own session uploaded, fetches no URL a request names, sends nothing
(no token) anywhere, deletes uploads and keeps them within a disk budget and each visitor's
share, cuts off slow bodies, bounds what a photo costs to decode, and its memory stays flat.

Visitors are told apart by their address: tests send from 127.0.0.2, 127.0.0.3, ... (all
loopback on Linux) with :meth:`Demo.client`.

A file "not read" is one whose access time did not move: :func:`canary` sets it an hour
before the file's modification time, which any read updates (also under ``relatime``).
"""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import RecordingServer, peak_memory, start_demo
from PIL import Image

import cifar_utils as cu
import upload_guard

REFUSED = (
    "error",
    {
        "error": "This demo reads only photos uploaded from its page in this session, and its "
        "sample photos. Upload the photo again.",
        "duration": 10,
        "visible": True,
        "title": "Cannot classify this file",
    },
)
# Gradio's own check, when a payload carries FileData's meta (as the page's do): it refuses
# before classify runs, and says why only in the server's log
REFUSED_BY_GRADIO = ("error", {"error": None})
UPLOADS_FULL = "The demo's space for uploads is full. Try again in a few minutes."
SHARE_FULL = "Your uploads fill your share of this demo's space. Try again in a few minutes."
BUDGET_MB, SHARE_MB = 40, 10  # --upload-budget-mb and --visitor-share-mb of the module's server


class Demo:
    """``python app.py --model MODEL --port P`` on loopback, its uploads in ``upload_dir``,
    called as the page and API clients call it (one keep-alive HTTP client)."""

    def __init__(self, model, upload_dir: Path, log: Path, *options: str, env=None):
        self.upload_dir, self.log = upload_dir, log
        self.system_temp = upload_dir.parent / f"{upload_dir.name}-system-temp"
        self.system_temp.mkdir(parents=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "GRADIO_TEMP_DIR": str(upload_dir),
               "TMPDIR": str(self.system_temp), **(env or {})}  # fmt: skip
        self.url, self.process = start_demo(
            lambda port: [
                *[sys.executable, "app.py", "--model", str(model), "--port", str(port)],
                *options,
            ],
            log,
            env,
        )
        self.http = self.client("127.0.0.1")

    def client(self, address: str) -> httpx.Client:
        """An HTTP client of the API that connects from ``address`` (a visitor)."""
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(base_url=f"{self.url}gradio_api/", timeout=60, transport=transport)

    def upload(self, *files: tuple[str, bytes], http=None) -> list[str]:
        """Upload ``(name, content)`` files as the page does; the server paths it returns."""
        done = (http or self.http).post("upload", files=[("files", file) for file in files])
        assert done.status_code == 200, done.text
        return done.json()

    def classify(self, payload, session: str | None = None, http=None, **headers):
        """Call ``classify`` with ``payload`` (in ``session``, else a new session): its one
        event, ``("complete", [label])`` or ``("error", {"error": message, ...})``."""
        http = http or self.http
        body = {"data": [payload], **({"session_hash": session} if session else {})}
        started = http.post("call/classify", json=body, headers=headers)
        assert started.status_code == 200, started.text
        events = http.get(f"call/classify/{started.json()['event_id']}").text
        event, data = events.split("\n\n")[0].split("\n")
        return event.removeprefix("event: "), json.loads(data.removeprefix("data: "))

    def system_temp_files(self) -> list[str]:
        """Files the server left in the system's temporary folder (TensorFlow's autograph
        sources aside)."""
        names = (p.name for p in self.system_temp.iterdir())
        return [name for name in names if not name.startswith("__autograph_generated_file")]

    def serving(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        self.http.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@contextlib.contextmanager
def running_demo(model, upload_dir: Path, log: Path, *options: str, env=None):
    """A :class:`Demo`, killed on the way out unless a test has stopped it."""
    demo = Demo(model, upload_dir, log, *options, env=env)
    try:
        yield demo
    finally:
        demo.http.close()
        demo.process.kill()  # no-op if it has exited
        demo.process.wait(timeout=30)


@pytest.fixture(scope="module")
def demo(small_model, tmp_path_factory):
    uploads, log = tmp_path_factory.mktemp("uploads"), tmp_path_factory.mktemp("log") / "app.log"
    options = (
        "--upload-budget-mb",
        str(BUDGET_MB),
        "--visitor-share-mb",
        str(SHARE_MB),
        "--body-seconds",
        "6",
    )  # fmt: skip  (a loaded CI machine parses 1,000 parts slowly)
    with running_demo(small_model[0], uploads, log, *options) as demo:
        yield demo


def file_data(path) -> dict:
    """The payload the page (and gradio_client) sends for a file: FileData, with its meta."""
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def canary(path: Path) -> Path:
    """``path`` with its access time set an hour before its modification time (see above)."""
    status = path.stat()
    os.utime(path, ns=(status.st_mtime_ns - 3600 * 10**9, status.st_mtime_ns))
    return path


def was_read(path: Path) -> bool:
    status = path.stat()
    return status.st_atime_ns >= status.st_mtime_ns


def private_photo(folder: Path) -> Path:
    """A real photo outside the upload folder (a copy of a sample), as a :func:`canary`."""
    return canary(Path(shutil.copy(cu.sample_photo("coffee"), folder / "private.png")))


def visitor_photo(small_model, folder: Path, seed: int) -> tuple[tuple[str, bytes], list]:
    """A photo only this test has (random pixels) as an upload ``(name, content)``, and what
    ``cu.predict_image`` gives for it. (A sample photo uploaded is the sample photo: Gradio
    names a file by its content, so it lands on the sample's own path.)"""
    path = folder / f"visitor{seed}.png"
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return (path.name, path.read_bytes()), cu.predict_image(small_model[1], path, top_k=5)


def assert_classified(result, expected) -> None:
    event, data = result
    assert event == "complete", data
    assert data[1].startswith('<img alt="Grad-CAM overlay"')  # inline: no file to fetch
    shown = [(row["label"], row["confidence"]) for row in data[0]["confidences"]]
    assert [name for name, _ in shown] == [name for name, _ in expected]
    assert [p for _, p in shown] == pytest.approx([p for _, p in expected], abs=1e-6)


def test_a_path_outside_the_upload_folder_is_refused_unread(demo, tmp_path):
    photo = private_photo(tmp_path)
    # the payload, without FileData's meta (Gradio's own check passes it through):
    # one message, whether the file exists or not
    for path in (photo, tmp_path / "missing.png", "/etc/passwd"):
        assert demo.classify({"path": str(path)}) == REFUSED
    assert demo.classify(file_data(photo)) == REFUSED_BY_GRADIO
    assert not was_read(photo)
    assert demo.serving()


def test_a_relative_path_with_dotdot_is_refused_unread(demo, tmp_path):
    photo = private_photo(tmp_path)
    relative = os.path.relpath(photo, Path(__file__).resolve().parents[1])  # from app.py's cwd
    (uploaded,) = demo.upload(("notes.txt", b"an upload of this session"))
    out_of_upload = f"{Path(uploaded).parent}/../../{photo.relative_to(demo.upload_dir.parent)}"
    assert relative.startswith("../") and Path(os.path.normpath(out_of_upload)) == photo
    for path in (relative, out_of_upload):
        assert demo.classify({"path": path}) == REFUSED
        assert demo.classify(file_data(path)) == REFUSED_BY_GRADIO
    assert not was_read(photo)
    assert demo.serving()


def test_only_the_session_that_uploaded_a_file_may_read_it(demo, small_model, tmp_path):
    photo, expected = visitor_photo(small_model, tmp_path, seed=1)
    (uploaded,) = demo.upload(photo)
    assert Path(uploaded).parent.parent == demo.upload_dir
    assert_classified(demo.classify(file_data(uploaded), session="owner"), expected)

    canary(Path(uploaded))
    assert demo.classify(file_data(uploaded), session="another") == REFUSED
    assert demo.classify({"path": uploaded}) == REFUSED  # in a new session
    assert not was_read(Path(uploaded))
    assert_classified(demo.classify(file_data(uploaded), session="owner"), expected)

    # the same photo uploaded again, by another visitor: a new file at that path, theirs too;
    # the owner keeps it (a re-upload took it away), and a visitor who only learnt the path
    # can neither classify it nor fetch it
    with demo.client("127.0.0.2") as other, demo.client("127.0.0.3") as snoop:
        assert demo.upload(photo, http=other) == [uploaded]
        assert_classified(demo.classify(file_data(uploaded), "another", other), expected)
        assert_classified(demo.classify(file_data(uploaded), session="owner"), expected)
        canary(Path(uploaded))
        assert demo.classify(file_data(uploaded), "snoop", snoop) == REFUSED
        assert snoop.get(f"file={uploaded}").status_code == 404
        roundabout = (
            f"{Path(uploaded).parent}/../{Path(uploaded).parent.name}/{Path(uploaded).name}"
        )
        assert snoop.get(f"file={roundabout}").status_code == 404
        assert not was_read(Path(uploaded))
        assert other.get(f"file={uploaded}").content == photo[1]
    assert demo.serving()


def test_no_visitor_can_pass_for_another(demo, small_model, tmp_path):
    """uvicorn trusts X-Forwarded-For from loopback by default: a local client could name the
    address of the visitor whose upload it wants, or a new one for each flood of uploads."""
    photo, _ = visitor_photo(small_model, tmp_path, seed=4)
    with demo.client("127.0.0.4") as owner:
        (uploaded,) = demo.upload(photo, http=owner)
    posing = {"X-Forwarded-For": "127.0.0.4"}
    assert demo.http.get(f"file={uploaded}", headers=posing).status_code == 404
    assert demo.classify(file_data(uploaded), "posing", **posing) == REFUSED
    assert demo.serving()


def test_a_file_in_the_upload_folder_that_no_one_uploaded_is_refused_unread(demo):
    planted = demo.upload_dir / "planted" / "photo.png"
    planted.parent.mkdir()
    canary(Path(shutil.copy(cu.sample_photo("coffee"), planted)))
    assert demo.classify(file_data(planted)) == REFUSED  # Gradio's own check lets it by
    assert demo.classify({"path": str(planted)}) == REFUSED
    assert not was_read(planted)
    assert demo.serving()


def test_a_symlink_in_the_upload_folder_pointing_out_is_refused_unread(demo, small_model, tmp_path):
    private = private_photo(tmp_path)
    planted = demo.upload_dir / "link" / "photo.png"
    planted.parent.mkdir()
    planted.symlink_to(private)
    # and one in place of a file this session uploaded (a path Gradio's upload route wrote)
    photo, expected = visitor_photo(small_model, tmp_path, seed=2)
    (uploaded,) = demo.upload(photo)
    assert_classified(demo.classify(file_data(uploaded), session="linker"), expected)
    os.remove(uploaded)
    os.symlink(private, uploaded)
    for path in (planted, uploaded):
        assert demo.classify({"path": str(path)}, session="linker") == REFUSED
        assert demo.classify(file_data(path), session="linker") == REFUSED_BY_GRADIO
    assert not was_read(private)
    assert demo.serving()


def test_the_sample_photos_are_classified_in_any_session(demo, small_model):
    config = demo.http.get(f"{demo.url}config").json()
    dataset = next(c for c in config["components"] if c["type"] == "dataset")
    samples = [sample for (sample,) in dataset["props"]["samples"]]  # what the page sends
    # no server path: /config showed the absolute upload folder
    for page in (f"{demo.url}config", demo.url, "info"):
        assert str(demo.upload_dir) not in demo.http.get(page).text, page
    for sample in samples:  # the page shows them
        assert (
            demo.http.get(sample["url"]).content
            == Path(demo.upload_dir, sample["path"]).read_bytes()
        )
    assert [Path(sample["path"]).name for sample in samples] == [
        file for file, _, _ in cu.SAMPLE_PHOTOS.values()
    ]
    for name, sample in zip(cu.SAMPLE_PHOTOS, samples, strict=True):
        expected = cu.predict_image(small_model[1], cu.sample_photo(name), top_k=5)
        assert_classified(demo.classify(sample), expected)
    assert demo.serving()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_memory_stays_flat_over_thousands_of_sessions(demo):
    """Every ``/call`` request is a new session, and Gradio kept ~25 KB for each (RSS 0.81 ->
    0.94 GB over 3,700 requests). These calls clear the image (the model does not run: its
    own memory is not at stake here), so what the server keeps per session shows alone."""
    warm_up, calls = 500, 2000  # warm-up: past the 200 sessions the app keeps
    for _ in range(warm_up):
        assert demo.classify(None) == ("complete", [{}, ""])  # an empty label, no overlay
    rss = [rss_mb(demo.process.pid)]
    for i in range(1, calls + 1):
        assert demo.classify(None) == ("complete", [{}, ""])
        if i % 250 == 0:
            rss.append(rss_mb(demo.process.pid))
    assert max(rss) - rss[0] < 2.0, f"RSS (MB) every 250 calls after {warm_up}: {rss}"


def files_in(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def test_uploads_are_capped_per_session_and_the_folder_emptied_at_start_and_stop(
    small_model, tmp_path
):
    """A restart kept the previous process's uploads (and what they held of the budget), and
    uploads survived SIGTERM when there were many or a slow body was open: the upload folder
    is the demo's own, emptied when it starts and when it stops."""
    uploads = tmp_path / "uploads"
    previous = [uploads / "0123abcd" / "photo.png", uploads / "tmpleftover"]
    for path in previous:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from the previous run")
    with running_demo(small_model[0], uploads, tmp_path / "app.log") as demo:
        samples = files_in(demo.upload_dir)  # Gradio's copies of the sample photos, only
        assert {path.name for path in samples} == {f for f, _, _ in cu.SAMPLE_PHOTOS.values()}
        paths = [
            path
            for batch in (range(10), range(10, 20))  # at most 10 files a request
            for path in demo.upload(*[(f"photo{i}.png", os.urandom(2 * 2**20)) for i in batch])
        ]
        assert [Path(path).stat().st_size for path in paths] == [2 * 2**20] * 20
        for path in paths:  # one visitor's session names them all (none is an image)
            event, data = demo.classify(file_data(path), session="visitor")
            assert (event, data["error"]) == (
                "error",
                f"'{Path(path).name}' is not a readable image (UnidentifiedImageError: cannot "
                f"identify image file '{Path(path).name}'). Give a PNG, JPEG, BMP, GIF or WebP "
                "file (RGB, RGBA or greyscale)",
            )
        assert [Path(path).exists() for path in paths] == [False] * 17 + [True] * 3
        assert demo.classify(file_data(paths[0]), session="visitor") == REFUSED
        more = demo.upload(("late.png", os.urandom(2**20)))  # never classified
        host, port = demo.url.split("/")[2].split(":")
        with socket.create_connection((host, int(port))) as slow:  # a body left open
            slow.sendall(multipart_head("upload", 300_000) + FILE_PART + b"x" * 1000)
            time.sleep(1)
            stopping = time.monotonic()
            assert demo.stop() == 0
            stopped = time.monotonic() - stopping
        assert list(uploads.iterdir()) == []
        assert not Path(more[0]).exists()
        assert demo.system_temp_files() == []
        assert "Traceback" not in demo.log.read_text()
        assert stopped < 20, stopped


@pytest.fixture
def recorder():
    server = RecordingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_url_a_request_names_is_never_fetched(demo, recorder, small_model, tmp_path):
    """Gradio fetched a FileData path of http(s)://... (safehttpx refuses loopback hosts,
    so it failed "validation" here, in the log; a public host's file was downloaded whole)."""
    port, meta = recorder.server_address[1], {"_type": "gradio.FileData"}
    urls = [f"{scheme}://{host}:{port}/photo.png" for scheme in ("http", "https")
            for host in ("127.0.0.1", "localhost")]  # fmt: skip
    logged = len(demo.log.read_bytes())
    for url in urls:
        for payload in ({"path": url, "meta": meta}, {"path": url, "url": url, "meta": meta},
                        {"path": url}):  # fmt: skip
            assert demo.classify(payload) == REFUSED, payload
    for path in ("file:///etc/passwd", f"ftp://127.0.0.1:{port}/photo.png"):
        assert demo.classify({"path": path, "meta": meta}) == REFUSED
    # the examples' event takes the dataset's input: Gradio fetched files named there too
    done = demo.http.post("run/load_example", json={"data": [{"path": urls[0], "meta": meta}]})
    assert REFUSED[1]["error"] in done.text
    # a URL in FileData's url beside this session's own upload: ignored (the page sends its
    # own file URL there)
    photo, expected = visitor_photo(small_model, tmp_path, seed=3)
    (uploaded,) = demo.upload(photo)
    named = {**file_data(uploaded), "url": urls[0]}
    assert_classified(demo.classify(named, session="url"), expected)

    assert recorder.requests == []
    log = demo.log.read_bytes()[logged:].decode(errors="replace")
    assert "failed validation" not in log and "Traceback" not in log, log
    assert demo.serving()


def test_leftovers_gradio_never_deletes_are_removed_when_old(tmp_path):
    """Temporary files of refused uploads and the empty folders uploads leave would hold
    the upload budget for good: the housekeeping removes them once older than the uploads'
    lifetime; younger ones and folders holding an upload stay."""
    old, young = tmp_path / "tmpold", tmp_path / "tmpyoung"
    empty, upload = tmp_path / "empty", tmp_path / "abc123"
    for path in (old, young):
        path.write_bytes(b"x" * 1000)
    empty.mkdir()
    upload.mkdir()
    (upload / "photo.png").write_bytes(b"png")
    for path in (old, empty, upload):
        os.utime(path, (1, 1))
    assert sorted(upload_guard.remove_leftovers(tmp_path, 600)) == ["empty", "tmpold"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123", "tmpyoung"]


def disk_use(folder: Path) -> int:
    """Bytes the files and folders under ``folder`` take (sizes, or blocks if more)."""
    return sum(max(s.st_size, s.st_blocks * 512) for s in map(os.lstat, folder.rglob("*")))


def raw_request(demo, head: bytes, *chunks: bytes, pause: float = 0.0) -> tuple[str, float]:
    """Send ``head`` (request line and headers) and ``chunks`` of body on a raw socket,
    ``pause`` seconds apart (a body can be sent slowly, or short, as no HTTP client would);
    the answer's status line and the seconds it took from the first byte."""
    host, port = demo.url.split("/")[2].split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=120) as raw:
        raw.sendall(head)
        for chunk in chunks:
            with contextlib.suppress(OSError):  # the server may have answered and closed
                raw.sendall(chunk)
            if select.select([raw], [], [], pause)[0]:  # answered
                break
        answer = raw.recv(4096).decode(errors="replace")
    return answer.split("\r\n")[0], time.monotonic() - started


def multipart_head(route: str, length: int, content_type="multipart/form-data") -> bytes:
    return (
        f"POST /gradio_api/{route} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        f"Content-Type: {content_type}; boundary=X\r\n\r\n"
    ).encode()


FILE_PART = (
    b'--X\r\nContent-Disposition: form-data; name="files"; filename="part.bin"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def test_uploads_never_classified_stay_within_the_disk_budget(demo):
    """The upload route takes no session and up to 1,000 files a request: 2 MB files, never
    classified, are taken until the folder would pass the budget, then refused, whether one
    or many a request; freed space (what the sweep does) is taken again. Each visitor
    (address) holds at most its share, so it takes several to fill the budget."""
    budget, size = BUDGET_MB * 2**20, 2 * 2**20
    room = budget - disk_use(demo.upload_dir)
    many = [("files", (f"many{i}.bin", os.urandom(2**20))) for i in range(BUDGET_MB + 1)]
    assert demo.http.post("upload", files=many).status_code == 413  # refused whole, unread
    assert budget - disk_use(demo.upload_dir) == room
    taken, refusals = [], []
    for i in range(60):
        with demo.client(f"127.0.1.{i // 4 + 1}") as visitor:  # 4 files each: within a share
            done = visitor.post("upload", files=[("files", (f"junk{i}.bin", os.urandom(size)))])
        if done.status_code != 200:
            refusals.append((done.status_code, done.text))
            break
        taken += done.json()
        assert disk_use(demo.upload_dir) <= budget
    assert refusals == [(413, UPLOADS_FULL)]
    assert room // size - 2 <= len(taken) <= room // size  # multipart and folder overhead
    chunked = demo.http.post(
        "upload",
        content=iter([b"--x\r\n"]),
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert chunked.status_code == 411  # no Content-Length: its size is not known beforehand
    # chunked with a small Content-Length: uvicorn would read the whole chunked body
    head = multipart_head("upload", 10).replace(
        b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert raw_request(demo, head)[0].startswith("HTTP/1.1 411")
    assert disk_use(demo.upload_dir) <= budget

    sample = file_data(next(path for path in demo.upload_dir.rglob("coffee.png")))
    assert demo.classify(sample)[0] == "complete"  # still serving
    for path in taken:  # as the sweep does after ten minutes
        shutil.rmtree(Path(path).parent)
    time.sleep(upload_guard.HOUSEKEEPING_SECONDS + 1)  # the folder is measured again
    assert len(demo.upload(("again.bin", os.urandom(size)))) == 1
    assert demo.serving()


def test_files_reach_the_disk_through_the_upload_route_only(demo):
    """process_recording took any Content-Type case (and chunked bodies), and kept each file
    (up to 50 MB) in the system's temporary folder for good: it is closed, multipart bodies
    are refused on every other route whatever their case, other bodies are small."""
    for content_type in ("multipart/form-data", "Multipart/form-data", "MULTIPART/FORM-DATA"):
        for route in ("process_recording", "queue/join", "call/classify"):
            body = FILE_PART + b"x" * 1000 + b"\r\n--X--\r\n"
            head = multipart_head(route, len(body), content_type)
            assert raw_request(demo, head, body)[0] == "HTTP/1.1 404 Not Found", route
    chunked = multipart_head("process_recording", 10, "Multipart/form-data").replace(
        b"Content-Length: 10", b"Transfer-Encoding: chunked"
    )
    assert raw_request(demo, chunked, b"5\r\n--X\r\n\r\n0\r\n\r\n")[0].startswith("HTTP/1.1 4")
    large = demo.http.post("call/classify", content=b"[" * (2 << 20))
    assert large.status_code == 413
    assert demo.system_temp_files() == []
    assert [p.name for p in demo.upload_dir.iterdir() if p.is_file()] == []
    assert demo.serving()


def test_bodies_cut_short_or_never_closed_leave_no_file(demo):
    """A multipart never closed, or a Content-Length shorter than the body, stored a partial
    file: the upload is refused (400) and its temporary file removed."""
    before = files_in(demo.upload_dir)
    unclosed = FILE_PART + b"y" * 5000
    whole = unclosed + b"\r\n--X--\r\n"
    for head, body in ((multipart_head("upload", len(unclosed)), unclosed),
                       (multipart_head("upload", len(whole) - 20), whole)):  # fmt: skip
        assert raw_request(demo, head, body)[0] == "HTTP/1.1 400 Bad Request"
    assert files_in(demo.upload_dir) == before
    assert demo.serving()


def test_one_visitor_cannot_refuse_another(demo):
    """Each visitor's uploads count against its own share: about 64 requests of 1,000 tiny
    files (each counted 8 KB with its folder) filled the whole budget; a slow body holding
    the budget refused everyone for as long as it stayed open. Now the flood fills its
    sender's share only, and a slow body is cut off at its deadline (--body-seconds 6 plus
    1 s per 100 KB) while others upload."""
    tiny = [("files", (f"t{i}.bin", b"t")) for i in range(10)]  # 10 a request at most
    with demo.client("127.0.0.5") as flood, demo.client("127.0.0.6") as other:
        answers = [flood.post("upload", files=tiny) for _ in range(130)]
        taken = [answer.status_code for answer in answers].index(413)
        assert 105 <= taken <= 115, taken  # each counted ~93 KB (11 parts) of a 10 MB share
        assert {(a.status_code, a.text) for a in answers[taken:]} == {(413, SHARE_FULL)}
        assert len(demo.upload(("photo.bin", os.urandom(2**20)), http=other)) == 1

        declared = 300_000  # deadline 6 + 3 s
        head = multipart_head("upload", declared)
        outcome = {}
        slow = threading.Thread(
            target=lambda: outcome.update(
                answer=raw_request(demo, head, FILE_PART, *[b"x"] * 30, pause=0.5)
            )
        )
        slow.start()
        time.sleep(1)
        for _ in range(3):  # meanwhile another visitor uploads as usual
            assert len(demo.upload(("photo.bin", os.urandom(2**20)), http=other)) == 1
        slow.join()
    status, seconds = outcome["answer"]
    assert status == "HTTP/1.1 408 Request Timeout"
    assert 8.5 < seconds < 14, seconds
    assert demo.serving()


def test_no_token_leaves_the_host(small_model, recorder, tmp_path):
    """With a Hugging Face token in the environment, Gradio's run history (on by default)
    POSTed a classify run to the bucket a request header named, with the token, and listed
    any bucket the token reads; huggingface_hub asked the Hub for /api/agent-harnesses.
    The Hub here is a local recorder, the token a fake: nothing may reach the recorder."""
    hub = f"http://127.0.0.1:{recorder.server_address[1]}"
    env = {"HF_TOKEN": "hf_fake_token_for_tests", "HF_ENDPOINT": hub, "GRADIO_RUN_HISTORY": "True"}
    with running_demo(small_model[0], tmp_path / "up", tmp_path / "app.log", env=env) as demo:
        bucket = {"x-gradio-history-bucket": "someone/bucket"}
        sample = file_data(next(path for path in demo.upload_dir.rglob("coffee.png")))
        assert demo.classify({**sample, "url": f"{hub}/x.png"}, **bucket)[0] == "complete"
        assert demo.classify(sample, session="history", **bucket)[0] == "complete"
        listed = demo.http.get("run-history/records", params={"bucket": "owner/private"})
        assert listed.status_code == 404
        assert demo.http.get("runs").status_code == 404
        config = demo.http.get(f"{demo.url}config").json()
        assert config["run_history"] is False
        time.sleep(2)  # history uploads ran in the background
    assert recorder.requests == []


def webp_bomb(folder: Path, side: int) -> Path:
    """A lossless WebP of ``side`` x ``side`` black pixels: about 1.6 KB at 6300."""
    path = folder / f"bomb{side}.webp"
    Image.new("RGB", (side, side)).save(path, lossless=True)
    return path


def test_a_tiny_file_of_many_pixels_is_refused_before_decoding(demo, tmp_path):
    """A 1.6 KB WebP of 6300x6300 took 1 to 2.3 s and ~630 MB at peak under the 40-megapixel
    cap; the demo decodes at most DEMO_MAX_PIXELS (6 million)."""
    bomb = webp_bomb(tmp_path, 6300)
    assert bomb.stat().st_size < 2000
    (uploaded,) = demo.upload((bomb.name, bomb.read_bytes()))
    event, data = demo.classify(file_data(uploaded), session="bomb")
    assert (event, data["error"]) == (
        "error",
        f"'{bomb.name}' is too large to open safely: it has 6300x6300 pixels (40 million) to "
        "decode, more than the 6 million pixels this loader decodes. Shrink it (a few "
        "thousand pixels a side is plenty: the models see 32x32 or 224x224) and try again",
    )
    assert demo.serving()


@pytest.mark.parametrize("side", [2449])  # 5.998 megapixels: just within the demo's cap
def test_the_largest_photo_the_demo_decodes_costs_about_100_mb(tmp_path, side):
    import app

    bomb = webp_bomb(tmp_path, side)
    assert side * side <= app.DEMO_MAX_PIXELS < (side + 1) ** 2
    load = (
        f"photos.load_image({str(bomb)!r}, size=(224, 224), max_pixels=app.DEMO_MAX_PIXELS).shape"
    )
    grew, result = peak_memory("import app\nimport cifar_utils.photos as photos", load)
    assert result == "(224, 224, 3)"
    assert grew < 110, f"peak memory rose by {grew:.0f} MB"


def test_a_large_jpeg_is_decoded_shrunk_to_the_demo_cap(tmp_path):
    """A 12-megapixel phone photo is not refused: the JPEG decoder shrinks it to 3."""
    import app

    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(photo, quality=90)
    image = cu.load_image(photo, max_pixels=app.DEMO_MAX_PIXELS)
    assert image.shape == (1500, 2000, 3)


def event_flood(demo, address: str, calls: int, payload) -> dict[int, int]:
    """``calls`` POSTs of ``call/classify`` from ``address`` on 4 keep-alive connections at
    once, as fast as they are answered; how many got each status."""
    statuses, lock = {}, threading.Lock()

    def send(n):
        with demo.client(address) as http:
            for _ in range(n):
                status = http.post("call/classify", json={"data": [payload]}).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=send, args=(calls // 4,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_a_flood_of_calls_leaves_the_queue_to_others(demo, small_model):
    """~230 call/classify in a second stopped Gradio's queue for everyone ("Queue is
    stopped"): the queue dropped a waiting session's messages. Now one address has at most
    5 events queued or running; the rest are refused (429), and another visitor's call,
    from a session that started before the flood, completes."""
    sample = file_data(next(path for path in demo.upload_dir.rglob("rocket.jpg")))
    expected = cu.predict_image(small_model[1], cu.sample_photo("rocket"), top_k=5)
    assert_classified(demo.classify(sample, session="before-flood"), expected)
    logged = len(demo.log.read_bytes())
    statuses = event_flood(demo, "127.0.0.7", 300, sample)
    assert sum(statuses.values()) == 300 and set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 300 - 5 * 4 * 4, statuses  # at most 5 at once from 4 connections
    assert_classified(demo.classify(sample, session="before-flood"), expected)
    assert_classified(demo.classify(sample), expected)
    log = demo.log.read_bytes()[logged:].decode(errors="replace")
    assert "Traceback" not in log and "KeyError" not in log, log
    assert demo.serving()


def test_a_boundary_trick_or_a_doubled_header_cannot_dodge_the_count_of_parts(demo):
    """BodyGuard's boundary regex read "xboundary=FAKE; boundary=REAL" as FAKE, and a doubled
    Content-Type was read last by it and first by Gradio: 1,000 one-byte files counted as one
    part. Now it reads the boundary as Gradio's parser does, refuses doubled headers, and an
    upload carries at most 10 files."""
    before = files_in(demo.upload_dir)
    real, fake = "REALb0undary", "FAKEb0undary"

    def parts(n, boundary=real):
        part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            'filename="f{}.bin"\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n'
        )
        return "".join(part.format(i) for i in range(n)).encode() + f"--{boundary}--\r\n".encode()

    def head(length, *content_types):
        lines = "".join(f"Content-Type: {kind}\r\n" for kind in content_types)
        return (f"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                f"{lines}\r\n").encode()  # fmt: skip

    trick = parts(1000) + f"\r\n--{fake}--\r\n".encode()  # an epilogue the parser ignores
    kind = f"multipart/form-data; xboundary={fake}; boundary={real}"
    assert raw_request(demo, head(len(trick), kind), trick)[0].startswith("HTTP/1.1 413 ")
    doubled = head(len(trick), f"multipart/form-data; boundary={real}",
                   f"multipart/form-data; boundary={fake}")  # fmt: skip
    assert raw_request(demo, doubled, trick)[0] == "HTTP/1.1 400 Bad Request"
    body = parts(1)  # two lengths: the server merges equal ones, refuses unequal ones
    twice = head(len(body), kind).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    assert raw_request(demo, twice, body)[0] == "HTTP/1.1 400 Bad Request"
    eleven = parts(11)
    answer = raw_request(demo, head(len(eleven), kind), eleven)[0]
    assert answer.startswith("HTTP/1.1 413 ")
    assert files_in(demo.upload_dir) == before
    with demo.client("127.0.0.11") as visitor:
        ten = [("files", (f"ten{i}.bin", os.urandom(100))) for i in range(10)]
        assert len(demo.upload(*[file for _, file in ten], http=visitor)) == 10
    assert demo.serving()


def test_the_file_routes_fetch_no_url(demo, recorder):
    """GET /gradio_api/file=https://... made the server fetch any public URL for the visitor
    (Gradio's secure_url_stream_response). Now any file name with a scheme is not found, on
    the deprecated /gradio_api/file/ route too, and nothing is fetched."""
    port = recorder.server_address[1]
    names = ["http://demo-outside.example/x", "https://demo-outside.example/x.png",
             f"http://127.0.0.1:{port}/x", "ftp://demo-outside.example/x"]  # fmt: skip
    for name in names:
        for route in ("file=", "file/"):
            assert demo.http.get(f"{route}{name}").status_code == 404, (route, name)
            assert demo.http.head(f"{route}{name}").status_code == 404, (route, name)
    time.sleep(0.5)
    assert recorder.requests == []
    assert demo.serving()


def test_the_deprecated_file_route_serves_only_the_sender(demo, small_model, tmp_path):
    """/gradio_api/file/<path> (Gradio's file_deprecated) served any visitor's upload: only
    /file= was checked."""
    photo, _ = visitor_photo(small_model, tmp_path, seed=9)
    with demo.client("127.0.0.9") as owner, demo.client("127.0.0.10") as snoop:
        (uploaded,) = demo.upload(photo, http=owner)
        canary(Path(uploaded))
        assert snoop.get(f"file/{uploaded}").status_code == 404
        assert snoop.get(f"file={uploaded}").status_code == 404
        assert not was_read(Path(uploaded))
        assert owner.get(f"file/{uploaded}").content == photo[1]
    assert demo.serving()


def icon_holding(folder: Path, side: int, kind: str) -> Path:
    """An ICO (or ICNS) whose one entry is a PNG of ``side`` x ``side`` black pixels (its
    directory says 256x256): Pillow decodes it to open the file."""
    import io
    import struct

    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 255)).save(buffer, "PNG", compress_level=1)
    png = buffer.getvalue()
    if kind == "ico":
        head = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32,
                                                          len(png), 22)  # fmt: skip
    else:
        entry = b"ic10" + struct.pack(">I", 8 + len(png))
        head = b"icns" + struct.pack(">I", 8 + len(entry) + len(png)) + entry
    path = folder / f"icon{side}.{kind}"
    path.write_bytes(head + png)
    return path


@pytest.mark.parametrize("kind", ["ico", "icns"])
def test_an_icon_is_not_opened(tmp_path, kind):
    """Pillow decoded an ICO's or ICNS's embedded PNG while opening it, before any pixel
    check (a 684 KB ICO of 13000x13000: 7 s, +646 MB). Only the photo formats are opened."""
    icon = icon_holding(tmp_path, 4000, kind)
    load = f"photos.load_image({str(icon)!r}, max_pixels=app.DEMO_MAX_PIXELS)"
    grew, result = peak_memory("import app\nimport cifar_utils.photos as photos", load)
    assert result == (
        f"ValueError: '{icon}' is not a readable image (UnidentifiedImageError: cannot "
        f"identify image file '{icon}'). Give a PNG, JPEG, BMP, GIF or WebP file (RGB, RGBA "
        "or greyscale)"
    )
    assert grew < 20, f"peak memory rose by {grew:.0f} MB (decoded: 64 MB)"


def test_a_jpeg_of_many_scans_is_refused_before_decoding(tmp_path):
    """Each scan of a JPEG is decoded over the whole image: a 136 KB progressive JPEG of 5.8
    megapixels with 6,000 repeated scans took 26 s of the demo's one worker."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 200)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    normal, many = tmp_path / "normal.jpg", tmp_path / "many.jpg"
    normal.write_bytes(data)
    many.write_bytes(data[:end] + data[last:end] * 30 + b"\xff\xd9")
    assert cu.load_image(normal).shape == (48, 64, 3)
    scans = data.count(b"\xff\xda") + 30
    with pytest.raises(ValueError) as refused:
        cu.load_image(many)
    assert str(refused.value) == (
        f"'many.jpg' is a JPEG of {scans} scans, more than the 20 this loader decodes (a "
        "progressive JPEG has about 10). Save it again as a plain (baseline) JPEG or a PNG "
        "and try again"
    )


def test_uploads_are_swept_by_age_and_the_samples_stay(tmp_path):
    """Gradio's delete_cache went by its process's in-memory sets (it died once on "Set
    changed size during iteration") and never saw a previous process's uploads."""

    old, young, sample = (
        tmp_path / "a" / "old.png",
        tmp_path / "b" / "young.png",
        tmp_path / "c" / "s.png",
    )
    for path in (old, young, sample):
        path.parent.mkdir()
        path.write_bytes(b"png")
    for path in (old, sample):
        os.utime(path, (1, 1))
    assert upload_guard.sweep_uploads(tmp_path, 600, keep={str(sample)}) == [str(old)]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b",
        "b/young.png",
        "c",
        "c/s.png",
    ]


def test_the_queue_never_drops_a_waiting_sessions_messages():
    """Gradio's LRU of session messages dropped the oldest session even while its event
    waited: the next message to it raised KeyError and stopped the queue for everyone."""
    from types import SimpleNamespace

    queue = SimpleNamespace(event_ids_to_events={})
    messages = upload_guard.SessionMessages(3, queue)
    for session in ("page", "a", "b"):
        messages[session] = []
    queue.event_ids_to_events = {"e1": SimpleNamespace(session_hash="page")}  # "page" waits
    messages["c"] = []
    messages["d"] = []
    assert list(messages) == ["page", "c", "d"]  # the oldest sessions with nothing waiting
    queue.event_ids_to_events = {}
    messages["e"] = []
    assert list(messages) == ["c", "d", "e"]


def test_a_second_demo_on_the_same_upload_folder_refuses_to_start(demo, small_model):
    """The upload folder is emptied at start-up: a second demo on it would delete the first
    one's uploads and sample photos."""
    samples = files_in(demo.upload_dir)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "GRADIO_TEMP_DIR": str(demo.upload_dir)}
    done = subprocess.run(
        [sys.executable, "app.py", "--model", str(small_model[0]), "--port", "1"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: another demo serves from the upload folder {demo.upload_dir}: stop it, or "
        "set GRADIO_TEMP_DIR to a folder of this demo's own"
    )
    assert samples and files_in(demo.upload_dir) >= samples
    assert demo.serving()
