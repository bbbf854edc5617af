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
* :func:`housekeeping`: leftovers Gradio never deletes are removed, at shutdown too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field

import gradio as gr
from gradio import utils as gradio_utils
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse

UPLOADS_PER_SESSION = 3  # of the uploads a session classified, older ones are deleted
DELETE_UPLOADS = (60, 600)  # gr.Blocks(delete_cache=): every minute, uploads over 10 minutes old
HOUSEKEEPING_SECONDS = 5  # how often finished sessions and deleted uploads are forgotten
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
        """Forget uploads no longer on disk as they were claimed (``delete_cache`` took them)."""
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


@dataclass
class _Body:
    """What :class:`BodyGuard` knows of one request body as it arrives."""

    length: int
    deadline: float
    boundary: bytes = b""  # b"--" + the multipart boundary, for an upload
    received: int = 0
    parts: int = 0
    tail: bytes = b""
    cut: str = ""  # why the body was cut off: TOO_SLOW, SHARE_FULL, UPLOADS_FULL, UNFINISHED
    done: bool = False  # its last chunk has arrived
    charge: list = field(default_factory=list)

    def cost(self) -> int:
        return max(self.length, self.received) + PART_BYTES * self.parts


class BodyGuard:
    """ASGI middleware: every request body is bounded in size, time and (uploads) disk.

    Gradio 6.31 has ``max_file_size`` (per file, used here too) and nothing else: no total,
    no share per visitor, no deadline, any Content-Type case on ``process_recording``
    (which keeps its files in the system's temporary folder for good), chunked bodies, and
    a multipart body never closed stores its partial file. Here, on every route:

    * a body needs a ``Content-Length`` and no ``Transfer-Encoding`` (411);
    * ``process_recording`` is closed (404), and so is any multipart body (Content-Type
      compared case-insensitively) off ``/gradio_api/upload``;
    * a body off the upload route is at most :data:`MAX_FORM_BYTES` (413);
    * a body has ``body_seconds`` plus its length at :data:`MIN_BODY_RATE` to arrive, else
      it is cut off (408) and what it sent stays charged to its sender;
    * an upload is admitted only if its sender's charges (:class:`Uploads`) plus its cost
      stay within ``share`` and the upload folder on disk (:func:`folder_bytes`) plus the
      uploads being received stay within ``budget`` (413); its cost is its length plus
      :data:`PART_BYTES` a part, counted as it arrives (cut off once it passes either);
      an upload whose multipart body is not closed is cut off (400);
    * an upload's charge stays with its sender while its files may stay on disk; upload
      files are served (``/gradio_api/file=``) only to the addresses that sent them, and the
      samples by the names the page knows (``hidden``, see :class:`LocalFilesBlocks`).
    """

    def __init__(self, app, *, folder, budget, share, body_seconds, uploads, samples, hidden):
        self.app, self.folder, self.budget, self.share = app, folder, budget, share
        self.body_seconds, self.uploads, self.samples = body_seconds, uploads, frozenset(samples)
        self.hidden = hidden  # a sample's path as the page knows it -> its path
        self.receiving = {}  # id -> _Body of the uploads admitted and not yet done
        self.used = 0  # the upload folder's size when last measured
        self.lock = asyncio.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        visitor, path = (scope.get("client") or ("?", 0))[0], scope["path"]
        if scope["method"] in ("GET", "HEAD"):
            before, found, name = path.partition("/file=")
            if found and name in self.hidden:  # a sample, named as the page knows it
                path = f"{before}/file={self.hidden[name]}"
                scope = {**scope, "path": path, "raw_path": path.encode()}
            if self._file_of_another(path, visitor):
                return await _answer(scope, receive, send, 404, "Not found.")
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        upload = path.rstrip("/").endswith("/gradio_api/upload")
        if path.rstrip("/").endswith("/process_recording") or (
            kind.startswith(b"multipart/") and not upload
        ):  # files reach the disk through the upload route only
            return await _answer(scope, receive, send, 404, "Not found.")
        length = headers.get(b"content-length", b"")
        if b"transfer-encoding" in headers or not length.isdigit():
            return await _answer(scope, receive, send, 411, "A body must give its Content-Length.")
        length = int(length)
        if not upload and length > MAX_FORM_BYTES:
            return await _answer(scope, receive, send, 413, "The request is too large.")
        body = _Body(length, time.monotonic() + self.body_seconds + length / MIN_BODY_RATE)
        if upload:
            match = re.search(rb'boundary="?([^";]+)', headers.get(b"content-type", b""), re.I)
            body.boundary = b"--" + (match.group(1) if match else b"")
            refusal = await self._admit(visitor, body)
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

        async def watched_send(message):
            if message["type"] == "http.response.start":
                started.append(message["status"])
            elif upload and started == [200] and message.get("body"):
                with contextlib.suppress(ValueError):
                    self.uploads.sent(visitor, json.loads(message["body"]))
            await send(message)

        try:
            await self.app(scope, guarded_receive, watched_send)
        except ClientDisconnect:
            if not started and body.cut:
                status = {TOO_SLOW: 408, UNFINISHED: 400}.get(body.cut, 413)
                await _answer(scope, receive, send, status, body.cut)
        finally:
            if upload:
                self.receiving.pop(id(body), None)
                kept = DELETE_UPLOADS[0] + DELETE_UPLOADS[1]  # until delete_cache takes it
                self.uploads.close_charge(body.charge, body.cost(), kept)
                if not self.receiving and (started != [200] or body.cut):
                    # no upload is under way: what is at the folder's top is a leftover
                    await asyncio.to_thread(remove_leftovers, self.folder, 0)

    async def _admit(self, visitor: str, body: _Body) -> str:
        """Why the upload ``body`` may not start, or "" if it may (then it is charged to
        ``visitor`` and counted as being received)."""
        if self.uploads.charged(visitor) + body.cost() > self.share:
            return SHARE_FULL
        async with self.lock:  # one measure at a time: two uploads cannot both take the room
            self.used = used = await asyncio.to_thread(folder_bytes, self.folder)
            if used + sum(b.cost() for b in self.receiving.values()) + body.cost() > self.budget:
                return UPLOADS_FULL
            body.charge = self.uploads.open_charge(visitor, body.cost())
            self.receiving[id(body)] = body
        return ""

    def _count(self, message: dict, body: _Body, visitor: str) -> None:
        """Count a chunk of an upload's body: its parts, and the closing boundary at its end."""
        chunk = message.get("body", b"")
        window = body.tail + chunk
        body.parts += window.count(body.boundary) - body.tail.count(body.boundary)
        body.received += len(chunk)
        body.tail = window[-(len(body.boundary) + 8) :]
        body.charge[0] = body.cost()
        if self.uploads.charged(visitor) > self.share:
            body.cut = SHARE_FULL
        elif self.used + sum(b.cost() for b in self.receiving.values()) > self.budget:
            body.cut = UPLOADS_FULL
        elif not message.get("more_body", False):
            if not body.tail.rstrip(b"\r\n").endswith(body.boundary + b"--"):
                body.cut = UNFINISHED

    def _file_of_another(self, path: str, visitor: str) -> bool:
        """Whether ``path`` asks Gradio's file route for an upload ``visitor`` did not send."""
        _, found, name = path.partition("/file=")
        if not found or not gradio_utils.is_in_or_equal(name, self.folder):  # as Gradio's check
            return False
        name = str(gradio_utils.abspath(name))  # e.g. ".." resolved, as the upload route names
        return name not in self.samples and not self.uploads.sent_by(name, visitor)


async def _answer(scope, receive, send, status: int, text: str) -> None:
    headers = {"connection": "close"} if status in (400, 408, 411, 413) else None
    await PlainTextResponse(text, status, headers=headers)(scope, receive, send)


def remove_leftovers(folder, age: float) -> list[str]:
    """Delete what Gradio leaves in its upload ``folder`` and never deletes, older than
    ``age`` seconds: files at the top level (the temporary files of uploads it refused or
    never finished) and empty folders (what ``delete_cache`` leaves of an upload). Both
    count against the upload budget. Returns the names removed."""
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


def housekeeping(blocks: gr.Blocks, guard: UploadGuard, sessions_kept: int, leftover_age):
    """A FastAPI lifespan: the queue keeps message queues for at most ``sessions_kept``
    sessions (Gradio's LRU of 2,000, lowered), and every ``HOUSEKEEPING_SECONDS`` finished
    sessions and deleted uploads are forgotten and the upload folder's leftovers older than
    ``leftover_age`` seconds (the longest a body may take) removed; at shutdown, all of them."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        blocks._queue.pending_messages_per_session.max_size = sessions_kept
        folder = gradio_utils.get_upload_folder()

        async def sweep():
            while True:
                await asyncio.sleep(HOUSEKEEPING_SECONDS)
                forget_finished_sessions(blocks._queue)
                await asyncio.to_thread(guard.forget_deleted)
                await asyncio.to_thread(guard.uploads.forget_deleted)
                await asyncio.to_thread(remove_leftovers, folder, leftover_age)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            remove_leftovers(folder, 0)

    return lifespan
