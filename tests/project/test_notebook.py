"""The teaching notebook (notebooks/toy_demo.ipynb): it runs, and it matches its source.

`notebooks/toy_demo.py` (jupytext percent format) is the source; the committed `.ipynb`
is generated from it with outputs stripped:

    jupytext --sync notebooks/toy_demo.py     # or: jupytext --to ipynb notebooks/toy_demo.py

The execution test runs the whole notebook in a Jupyter kernel on this interpreter
(about a minute on 2 CPU cores) and checks that it printed the leakage table and drew
at least one figure inline.
"""

from __future__ import annotations

import sys

import pytest

from tests.helpers.paths import NOTEBOOKS

SOURCE = NOTEBOOKS / "toy_demo.py"
NOTEBOOK = NOTEBOOKS / "toy_demo.ipynb"
CELL_TIMEOUT_S = 300

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def test_notebook_matches_its_source():
    from_py = jupytext.read(SOURCE)
    from_ipynb = jupytext.read(NOTEBOOK)
    assert _cells(from_ipynb) == _cells(from_py), (
        "notebooks/toy_demo.ipynb is out of sync with toy_demo.py: run `jupytext --sync notebooks/toy_demo.py`"
    )


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"cells {dirty} of toy_demo.ipynb hold outputs: regenerate it with jupytext from the .py"


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
