"""The notebooks beside this package: finding them, and running one tagged cell of theirs.

nbformat reads notebooks; it lacks running one cell found by its tag, with clear errors.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the notebooks: the repository root, beside this package.
NOTEBOOK_DIR = Path(__file__).resolve().parents[1]


def notebook_path(notebook) -> Path:
    """``notebook`` as a path; a relative name not found here is taken in :data:`NOTEBOOK_DIR`."""
    path = Path(notebook)
    if not path.is_absolute() and not path.exists():
        path = NOTEBOOK_DIR / path
    return path


def run_tagged_cell(notebook, tag: str, namespace: dict) -> dict:
    """Run ``notebook``'s one code cell tagged ``tag`` in a copy of ``namespace``; return that copy.

    Raises:
        FileNotFoundError: no such notebook.
        LookupError: not exactly one code cell carries ``tag``.
        Exception: whatever the cell raises (traceback names notebook and tag).
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
