"""The tests' own shape: laid out like the package, helpers as a package, nothing on sys.path by hand.

- tests/<area>/ for each area of kvprobe (a subpackage kvprobe/P/ or a top-level module kvprobe/P.py),
  tests/toy_models/ for the plugin, tests/project/ for whole-project checks; no test file at the top.
- Every folder of tests is a package (equal basenames in two folders never clash), and test files
  import shared code from tests.helpers only, never from another test file.
- Nothing in tests/ edits sys.path; no file there is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import FIXTURES, ROOT, TESTS

OTHER_FOLDERS = {"toy_models", "project", "helpers", "fixtures"}  # the plugin, the whole project, shared code, data


def _areas() -> set[str]:
    package = ROOT / "kvprobe"
    return ({p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
            | {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")})


def _ours(path: Path) -> bool:
    """Not a fixture, a cache or a tool's folder (.hypothesis, __pycache__)."""
    parts = path.relative_to(TESTS).parts
    return not any(part.startswith((".", "__pycache__")) for part in parts) and FIXTURES not in (path, *path.parents)


def _folders() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*") if p.is_dir() and _ours(p))


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if _ours(p))


def test_test_folders_mirror_the_package():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and _ours(p)} | {"fixtures"}
    stray = folders - OTHER_FOLDERS - _areas()
    assert not stray, f"test folders for no kvprobe area: {sorted(stray)}"
    assert _areas() <= folders, f"kvprobe areas without a test folder: {sorted(_areas() - folders)}"
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []  # every test file lives in its area
    assert all(p.parent.parent == TESTS for p in TESTS.rglob("test_*.py")), "test folders are one level deep"


def test_every_test_folder_is_a_package():
    assert [str(p.relative_to(ROOT)) for p in [TESTS, *_folders()] if not (p / "__init__.py").is_file()] == []


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_tests_import_shared_code_from_the_helpers_only():
    bad = {str(p.relative_to(ROOT)): name for p in _python_files() for name in _imports(p)
           if name.startswith(("tests.", ".")) and not name.startswith("tests.helpers")
           or name.split(".")[-1].startswith("test_") or name.split(".")[0] in ("helpers", "conftest")}
    assert bad == {}


def _edits_sys_path(tree: ast.AST) -> bool:
    """`sys.path.insert(...)`, `.append`, `.extend`, `sys.path[...] = ...` or `sys.path = ...` anywhere."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            return True
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        if any(is_sys_path(t) or isinstance(t, ast.Subscript) and is_sys_path(t.value) for t in targets):
            return True
    return False


def test_nothing_in_tests_edits_sys_path():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))  # the check can fail
    assert _edits_sys_path(ast.parse("import sys\nsys.path[:0] = ['x']"))
    assert not _edits_sys_path(ast.parse("import sys\nprint(sys.path)"))
    assert [str(p.relative_to(ROOT)) for p in _python_files() if _edits_sys_path(ast.parse(p.read_text()))] == []


def test_no_test_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _python_files() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
