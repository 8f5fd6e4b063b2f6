"""The library's shape: data flows one way, no import cycle, the library never imports the CLI or the toy."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import ROOT as REPO

ROOT = REPO / "kvprobe"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvprobe modules (and `toy_models`) it imports, at any depth of its code."""
    mods = _modules()
    graph = {}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import hf` imports the submodule, not the package
                    out.add(f"{name}.{alias.name}" if f"{name}.{alias.name}" in mods else name)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) > 1:
                # a package's lazy re-exports, `lazy_exports(__name__, {"..data.samples": names})`: imports all the same
                for key in getattr(node.args[1], "keys", []):
                    level = len(key.value) - len(key.value.lstrip("."))
                    out.add(".".join(package[: len(package) - level + 1] + [key.value.lstrip(".")]))
        graph[mod] = {o for o in out if o in mods and o != mod} | {"toy_models" for o in out
                                                                   if o.split(".")[0] == "toy_models"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v in graph and not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return found


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_library_never_imports_the_cli_or_the_toy():
    entry = {"kvprobe.__main__"}  # `python -m kvprobe` is the command itself
    bad = {m: sorted(o for o in out if o.startswith("kvprobe.cli") or o == "toy_models")
           for m, out in import_graph().items() if not m.startswith("kvprobe.cli") and m not in entry}
    assert {m: o for m, o in bad.items() if o} == {}


def test_nothing_under_kvprobe_imports_the_toy():
    """The toy is a plugin everywhere, the CLI included: its model kind and its `kvprobe toy` command
    reach kvprobe through entry points (`kvprobe.model_kinds`, `kvprobe.cli`), never by an import,
    not even one by name (importlib.import_module("toy_models..."))."""
    static = sorted(m for m, out in import_graph().items() if "toy_models" in out)
    by_name = sorted(str(f.relative_to(ROOT.parent)) for f in ROOT.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
                     if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant)
                     and str(n.args[0].value).split(".")[0] == "toy_models")
    assert (static, by_name) == ([], [])


def test_no_library_file_over_500_lines():
    long = {str(f.relative_to(ROOT.parent)): n for f in ROOT.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}


# the pipeline, left to right: a module may import its own room and rooms to its left only
PIPELINE = ("errors", "files", "grid", "memento", "data", "store", "export", "capture", "probes", "stats", "analysis", "reconstruction", "causal", "reporting", "serving",
            "training", "config", "experiment", "cli")


def _room(module: str) -> int | None:
    parts = module.split(".")
    return PIPELINE.index(parts[1]) if len(parts) > 1 and parts[1] in PIPELINE else None


def test_data_flows_one_way():
    rooms = {m for m in import_graph() if m.count(".") >= 1}
    assert {m.split(".")[1] for m in rooms} - {"__main__"} == set(PIPELINE)  # every room has its place
    backwards = sorted(f"{m} -> {o}" for m, out in import_graph().items() for o in out
                       if _room(m) is not None and o != "toy_models" and (_room(o) or 0) > _room(m))
    assert backwards == []


def test_a_model_kind_that_is_not_installed_is_refused(monkeypatch):
    """The toy is a plugin: without its entry point a config naming it gets one clear line."""
    import pytest

    from kvprobe.experiment import ExperimentError, kinds

    assert kinds.model_kind("toy").name == "toy" and kinds.model_kind("hf") is kinds.HF
    monkeypatch.setattr(kinds, "entry_points", lambda group: [])
    kinds._plugins.cache_clear()
    try:
        with pytest.raises(ExperimentError, match=r"model.kind: no model kind 'toy' is installed \(known: hf\)"):
            kinds.model_kind("toy")
    finally:
        kinds._plugins.cache_clear()


# Words of the grid's vocabulary that are also another vocabulary's, per module, with what they mean there.
HOMONYMS = {
    "memento": {  # a mask condition (MaskConfig.name) or a chat template's name, not the site
        "config.py", "memento/masks.py", "memento/config.py", "reporting/plotting.py", "reporting/words.py",
        "data/chat.py", "serving/client.py", "serving/config.py", "serving/fork.py", "serving/offline.py", "cli/serve.py", "cli/demo.py"},
    "block_end": {"data/tokens.py", "data/synthetic.py", "data/traces.py", "memento/layout.py"},  # the token's name
    "mean": {"data/tokens.py"},  # how new token embeddings are initialised
    "last": {"reporting/paper.py"},  # the paper's "last layer"
}


def _grid_literals() -> dict[str, set[str]]:
    """Module (relative to kvprobe/) -> the site, pooling and probe-family names it writes as string literals
    outside docstrings, less the homonyms above."""
    from kvprobe.grid import FAMILIES, POOLINGS, SITES

    words = set(SITES) | set(POOLINGS) | set(FAMILIES)
    found: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).as_posix()
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        hits = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in words
                and id(n) not in docs and rel not in HOMONYMS.get(n.value, ())}
        if hits:
            found[rel] = hits
    return found


def test_the_grid_vocabulary_is_written_in_one_module():
    """Sites, poolings and probe families are named in kvprobe/grid.py; every other module imports them."""
    found = _grid_literals()
    assert set(found) == {"grid.py"}, {k: sorted(v) for k, v in found.items() if k != "grid.py"}


def test_functions_are_short_enough_to_hold():
    """No library function over 80 lines, and at most 5 over 60 (from `def` to its last line, docstring included)."""
    lengths = {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
               for path in ROOT.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {k: v for k, v in lengths.items() if v > 80} == {}
    assert len([k for k, v in lengths.items() if v > 60]) <= 5, sorted(k for k, v in lengths.items() if v > 60)
