"""The README's quick commands, run as written (paths swapped for temporary ones).

Blocks marked ``<!-- readme-test: NAME -->`` in README.md and the docs/ pages are run line by
line with bash from the repository root: here the smoke run on the generated archive, the
model commands (curves, predict, export) and the web demo; the transfer notebook's quick
check runs in ``tests/test_transfer.py`` (then resumed on two devices). The README itself
stays short, starts with the offline try, and its links resolve. The times they take are printed
(``pytest -s``), to keep the README's stated times measured.
"""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    check_calibrated_export,
    readme_blocks,
    run_readme_block,
    start_demo,
    swap_paths,
)

import cifar_utils as cu

README = ROOT / "README.md"


def _git_status() -> str | None:
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        return None
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True).stdout  # fmt: skip


def test_the_readme_marks_its_quick_commands():
    blocks = readme_blocks()
    assert set(blocks) == {"smoke", "transfer", "use", "demo"}
    assert all(line.startswith(".venv/bin/") for lines in blocks.values() for line in lines)
    assert "<!-- readme-test: smoke -->" in README.read_text()  # the others are in docs/


def _sections(text: str) -> list[str]:
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def test_the_readme_is_a_five_minute_read_that_starts_with_the_offline_try():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    # "the smoke run": the data loader's message sends readers without the dataset there.
    assert _sections(text)[:5] == [
        "Install", "Try it in a minute, offline (the smoke run)", "The real run", "Tests",
        "Results",
    ]  # fmt: skip
    commands = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert commands[0].startswith("python3 -m venv .venv && .venv/bin/pip install -r ")
    assert commands[1].startswith(".venv/bin/python tests/synthetic_cifar.py")  # the smoke run
    assert "-p EPOCHS 100 --log-output" in commands[2]  # the real run
    assert "seed project" in text.lower() and "cifar_utils/published.py" in text


def test_every_link_of_the_readme_and_docs_resolves():
    """Relative links, and their #anchors, point at a file and heading that exist."""
    missing = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                missing.append(f"{page.name}: {target}")
            elif anchor and anchor not in {_anchor(h) for h in _headings(linked)}:
                missing.append(f"{page.name}: {target} (no such heading)")
    assert not missing


def _headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines()
            if line.startswith("#")]  # fmt: skip


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_ci_runs_the_readmes_test_command():
    readme = re.search(r"## Tests\n.*?```bash\n(.*?)\n```", README.read_text(), re.S)[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == readme.replace("pip install -r", "pip install -q -r")
    assert "-e ." in ci  # the package, importable from any folder


@pytest.mark.slow
def test_readme_quick_commands_work_as_written(tmp_path):
    blocks = readme_blocks()
    synthetic = tmp_path / "synthetic"
    swaps = {"/tmp/synthetic": str(synthetic), " results/": f" {synthetic}/results/"}
    before = _git_status()
    seconds = {"smoke": run_readme_block("smoke", swaps)[0]}
    results = synthetic / "results"
    record = json.loads((results / "simple_cnn.json").read_text())
    # Far above chance (0.01 top-1, 0.05 top-5) after 3 epochs on 1,000 generated images
    # (measured: 0.218 and 0.703).
    assert record["test_top1"] > 0.12 and record["test_top5"] > 0.4
    check_calibrated_export(results, record, cu.load_cifar100(synthetic)[1], cu.build_simple_cnn)
    assert record["full_cifar100"] is False and record["data"]["official"] is False
    assert record["settings_changed"]["TRAIN_LIMIT"] == 1000
    assert (results / "simple_cnn.keras").is_file()
    # The notebook trains with the seed's settings (cifar_utils.published), as its plan records.
    plan = json.loads((results / "simple_cnn" / "state.json").read_text())["plan"]
    seed = cu.OPTIMIZERS["simple_cnn"]
    assert plan["optimizer"]["class"] == seed["class"] == "Adam"
    assert plan["optimizer"]["learning_rate"] == pytest.approx(seed["learning_rate"])
    flip, shift = plan["data"]["augmentation"]
    assert (flip["layer"], flip["mode"], shift["layer"]) == (
        "RandomFlip", "horizontal", "RandomTranslation"
    )  # fmt: skip
    assert shift["height_factor"] == shift["width_factor"] == cu.AUGMENTATION["simple_cnn"]["shift"]
    assert {p.name for p in (results / "figures").iterdir()} == {
        f"simple_cnn_{n}.png"
        for n in ("samples", "augmentation", "curves", "superclass_confusion", "mistakes",
                  "photo_prediction", "reliability", "grad_cam", "photo_grad_cam")
    }  # fmt: skip
    assert _git_status() == before  # nothing written into the checkout

    seconds["use"], printed = run_readme_block("use", swaps)
    assert (results / "simple_cnn" / "curves.png").stat().st_size > 10_000
    assert (results / "serving" / "simple_cnn" / "1" / "saved_model.pb").is_file()
    # The predict line's output: the photo installed with scikit-image (as written, the
    # path pasted into a shell), then its top 5 as "  name  probability".
    photo, *rows = printed[1].splitlines()
    assert (ROOT / photo).resolve() == cu.sample_photo("rocket").resolve()
    model, names, _ = cu.load_exported_model(results / "simple_cnn.keras")
    expected = cu.predict_image(model, ROOT / photo, top_k=5, class_names=names)
    assert [r.split()[0] for r in rows] == [n for n, _ in expected]
    np.testing.assert_allclose([float(r.split()[1]) for r in rows],
                               [p for _, p in expected], atol=5e-5)  # fmt: skip

    start = time.perf_counter()
    url, server = start_demo(
        lambda port: ["bash", "-c", "exec " + swap_paths(blocks["demo"][0], swaps).replace(
            "--port 7860", f"--port {port}")],
        tmp_path / "demo.log",
    )  # fmt: skip
    try:
        seconds["demo start"] = time.perf_counter() - start
        assert b"gradio" in urllib.request.urlopen(url, timeout=30).read().lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "share=True" not in (tmp_path / "demo.log").read_text()  # no hint at public links
    print("README commands took " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
