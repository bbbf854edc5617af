"""Refresh a notebook's committed outputs from a real run of the committed code.

Committed notebooks carry outputs only where they are true of CIFAR-100 whatever data the
run saw: model summaries, parameter counts, previews on a real photo. Such cells carry the
tag ``keep-output``. This tool runs the notebook with papermill on a small synthetic archive
(``tests/synthetic_cifar.py``) in a temporary folder, from its first cell to its last
``keep-output`` cell (the cells after it, training and evaluation, cannot change those
outputs), then writes the notebook back with the outputs of ``keep-output`` cells and every
other cell's outputs cleared. Figures those cells save (under the run's
``OUTPUT_DIR/figures``) can be copied into ``images/`` with ``--copy-image``.

Usage::

    python tools/refresh_outputs.py simple_image_clasifier.ipynb \\
        --copy-image "simple_cnn_augmentation.png" [-p NAME VALUE ...]
    python tools/refresh_outputs.py image_classifier_with_transfer_learning.ipynb \\
        --copy-image "efficientnet_b0_augmentation.png" -p WEIGHTS null -p TRAIN_LIMIT 100
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import papermill

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # no CUDA-probe noise in the kept outputs
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import synthetic_cifar  # noqa: E402

import cifar_utils as cu  # noqa: E402

#: Quick settings for the cells that run (no training runs), each given only to the notebooks
#: that have that parameter.
QUICK = {"TRAIN_LIMIT": 200, "VAL_SIZE": 100}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--copy-image", action="append", default=[], metavar="NAME")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = synthetic_cifar.write_archive(tmp / "data", 1000, 200)
        known = cu.notebook_defaults(args.notebook)
        params = {
            **{name: value for name, value in QUICK.items() if name in known},
            "DATA_DIR": str(archive),
            "OUTPUT_DIR": str(tmp / "results"),
            **{name: json.loads(value) for name, value in args.p},
        }
        nb = nbformat.read(args.notebook, as_version=4)
        kept = [i for i, c in enumerate(nb.cells) if "keep-output" in c.metadata.get("tags", [])]
        nb.cells = nb.cells[: kept[-1] + 1]
        nbformat.write(nb, tmp / "in.ipynb")
        executed = papermill.execute_notebook(
            str(tmp / "in.ipynb"),
            str(tmp / "out.ipynb"),
            parameters=params,
            cwd=str(ROOT),
            kernel_name="python3",
            progress_bar=False,
        )
        outputs = {c["id"]: c for c in executed.cells}
        for name in args.copy_image:
            shutil.copy(tmp / "results" / "figures" / name, ROOT / "images" / name)
    nb = nbformat.read(args.notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "keep-output" in cell.metadata.get("tags", []):
            ran = outputs[cell.id]
            cell.outputs, cell.execution_count = ran.outputs, ran.execution_count
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, args.notebook)
    print(f"{args.notebook}: kept outputs of the keep-output cells, cleared the rest")


if __name__ == "__main__":
    main()
