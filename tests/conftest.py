"""Shared fixtures: a learnable archive in the official cifar-100-python layout."""

import os
from pathlib import Path

import pytest
import synthetic_cifar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    """Path of a synthetic ``cifar-100-python.tar.gz``: 3,000 train / 1,000 test images."""
    return synthetic_cifar.write_archive(tmp_path_factory.mktemp("cifar"), 3000, 1000, seed=0)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep every test away from the user's ~/.keras cache and CIFAR100_DIR."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv("CIFAR100_DIR", raising=False)


ROOT = Path(__file__).resolve().parents[1]


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
