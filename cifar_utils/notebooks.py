"""The notebooks beside this package: finding them, and running one tagged cell of theirs.

A notebook is the one place where its network is written (its cell tagged ``network``), so
the tests, the benchmark and the scripts build that very network from the notebook file
rather than from a second copy of it (:func:`cifar_utils.models.build_from_notebook`).
nbformat reads notebooks; what it lacks, and this module adds, is running one cell found by
its tag on its own, with a clear error when the file or the cell is missing.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the notebooks: the repository root, beside this package.
NOTEBOOK_DIR = Path(__file__).resolve().parents[1]


def notebook_path(notebook) -> Path:
    """``notebook`` as a path; a relative name that does not exist here is looked up in
    :data:`NOTEBOOK_DIR` (where the notebooks live, beside this package)."""
    path = Path(notebook)
    if not path.is_absolute() and not path.exists():
        path = NOTEBOOK_DIR / path
    return path


def run_tagged_cell(notebook, tag: str, namespace: dict) -> dict:
    """Run the one code cell of ``notebook`` tagged ``tag`` in a copy of ``namespace``.

    Args:
        notebook: a notebook's path, or its file name in :data:`NOTEBOOK_DIR`.
        tag: the cell tag (Jupyter's cell metadata ``tags``).
        namespace: the names the cell uses from the notebook's earlier cells (e.g. ``keras``);
            not changed.

    Returns:
        dict: the namespace after the cell ran (what it imported and defined, added).

    Raises:
        FileNotFoundError: no such notebook (the message names the file and the tag).
        LookupError: no code cell, or more than one, carries ``tag``.
        Exception: whatever the cell raises, its traceback naming the notebook and the tag.
    """
    import nbformat

    path = notebook_path(notebook)
    if not path.is_file():
        raise FileNotFoundError(
            f"No notebook at {path}: its code cell tagged '{tag}' is needed. The notebooks "
            f"live in the repository root ({NOTEBOOK_DIR}); restore the file (git checkout "
            f"-- {path.name}) or name another notebook."
        )
    cells = [
        cell
        for cell in nbformat.read(path, as_version=4).cells
        if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])
    ]
    if len(cells) != 1:
        raise LookupError(
            f"{path} has {len(cells)} code cells tagged '{tag}', not one: tag the cell that "
            f"defines it (in Jupyter: View > Cell Toolbar > Tags), or restore it with git "
            f"checkout -- {path.name}"
        )
    code = compile(cells[0].source, f"{path} (cell tagged '{tag}')", "exec")
    scope = dict(namespace)
    exec(code, scope)  # the notebook's own code, run as the notebook runs it
    return scope
