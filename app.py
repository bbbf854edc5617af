"""Web demo: classify a photo with a trained CIFAR-100 model (Gradio, local and offline).

    python app.py --model results/efficientnet_b0.keras [--host 127.0.0.1] [--port 7860]

Upload or paste a photo and see the top-5 of the 100 classes, and beside them the photo with
its Grad-CAM heatmap over it (where the network found its top-1 class); scikit-image's sample
photos are one click away. The model's name, size and test top-1 come from the results file beside
it (``results/<model>.json``). Nothing is sent anywhere and nothing is recorded: no
analytics, no run history, no Hugging Face calls or token, no share link, no fonts or
scripts from other sites. What the server guards against, and with which limits
(``python app.py --help`` shows them): ``upload_guard.py`` and ``docs/demo-security.md``.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

#: Events Gradio's queue holds waiting (``queue(max_size=)``); more are refused ("Queue is
#: full"). One visitor (address) may have 5 (``upload_guard.MAX_VISITOR_EVENTS``).
QUEUE_SIZE = 50
#: Sessions whose state Gradio keeps (``state_session_capacity``), whose messages its queue
#: holds and whose events it keeps statistics of: every ``/call`` request is a new session.
#: Well above QUEUE_SIZE: a waiting session's messages are never dropped.
SESSIONS_KEPT = 400
UPLOAD_BUDGET_MB = 500  # disk all uploads together may take
VISITOR_SHARE_MB = 50  # of it, what one visitor (client address) may hold
MAX_FILE_MB = 20  # Gradio's max_file_size: one uploaded file
BODY_SECONDS = 30  # a request body's deadline, plus 1 s per 100 KB of it
#: Most pixels a photo may have to decode (after a JPEG's draft): about 100 MB and 0.2 s at
#: most here (an RGB WebP, the costliest format per pixel), where cu.load_image allows 40
#: million. The networks see 32x32 or 224x224.
DEMO_MAX_PIXELS = 6_000_000
OVERLAY_SIDE = 512  # the Grad-CAM overlay's longest side in pixels, at most
#: Pillow's own cap in the demo (``Image.MAX_IMAGE_PIXELS``; its default 89 million): it
#: refuses images over twice this at open, whatever reads them.
PILLOW_MAX_PIXELS = 25_000_000
#: The upload folder when GRADIO_TEMP_DIR does not name one. It is the demo's own: emptied
#: when the demo starts and when it stops.
UPLOAD_FOLDER = "cifar100-demo-uploads"
#: Set before gradio (and huggingface_hub) are imported: they read these at import.
QUIET_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # no telemetry
    "GRADIO_ANALYTICS_MAX_EVENTS": str(SESSIONS_KEPT),
    "GRADIO_RUN_HISTORY": "False",  # runs recorded nowhere (and sent to no bucket)
    "HF_HUB_OFFLINE": "1",  # huggingface_hub calls no one (e.g. /api/agent-harnesses)
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # the demo needs none: dropped from its env


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe_model(model_path) -> str:
    """Markdown naming the model, its parameter count and test top-1 from its results file.

    The results file sits beside the model: same folder and stem, ``.json`` (fields
    ``model``, ``params`` (a dict with ``total``, or an int), ``test_top1``,
    ``full_cifar100``). A missing or unreadable file gives a plain note naming it; fields
    that are missing or of the wrong type show as "?".
    """
    import cifar_utils as cu

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


def overlay_html(model, photo) -> str:
    """An ``<img>`` of ``photo`` (uint8 (H, W, 3)), shrunk to at most :data:`OVERLAY_SIDE`
    pixels a side, with the model's Grad-CAM heatmap of its top-1 class over it, inline.

    Inline (a data URL), not a gr.Image output: Gradio would write that to the upload folder,
    where upload_guard serves only a visitor's own uploads and counts the disk budget.
    """
    import base64
    import io

    from PIL import Image

    import cifar_utils as cu

    # The network sees the whole photo, as for the listed top-1; only the picture is shrunk.
    overlay = cu.overlay_heatmap(*cu.explain_photo(model, photo, max_side=OVERLAY_SIDE))
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="Grad-CAM overlay" style="max-width:100%" src="data:image/png;base64,{data}">'


def build_app(model_path):
    """The demo page for the model file ``model_path`` (see ``cu.load_exported_model``), and
    the lifespan and middleware to serve it with (``launch(app_kwargs=...)``).

    Raises:
        FileNotFoundError, ValueError: the model file is missing or not a CIFAR-100 model.
    """
    import gradio as gr
    from gradio import utils as gradio_utils
    from PIL import Image

    import cifar_utils as cu
    import upload_guard as guarding

    model, class_names, _ = cu.load_exported_model(model_path)
    Image.MAX_IMAGE_PIXELS = PILLOW_MAX_PIXELS

    def classify(upload, request: gr.Request):
        """Top-5 ``{class name: probability}`` of the uploaded file and its Grad-CAM overlay
        (:func:`overlay_html`); gr.Error if unreadable or not this session's upload or a
        sample photo (:class:`upload_guard.UploadGuard`)."""
        if upload is None:  # the image was cleared
            return None, ""
        path = guard.path_for(upload, request.session_hash, request.client.host)
        try:
            photo = cu.load_image(path, max_pixels=DEMO_MAX_PIXELS)
            top = cu.predict_image(model, photo, top_k=5, class_names=class_names)
        except (FileNotFoundError, ValueError) as exc:
            name = upload.get("orig_name") or Path(path).name
            message = str(exc).replace(path, name)  # not the server's temp path
            raise gr.Error(
                message, title="Cannot classify this file", print_exception=False
            ) from None
        return dict(top), overlay_html(model, photo)

    # no delete_cache: upload_guard.housekeeping deletes old uploads from the folder itself
    with guarding.LocalFilesBlocks(title="CIFAR-100 classifier", analytics_enabled=False) as demo:
        gr.Markdown("# CIFAR-100 classifier\n" + describe_model(model_path))
        with gr.Row():
            image = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"])
            label = gr.Label(label="Top 5 of 100 classes", num_top_classes=5)
            cam = gr.HTML(label="Grad-CAM: where it found the top-1 class", show_label=True,
                          container=True)  # fmt: skip
        # preprocess=False hands classify the uploaded file itself, read by cu.load_image
        # (exactly as predict_image reads a file); gr.Image's preprocess would decode it whole
        image.change(classify, image, [label, cam], preprocess=False)
        gr.Examples(
            [[str(cu.sample_photo(name))] for name in cu.SAMPLE_PHOTOS],
            inputs=image,
            label="Sample photos (shipped with scikit-image)",
        )
    demo.queue(max_size=QUEUE_SIZE)
    uploads, samples = guarding.Uploads(), image.keep_in_cache  # Gradio's copies of samples
    guard = guarding.UploadGuard(demo, samples, uploads)
    space = guarding.UploadSpace(gradio_utils.get_upload_folder())

    def serve_kwargs(budget_mb, share_mb, body_seconds) -> dict:
        """``launch(app_kwargs=...)``: housekeeping and the :class:`BodyGuard` middleware."""
        from starlette.middleware import Middleware

        longest = body_seconds + share_mb * 2**20 / guarding.MIN_BODY_RATE  # a body's deadline
        age = max(guarding.UPLOAD_SECONDS, longest)  # no body still arriving is swept
        return {
            "lifespan": guarding.housekeeping(demo, guard, space, SESSIONS_KEPT, age),
            "middleware": [
                Middleware(
                    guarding.BodyGuard,
                    space=space,
                    budget=int(budget_mb * 2**20),
                    share=int(share_mb * 2**20),
                    body_seconds=body_seconds,
                    upload_seconds=age,
                    uploads=uploads,
                    samples=samples,
                    hidden=demo.hidden_paths,
                    pending=lambda visitor: guarding.visitor_events(demo._queue, visitor),
                )
            ],
        }

    return demo, serve_kwargs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CIFAR-100 classifier web demo (Gradio). It sends nothing off the host; "
        f"photos over {DEMO_MAX_PIXELS / 1e6:.0f} megapixels to decode are refused (JPEGs "
        "are decoded shrunk to fit); uploads are deleted after 10 minutes. The upload folder "
        f"($GRADIO_TEMP_DIR, else {UPLOAD_FOLDER} in the system's temporary folder) is the "
        "demo's own: everything in it is deleted when the demo starts and stops. uvicorn has "
        "no deadline for request headers: before opening the demo to a network, put it behind "
        "a reverse proxy with one and a per-address connection limit (docs/demo-security.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, default=argparse.SUPPRESS,
                        help="e.g. results/efficientnet_b0.keras")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback; "
                        "another only behind a reverse proxy, see above)")  # fmt: skip
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    limits = {
        "--upload-budget-mb": (UPLOAD_BUDGET_MB, "disk all uploads together may take (MB)"),
        "--visitor-share-mb": (VISITOR_SHARE_MB, "of it, what one visitor (client address) "
                               "may hold (MB)"),
        "--max-file-mb": (MAX_FILE_MB, "largest uploaded file (MB)"),
        "--body-seconds": (BODY_SECONDS, "a request body's deadline in seconds, plus 1 s per "
                           "100 KB; a slower body is cut off and counted against its sender"),
    }  # fmt: skip
    for option, (default, text) in limits.items():
        parser.add_argument(option, type=float, default=default, help=text)
    return parser.parse_args(argv)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)  # as python -m cifar_utils's commands


def check_port(host: str, port: int) -> None:
    """Exit with one line if ``host:port`` cannot be served on (taken, or not this machine's
    address): in a second, before TensorFlow and Gradio start. Gradio's launch fails too, but
    only after the model has loaded."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            cannot_serve(host, port, exc)


def cannot_serve(host: str, port: int, exc: OSError):
    fail(f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --port (or "
         "--host)")  # fmt: skip


def main(argv=None) -> None:
    """``python app.py --model FILE [...]``: serve the demo until Ctrl-C or SIGTERM."""
    from cifar_utils.checks import check_model_file

    args = parse_args(argv)
    try:
        check_model_file(args.model)  # in a second: before TensorFlow and gradio start
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    check_port(args.host, args.port)
    for name in TOKENS:
        os.environ.pop(name, None)
    os.environ.update(QUIET_ENVIRONMENT)
    # visitors are told apart by address: uvicorn would let any loopback client name another
    # in X-Forwarded-For; set it to a reverse proxy's address if the demo is behind one
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    import fcntl
    import signal
    import tempfile

    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(tempfile.gettempdir(), UPLOAD_FOLDER))
    import gradio as gr
    from gradio import utils as gradio_utils

    import upload_guard as guarding

    folder = gradio_utils.get_upload_folder()
    os.makedirs(folder, exist_ok=True)
    lock = open(f"{folder}.lock", "a")  # held open, and so locked, until the demo exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another demo serves from the upload folder {folder}: stop it, or set "
             "GRADIO_TEMP_DIR to a folder of this demo's own")  # fmt: skip
    guarding.empty_folder(folder)  # a previous run's uploads (and what they held of the budget)

    try:
        demo, serve_kwargs = build_app(args.model)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
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
            run_history=False,
            max_file_size=int(args.max_file_mb * 2**20),
            state_session_capacity=SESSIONS_KEPT,
            app_kwargs=serve_kwargs(
                args.upload_budget_mb, args.visitor_share_mb, args.body_seconds
            ),  # fmt: skip
        )
    except OSError as exc:  # taken since check_port, or the address is not this machine's
        cannot_serve(args.host, args.port, exc)
    print(f"Serving the demo on {demo.local_url} (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C
    try:
        demo.block_thread()
    finally:  # whatever Gradio and uvicorn still wait for (open bodies, its 5 s)
        guarding.empty_folder(folder)


if __name__ == "__main__":
    main()
