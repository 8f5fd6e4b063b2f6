"""Regenerate the teaching notebook with its outputs: notebooks/toy_demo.py -> notebooks/toy_demo.ipynb.

    python notebooks/build.py

It reads the jupytext source, runs every cell in a fresh Jupyter kernel on this interpreter
and writes the notebook with what each cell printed and drew. The kernel works in a
temporary directory and writes its outputs to `kvprobe-notebook` there, so nothing lands
in the repository and the printed paths are the same on every run. Cell ids are numbered
and no execution timestamps are kept, so a rebuild changes only what the cells print
(their timings). The committed notebook is replaced only once every cell has run; a
failing cell leaves it as it was. Needs the `notebook` extra: pip install -e ".[notebook]".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "toy_demo.py"
NOTEBOOK = HERE / "toy_demo.ipynb"
OUT_NAME = "kvprobe-notebook"  # the kernel's KVPROBE_NOTEBOOK_OUT, relative to its temporary working directory
CELL_TIMEOUT_S = 600
NEEDS = ("jupytext", "nbclient", "nbformat", "ipykernel")


def kernel_manager():
    """A kernel manager that starts ipykernel on sys.executable, whatever kernelspecs are installed."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3 (ipykernel)", language="python", resource_dir=str(HERE))

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def build(source: Path = SOURCE, target: Path = NOTEBOOK) -> float:
    """Execute SOURCE in a kernel and write it, with outputs, to TARGET; return the seconds it ran."""
    import jupytext
    import nbclient
    import nbformat

    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # jupytext draws random ids; numbered ones keep rebuilds diffable
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvprobe-notebook-build-") as workdir:
        os.environ["KVPROBE_NOTEBOOK_OUT"] = OUT_NAME  # the kernel inherits the environment
        client = nbclient.NotebookClient(nb, km=kernel_manager(), kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                         record_timing=False, resources={"metadata": {"path": workdir}})
        client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    seconds = time.perf_counter() - start
    partial = target.with_name(target.name + ".partial")
    nbformat.write(nb, partial)
    os.replace(partial, target)
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse that refuses in one line on stderr, `notebooks/build.py: error: ...`, and exits 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Parse the (empty) command line, check the extra is installed, build, and report time and load."""
    parser = _Parser(prog="notebooks/build.py", description=__doc__.splitlines()[0])
    parser.parse_args(argv)  # no arguments: anything given is refused with exit 2
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}: pip install -e \".[notebook]\"")
    load_before = os.getloadavg()
    seconds = build()
    load_after = os.getloadavg()
    print(f"wrote {NOTEBOOK.relative_to(HERE.parent)}: executed in {seconds:.0f} s, "
          f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after (1 min), "
          f"{load_after[1]:.2f} over the last 5 min, on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
