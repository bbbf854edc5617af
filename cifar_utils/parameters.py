"""The notebooks' parameter contract: ``check_parameters`` runs first in every notebook."""

from __future__ import annotations

import difflib
import math
import os
import sys
from pathlib import Path

from .checks import is_int
from .data import FINE_LABEL_NAMES, TRAIN_IMAGES, split_problem
from .errors import ParameterError
from .notebooks import notebook_path
from .numerics import is_precision_setting
from .photos import load_image
from .runlock import own_output_dir


class NotebookParameters(dict):
    """A run's checked parameters (name -> value), with the notebook's ``defaults``."""

    def __init__(self, values: dict, defaults: dict):
        super().__init__(values)
        self.defaults = dict(defaults)

    def changed(self) -> dict:
        """The parameters whose value differs from the notebook's default (JSON-able)."""
        return {k: _jsonable(v) for k, v in self.items() if v != self.defaults.get(k)}

    def check_batch_size(self, train_images: int, replicas: int = 1) -> None:
        """Refuse a global batch (``BATCH_SIZE`` x ``replicas``) above ``train_images``.

        Raises:
            ParameterError: naming ``BATCH_SIZE``, the images and the largest that fits.
        """
        if self["BATCH_SIZE"] * replicas > train_images:
            raise ParameterError(_batch_too_large(self["BATCH_SIZE"], replicas, train_images))


def _jsonable(value):
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)


def notebook_defaults(notebook) -> dict:
    """``notebook``'s parameters (name -> default) from its cell tagged "parameters".

    Raises:
        ValueError: no cell tagged "parameters", or a default is no literal.
    """
    import ast

    import papermill

    found = papermill.inspect_notebook(str(notebook_path(notebook)))
    if not found:
        raise ValueError(f"{notebook} has no code cell tagged 'parameters'")
    return {name: ast.literal_eval(p["default"]) for name, p in found.items()}


def _assigned_names(notebook) -> set[str]:
    """Every name a code cell of ``notebook`` assigns, imports or defines."""
    import ast

    import nbformat

    names = set()
    cells = nbformat.read(notebook_path(notebook), as_version=4).cells
    for cell in (c for c in cells if c.cell_type == "code"):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
    return names


def _is_real(v) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _existing_file(v) -> bool:
    return isinstance(v, str | os.PathLike) and Path(v).expanduser().is_file()


def _readable_image(v) -> bool:
    if not _existing_file(v):
        return False
    try:
        load_image(Path(v).expanduser())
    except ValueError:
        return False
    return True


#: (test on the name, test on the value, what the value must be), first match wins.
_PARAMETER_RULES = (
    (lambda n: n.endswith("EPOCHS"), lambda v: is_int(v) and v >= 1, "an int >= 1"),
    (lambda n: n == "LR" or n.endswith("_LR"), lambda v: _is_real(v) and v > 0, "a number > 0"),
    (lambda n: n == "BATCH_SIZE", lambda v: is_int(v) and v >= 1,
     "an int >= 1 (images per batch and device)"),
    (lambda n: n == "SEED", lambda v: is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
    (lambda n: n == "IMAGE_SIZE", lambda v: is_int(v) and 32 <= v <= 1024,
     "an int in [32, 1024] (pixels; 224 is EfficientNet's ImageNet size)"),
    (lambda n: n == "XLA", lambda v: v is True or v is False or v == "auto",
     'True, False or "auto"'),
    (lambda n: n == "MIXED_PRECISION",
     is_precision_setting,
     '"auto" (from the hardware), True or "float16", "bfloat16", or False or "float32"'),
    (lambda n: n == "WEIGHTS", lambda v: v is None or v == "imagenet" or _existing_file(v),
     '"imagenet", None (random weights) or the path of an existing .h5 weights file'),
    (lambda n: n == "PHOTO", lambda v: v is None or _readable_image(v),
     "None (the sample photo) or the path of an image file Pillow reads (PNG, JPEG, BMP, GIF)"),
    (lambda n: n == "DATA_DIR", lambda v: v is None or Path(str(v)).expanduser().exists(),
     "None (CIFAR100_DIR, the Keras cache, or a download) or an existing file or folder"),
    (lambda n: n.endswith("_DIR"), lambda v: isinstance(v, str | os.PathLike) and str(v) != "",
     "a folder path"),
)  # fmt: skip


def _expected(name: str, default) -> tuple:
    """(value test, description) of parameter ``name``, from its name, else its default's type."""
    for applies, test, what in _PARAMETER_RULES:
        if applies(name):
            return test, what
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "True or False"
    if is_int(default):
        return is_int, "an int"
    if isinstance(default, float):
        return _is_real, "a number"
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    return (lambda v: True), "anything"


def _batch_too_large(batch_size: int, replicas: int, train_images: int) -> str:
    """The message for a ``BATCH_SIZE`` whose global batch exceeds ``train_images``."""
    per = total = ""
    if replicas > 1:
        per, total = " per replica", f" x {replicas} replicas = {batch_size * replicas:,} a step"
    return (
        f"BATCH_SIZE = {batch_size}{total}: more than the {train_images:,} training images, "
        f"so every epoch would be a single, smaller step. BATCH_SIZE must be at most "
        f"{train_images // replicas:,}{per}, or TRAIN_LIMIT and VAL_SIZE must leave more "
        "images to train on"
    )


_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def check_parameters(namespace: dict, notebook) -> NotebookParameters:
    """Check a notebook run's parameters (from ``globals()``) before anything is read or written.

    Unknown names are refused with the closest known one; values by the rules of
    :data:`_PARAMETER_RULES`, ``VAL_SIZE``/``TRAIN_LIMIT``/``BATCH_SIZE`` against CIFAR-100's
    training images. In a notebook's kernel it then locks ``OUTPUT_DIR`` (:func:`own_output_dir`).

    Returns:
        :class:`NotebookParameters`.

    Raises:
        ParameterError: every problem found, one per line, each naming the parameter.
        OutputDirInUse: another run of this notebook is writing into ``OUTPUT_DIR``.
    """
    defaults = notebook_defaults(notebook)
    known = _assigned_names(notebook)
    problems = []
    # papermill only warns on an unknown -p name (a typo such as EPOCH).
    for name in namespace:
        if name.startswith("_") or name in known or name in _IPYTHON_NAMES:
            continue
        close = difflib.get_close_matches(name.upper(), defaults, n=1, cutoff=0.6)
        if name.isupper() or close:
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(
                f"{name}: no such parameter{hint} The parameters are {', '.join(defaults)}"
            )
    values = {name: namespace.get(name, default) for name, default in defaults.items()}
    for name, value in values.items():
        test, what = _expected(name, defaults[name])
        if name not in ("VAL_SIZE", "TRAIN_LIMIT") and not test(value):  # those two: below
            problems.append(f"{name} = {value!r}: must be {what}")
    val, limit, batch = values["VAL_SIZE"], values["TRAIN_LIMIT"], values["BATCH_SIZE"]
    split = split_problem(TRAIN_IMAGES, len(FINE_LABEL_NAMES), val, limit, data="CIFAR-100")
    if split:
        problems.append(split)
    else:
        left = min(limit or TRAIN_IMAGES, TRAIN_IMAGES - val)  # the images to train on
        if is_int(batch) and batch > left:
            problems.append(_batch_too_large(batch, 1, left))
    if problems:
        raise ParameterError("Bad notebook parameters:\n  " + "\n  ".join(problems))
    if namespace is vars(sys.modules["__main__"]):  # a run (a notebook's kernel), not a check
        own_output_dir(values["OUTPUT_DIR"], notebook)
    return NotebookParameters(values, defaults)
