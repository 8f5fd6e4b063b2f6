"""`pip install -e .` alone, no extras, runs `kvprobe demo` in a fresh virtual environment (issue 31).

Builds the environment (minutes: torch from pip's cache or the local file, then the base
dependencies), so it runs only when asked: KVPROBE_BASE_INSTALL=1. Passed on 2026-12-06 in 138 s
on this project's 2-core machine (torch from pip's cache).
"""

from __future__ import annotations

import os
import subprocess
import venv

import pytest

from tests.helpers.paths import ROOT

EXTRAS_PACKAGES = ("httpx", "datasets", "accelerate", "wandb", "tensorboard", "transformer_lens", "nnsight",
                   "playwright", "pdoc", "jupyterlab")


@pytest.mark.skipif(os.environ.get("KVPROBE_BASE_INSTALL") != "1",
                    reason="builds a virtual environment (minutes): set KVPROBE_BASE_INSTALL=1")
def test_the_base_install_runs_the_demo(tmp_path):
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=1500, cwd=tmp_path)

    for step in (["-m", "pip", "install", "-q", "torch==2.13.0"], ["-m", "pip", "install", "-q", "-e", str(ROOT)]):
        done = run(*step)
        assert done.returncode == 0, done.stderr[-2000:]
    found = run("-c", f"import importlib.util as u; print([m for m in {EXTRAS_PACKAGES!r} if u.find_spec(m)])")
    assert found.stdout.strip() == "[]"  # no extra came along
    demo = run("-m", "kvprobe", "--threads", "1", "demo", "--out", "demo", "--samples", "500", "--quiet")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    assert (tmp_path / "demo" / "report" / "summary.md").is_file()
