"""Argument checks several modules share: pixels, labels, counts, paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def is_int(value) -> bool:
    """Whether ``value`` is an int (a bool is not, though Python says it is)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_positive_int(value, what: str) -> int:
    """``value`` as an int if it is an int >= 1, else a ValueError naming ``what``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, not {value!r}")
    return int(value)


def check_pixels(x, what: str = "images") -> np.ndarray:
    """``x`` as numpy if its values are pixels: uint8 in [0, 255] or float in [0, 1].

    Raises:
        ValueError: another dtype, NaN/inf (naming the first index), floats outside [0, 1].
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 in [0, 255] or float in [0, 1], not {x.dtype}")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(
            f"{what} hold {bad} NaN or infinite value(s) (first at index "
            f"{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}); fix the preprocessing "
            "that produced them, or pass the uint8 images from load_cifar100"
        )
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"float {what} must be in [0, 1], these span [{x.min():g}, {x.max():g}]; "
            "pass 0-255 data as uint8"
        )
    return x


def check_labels(y, num_classes: int, what: str) -> np.ndarray:
    """``y`` as int64 (N,) in [0, num_classes), else a ValueError saying what is wrong."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{what} must be integer class indices of shape (N,), not {y.dtype} {y.shape}; "
            "for one-hot or probability rows pass `.argmax(axis=1)`"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} holds values outside [0, {num_classes - 1}]")
    return y.astype(np.int64)


def check_label_pair(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays checked (:func:`check_labels`), non-empty and equally long."""
    y_true = check_labels(y_true, num_classes, "y_true")
    y_pred = check_labels(y_pred, num_classes, "y_pred")
    if len(y_true) != len(y_pred) or not len(y_true):
        raise ValueError(
            f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must be non-empty and equally long"
        )
    return y_true, y_pred


def check_model_file(path) -> Path:
    """``path`` as a Path if a ``.keras`` (or legacy ``.h5``) file is there; no TensorFlow.

    Raises:
        FileNotFoundError: nothing there (names the ``.keras`` files beside it).
        ValueError: another suffix.
    """
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        # files only: Keras keeps its settings in a folder named .keras (e.g. ~/.keras)
        beside = (
            sorted(p.name for p in folder.glob("*.keras") if p.is_file()) if folder.is_dir() else []
        )
        where = "It is a folder; its parent" if path.is_dir() else "That folder"
        raise FileNotFoundError(
            f"No model file at '{path}'. "
            + (f"{where} '{folder}' holds {', '.join(beside)}. " if beside else "")
            + "A notebook writes OUTPUT_DIR/<model>.keras when it ends (simple_cnn.keras, "
            "complex_cnn.keras or efficientnet_b0.keras; OUTPUT_DIR is results/ by default)"
        )
    if path.suffix not in (".keras", ".h5"):
        raise ValueError(
            f"'{path}' is not a Keras model file (.keras, or a legacy .h5): give the .keras "
            "file a notebook wrote at its end, e.g. results/simple_cnn.keras"
        )
    return path


RUN_FOLDERS = (
    "The notebooks train in results/simple_cnn, results/complex_cnn and "
    "results/efficientnet_b0 (which holds head/ and finetune/), under their OUTPUT_DIR "
    "(results/ by default); a run folder gets its log.csv when training starts"
)


def check_run_folder(path) -> Path:
    """``path`` as a Path if it is a folder; no TensorFlow.

    Raises:
        FileNotFoundError: no folder there (says where the notebooks' run folders are).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No folder '{path}'. {RUN_FOLDERS}")
    return path


def check_new_folder(path) -> Path:
    """``path`` as a Path if nothing or an empty folder is there; no TensorFlow.

    Raises:
        FileExistsError: a symbolic link, a file or a folder holding anything.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"'{path}' is a symbolic link; name a new folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"'{path}' already exists and is not an empty folder; choose a new folder, or "
            "remove it first to replace it"
        )
    return path
