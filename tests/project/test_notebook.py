"""The teaching notebook (notebooks/toy_demo.ipynb): it opens with its outputs, matches its source, and runs.

`notebooks/toy_demo.py` (jupytext percent format) is the source; the committed `.ipynb`
is generated from it, executed, with outputs, by one command:

    python notebooks/build.py

The execution test runs the whole notebook in a Jupyter kernel on this interpreter
(about a minute on 2 CPU cores) and checks that it printed the leakage table and drew
at least one figure inline.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types

import pytest

from tests.helpers.cli_support import snapshot
from tests.helpers.paths import NOTEBOOKS

SOURCE = NOTEBOOKS / "toy_demo.py"
NOTEBOOK = NOTEBOOKS / "toy_demo.ipynb"
CELL_TIMEOUT_S = 300
MAX_CELL_LINES = 25
MAX_NOTEBOOK_BYTES = 2_000_000
REBUILD = "regenerate it: python notebooks/build.py"

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def _committed():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _calls(source: str, name: str) -> int:
    """How many times the cell calls NAME(...) outside the functions it defines."""
    top = [stmt for stmt in ast.parse(source).body if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef))]
    return sum(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
               for stmt in top for node in ast.walk(stmt))


def _build_script() -> types.ModuleType:
    """notebooks/build.py as a module (it is a script, not part of the package), without a __pycache__."""
    path = NOTEBOOKS / "build.py"
    module = types.ModuleType("notebook_build")
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def test_notebook_matches_its_source():
    from_py = jupytext.read(SOURCE)
    from_ipynb = jupytext.read(NOTEBOOK)
    assert [s for t, s in _cells(from_ipynb) if t == "code"] == [s for t, s in _cells(from_py) if t == "code"], (
        f"the code of notebooks/toy_demo.ipynb differs from toy_demo.py: {REBUILD}")
    assert _cells(from_ipynb) == _cells(from_py), f"the text of toy_demo.ipynb differs from toy_demo.py: {REBUILD}"


def test_notebook_is_committed_with_its_outputs():
    """Every cell that prints or draws shows what it printed or drew, from one clean run, top to bottom."""
    cells = _code_cells(_committed())
    silent = [i for i, cell in enumerate(cells)
              if (_calls(cell.source, "print") or _calls(cell.source, "show")) and not cell.outputs]
    assert not silent, f"code cells {silent} of toy_demo.ipynb print or draw but hold no outputs: {REBUILD}"
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), (
        f"toy_demo.ipynb was not run once, top to bottom: {REBUILD}")
    outputs = [out for cell in cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert not [out for out in outputs if out.output_type == "stream" and out.name == "stderr"], (
        "toy_demo.ipynb shows warnings or errors on stderr")
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "layer       -1      +0      +1      +2" in text
    assert "outputs (KV stores, figures) in kvprobe-notebook" in text  # build.py's fixed, relative output folder
    assert "/tmp" not in text, "the committed outputs name a temporary path that changes every run"
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert len(images) == sum(_calls(cell.source, "show") for cell in cells)  # each figure shown inline
    assert not [cell.metadata for cell in cells if "execution" in cell.metadata], "execution timestamps were kept"


def test_committed_notebook_is_small():
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_cells_are_short():
    long = {i: len(cell.source.splitlines()) for i, cell in enumerate(jupytext.read(SOURCE).cells)
            if len(cell.source.splitlines()) > MAX_CELL_LINES}
    assert not long, f"cells of toy_demo.py over {MAX_CELL_LINES} lines (index: lines): {long}"


def _first_code_cell() -> str:
    nb = jupytext.read(SOURCE)
    assert nb.cells[0].cell_type == "markdown"  # the title, then the Colab cell
    assert nb.cells[1].cell_type == "code"
    return nb.cells[1].source


def test_first_code_cell_is_colab_ready():
    source = _first_code_cell()
    assert '"google.colab" in sys.modules' in source
    assert '"pip", "install"' in source


def test_colab_cell_does_nothing_on_a_local_install(tmp_path, monkeypatch, capsys):
    def no_install(*args, **kwargs):
        raise AssertionError(f"the Colab cell ran {args} outside Colab")

    monkeypatch.setattr("subprocess.run", no_install)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setenv("KVPROBE_NOTEBOOK_OUT", str(tmp_path / "out"))
    exec(_first_code_cell(), {})
    assert capsys.readouterr().out.strip() == f"outputs (KV stores, figures) in {tmp_path / 'out'}"
    assert (tmp_path / "out" / "figures").is_dir()


def test_colab_cell_installs_kvprobe_on_colab(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda command, **kwargs: calls.append((command, kwargs)))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("KVPROBE_NOTEBOOK_OUT", raising=False)
    monkeypatch.delenv("KVPROBE_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="KVPROBE_SOURCE"):  # no address given: it never guesses one
        exec(_first_code_cell(), {})
    assert calls == []
    monkeypatch.setenv("KVPROBE_SOURCE", "git+https://example.org/my/kvprobe")
    exec(_first_code_cell(), {})
    [(command, kwargs)] = calls
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and kwargs == {"check": True}
    assert command[-1] == "kvprobe @ git+https://example.org/my/kvprobe"
    assert capsys.readouterr().out.strip() == "outputs (KV stores, figures) in kvprobe-notebook"
    assert (tmp_path / "kvprobe-notebook" / "figures").is_dir()


@pytest.mark.parametrize("argv, needle", [(["--out", "x.ipynb"], "--out"), (["extra"], "extra")])
def test_build_refuses_arguments(argv, needle, capsys):
    before = snapshot(NOTEBOOKS)
    with pytest.raises(SystemExit) as exit_:
        _build_script().main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("notebooks/build.py: error:") and needle in err
    assert snapshot(NOTEBOOKS) == before


def test_build_names_the_missing_extra(monkeypatch, capsys):
    build = _build_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None if name == "nbclient" else real(name))
    before = snapshot(NOTEBOOKS)
    with pytest.raises(SystemExit) as exit_:
        build.main([])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "nbclient" in err and '".[notebook]"' in err
    assert snapshot(NOTEBOOKS) == before


def _this_interpreter_kernel():
    """A kernel manager that starts ipykernel on sys.executable, whatever kernelspecs are installed."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"Python ({sys.executable})",
                language="python",
                resource_dir=str(NOTEBOOKS),
            )

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("KVPROBE_NOTEBOOK_OUT", str(tmp_path / "out"))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_this_interpreter_kernel(),
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # working directory: nothing lands in the repo
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "memento: linear probe accuracy (%), chance 10" in text
    assert "layer       -1      +0      +1      +2" in text
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert len(images) >= 1
    assert (tmp_path / "out" / "figures" / "accuracy_by_distance.png").is_file()
    assert (tmp_path / "out" / "stores" / "memento" / "kvstore.h5").is_file()
