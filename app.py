"""Web demo: classify a photo with a trained CIFAR-100 model (Gradio, local and offline).

    python app.py --model results/efficientnet_b0.keras [--host 127.0.0.1] [--port 7860]

Upload or paste a photo (any size or mode, read exactly as ``cu.predict_image`` reads it)
and see the top-5 of the 100 classes; scikit-image's sample photos are one click away. The
model's name, size and test top-1 come from the results file beside it
(``results/<model>.json``). Nothing is sent anywhere: no analytics, no share link, no fonts
or scripts from other sites.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

import cifar_utils as cu  # noqa: E402


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
    params = record.get("params")
    params = params.get("total") if isinstance(params, dict) else params
    top1 = record.get("test_top1")
    text = (
        f"Model **{record.get('model', Path(model_path).stem)}** · "
        f"{f'{params:,}' if _is_number(params) and isinstance(params, int) else '?'} parameters · "
        f"test top-1 {f'{top1:.3f}' if _is_number(top1) else '?'}"
    )
    if record.get("full_cifar100") is not True:
        text += " (not a full CIFAR-100 run: a quick run or other data)"
    return text + f" · from `{results.name}`"


def build_app(model_path) -> gr.Blocks:
    """The demo page for the model file ``model_path`` (see ``cu.load_exported_model``).

    Raises:
        FileNotFoundError, ValueError: the model file is missing or not a CIFAR-100 model.
    """
    model, class_names, _ = cu.load_exported_model(model_path)

    def classify(upload):
        """Top-5 ``{class name: probability}`` of the uploaded file; gr.Error if unreadable."""
        if upload is None:  # the image was cleared
            return None
        try:
            top = cu.predict_image(model, upload["path"], top_k=5, class_names=class_names)
        except (FileNotFoundError, ValueError) as exc:
            name = upload.get("orig_name") or Path(upload["path"]).name
            message = str(exc).replace(upload["path"], name)  # not the server's temp path
            raise gr.Error(
                message, title="Cannot classify this file", print_exception=False
            ) from None
        return dict(top)

    with gr.Blocks(title="CIFAR-100 classifier", analytics_enabled=False) as demo:
        gr.Markdown("# CIFAR-100 classifier\n" + describe_model(model_path))
        with gr.Row():
            image = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"])
            label = gr.Label(label="Top 5 of 100 classes", num_top_classes=5)
        # preprocess=False hands classify the uploaded file itself, so it is read by
        # cu.load_image (exactly as predict_image reads a file) and bad files get its message.
        image.change(classify, image, label, preprocess=False)
        gr.Examples(
            [[str(cu.sample_photo(name))] for name in cu.SAMPLE_PHOTOS],
            inputs=image,
            label="Sample photos (shipped with scikit-image)",
        )
    return demo


def main(argv=None) -> None:
    """``python app.py --model FILE [--host HOST] [--port PORT]``: serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(description="CIFAR-100 classifier web demo (Gradio)")
    parser.add_argument("--model", required=True, help="e.g. results/efficientnet_b0.keras")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        demo = build_app(args.model)
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
            allowed_paths=[str(cu.sample_photo().parent)],  # the sample photos
            max_file_size="50mb",
        )
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(
            f"error: cannot serve on {args.host}:{args.port} ({exc.strerror or exc}); "
            "choose another --port (or --host)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    print(f"Serving the demo on {demo.local_url} (Ctrl-C to stop)", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
