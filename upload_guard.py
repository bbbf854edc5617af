"""What the web demo (``app.py``) guards: which files a classify call reads, which URLs it never
fetches, and what a request body may cost in disk and time (see ``docs/demo-security.md``).

Gradio 6.31 checks a file an event names only when the payload carries FileData's ``meta``,
never asks who uploaded it, fetches any ``http(s)://`` path an event names, and lets its
upload route (no session) take 1,000 files a request with no total, no per-visitor share and
no deadline for the body. It has switches for none of that, so this module holds our own:

* :class:`UploadGuard`: a classify call reads a sample photo or an upload of its own session,
  uploaded from the same address (:class:`Uploads` knows who sent what).
* :class:`LocalFilesBlocks`: no URL named in a request is ever fetched.
* :class:`BodyGuard` (ASGI middleware): every request body, on every route, has a
  ``Content-Length``, a size cap, a deadline and (for uploads) a place in the disk budget
  and in its visitor's share; bodies of any other route may not be multipart;
  ``process_recording`` is closed; upload files are served only to the address that sent them.
* :func:`housekeeping`: the queue never drops a waiting session's messages; uploads are
  deleted when 10 minutes old (:func:`sweep_uploads`, in place of Gradio's ``delete_cache``),
  and the upload folder is emptied at start-up and shutdown (:func:`empty_folder`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

import gradio as gr
from gradio import utils as gradio_utils
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse

UPLOADS_PER_SESSION = 3  # of the uploads a session classified, older ones are deleted
UPLOAD_SECONDS = 600  # uploads are deleted when this old (seconds)
#: How often finished sessions and deleted uploads are forgotten, uploads over
#: UPLOAD_SECONDS old deleted and the upload folder measured.
HOUSEKEEPING_SECONDS = 5
MAX_UPLOAD_FILES = 10  # files one upload request may carry (the page sends one)
#: Events one visitor (client address) may have queued or running at once; more are
#: refused (429) before Gradio's queue sees them.
MAX_VISITOR_EVENTS = 5
#: What a file costs on disk beyond its bytes (its folder, its last block, its inode): a
#: request is charged this for each part of its multipart body.
PART_BYTES = 8192
#: Largest body of any route but the upload route (the page's JSON calls take a few KB).
MAX_FORM_BYTES = 1 << 20
#: A body's deadline is ``body_seconds`` plus its length at this rate (bytes a second).
MIN_BODY_RATE = 100_000
REFUSED = (
    "This demo reads only photos uploaded from its page in this session, and its sample "
    "photos. Upload the photo again."
)
UPLOADS_FULL = "The demo's space for uploads is full. Try again in a few minutes."
SHARE_FULL = "Your uploads fill your share of this demo's space. Try again in a few minutes."
TOO_SLOW = "The request's body came too slowly and was cut off."
UNFINISHED = "The upload's body ended before its last part was closed; nothing was kept."
TOO_MANY_FILES = f"An upload may carry at most {MAX_UPLOAD_FILES} files."
BUSY = (
    f"You have {MAX_VISITOR_EVENTS} requests waiting already. Wait for their results and try again."
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, file:, data:, ...


def _refused() -> gr.Error:
    return gr.Error(REFUSED, title="Cannot classify this file", print_exception=False)


def _identity(path: str) -> tuple[int, int]:
    """Tells two files at one path apart: Gradio writes every upload as a new file renamed
    into place, so the same photo uploaded again is a new inode at the same path."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


class Uploads:
    """Who sent what: each visitor's (client address's) charges against its share, and the
    addresses that uploaded each path. Shared by :class:`BodyGuard` (the event loop) and
    :class:`UploadGuard` (Gradio's worker threads)."""

    def __init__(self):
        self.charges = {}  # visitor -> [[bytes, expires (monotonic) or None while open]]
        self.senders = {}  # path -> visitors that uploaded it
        self.lock = threading.Lock()

    def charged(self, visitor: str) -> int:
        """Bytes ``visitor`` holds now: its bodies being received, its kept uploads and the
        leftovers of its refused ones, until they expire."""
        now = time.monotonic()
        with self.lock:
            live = [c for c in self.charges.get(visitor, []) if c[1] is None or c[1] > now]
            if live:
                self.charges[visitor] = live
            else:
                self.charges.pop(visitor, None)
            return sum(c[0] for c in live)

    def open_charge(self, visitor: str, size: int) -> list:
        """A charge of ``size`` bytes held by ``visitor`` until :meth:`close_charge`."""
        charge = [size, None]
        with self.lock:
            self.charges.setdefault(visitor, []).append(charge)
        return charge

    def close_charge(self, charge: list, size: int, seconds: float) -> None:
        """Keep ``size`` bytes of ``charge`` for ``seconds`` more (as long as its files may
        stay on disk)."""
        with self.lock:
            charge[0], charge[1] = size, time.monotonic() + seconds

    def sent(self, visitor: str, paths) -> None:
        with self.lock:
            for path in paths:
                self.senders.setdefault(path, set()).add(visitor)

    def sent_by(self, path: str, visitor: str) -> bool:
        with self.lock:
            return visitor in self.senders.get(path, ())

    def forget_deleted(self) -> None:
        with self.lock:
            for path in [p for p in self.senders if not os.path.exists(p)]:
                del self.senders[path]


class UploadGuard:
    """Which file a classify call may read: a sample photo, or an upload of its own session.

    Gradio 6.31 checks a file an event's payload names only when the payload carries
    FileData's ``meta`` (``processing_utils.async_move_files_to_cache`` passes any other dict
    through; with ``preprocess=False`` nothing else looks), and never asks who uploaded a
    file. So :meth:`path_for` runs Gradio's own folder check (``utils.is_allowed_file``, as
    its file route does) on every payload, accepts only files Gradio's upload route wrote
    (``Blocks.upload_file_set``) from the caller's own address (:class:`Uploads`), and gives
    each file to the sessions that name it from there; a new file at the same path (the same
    photo uploaded again) adds the session naming it and takes no one's away. A session keeps
    the last ``UPLOADS_PER_SESSION`` uploads it named: older ones are deleted. Every refusal
    is the one :data:`REFUSED` message, whatever the path, so it tells nothing about what
    exists.
    """

    def __init__(self, blocks: gr.Blocks, samples, uploads: Uploads):
        self.blocks, self.samples, self.uploads = blocks, frozenset(samples), uploads
        self.owners = {}  # path -> (_identity, sessions)
        self.kept = {}  # session -> its uploads' paths, oldest first
        self.lock = threading.Lock()

    def path_for(self, payload: dict, session: str, visitor: str) -> str:
        """The path ``payload`` names if this session (from address ``visitor``) may read it;
        raises gr.Error otherwise."""
        path = payload.get("path")
        if path in self.samples:
            return path
        if not (isinstance(path, str) and path in self.blocks.upload_file_set):
            raise _refused()
        in_folder, _ = gradio_utils.is_allowed_file(
            gradio_utils.abspath(path),
            blocked_paths=self.blocks.blocked_paths,
            allowed_paths=[],
            created_paths=[gradio_utils.get_upload_folder()],
        )
        if not in_folder:  # e.g. a symbolic link put in place of an upload
            raise _refused()
        with self.lock:
            try:
                identity = _identity(path)
            except OSError:  # deleted meanwhile
                raise _refused() from None
            identity_then, sessions = self.owners.get(path, (None, set()))
            if session in sessions:
                return path
            if identity == identity_then or not self.uploads.sent_by(path, visitor):
                raise _refused()  # another session's upload, or another address's
            self.owners[path] = identity, sessions | {session}
            self.kept.setdefault(session, []).append(path)
            for old in self.kept[session][:-UPLOADS_PER_SESSION]:
                self._forget(old)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
                self.blocks.upload_file_set.discard(old)
        return path

    def _forget(self, path: str) -> None:
        """Drop ``path`` and its sessions' claims on it (call with the lock held)."""
        _, sessions = self.owners.pop(path)
        for session in sessions:
            self.kept[session].remove(path)
            if not self.kept[session]:
                del self.kept[session]

    def forget_deleted(self) -> None:
        """Forget uploads no longer on disk as they were claimed (the sweep took them)."""
        with self.lock:
            for path, (identity, _) in list(self.owners.items()):
                try:
                    gone = _identity(path) != identity
                except OSError:
                    gone = True
                if gone:
                    self._forget(path)


def _local_files_only(value, hidden: dict):
    """``value`` (an event's input as the request gave it) with every file payload's ``url``
    dropped and a sample's path as the page knows it (``hidden``) made the server's again;
    raises the :data:`REFUSED` gr.Error if a payload's ``path`` is not a local path
    (``http://...``, ``https://...`` or any other scheme)."""
    if isinstance(value, list):
        return [_local_files_only(item, hidden) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _local_files_only(item, hidden) for key, item in value.items()}
    if "path" in value:
        if isinstance(value["path"], str) and _SCHEME.match(value["path"]):
            raise _refused()
        value.pop("url", None)  # the page sends its own file URL there; Gradio sets it anew
        if isinstance(value["path"], str) and value["path"] in hidden:
            value["path"] = hidden[value["path"]]
    return value


def hide_folder(value, folder: str, hidden: dict) -> None:
    """Rewrite in place every file payload in ``value`` (a page's config) whose path is in
    ``folder`` to name it relative to it, in its ``path`` and ``url``; ``hidden`` gets
    relative -> absolute path."""
    if isinstance(value, list):
        for item in value:
            hide_folder(item, folder, hidden)
    elif isinstance(value, dict):
        for item in value.values():
            hide_folder(item, folder, hidden)
        path = value.get("path")
        if isinstance(path, str) and path.startswith(folder + os.sep):
            relative = path[len(folder) + 1 :]
            hidden[relative] = path
            value["path"] = relative
            if isinstance(value.get("url"), str):
                value["url"] = value["url"].replace(path, relative)


class LocalFilesBlocks(gr.Blocks):
    """gr.Blocks whose events never make the server fetch a URL a request names.

    Gradio 6.31 downloads the file at any ``http(s)://`` URL that an event's input names as
    a FileData ``path`` (``Block.async_move_resource_to_block_cache``, through safehttpx)
    before the event's function runs, whatever the component and even with
    ``preprocess=False``; nothing caps its size and there is no option to turn it off. So
    :meth:`preprocess_data` first refuses any input naming a ``path`` that is not local and
    drops the ``url`` of every file payload (:func:`_local_files_only`).

    Its config (``/config``, the page, the API info) names the example files relative to the
    upload folder, whose absolute path is no visitor's business (:func:`hide_folder`):
    ``hidden_paths`` maps them back, for events and (:class:`BodyGuard`) the file route.
    """

    def __init__(self, *args, **kwargs):
        self.hidden_paths = {}  # filled, never replaced: BodyGuard holds it
        super().__init__(*args, **kwargs)

    def get_config_file(self):
        config = super().get_config_file()
        hide_folder(config, gradio_utils.get_upload_folder(), self.hidden_paths)
        return config

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        inputs = [_local_files_only(value, self.hidden_paths) for value in inputs]
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)


def folder_bytes(folder) -> int:
    """The disk space the files and folders under ``folder`` take: each its size, or its
    blocks if more (as ``du``), and at least 4 KB; 0 if the folder does not exist."""
    total, folders = 0, [folder]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:  # deleted meanwhile
            continue
        with entries:
            for entry in entries:
                try:
                    status = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += max(status.st_size, status.st_blocks * 512, 4096)
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return total


class UploadSpace:
    """The disk the upload folder takes: measured (:func:`folder_bytes`) off the request path
    by the housekeeping every ``HOUSEKEEPING_SECONDS``, plus the uploads finished since the
    measure began. (Measuring it on every upload took about 1 s at 121,000 files.)"""

    def __init__(self, folder):
        self.folder, self.measured, self.finished = folder, 0, 0
        self.lock = threading.Lock()  # measure() runs in a worker thread

    def measure(self) -> None:
        with self.lock:
            counted = self.finished
        size = folder_bytes(self.folder)
        with self.lock:  # what finished during the scan stays counted (at worst twice)
            self.measured, self.finished = size, self.finished - counted

    def add(self, size: int) -> None:
        """Count an upload that finished, ``size`` bytes (its cost, files kept or not)."""
        with self.lock:
            self.finished += size

    def used(self) -> int:
        with self.lock:
            return self.measured + self.finished


@dataclass
class _Body:
    """What :class:`BodyGuard` knows of one request body as it arrives."""

    length: int
    deadline: float
    boundary: bytes = b""  # b"--" + the multipart boundary, for an upload
    received: int = 0
    parts: int = 0
    tail: bytes = b""
    cut: str = ""  # why it was cut off: TOO_SLOW, SHARE_FULL, UPLOADS_FULL, TOO_MANY_FILES, ...
    done: bool = False  # its last chunk has arrived
    charge: list = field(default_factory=list)

    def cost(self) -> int:
        return max(self.length, self.received) + PART_BYTES * self.parts


class BodyGuard:
    """ASGI middleware: every request body is bounded in size, time and (uploads) disk, every
    visitor's queued events in number, and the file routes serve only a visitor's own files.

    Gradio 6.31 has ``max_file_size`` (per file, used here too) and a queue size (set in
    ``app.py``), and nothing else: no total, no share per visitor, no deadline, 1,000 files
    a request, any Content-Type case on ``process_recording`` (which keeps its files in the
    system's temporary folder for good), chunked bodies, a multipart body never closed
    stores its partial file, one address may fill the whole queue, and its file routes
    fetch any URL (``/file=https://...``) and serve any upload (``/file/<path>``, unchecked).
    Here, on every route:

    * a ``Content-Type``, ``Content-Length`` or ``Transfer-Encoding`` header given twice is
      refused (400): Starlette reads the first, a dict the last;
    * ``/file=`` or ``/file/`` naming a URL (any scheme) is not found (404);
    * a body needs a ``Content-Length`` and no ``Transfer-Encoding`` (411);
    * ``process_recording`` is closed (404), and so is any multipart body (Content-Type
      compared case-insensitively) off ``/gradio_api/upload``;
    * a body off the upload route is at most :data:`MAX_FORM_BYTES` (413);
    * an event (``queue/join``, ``call/...``, ``run/...``) is refused (429) while its visitor
      has :data:`MAX_VISITOR_EVENTS` queued, running or being sent (``pending``);
    * a body has ``body_seconds`` plus its length at :data:`MIN_BODY_RATE` to arrive, else
      it is cut off (408) and what it sent stays charged to its sender;
    * an upload is admitted only if its sender's charges (:class:`Uploads`) plus its cost
      stay within ``share`` and the upload folder (:class:`UploadSpace`) plus the uploads
      being received stay within ``budget`` (413); its cost is its length plus
      :data:`PART_BYTES` a part, counted as it arrives with the boundary Gradio's parser
      reads (cut off once it passes either, or :data:`MAX_UPLOAD_FILES` parts); an upload
      whose multipart body is not closed is cut off (400);
    * an upload's charge stays with its sender while its files may stay on disk; upload
      files are served (``/gradio_api/file=``, ``/gradio_api/file/``) only to the addresses
      that sent them, and the samples by the names the page knows (``hidden``, see
      :class:`LocalFilesBlocks`).
    """

    def __init__(self, app, *, space, budget, share, body_seconds, upload_seconds, uploads,
                 samples, hidden, pending):  # fmt: skip
        self.app, self.space, self.folder = app, space, space.folder
        self.upload_seconds = upload_seconds  # how old uploads are when the sweep deletes them
        self.budget, self.share, self.body_seconds = budget, share, body_seconds
        self.uploads, self.samples = uploads, frozenset(samples)
        self.hidden = hidden  # a sample's path as the page knows it -> its path
        self.pending = pending  # visitor -> its events in Gradio's queue (queued or running)
        self.sending = {}  # visitor -> its event requests not yet answered
        self.receiving = {}  # id -> _Body of the uploads admitted and not yet done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        visitor, path = (scope.get("client") or ("?", 0))[0], scope["path"]
        names = [name.lower() for name, _ in scope["headers"]]
        if any(names.count(n) > 1 for n in (b"content-type", b"content-length",
                                            b"transfer-encoding")):  # fmt: skip
            return await _answer(scope, receive, send, 400, "A header is given twice.")
        if scope["method"] in ("GET", "HEAD"):
            route, name = _file_route(path)
            if route and name in self.hidden:  # a sample, named as the page knows it
                name = self.hidden[name]
                scope = {**scope, "path": route + name, "raw_path": (route + name).encode()}
            # a URL: Gradio would fetch it for the visitor
            if route and (_SCHEME.match(name) or self._file_of_another(name, visitor)):
                return await _answer(scope, receive, send, 404, "Not found.")
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind, options = parse_options_header(headers.get(b"content-type", b""))
        upload = path.rstrip("/").endswith("/gradio_api/upload")
        if path.rstrip("/").endswith("/process_recording") or (
            kind.lower().startswith(b"multipart/") and not upload
        ):  # files reach the disk through the upload route only
            return await _answer(scope, receive, send, 404, "Not found.")
        length = headers.get(b"content-length", b"")
        if b"transfer-encoding" in headers or not length.isdigit():
            return await _answer(scope, receive, send, 411, "A body must give its Content-Length.")
        length = int(length)
        if not upload and length > MAX_FORM_BYTES:
            return await _answer(scope, receive, send, 413, "The request is too large.")
        event = _EVENT_ROUTE.search(path) is not None
        if event and self.pending(visitor) + self.sending.get(visitor, 0) >= MAX_VISITOR_EVENTS:
            return await _answer(scope, receive, send, 429, BUSY)
        body = _Body(length, time.monotonic() + self.body_seconds + length / MIN_BODY_RATE)
        if upload:
            body.boundary = b"--" + options.get(b"boundary", b"")  # as Gradio's parser reads it
            refusal = self._admit(visitor, body)
            if refusal:
                return await _answer(scope, receive, send, 413, refusal)
        started = []

        async def guarded_receive():
            if body.cut:
                return {"type": "http.disconnect"}
            if body.done:  # the deadline is the body's: a listener for disconnects waits on
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), body.deadline - time.monotonic())
            except TimeoutError:
                body.cut = TOO_SLOW
                return {"type": "http.disconnect"}
            body.done = not message.get("more_body", False)
            if message["type"] == "http.request" and upload:
                self._count(message, body, visitor)
            return {"type": "http.disconnect"} if body.cut else message

        def answered():
            if event and not started:  # from now on the event is in Gradio's queue, if at all
                self.sending[visitor] -= 1
                if not self.sending[visitor]:
                    del self.sending[visitor]

        async def watched_send(message):
            if message["type"] == "http.response.start":
                answered()
                started.append(message["status"])
            elif upload and started == [200] and message.get("body"):
                with contextlib.suppress(ValueError):
                    self.uploads.sent(visitor, json.loads(message["body"]))
            await send(message)

        if event:
            self.sending[visitor] = self.sending.get(visitor, 0) + 1
        try:
            await self.app(scope, guarded_receive, watched_send)
        except ClientDisconnect:
            if not started and body.cut:
                status = {TOO_SLOW: 408, UNFINISHED: 400}.get(body.cut, 413)
                await _answer(scope, receive, send, status, body.cut)
        finally:
            answered()
            if upload:
                self.receiving.pop(id(body), None)
                self.space.add(body.cost())
                kept = self.upload_seconds + 2 * HOUSEKEEPING_SECONDS  # until the sweep takes it
                self.uploads.close_charge(body.charge, body.cost(), kept)
                if not self.receiving and (started != [200] or body.cut):
                    # no upload is under way: what is at the folder's top is a leftover
                    await asyncio.to_thread(remove_leftovers, self.folder, 0)

    def _admit(self, visitor: str, body: _Body) -> str:
        """Why the upload ``body`` may not start, or "" if it may (then it is charged to
        ``visitor`` and counted as being received)."""
        if self.uploads.charged(visitor) + body.cost() > self.share:
            return SHARE_FULL
        if self._used() + body.cost() > self.budget:
            return UPLOADS_FULL
        body.charge = self.uploads.open_charge(visitor, body.cost())
        self.receiving[id(body)] = body
        return ""

    def _used(self) -> int:
        """Disk the upload folder takes, with the uploads being received at their cost."""
        return self.space.used() + sum(b.cost() for b in self.receiving.values())

    def _count(self, message: dict, body: _Body, visitor: str) -> None:
        """Count a chunk of an upload's body: its parts, and the closing boundary at its end."""
        chunk = message.get("body", b"")
        window = body.tail + chunk
        body.parts += window.count(body.boundary) - body.tail.count(body.boundary)
        body.received += len(chunk)
        body.tail = window[-(len(body.boundary) + 8) :]
        body.charge[0] = body.cost()
        if body.parts > MAX_UPLOAD_FILES + 1:  # a boundary before each part, one closing
            body.cut = TOO_MANY_FILES
        elif self.uploads.charged(visitor) > self.share:
            body.cut = SHARE_FULL
        elif self._used() > self.budget:
            body.cut = UPLOADS_FULL
        elif not message.get("more_body", False):
            if not body.tail.rstrip(b"\r\n").endswith(body.boundary + b"--"):
                body.cut = UNFINISHED

    def _file_of_another(self, name: str, visitor: str) -> bool:
        """Whether the file route's ``name`` is an upload ``visitor`` did not send."""
        if not gradio_utils.is_in_or_equal(name, self.folder):  # as Gradio's check
            return False
        name = str(gradio_utils.abspath(name))  # e.g. ".." resolved, as the upload route names
        return name not in self.samples and not self.uploads.sent_by(name, visitor)


#: Routes that put an event in Gradio's queue (``call/<api>`` and ``call/v2/<api>`` too).
_EVENT_ROUTE = re.compile(r"/(queue/join|call/|run/)")


def _file_route(path: str) -> tuple[str, str]:
    """``(route, name)`` if ``path`` asks a file route for ``name`` (``.../file=<name>``, or
    Gradio's older ``.../gradio_api/file/<name>``), else ``("", "")``."""
    before, found, name = path.partition("/file=")
    if found:
        return before + found, name
    before, found, name = path.partition("/gradio_api/file/")
    return (before + found, name) if found else ("", "")


async def _answer(scope, receive, send, status: int, text: str) -> None:
    headers = {"connection": "close"} if status in (400, 408, 411, 413, 429) else None
    await PlainTextResponse(text, status, headers=headers)(scope, receive, send)


def remove_leftovers(folder, age: float) -> list[str]:
    """Delete what Gradio leaves in its upload ``folder`` and never deletes, older than
    ``age`` seconds: files at the top level (the temporary files of uploads it refused or
    never finished) and empty folders. Both count against the upload budget. Returns the
    names removed."""
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):  # gone or filled meanwhile: next sweep
                if now - entry.stat(follow_symlinks=False).st_mtime < age:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    os.rmdir(entry.path)  # only an empty one
                else:
                    os.remove(entry.path)
                removed.append(entry.name)
    return removed


def sweep_uploads(folder, age: float, keep=frozenset()) -> list[str]:
    """Delete the uploads in ``folder`` (``<folder>/<hash>/<name>``, as Gradio writes them)
    older than ``age`` seconds but those in ``keep``, then the folders they leave empty and
    :func:`remove_leftovers` older than ``age``. Returns the uploads' paths removed.

    In place of Gradio's ``delete_cache``, which goes by what its process remembers (sets
    that once raised "Set changed size during iteration" and stopped deleting for good), and
    keeps a previous process's uploads forever."""
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        folders = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    for inside in folders:
        emptied = False
        with contextlib.suppress(OSError), os.scandir(inside) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # gone meanwhile
                    old = now - entry.stat(follow_symlinks=False).st_mtime >= age
                    if old and entry.path not in keep and not entry.is_dir(follow_symlinks=False):
                        os.remove(entry.path)
                        removed.append(entry.path)
                        emptied = True
        if emptied:
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(inside)
    remove_leftovers(folder, age)
    return removed


def empty_folder(folder) -> None:
    """Delete everything in ``folder`` (the demo's own upload folder), keeping the folder."""
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in list(entries):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.remove(entry.path)


def forget_finished_sessions(queue) -> None:
    """Drop Gradio's queue record of sessions that have nothing left to receive.

    Gradio 6.31 never removes a session's entry from ``Queue.pending_event_ids_session``
    once its results are delivered, nor when its message queue has been evicted from
    ``pending_messages_per_session`` (an LRU); as every ``/call`` request is a new session,
    that dict grows without end. Runs on the server's event loop, between Gradio's updates.
    """
    pending, queues = queue.pending_event_ids_session, queue.pending_messages_per_session
    for session in [s for s, ids in pending.items() if not ids or s not in queues]:
        del pending[session]


class SessionMessages(gradio_utils.LRUCache):
    """Gradio's per-session message queues, keeping at most ``max_size`` sessions, that
    never drops the messages of a session with an event queued or running.

    Gradio's LRU (2,000 sessions) drops the oldest session whatever it waits for; the next
    message to it raises KeyError in ``Queue.send_message`` and stops the queue for every
    visitor ("Queue is stopped"): a page visitor's session is the oldest while ~200 ``/call``
    requests flood in. Sessions with events number at most the queue's ``max_size`` plus the
    events running, so with ``max_size`` well above that there is always one to drop.
    """

    def __init__(self, max_size: int, queue):
        super().__init__(max_size)
        self.queue = queue

    def __setitem__(self, key, value) -> None:
        if key not in self and len(self) >= self.max_size:
            waiting = {event.session_hash for event in self.queue.event_ids_to_events.values()}
            oldest = next((session for session in self if session not in waiting), None)
            if oldest is not None:
                del self[oldest]
        if key in self:
            self.move_to_end(key)
        collections.OrderedDict.__setitem__(self, key, value)


def visitor_events(queue, visitor: str) -> int:
    """How many events ``visitor`` (a client address) has in Gradio's ``queue``, queued or
    running."""
    requests = (event.request for event in list(queue.event_ids_to_events.values()))
    return sum(1 for r in requests if r is not None and r.client and r.client.host == visitor)


def housekeeping(blocks: gr.Blocks, guard: UploadGuard, space: UploadSpace, sessions_kept: int,
                 age: float):  # fmt: skip
    """A FastAPI lifespan: the queue keeps message queues for at most ``sessions_kept``
    sessions, never a waiting one's (:class:`SessionMessages`), and every
    ``HOUSEKEEPING_SECONDS`` finished sessions and deleted uploads are forgotten, uploads
    older than ``age`` seconds deleted (:func:`sweep_uploads`; the samples stay) and the
    upload folder measured (``space``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        queue = blocks._queue
        messages = SessionMessages(sessions_kept, queue)
        messages.update(queue.pending_messages_per_session)
        queue.pending_messages_per_session = messages
        space.measure()

        async def sweep():
            while True:
                await asyncio.sleep(HOUSEKEEPING_SECONDS)
                forget_finished_sessions(queue)
                removed = await asyncio.to_thread(sweep_uploads, space.folder, age, guard.samples)
                blocks.upload_file_set.difference_update(removed)
                await asyncio.to_thread(guard.forget_deleted)
                await asyncio.to_thread(guard.uploads.forget_deleted)
                await asyncio.to_thread(space.measure)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()

    return lifespan
