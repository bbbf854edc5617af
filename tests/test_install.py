"""The install (``pip install -e .``) makes ``cifar_utils`` importable from any folder, so a
notebook copied elsewhere runs there."""

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import synthetic_cifar
from conftest import ROOT

SIMPLE = "simple_image_clasifier.ipynb"


def test_the_project_declares_its_package_and_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["packages"] == ["cifar_utils"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


@pytest.mark.slow
def test_an_editable_install_runs_a_notebook_copied_to_another_folder(tmp_path):
    """A fresh virtualenv that sees this one's packages (TensorFlow is not installed again:
    a .pth file adds them), with the project installed editable and without build isolation
    (no network): from another folder, ``import cifar_utils`` finds the checkout's package,
    and a copy of the simple notebook runs there, a tiny run on the generated archive."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    where = "import site; print(site.getsitepackages()[0])"
    own_site = subprocess.run([python, "-c", where], capture_output=True, text=True, check=True)
    shared = site.getsitepackages()[0]
    before = {*ROOT.glob("*.egg-info"), *ROOT.glob("build")}  # the README's own install makes one
    (Path(own_site.stdout.strip()) / "shared.pth").write_text(
        f"import site; site.addsitedir({shared!r})\n"
    )
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "-e", ROOT], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {*ROOT.glob("*.egg-info"), *ROOT.glob("build")} <= before  # nothing new in the checkout

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    where = "import cifar_utils; print(cifar_utils.__file__)"
    found = subprocess.run([python, "-c", where], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert found.stdout.strip() == str(ROOT / "cifar_utils" / "__init__.py"), found.stderr

    shutil.copy(ROOT / SIMPLE, elsewhere / SIMPLE)
    synthetic_cifar.write_archive(tmp_path / "data", 600, 200, seed=0)
    # The native "python3" kernel is this virtualenv's python (papermill's own interpreter).
    run = subprocess.run([python, "-m", "papermill", SIMPLE, "run.ipynb", "-k", "python3",
                          "-p", "DATA_DIR", str(tmp_path / "data"), "-p", "TRAIN_LIMIT", "200",
                          "-p", "VAL_SIZE", "100", "-p", "EPOCHS", "1", "-p", "BATCH_SIZE", "32",
                          "-p", "OUTPUT_DIR", "results"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((elsewhere / "results" / "simple_cnn.json").read_text())
    assert (record["epochs"], record["train_images"], record["test_images"]) == (1, 200, 200)
    assert record["params"]["total"] == 1_777_636
    assert (elsewhere / "results" / "simple_cnn.keras").is_file()
