"""The README's quick commands, run as written (paths swapped for temporary ones).

Blocks marked ``<!-- readme-test: NAME -->`` are run line by line with bash from the
repository root: the smoke run on the generated archive, the transfer notebook's quick check,
the model commands (curves, predict, export) and the web demo. The times they take are
printed (``pytest -s``), to keep the README's stated times measured.
"""

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT

import cifar_utils as cu

BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```bash\n(.*?)```", re.S)


def readme_blocks() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {name: body.strip().splitlines() for name, body in BLOCK.findall(text)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _swap(line: str, swaps: dict) -> str:
    for old, new in swaps.items():
        line = line.replace(old, new)
    return line


def _run(lines, swaps, timeout=900) -> float:
    start = time.perf_counter()
    for line in lines:
        command = _swap(line, swaps)
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        print(done.stdout[-1500:])
    return time.perf_counter() - start


def _git_status() -> str | None:
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        return None
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True).stdout  # fmt: skip


def test_the_readme_marks_its_quick_commands():
    blocks = readme_blocks()
    assert set(blocks) == {"smoke", "transfer", "use", "demo"}
    assert all(line.startswith(".venv/bin/") for lines in blocks.values() for line in lines)


@pytest.mark.slow
def test_readme_quick_commands_work_as_written(tmp_path):
    blocks = readme_blocks()
    synthetic = tmp_path / "synthetic"
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        shutil.copy(cu.sample_photo(name), photos)
    swaps = {
        "/tmp/synthetic": str(synthetic),
        " results/": f" {synthetic}/results/",
        "photo.jpg": str(cu.sample_photo("rocket")),
        "photos/": f"{photos}/",
    }
    before = _git_status()
    seconds = {"smoke": _run(blocks["smoke"], swaps)}
    results = synthetic / "results"
    record = json.loads((results / "simple_cnn.json").read_text())
    # Far above chance (0.01 top-1, 0.05 top-5) after 3 epochs on 2,000 generated images.
    assert record["test_top1"] > 0.15 and record["test_top5"] > 0.4
    assert record["full_cifar100"] is False and record["data"]["official"] is False
    assert record["settings_changed"]["TRAIN_LIMIT"] == 2000
    assert (results / "simple_cnn.keras").is_file()
    assert {p.name for p in (results / "figures").iterdir()} == {
        f"simple_cnn_{n}.png"
        for n in ("samples", "augmentation", "curves", "superclass_confusion", "mistakes",
                  "photo_prediction")
    }  # fmt: skip
    assert _git_status() == before  # nothing written into the checkout

    seconds["transfer"] = _run(blocks["transfer"], swaps)
    transfer = json.loads((results / "efficientnet_b0.json").read_text())
    assert transfer["epochs"] == 2 and (results / "efficientnet_b0.keras").is_file()

    seconds["use"] = _run(blocks["use"], swaps)
    assert (results / "simple_cnn" / "curves.png").stat().st_size > 10_000
    assert (results / "simple_cnn_serving" / "saved_model.pb").is_file()
    done = subprocess.run(
        ["bash", "-c", _swap(blocks["use"][1], swaps).split("#")[0] + " --json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    predictions = json.loads(done.stdout)["predictions"]
    model, names, _ = cu.load_exported_model(results / "simple_cnn.keras")
    assert len(predictions) == 3  # the photo and the folder's two
    for item in predictions:
        expected = cu.predict_image(model, item["image"], top_k=5, class_names=names)
        got = [(p["class"], p["probability"]) for p in item["top"]]
        assert [n for n, _ in got] == [n for n, _ in expected]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], rtol=1e-5)

    port = str(_free_port())
    command = _swap(blocks["demo"][0], {**swaps, "7860": port})
    start = time.perf_counter()
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        page = None
        while page is None and time.perf_counter() - start < 120 and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(1)
        assert page is not None and b"gradio" in page.lower(), server.poll()
        seconds["demo start"] = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("README commands took " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
