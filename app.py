"""Web demo: classify a photo with a trained CIFAR-100 model (Gradio, local and offline).

    python app.py --model results/efficientnet_b0.keras [--host 127.0.0.1] [--port 7860]

Upload or paste a photo (any size or mode, read exactly as ``cu.predict_image`` reads it)
and see the top-5 of the 100 classes; scikit-image's sample photos are one click away. The
model's name, size and test top-1 come from the results file beside it
(``results/<model>.json``). Nothing is sent anywhere: no analytics, no share link, no fonts
or scripts from other sites.

The server reads only the sample photos and files Gradio received as uploads, each for the
session that uploaded it (:class:`UploadGuard`), and never fetches a URL a request names
(:class:`LocalFilesBlocks`). Uploads are deleted after ``DELETE_UPLOADS[1]`` seconds and when
the server stops (Ctrl-C or SIGTERM), and a session keeps at most ``UPLOADS_PER_SESSION`` of
the photos it classified; the upload route takes no session, though, so what bounds the disk
is :class:`UploadBudget` (``--upload-budget-mb``, all visitors together). What Gradio
remembers per session is bounded by ``SESSIONS_KEPT`` (see :func:`forget_finished_sessions`).
"""

import os

#: Sessions whose state Gradio keeps (``state_session_capacity``) and whose messages its
#: queue holds, and events it keeps statistics of: every ``/call`` request is a new session,
#: and Gradio's defaults (10,000 states of ~25 KB) let memory grow by ~250 MB before it levels
#: off. Far more than the sessions whose events run at one time.
SESSIONS_KEPT = 200
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry
os.environ["GRADIO_ANALYTICS_MAX_EVENTS"] = str(SESSIONS_KEPT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from gradio import utils as gradio_utils  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402

import cifar_utils as cu  # noqa: E402

UPLOADS_PER_SESSION = 3  # of the uploads a session classified, older ones are deleted
UPLOAD_BUDGET_MB = 500  # disk the upload folder may take, all visitors together (UploadBudget)
DELETE_UPLOADS = (60, 600)  # gr.Blocks(delete_cache=): every minute, uploads over 10 minutes old
HOUSEKEEPING_SECONDS = 5  # how often finished sessions and deleted uploads are forgotten
REFUSED = (
    "This demo reads only photos uploaded from its page in this session, and its sample "
    "photos. Upload the photo again."
)
UPLOADS_FULL = "The demo's space for uploads is full. Try again in a few minutes."
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, file:, data:, ...


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe_model(model_path) -> str:
    """Markdown naming the model, its parameter count and test top-1 from its results file.

    The results file sits beside the model: same folder and stem, ``.json`` (fields
    ``model``, ``params`` (a dict with ``total``, or an int), ``test_top1``,
    ``full_cifar100``). A missing or unreadable file gives a plain note naming it; fields
    that are missing or of the wrong type show as "?".
    """
    name, results = Path(model_path).name, Path(model_path).with_suffix(".json")
    if not results.is_file():
        return f"Model `{name}`: no results file (`{results.name}`) beside it."
    try:
        record = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # half-written, not JSON, unreadable
        return f"Model `{name}`: its results file `{results.name}` is unreadable ({exc})."
    if not isinstance(record, dict):
        return f"Model `{name}`: its results file `{results.name}` holds no results record."
    params = cu.total_params(record.get("params"))
    top1 = record.get("exported_test_top1", record.get("test_top1"))  # this file's figure
    text = (
        f"Model **{record.get('model', Path(model_path).stem)}** · "
        f"{f'{params:,}' if params is not None else '?'} parameters · "
        f"test top-1 {f'{top1:.3f}' if _is_number(top1) else '?'}"
    )
    if record.get("full_cifar100") is not True:
        text += " (not a full CIFAR-100 run: a quick run or other data)"
    return text + f" · from `{results.name}`"


def _refused() -> gr.Error:
    return gr.Error(REFUSED, title="Cannot classify this file", print_exception=False)


def _identity(path: str) -> tuple[int, int]:
    """Tells two files at one path apart: Gradio writes every upload as a new file renamed
    into place, so the same photo uploaded again is a new inode at the same path. (An inode
    number freed by a deletion may come back for a new upload; then that upload is refused
    until :meth:`UploadGuard.forget_deleted` has run.)"""
    status = os.stat(path)
    return status.st_dev, status.st_ino


class UploadGuard:
    """Which file a classify call may read: a sample photo, or an upload of its own session.

    Gradio 6.31 checks a file an event's payload names only when the payload carries
    FileData's ``meta`` (``processing_utils.async_move_files_to_cache`` passes any other dict
    through, and ``gr.Image``'s data model does not require it; with ``preprocess=False``
    nothing else looks, and ``gr.Image``'s preprocess would open the path with PIL just the
    same), and it never asks who uploaded a file: ``/gradio_api/upload`` takes no session,
    and any file in its upload folder passes. (A payload with ``meta`` naming a file outside
    that folder is refused by Gradio before classify runs, with no message for the client.)
    So :meth:`path_for` runs Gradio's
    own folder check (``utils.is_allowed_file``, as its file route does: ``..`` and symbolic
    links resolved, ``blocked_paths`` honoured) on every payload, accepts only files Gradio's
    upload route wrote (``Blocks.upload_file_set``, what ``delete_cache`` deletes), and gives
    each upload to the first session that names it; a new upload of the same photo is a new
    file (:func:`_identity`), free for the session that sent it. A session keeps the last
    ``UPLOADS_PER_SESSION`` uploads it named: older ones are deleted (uploads no call names
    are bounded by :class:`UploadBudget` alone). Every refusal is the one
    :data:`REFUSED` message, whatever the path, so it tells nothing about what exists.
    """

    def __init__(self, blocks: gr.Blocks, samples):
        self.blocks, self.samples = blocks, frozenset(samples)
        self.owners = {}  # path -> (_identity, session)
        self.kept = {}  # session -> its uploads' paths, oldest first
        self.lock = threading.Lock()

    def path_for(self, payload: dict, session: str) -> str:
        """The path ``payload`` names if this session may read it; raises gr.Error otherwise."""
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
            owner = self.owners.get(path)
            if owner is not None and owner[0] == identity:
                if owner[1] != session:  # another session's upload
                    raise _refused()
                return path
            if owner is not None:  # an earlier upload at this path, replaced by this one
                self._forget(path)
            self.owners[path] = identity, session
            self.kept.setdefault(session, []).append(path)
            for old in self.kept[session][:-UPLOADS_PER_SESSION]:
                self._forget(old)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
                self.blocks.upload_file_set.discard(old)
        return path

    def _forget(self, path: str) -> None:
        """Drop ``path``'s owner (call with the lock held)."""
        _, session = self.owners.pop(path)
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


def _local_files_only(value):
    """``value`` (an event's input as the request gave it) with every file payload's ``url``
    dropped; raises the :data:`REFUSED` gr.Error if a payload's ``path`` is not a local path
    (``http://...``, ``https://...`` or any other scheme)."""
    if isinstance(value, list):
        return [_local_files_only(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _local_files_only(item) for key, item in value.items()}
    if "path" in value:
        if isinstance(value["path"], str) and _SCHEME.match(value["path"]):
            raise _refused()
        value.pop("url", None)  # the page sends its own file URL there; Gradio sets it anew
    return value


class LocalFilesBlocks(gr.Blocks):
    """gr.Blocks whose events never make the server fetch a URL a request names.

    Gradio 6.31 downloads the file at any ``http(s)://`` URL that an event's input names as
    a FileData ``path`` (with FileData's ``meta``): ``Blocks.preprocess_data`` hands every
    input to ``processing_utils.async_move_files_to_cache``, whose component then fetches
    it (``Block.async_move_resource_to_block_cache``, through safehttpx) into the upload
    folder, before the event's function (and :class:`UploadGuard`) runs, whatever the
    component and even with ``preprocess=False``. Nothing caps its size (``max_file_size``
    is the upload route's), only public hosts are refused, and there is no option to turn it
    off. (FileData's ``url`` of an input is not fetched in 6.31 unless the component proxies
    a loaded app.) So :meth:`preprocess_data` first refuses, with the one :data:`REFUSED`
    message, any input naming a ``path`` that is not a local path, and drops the ``url``
    of every file payload (see :func:`_local_files_only`).
    """

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        inputs = [_local_files_only(value) for value in inputs]
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)


def folder_bytes(folder) -> int:
    """The disk space the files and folders under ``folder`` take: each its size, or its
    blocks if more (as ``du``), and at least 4 KB (so that a budget of bytes bounds the number
    of empty files too); 0 if the folder does not exist."""
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


class UploadBudget:
    """ASGI middleware: an upload is refused (HTTP 413, :data:`UPLOADS_FULL`) unless the upload
    folder, the uploads being received and this one fit in ``budget`` bytes.

    Gradio 6.31's upload route (``/gradio_api/upload``) takes no session and up to 1,000
    files of ``max_file_size`` each per request, writing them to the upload folder as they
    arrive; it has no option for a total size or a file count, and keeps them until
    ``delete_cache`` removes them (:data:`DELETE_UPLOADS`): the per-session cap of
    :class:`UploadGuard` applies only to files a session classifies. So an upload must give
    its ``Content-Length`` and no ``Transfer-Encoding`` (HTTP 411 otherwise: a chunked body
    would ignore the length; the server reads no more than that), and it
    is admitted only if the folder as on disk (:func:`folder_bytes`, a scan bounded by the
    budget) plus the bytes of the uploads admitted and still being received plus its own
    length stay within ``budget``. (A Content-Length counts a file's bytes, not the block and
    folder the file system adds: the uploads being received may pass the budget by that much,
    4 KB or so a file; the next upload sees it.)
    Multipart bodies are refused on every other route (404): Gradio's ``process_recording``
    writes them to the system's temporary folder and never deletes them.
    """

    def __init__(self, app, folder, budget: int):
        self.app, self.folder, self.budget = app, folder, budget
        self.receiving = 0  # Content-Length of the uploads admitted and not yet done
        self.lock = asyncio.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not scope["path"].rstrip("/").endswith("/upload"):
            if headers.get(b"content-type", b"").startswith(b"multipart/"):
                # files reach the disk through the upload route only (Gradio's
                # process_recording parses files into the system's temp folder and keeps them)
                return await PlainTextResponse("Not found.", 404)(scope, receive, send)
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if b"transfer-encoding" in headers or not length.isdigit():  # chunked: length unknown
            refusal = PlainTextResponse("An upload must give its Content-Length.", 411)
            return await refusal(scope, receive, send)
        length = int(length)
        async with self.lock:  # one measure at a time: two uploads cannot both take the room
            used = await asyncio.to_thread(folder_bytes, self.folder)
            admitted = used + self.receiving + length <= self.budget
            if admitted:
                self.receiving += length
        if not admitted:
            return await PlainTextResponse(UPLOADS_FULL, 413)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.receiving -= length


def remove_leftovers(folder, age: float) -> list[str]:
    """Delete what Gradio leaves in its upload ``folder`` and never deletes, older than
    ``age`` seconds: files at the top level (the temporary files of uploads it refused or
    never finished) and empty folders (what ``delete_cache`` leaves of an upload). Both
    count against :class:`UploadBudget`, so without this they would hold its room for good.
    Returns the names removed."""
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

    Gradio 6.31 keeps a set of pending event ids per session in
    ``Queue.pending_event_ids_session`` and never removes a session's entry once its results
    are delivered (an empty set stays), nor when the session's message queue has been evicted
    from ``pending_messages_per_session`` (an LRU), after which its ids can never be
    delivered. As every ``/call`` request is a new session, that dict grows without end.
    Runs on the server's event loop, so never between Gradio's own updates of it.
    """
    pending, queues = queue.pending_event_ids_session, queue.pending_messages_per_session
    for session in [s for s, ids in pending.items() if not ids or s not in queues]:
        del pending[session]


def _housekeeping(blocks: gr.Blocks, guard: UploadGuard):
    """A FastAPI lifespan: the queue keeps message queues for at most ``SESSIONS_KEPT``
    sessions (Gradio's LRU of 2,000, ~1.7 KB each, lowered: a session's queue is needed only
    while its event runs), and every ``HOUSEKEEPING_SECONDS`` finished sessions
    (:func:`forget_finished_sessions`) and deleted uploads (:meth:`UploadGuard.forget_deleted`)
    are forgotten and the upload folder's leftovers removed (:func:`remove_leftovers`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        blocks._queue.pending_messages_per_session.max_size = SESSIONS_KEPT

        async def sweep():
            while True:
                await asyncio.sleep(HOUSEKEEPING_SECONDS)
                forget_finished_sessions(blocks._queue)
                await asyncio.to_thread(guard.forget_deleted)
                folder = gradio_utils.get_upload_folder()
                await asyncio.to_thread(remove_leftovers, folder, DELETE_UPLOADS[1])

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()

    return lifespan


def build_app(model_path) -> tuple[gr.Blocks, object]:
    """The demo page for the model file ``model_path`` (see ``cu.load_exported_model``), and
    the lifespan to serve it with (``launch(app_kwargs={"lifespan": ...})``: housekeeping).

    Raises:
        FileNotFoundError, ValueError: the model file is missing or not a CIFAR-100 model.
    """
    model, class_names, _ = cu.load_exported_model(model_path)

    def classify(upload, request: gr.Request):
        """Top-5 ``{class name: probability}`` of the uploaded file; gr.Error if unreadable
        or not this session's upload or a sample photo (:class:`UploadGuard`)."""
        if upload is None:  # the image was cleared
            return None
        path = guard.path_for(upload, request.session_hash)
        try:
            top = cu.predict_image(model, path, top_k=5, class_names=class_names)
        except (FileNotFoundError, ValueError) as exc:
            name = upload.get("orig_name") or Path(path).name
            message = str(exc).replace(path, name)  # not the server's temp path
            raise gr.Error(
                message, title="Cannot classify this file", print_exception=False
            ) from None
        return dict(top)

    with LocalFilesBlocks(
        title="CIFAR-100 classifier", analytics_enabled=False, delete_cache=DELETE_UPLOADS
    ) as demo:
        gr.Markdown("# CIFAR-100 classifier\n" + describe_model(model_path))
        with gr.Row():
            image = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"])
            label = gr.Label(label="Top 5 of 100 classes", num_top_classes=5)
        # preprocess=False hands classify the uploaded file itself, so it is read by
        # cu.load_image (exactly as predict_image reads a file) and bad files get its message;
        # gr.Image's preprocess would decode it whole first. Which file: see UploadGuard.
        image.change(classify, image, label, preprocess=False)
        gr.Examples(
            [[str(cu.sample_photo(name))] for name in cu.SAMPLE_PHOTOS],
            inputs=image,
            label="Sample photos (shipped with scikit-image)",
        )
    guard = UploadGuard(demo, image.keep_in_cache)  # Gradio's copies of the sample photos
    return demo, _housekeeping(demo, guard)


def main(argv=None) -> None:
    """``python app.py --model FILE [--host HOST] [--port PORT]``: serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(description="CIFAR-100 classifier web demo (Gradio)")
    parser.add_argument("--model", required=True, help="e.g. results/efficientnet_b0.keras")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--upload-budget-mb",
        type=float,
        default=UPLOAD_BUDGET_MB,
        help=f"disk space all uploads together may take, in MB (default {UPLOAD_BUDGET_MB})",
    )
    args = parser.parse_args(argv)
    try:
        demo, housekeeping = build_app(args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None  # as python -m cifar_utils's commands
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            quiet=True,  # no hint about public share links: this demo stays local
            prevent_thread_lock=True,
            theme=gr.themes.Default(),  # its fonts ship with gradio: no Google Fonts download
            ssr_mode=False,  # no Node server
            mcp_server=False,
            max_file_size="50mb",
            state_session_capacity=SESSIONS_KEPT,
            app_kwargs={
                "lifespan": housekeeping,
                "middleware": [
                    Middleware(
                        UploadBudget,
                        folder=gradio_utils.get_upload_folder(),
                        budget=int(args.upload_budget_mb * 2**20),
                    )
                ],
            },
        )
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(
            f"error: cannot serve on {args.host}:{args.port} ({exc.strerror or exc}); "
            "choose another --port (or --host)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    print(f"Serving the demo on {demo.local_url} (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C: uploads deleted
    demo.block_thread()


if __name__ == "__main__":
    main()
