"""The library's shape: data flows one way, no import cycle, the library never imports the CLI or the toy."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kvprobe"


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


def test_no_library_file_over_500_lines():
    long = {str(f.relative_to(ROOT.parent)): n for f in ROOT.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}


# the pipeline, left to right: a module may import its own room and rooms to its left only
PIPELINE = ("errors", "memento", "data", "store", "capture", "probes", "stats", "analysis", "causal", "reporting", "serving",
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
