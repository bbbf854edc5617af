"""The web demo (app.py) in a real browser: Debian's headless Chromium driven by Playwright.

Without /usr/bin/chromium these tests skip (install it with ``apt-get install chromium``),
except under CI (``CI=true``), where they fail. ``DEMO_SCREENSHOT=PATH`` saves the page
with the rocket's prediction to PATH (how ``images/demo.png`` is made).
"""

import json
import math
import os
import sys
import threading
from pathlib import Path

import keras
import pytest
from conftest import RecordingServer, start_demo
from PIL import Image

import cifar_utils as cu

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN_STEPS = 30  # batches of 64: enough to move the probabilities away from uniform

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _chromium():
    """Skip (fail under CI) before any training or server start when Chromium is missing."""
    if not Path(CHROMIUM).exists():
        message = f"No Chromium at {CHROMIUM}: install it with `apt-get install chromium`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def model_file(cifar_archive, tmp_path_factory):
    """``results/simple_cnn.keras`` and ``.json``: the simple CNN after a few steps on the
    synthetic archive (NOT a CIFAR-100 model; its results file says so)."""
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = cu.load_cifar100(cifar_archive)
    model = cu.build_simple_cnn()
    cu.fast_small_conv_gradients(model)
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    train = cu.make_dataset(x_train, y_train, batch_size=64, training=True, seed=0)
    model.fit(train.take(TRAIN_STEPS), verbose=0, shuffle=False)
    results = tmp_path_factory.mktemp("results")
    data = "synthetic archive of tests/synthetic_cifar.py, not CIFAR-100"
    cu.write_results(
        results,
        "simple_cnn",
        params=cu.parameter_counts(model),
        test_top1=cu.top_k_accuracy(y_test, cu.predict_proba(model, x_test)),
        steps=TRAIN_STEPS,
        data=data,
        full_cifar100=False,
    )
    return cu.export_model(model, results / "simple_cnn.keras", model="simple_cnn", data=data)


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    """``python app.py --model M --port P`` on loopback: yields (url, process, proxy).

    Every proxy variable points at a recording proxy, so an HTTP call to anywhere but
    loopback by gradio or its libraries (analytics, version checks, hub look-ups) is seen.
    """
    proxy = RecordingServer()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
        **{k: proxy_url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        **{k.lower(): proxy_url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    url, process = start_demo(
        lambda port: [sys.executable, "app.py", "--model", str(model_file), "--port", str(port)],
        tmp_path_factory.mktemp("log") / "app.log",
        env,
    )
    yield url, process, proxy
    process.terminate()
    process.wait(timeout=30)
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture
def page(server):
    """A fresh headless Chromium page on the demo; asserts it fetched nothing but loopback."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        hosts = set()
        page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
        page.goto(server[0])
        page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
        yield page
        browser.close()
    assert hosts == {server[0].split("/")[2]}  # no fonts, scripts or analytics from outside


def _assert_shows(page, expected) -> None:
    """Wait until the label shows ``expected`` (predict_image's (name, probability) x5): the
    names, the percentages (rounded as the page rounds: half up) and the bar values (the
    probabilities themselves). Waiting on the whole list, not the top name: two photos may
    share their top class, and the page updates its rows one after another."""
    from playwright.sync_api import expect

    rows = page.locator('[data-testid="label"] .confidence-set')
    expect(rows.locator("dt")).to_have_text([name for name, _ in expected], timeout=60_000)
    expect(rows.locator("dd")).to_have_text([f"{math.floor(p * 100 + 0.5)}%" for _, p in expected])
    want = pytest.approx([p for _, p in expected], abs=1e-6)
    for _ in range(100):  # the bars may trail the text for a moment
        values = [float(row.locator("meter").get_attribute("value")) for row in rows.all()]
        if values == want:
            break
        page.wait_for_timeout(100)
    assert values == want


def test_rocket_and_a_sample_photo_match_predict_image(page, model_file, server):
    model, names, _ = cu.load_exported_model(model_file)
    record = json.loads(model_file.with_suffix(".json").read_text())
    header = page.get_by_text("parameters").inner_text()
    assert "simple_cnn" in header and "1,777,636 parameters" in header
    assert f"test top-1 {record['test_top1']:.3f}" in header
    assert "not a full CIFAR-100 run" in header

    rocket = cu.sample_photo("rocket")
    page.set_input_files("input[type=file]", rocket)
    expected = cu.predict_image(model, rocket, top_k=5, class_names=names)
    _assert_shows(page, expected)
    _assert_overlay(page, model, rocket)
    if os.environ.get("DEMO_SCREENSHOT"):
        _save_screenshot(page, Path(os.environ["DEMO_SCREENSHOT"]))

    # the sample photos are one click away
    page.locator("button.gallery-item:has(img[src$='coffee.png'])").click()
    expected = cu.predict_image(model, cu.sample_photo("coffee"), top_k=5, class_names=names)
    _assert_shows(page, expected)
    assert server[2].requests == []  # the server called out to no one


def _assert_overlay(page, model, photo) -> None:
    """The page shows ``photo``'s Grad-CAM overlay beside the top-5: the PNG inline in it is
    the one app.overlay_html makes here from the same file (within one level of rounding)."""
    import base64
    import io

    import numpy as np
    from playwright.sync_api import expect

    import app

    shown = page.locator('img[alt="Grad-CAM overlay"]')
    expect(shown).to_be_visible(timeout=60_000)
    sent = shown.get_attribute("src")
    here = app.overlay_html(model, cu.load_image(photo)).split('src="')[1].rstrip('">')
    images = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))).astype(int)
        for src in (sent, here)
    ]
    assert images[0].shape == images[1].shape and max(images[0].shape) == app.OVERLAY_SIDE
    assert np.abs(images[0] - images[1]).max() <= 1


def _save_screenshot(page, path: Path) -> None:
    """The page as a 256-colour PNG (a photo preview makes a full-colour one 3x larger)."""
    page.wait_for_timeout(1000)  # let the bars finish their transition
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".full.png")
    page.screenshot(path=png)
    with Image.open(png) as full:
        full.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    png.unlink()


def _png_header(width: int, height: int) -> bytes:
    """A PNG file that declares ``width`` x ``height`` pixels (and holds none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bad_uploads_show_a_message_and_the_server_keeps_serving(
    page, model_file, server, tmp_path
):
    from playwright.sync_api import expect

    (tmp_path / "notes.txt").write_text("a text file, not a photo\n")
    (tmp_path / "notes.png").write_text("a text file named like a photo\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "huge.png").write_bytes(_png_header(20_000, 20_000))  # 400 megapixels
    cases = [
        ("notes.txt", "Invalid file type"),  # refused by the page itself
        ("notes.png", "'notes.png' is not a readable image"),
        ("empty.jpg", "'empty.jpg' is not a readable image"),
        ("huge.png", "'huge.png' is too large to open safely"),
    ]
    for name, message in cases:
        page.set_input_files("input[type=file]", tmp_path / name)
        expect(page.get_by_text(message)).to_be_visible(timeout=60_000)
        page.reload()  # a fresh page for the next file
        page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
    assert server[1].poll() is None  # still serving

    model, names, _ = cu.load_exported_model(model_file)
    rocket = cu.sample_photo("rocket")
    page.set_input_files("input[type=file]", rocket)
    expected = cu.predict_image(model, rocket, top_k=5, class_names=names)
    _assert_shows(page, expected)
