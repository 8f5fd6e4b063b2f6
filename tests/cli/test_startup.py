"""The command answers at once when it needs no model (issue 29): `--help` of every command and
refusals of input load none of the heavy libraries, and the lazy re-exports still give every name.

Each command runs in a fresh interpreter (a subprocess), which reports the modules it ended up
with; the commands are read off the parser, so a new subcommand is covered without an edit here.
The time itself is measured by benchmarks/bench_startup.py, not here (a loaded machine would
make a timed test flaky).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kvprobe.cli import build_parser
from tests.helpers.cli_support import assert_refused, snapshot
from tests.helpers.paths import ROOT

# what `--help` of any command must not import
HEAVY = ("torch", "transformers", "sklearn", "h5py", "nnsight", "transformer_lens", "matplotlib", "pandas",
         "plotly", "tensorboard", "wandb")
MODEL_LIBRARIES = ("torch", "transformers", "sklearn")  # what no refusal of input needs

_CHILD = """
import json, sys
from kvprobe.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def run_fresh(argv: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """`kvprobe ARGV` in a new interpreter: its exit status, the HEAVY modules it imported, its stderr."""
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # main returned (whatever its status): the child printed its report
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["exit"], report["loaded"], done.stderr


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of `parser` (e.g. ("toy", "train")), depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [prefix + (name,), *command_paths(sub, prefix + (name,))]
    return found


COMMANDS = command_paths(build_parser())


def test_the_commands_are_read_off_the_parser():
    names = {" ".join(c) for c in COMMANDS}
    assert {"run", "capture", "probe", "verify", "serve", "generate", "sft", "toy train", "toy eval"} <= names


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "kvprobe")
def test_help_loads_no_heavy_library(command, tmp_path):
    code, loaded, err = run_fresh([*command, "--help"], tmp_path)
    assert (code, loaded, err) == (0, [], "")


# (id, argv, what the one error line names, the libraries it must not load). In argv {dir} is a
# scratch directory and {out} an output path there that must not appear. A run directory's commands
# read the store's index with h5py at hand; none of them needs a model's libraries to refuse.
REFUSALS = [
    ("missing-config-run", ["run", "{dir}/missing.yaml", "--out", "{out}"], ["missing.yaml", "no such config file"],
     HEAVY),
    ("missing-config-capture", ["capture", "{dir}/missing.yaml", "--out", "{out}"], ["missing.yaml"], HEAVY),
    ("bad-set-yaml", ["capture", "--set", "data.n_samples=[1", "--dry-run"], ["--set", "data.n_samples"], HEAVY),
    ("bad-set-field", ["run", "{dir}/tiny.yaml", "--out", "{out}", "--set", "data.n_samples=1"], ["data.n_samples"],
     HEAVY),
    ("threads-0", ["--threads", "0", "layout"], ["--threads"], HEAVY),
    ("kvprobe-threads", ["layout"], ["KVPROBE_THREADS"], HEAVY),
    ("demo-samples", ["demo", "--samples", "10", "--out", "{out}"], ["--samples"], HEAVY),
    ("layout-keep", ["layout", "--keep-last-n-blocks", "-3"], ["--keep-last-n-blocks"], HEAVY),
    ("toy-train-steps", ["toy", "train", "--steps", "0", "--out", "{out}"], ["steps"], HEAVY),
    ("toy-eval-samples", ["toy", "eval", "--samples", "0"], ["--samples"], HEAVY),
    ("export-missing", ["export-traces", "--generations", "{dir}/missing.jsonl", "--out", "{out}"], ["missing.jsonl"],
     HEAVY),
    ("generate-missing", ["generate", "--prompts", "{dir}/missing.jsonl", "--out", "{out}"], ["missing.jsonl"], HEAVY),
    ("probe-not-a-run", ["probe", "{dir}/nowhere"], ["nowhere"], MODEL_LIBRARIES),
    ("report-not-a-run", ["report", "{dir}/nowhere"], ["nowhere"], MODEL_LIBRARIES),
    ("verify-not-a-run", ["verify", "{dir}/nowhere"], ["nowhere"], MODEL_LIBRARIES),
]


@pytest.mark.parametrize("argv, needles, unloaded", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_a_refusal_that_needs_no_model_loads_none(argv, needles, unloaded, tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text("name: tiny\n")
    if "KVPROBE_THREADS" in needles:
        monkeypatch.setenv("KVPROBE_THREADS", "two")
    before = snapshot(tmp_path)
    code, loaded, err = run_fresh([a.format(dir=tmp_path, out=tmp_path / "out") for a in argv], tmp_path)
    assert_refused(code, err, *needles)
    assert [m for m in loaded if m in unloaded] == []
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_torch_and_transformers_settings_apply_when_they_load_later(tmp_path):
    """The command sets torch's threads and turns transformers' progress bars off as each loads,
    however late: here torch loads inside the command and transformers after it returned."""
    child = """
import json, sys
from kvprobe.cli import main
before = sorted(m for m in ("torch", "transformers") if m in sys.modules)
code = main(["--threads", "1", "layout"])
import torch
from transformers.utils import logging
print(json.dumps([before, code, torch.get_num_threads(), logging.is_progress_bar_enabled()]))
"""
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], 0, 1, False]


# ----------------------------------------------------------------------------- lazy re-exports


PACKAGES = ["kvprobe", *sorted(f"kvprobe.{p.name}" for p in (ROOT / "kvprobe").iterdir() if (p / "__init__.py").is_file()),
            "toy_models"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", [])
    assert [n for n in names if not hasattr(module, n)] == []
    assert set(names) <= set(dir(module))


def test_a_lazy_name_is_the_defining_modules_object():
    import kvprobe
    import kvprobe.capture
    from kvprobe.capture.spec import CaptureConfig
    from kvprobe.memento import masks
    from kvprobe.probes import mlp

    assert kvprobe.MaskConfig is masks.MaskConfig and kvprobe.allow_matrix is masks.allow_matrix
    assert kvprobe.capture.CaptureConfig is CaptureConfig
    from kvprobe.probes import MLPConfig

    assert MLPConfig is mlp.MLPConfig


def test_old_names_and_submodules_still_resolve_and_unknown_names_do_not():
    import kvprobe.capture
    import kvprobe.experiment

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kvprobe.capture.CaptureSpec is kvprobe.capture.CaptureConfig  # a renamed name, for one release
    assert [type(w.message) for w in caught] == [DeprecationWarning]
    from kvprobe.experiment import resolve  # a submodule, not a re-exported name

    assert resolve.__name__ == "kvprobe.experiment.resolve"
    with pytest.raises(AttributeError, match="'kvprobe.experiment' has no attribute 'nothing_here'"):
        kvprobe.experiment.nothing_here  # noqa: B018
