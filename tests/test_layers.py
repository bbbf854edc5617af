"""The package's layout (issue: a house a newcomer can find their way in): modules import only
modules listed before them in ``cifar_utils/__init__.py``'s table, none is too long to read
in one sitting, each says what it holds, and every public name is where ``__all__`` says."""

import ast
import re
from pathlib import Path

import cifar_utils as cu

PACKAGE = Path(cu.__file__).parent


def _layers() -> list[str]:
    """The modules in the order of the table in the package docstring, bottom first."""
    return re.findall(r"^``(\w+)``\s", cu.__doc__, flags=re.M)


def _imported(module: str) -> set[str]:
    """The package's modules that ``module`` imports (``from .x import``, ``from . import x``)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom | ast.Import) and "cifar_utils" in ast.dump(node):
            raise AssertionError(f"{module} imports the package by name; use relative imports")
    return found


def test_the_table_names_every_module_once():
    files = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert sorted(_layers()) == sorted(files) and len(set(_layers())) == len(_layers())


def test_modules_import_only_lower_layers():
    layers = _layers()
    for i, module in enumerate(layers):
        above = _imported(module) - set(layers[:i])
        assert not above, f"{module} imports {sorted(above)}, which are not below it"


def test_modules_are_short_and_say_what_they_hold():
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 700, f"{path.name} has {len(lines)} lines"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


def test_every_public_name_is_where_all_says():
    assert len(cu.__all__) == len(set(cu.__all__))
    root = PACKAGE.parent
    users = [*root.glob("*.ipynb"), root / "app.py", *root.glob("benchmarks/*.py"),
             *root.glob("tools/*.py")]  # fmt: skip
    used = {n for path in users for n in re.findall(r"\bcu\.(\w+)", path.read_text())}
    assert len(used) > 30 and not used - set(cu.__all__), sorted(used - set(cu.__all__))
    for name in cu.__all__:
        assert getattr(cu, name) is not None
        assert not name.startswith("_")
    assert dir(cu) == sorted(cu.__all__)
