"""Shared fixtures: a learnable archive in the official cifar-100-python layout; helpers that
run notebooks and the README's marked commands."""

import contextlib
import json
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import synthetic_cifar

import cifar_utils as cu
from cifar_utils.models import float32_copy

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    """Path of a synthetic ``cifar-100-python.tar.gz``: 3,000 train / 1,000 test images."""
    return synthetic_cifar.write_archive(tmp_path_factory.mktemp("cifar"), 3000, 1000, seed=0)


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory):
    """Path of a 13000x13000 RGBA PNG of zeros: 600 KB that would take 676 MB to decode.

    Written chunk by chunk (signature, IHDR, one zlib-compressed IDAT, IEND), so making it
    never holds the pixels either.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    side, packer = 13_000, zlib.compressobj()
    row = bytes(1 + 4 * side)  # filter type 0, then RGBA zeros
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small exported model with confident, image-dependent outputs: (path, model)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    init = keras.initializers.RandomNormal(0, 3, seed=0)
    outputs = keras.layers.Dense(100, activation="softmax", kernel_initializer=init)(h)
    path = tmp_path_factory.mktemp("model") / "small.keras"
    cu.export_model(keras.Model(inputs, outputs), path, model="small")
    return path, cu.load_exported_model(path)[0]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep every test away from the user's ~/.keras cache and CIFAR100_DIR."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv("CIFAR100_DIR", raising=False)


ROOT = Path(__file__).resolve().parents[1]


def peak_memory(setup: str, action: str) -> tuple[float, str]:
    """Run the statements ``setup``, then the expression ``action``, in a fresh interpreter
    from the repository root. Returns how many MB its peak resident memory rose above what
    it held after ``setup`` (Linux: the peak is reset in between), and the ``repr`` of
    ``action``'s value, or ``"Type: message"`` of what it raised."""
    code = (
        f"import json, sys\n{setup}\n"
        "def rss(key):\n"
        "    status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "    return int(status[key].split()[0]) / 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak starts again from here\n"
        "start = rss('VmRSS')\n"
        f"try:\n    result = repr({action})\n"
        "except Exception as exc:\n    result = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps({'mb': rss('VmHWM') - start, 'result': result}))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    return measured["mb"], measured["result"]


@pytest.fixture
def policy(request):
    """Keras' global dtype policy for one test: ``request.param`` (parametrize with
    ``indirect=True``; default ``"float32"``), and ``"float32"`` again after it."""
    keras.mixed_precision.set_global_policy(getattr(request, "param", "float32"))
    yield keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")


def labelled_images(n_train: int, n_val: int) -> tuple:
    """``(x, y)`` training and validation pairs of learnable generated images (uint8
    (N, 32, 32, 3)), labels cycling through the 100 classes, for quick training tests."""
    y = np.arange(n_train + n_val) % 100
    x = synthetic_cifar.make_images(y, seed=0)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def small_datasets(n_train: int, n_val: int, batch_size: int) -> tuple:
    """Training and validation ``make_dataset`` pipelines of :func:`labelled_images`."""
    (x, y), (xv, yv) = labelled_images(n_train, n_val)
    train = cu.make_dataset(x, y, batch_size=batch_size, training=True)
    return train, cu.make_dataset(xv, yv, batch_size=batch_size, training=False)


def run_notebook(name, tmp_path, **parameters):
    """Run notebook ``name`` headless with papermill; returns the executed notebook.

    ``OUTPUT_DIR`` defaults to a folder under ``tmp_path`` (figures go to its ``figures/``),
    so runs never touch the repository's ``results/`` or ``images/``.
    """
    import papermill

    parameters = {"OUTPUT_DIR": str(tmp_path / "results"), **parameters}
    return papermill.execute_notebook(
        str(ROOT / name),
        str(tmp_path / f"executed-{name}"),
        parameters=parameters,
        cwd=str(ROOT),
        kernel_name="python3",
        progress_bar=False,
    )


def check_calibrated_export(folder, record, test, build) -> None:
    """What a notebook run recorded of calibration and flip TTA is what its files give again.

    ``folder``: the run's ``OUTPUT_DIR``; ``record``: its results file, parsed; ``test``:
    ``(x, y)``, the test images it scored; ``build``: builds the network its best checkpoint
    (``folder/<model>/best.weights.h5``) loads into. The exported file (temperature-scaled,
    float32) scored again gives the recorded calibrated figures and top-1, the best
    checkpoint's predictions and its Grad-CAM heatmaps; the TTA counts add up; the card says
    what data it saw.
    """
    (x_test, y_test), name, n = test, record["model"], len(test[1])
    assert record["test_images"] == n
    assert cu.TEMPERATURE_RANGE[0] <= record["temperature"] <= cu.TEMPERATURE_RANGE[1]
    assert record["val_nll_calibrated"] <= record["val_nll"] + 1e-6  # T minimises it
    assert 0 <= record["test_ece"] <= 1 and 0 <= record["test_ece_calibrated"] <= 1
    model, _, metadata = cu.load_exported_model(Path(folder) / f"{name}.keras")
    assert metadata["temperature"] == record["temperature"]
    probs = cu.predict_proba(model, x_test)
    ece, nll = (
        cu.expected_calibration_error(y_test, probs),
        cu.negative_log_likelihood(y_test, probs),
    )
    assert (record["test_ece_calibrated"], record["test_nll_calibrated"]) == (
        pytest.approx(ece, abs=1e-6),
        pytest.approx(nll, abs=1e-6),
    )
    assert record["exported_test_top1"] == round(cu.top_k_accuracy(y_test, probs), 6)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(record["precision"])  # as trained: bfloat16 on some CPUs
    try:
        trained = build()
    finally:
        keras.config.set_dtype_policy(policy)
    trained.load_weights(Path(folder) / name / "best.weights.h5")
    best = float32_copy(trained)  # what the file computes, before the temperature
    assert (cu.predict_proba(best, x_test).argmax(1) == probs.argmax(1)).all()  # no top-1 moved
    heat = cu.grad_cam(model, x_test[:8])  # Grad-CAM works on the exported file, and scores
    assert heat.shape == (8, 32, 32)  # divided by T give the same heatmaps
    np.testing.assert_allclose(heat, cu.grad_cam(best, x_test[:8]), atol=1e-4)
    plain = cu.predict_proba(trained, x_test)  # the headline figures' model
    assert record["test_top1"] == round(cu.top_k_accuracy(y_test, plain), 6)
    assert record["test_ece"] == pytest.approx(
        cu.expected_calibration_error(y_test, plain), abs=1e-6
    )
    turned = record["test_tta_wrong_to_right"] - record["test_tta_right_to_wrong"]
    assert round(record["test_tta_top1"] * n) == round(record["test_top1"] * n) + turned
    tta = cu.tta_summary(y_test, plain, cu.flip_tta_proba(trained, x_test))
    assert tta == {key: record[key] for key in tta}
    card = cu.card_path(Path(folder) / f"{name}.keras").read_text()
    assert card.startswith(f"# {name}: NOT trained on CIFAR-100 (md5 ")
    assert f"divided by {record['temperature']:.4f}, fitted on the validation images" in card
    assert f"(temperature-scaled): {record['test_ece_calibrated']:.4f}" in card


BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```bash\n(.*?)```", re.S)


def readme_blocks() -> dict[str, list[str]]:
    """The marked command blocks of README.md and of the docs/ pages it links, by name."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    return {name: body.strip().splitlines() for name, body in BLOCK.findall(text)}


def swap_paths(line: str, swaps: dict) -> str:
    """``line`` with each key of ``swaps`` replaced by its value (README paths -> temporary)."""
    for old, new in swaps.items():
        line = line.replace(old, new)
    return line


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports no one listens on right now (another process may take
    one later)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:  # all held at once, so the n ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def start_demo(command, log: Path, env=None, timeout=300):
    """Start the web demo as ``command(port)`` (an argv list) on a free loopback port and
    wait until it says where it serves (so the page is up and its start-up line written).

    Another process may take the port between :func:`free_ports` and the demo's bind (it
    starts TensorFlow first): then it exits with "cannot serve on", and one more free port
    is tried. Returns ``(url, process)``; the process writes stdout and stderr to ``log``.
    """
    for attempt in (1, 2):
        (port,) = free_ports()
        with open(log, "w") as out:
            process = subprocess.Popen(
                command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if f"Serving the demo on {url}" in log.read_text():
                return url, process
            time.sleep(0.5)
        process.kill()
        if attempt == 2 or "cannot serve on" not in log.read_text():
            pytest.fail(f"app.py did not start:\n{log.read_text()[-3000:]}")


def run_readme_block(name: str, swaps: dict, timeout=900) -> tuple[float, list[str]]:
    """Run README block ``name`` line by line with bash from the repository root, paths
    swapped by ``swaps``; each line must succeed. Returns the seconds it took and what each
    line printed (stdout)."""
    start, printed = time.perf_counter(), []
    for line in readme_blocks()[name]:
        command = swap_paths(line, swaps)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        printed.append(done.stdout)
    return time.perf_counter() - start, printed


class AtBatch(keras.callbacks.Callback):
    """Calls ``action(model)`` before the given (0-based) epoch and batch of ``fit``."""

    def __init__(self, epoch, batch, action):
        super().__init__()
        self.at, self.action, self.epoch = (epoch, batch), action, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.action(self.model)


def ctrl_c(model):
    """An ``AtBatch`` action: stop the run as Ctrl-C does."""
    raise KeyboardInterrupt


class RecordingServer(socketserver.ThreadingTCPServer):
    """A TCP server on loopback that answers nothing and records each connection's first
    line (an HTTP request line, or the start of a TLS handshake): a proxy that forwards
    nothing, or a host a request must never reach."""

    daemon_threads = True

    def __init__(self):
        self.requests = []
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                server.requests.append(self.rfile.readline(2000).decode(errors="replace"))

        super().__init__(("127.0.0.1", 0), Handler)


def run_cases_with_onednn(cases: str, onednn: str) -> str:
    """Run ``tests/<cases>`` in a fresh pytest with ``TF_ENABLE_ONEDNN_OPTS=onednn``.

    oneDNN is read once per process, so each setting needs its own. Asserts every case passed
    and returns the run's stdout.
    """
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", "-p", "no:cacheprovider",
         str(ROOT / "tests" / cases)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|error)", summary)
    return done.stdout
