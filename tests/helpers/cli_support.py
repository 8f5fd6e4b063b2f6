"""Shared helpers for the CLI tests: the tiny study, in-process `kvprobe` calls, the refusal contract."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable

import yaml

from kvprobe.cli import main
from tests.helpers.sandbox import NETWORK

# The smallest study that still exercises every stage: 300 toy samples, two layers,
# the causal control, the direct and one masked offset, linear probes only.
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"kind": "toy", "checkpoint": "final"},
    "data": {"kind": "toy", "n_samples": 300, "target_block": 1},
    "capture": {"layers": [0, 3], "offsets": [-1, 0, 1], "batch_size": 150, "shard_size": 200},
    "conditions": {"memento": {"keep_last_n_blocks": 0}},
    "probe": {"families": ["linear"], "n_boot": 200, "shuffled_control": False},
}
# 300 samples x 2 layers x 3 offsets x 5 vectors x (K+V x 4 KV heads x 32 dims) x 2 bytes (float16)
TINY_BYTES = 300 * 2 * 3 * 5 * 256 * 2  # samples x layers x offsets x (4 tail tokens + mean) x D x fp16
# TINY with one fixed probe strength (no inner split): the same stages, a few seconds
FAST = {**TINY, "probe": {**TINY["probe"], "linear_l2_grid": [0.001]}}


# ----------------------------------------------------------------------------- helpers


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_quiet(*args) -> tuple[int, str, str]:
    """main() with its output captured, for module-scoped fixtures (no capsys there)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]] | None:
    """Every file under root with its size and mtime; None when root does not exist."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 2 and exactly one line on stderr, `kvprobe: error: ...`, naming each needle."""
    assert code == 2, f"exit {code}, stderr: {err!r}"
    lines = err.splitlines()  # splits on '\r' too: a progress bar is an extra line
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("kvprobe: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def sandbox_args(argv: list[str], root: Path, **more: Any) -> list[str]:
    """argv of a bad-input table with its placeholders filled: {dir} the sandbox, {cfg} its tiny config,
    {run} its copy of a finished run, {out} an output directory, and {NAME} for each of `more` (e.g. url)."""
    where = {"dir": root, "cfg": root / "tiny.yaml", "run": root / "run", "out": root / "out", **more}
    out = []
    for arg in argv:
        for name, value in where.items():
            arg = arg.replace(f"{{{name}}}", str(value))
        out.append(arg)
    return out


def assert_refused_untouched(capsys, root: Path, args: list[str], *needles: str, absent: tuple[str, ...] = ("out",),
                             snap: Callable[[Path], Any] = snapshot) -> None:
    """The bad-input contract: `kvprobe args` tries no network, prints no traceback, is refused in one
    line naming `needles`, leaves none of `absent` (under root) behind and changes nothing under root
    (as `snap` sees it)."""
    before = snap(root)
    NETWORK.clear()
    code, _, err = cli(capsys, *args)
    assert not NETWORK, f"tried to reach the network: {NETWORK}"
    assert "Traceback" not in err, err
    assert_refused(code, err, *needles)
    for name in absent:
        assert not (root / name).exists(), sorted(str(p) for p in (root / name).rglob("*"))
    assert snap(root) == before


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kvprobe: error: ")]
    assert len(lines) == 1, err
    return lines[0]


