"""The `kvprobe` command end to end: every subcommand, its --help, and bad input.

Everything runs in-process through `kvprobe.cli.main` (imports are paid once) on tiny
toy configs; one test runs the installed console script in a subprocess. Bad input
must exit 2 with exactly one line on stderr naming the offending field or file, and
must leave no partial output behind. `kvprobe demo`: test_cli_demo.py; `kvprobe toy`:
tests/toy_models/test_toy_cli.py; the example configs: tests/config/test_example_configs.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvprobe.cli import build_parser
from kvprobe.config import ConfigError, ExperimentConfig, load_config, parse_config
from kvprobe.stats import holm
from tests.helpers.cli_support import (TINY, TINY_BYTES, assert_refused, cli, cli_quiet, error_line, snapshot,
                                       write_config)
from tests.helpers.paths import EXPERIMENTS
from tests.helpers.paths import ROOT as REPO

REPORT_FILES = ("summary.md", "results.csv", "results.json", "diffs.csv")
FIGURES = ("accuracy_by_layer", "accuracy_by_distance", "accuracy_heatmap")


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (nested) subcommand of the parser: ('toy', 'train') -> its parser."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + (name,)] = sub
                found.update(subcommands(sub, prefix + (name,)))
    return found


# ----------------------------------------------------------------------------- --help

ALL_SUBCOMMANDS = [("demo",), ("layout",), ("toy",), ("toy", "train"), ("toy", "eval"), ("capture",), ("run",),
                   ("probe",), ("report",), ("serve",), ("generate",), ("generate-offline",), ("export-traces",),
                   ("sft",), ("verify",), ("export",), ("reconstruct",)]


def test_every_subcommand_is_covered():
    assert sorted(subcommands(build_parser())) == sorted(ALL_SUBCOMMANDS)


@pytest.mark.parametrize(
    "command",
    list(ALL_SUBCOMMANDS),
    ids=" ".join,
)
def test_help_exits_0_and_shows_examples(capsys, command):
    code, out, err = cli(capsys, *command, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: kvprobe {' '.join(command)}")
    assert "\nexamples:\n" in out
    examples = out.split("\nexamples:\n", 1)[1]
    assert f"kvprobe {' '.join(command)}" in examples, examples


def test_version(capsys):
    import kvprobe

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"kvprobe {kvprobe.__version__}"
    assert kvprobe.__version__ == importlib.metadata.version("kvprobe")  # one version: the package's


def test_top_level_help_lists_every_subcommand(capsys):
    code, out, err = cli(capsys, "--help")
    assert code == 0 and err == ""
    for name in {c[0] for c in ALL_SUBCOMMANDS}:
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_help_examples_name_configs_that_exist():
    missing = set()
    for sub in subcommands(build_parser()).values():
        for name in re.findall(r"experiments/[\w./-]+\.(?:ya?ml|toml|json)", sub.epilog or ""):
            if not (REPO / name).is_file():
                missing.add(name)
    assert not missing, f"--help examples name missing configs: {sorted(missing)}"


# ----------------------------------------------------------------------------- the entry point


def test_console_script_is_installed_and_exits_2_on_bad_input(tmp_path):
    # the venv's bin is on PATH when the venv is active; fall back to it when pytest runs unactivated
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    exe = shutil.which("kvprobe", path=search)
    assert exe, "the kvprobe console script is not installed"
    proc = subprocess.run([exe, "capture", "missing.yaml", "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_refused(proc.returncode, proc.stderr, "missing.yaml")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- capture --dry-run


def test_capture_dry_run_prints_plan_and_size_and_writes_nothing(capsys, tmp_path, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "capture", config, "--dry-run", "--out", tmp_path / "run")
    assert code == 0, err
    assert "[memento]" in out
    assert "samples        300 in 2 shard(s) of 200" in out
    assert "layers         [0, 3] of 4" in out
    assert "sites          ['memento'] at offsets [-1, 0, 1] from target block 1" in out
    assert f"expected size  {TINY_BYTES:,} bytes" in out
    assert f"total expected size: {TINY_BYTES:,} bytes" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # not even --out


def test_capture_dry_run_with_builtin_config_and_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "capture", "--dry-run", "--set", "data.n_samples=100", "--set", "capture.layers=[2]",
                         "--set", "capture.offsets=[0]")
    assert code == 0, err
    assert "samples        100 in 1 shard(s)" in out and "layers         [2] of 4" in out
    assert f"total expected size: {100 * 5 * 256 * 2:,} bytes" in out  # tail_mean: 5 vectors of 256
    assert list(tmp_path.iterdir()) == []


def test_custom_study_toml_dry_run(capsys, tmp_path, monkeypatch):
    config = EXPERIMENTS / "custom_study.toml"
    cfg = load_config(config)
    assert cfg.model.kind == "toy" and cfg.data.target_block == 3
    assert cfg.capture.layers == (1, 3) and cfg.capture.pooling == ("last",) and cfg.probe.pooling == "last"
    assert sorted(c.keep_last_n_blocks for c in cfg.conditions.values()) == [0, 1]
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "capture", config, "--dry-run")
    assert code == 0, err
    for name in cfg.conditions:
        assert f"[{name}]" in out
    assert "from target block 3" in out and "pooling        ['last']" in out and "layers         [1, 3] of 4" in out
    assert "keep_last_n_blocks=1" in out and "keep_last_n_blocks=0" in out
    per_condition = cfg.data.n_samples * 2 * 4 * 256 * 2  # layers x offsets x (K+V x 4 x 32) x float16
    assert out.count(f"expected size  {per_condition:,} bytes") == 2
    assert f"total expected size: {2 * per_condition:,} bytes" in out
    assert f"{2 * per_condition:,} bytes" in config.read_text()  # its comment tells the truth
    assert list(tmp_path.iterdir()) == []


def test_custom_study_reports_its_paired_difference(capsys, tmp_path):
    """The custom study asks memento vs keep-last-1: its report answers with a paired difference."""
    config = EXPERIMENTS / "custom_study.toml"
    assert load_config(config).comparisons() == (("memento", "keep-last-1"),)
    out = tmp_path / "custom"
    code, _, err = cli(capsys, "run", config, "--out", out, "--set", "data.n_samples=300",
                       "--set", "probe.n_boot=200", "--set", "probe.shuffled_control=false",
                       "--set", "probe.linear_l2_grid=[0.001]")  # a fixed strength: the pairing is what is tested
    assert code == 0, err
    diffs = (out / "report" / "diffs.csv").read_text().splitlines()
    assert len(diffs) == 1 + 2 * 4  # header + layers x offsets, each memento - keep-last-1
    summary = (out / "report" / "summary.md").read_text()
    assert "**memento − keep-last-1** (masks memento − memento-keep1)" in summary  # masks read from the stores


def test_config_defaults_are_the_python_defaults():
    """One declaration, one set of defaults: a config that says nothing captures and probes as Python does."""
    from dataclasses import replace

    from kvprobe.analysis import ProbeConfig
    from kvprobe.capture import CaptureConfig

    cfg = parse_config({})
    assert cfg.capture_spec("memento") == CaptureConfig(layers=(0, 1, 2, 3))
    for kind in ("linear", "mlp"):
        assert cfg.probe_settings(kind) == replace(ProbeConfig(), families=(kind,), device=cfg.model.device)


def test_comparisons_are_checked_and_default_sensibly():
    base = dict(TINY, conditions={"memento": {}, "text-only": {"restart_mode": True},
                                  "keep1": {"keep_last_n_blocks": 1}})
    assert parse_config(base).comparisons() == (("memento", "text-only"),)  # the standard pair only, by mask
    chosen = parse_config(dict(base, report={"comparisons": [["keep1", "memento"]]}))
    assert chosen.comparisons() == (("keep1", "memento"),)
    renamed = dict(TINY, conditions={"text-only": {"restart_mode": True, "mask_delimiters": True}, "paper": {}})
    assert parse_config(renamed).comparisons() == (("paper", "text-only"),)  # by mask, whatever the names
    with pytest.raises(ConfigError, match=r"report.comparisons.*'nope'.*not in conditions"):
        parse_config(dict(base, report={"comparisons": [["memento", "nope"]]}))
    with pytest.raises(ConfigError, match="compares a condition with itself"):
        parse_config(dict(base, report={"comparisons": [["keep1", "keep1"]]}))


def test_sweep_without_plus_one_follows_the_first_masked_offset(capsys, tmp_path):
    """A sweep over two checkpoints whose offsets skip +1 reports masked +2, not a KeyError."""
    fixed = dict(TINY["probe"], linear_l2_grid=[1e-3])  # a fixed strength keeps it quick
    config = write_config(tmp_path / "sweep.yaml", dict(TINY, probe=fixed, sweep={
        "checkpoints": ["series/step_000450", "final"], "n_samples": 300, "layers": [0, 3], "offsets": [0, 2],
        "task_samples": 100}))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", config, "--out", out)
    assert code == 0, err
    points = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [p["checkpoint"] for p in points] == ["series/step_000450", "final"]
    assert all(p["masked_offset"] == 2 and 0.1 < p["masked_accuracy"] < p["direct_accuracy"] for p in points)
    assert all(p["layer"] == 3 for p in points)
    from kvprobe.store import KVStore

    with KVStore(out / "sweep" / "final") as store:  # only the reported layer is captured (and probed)
        assert store.layers == [3]
    summary = (out / "report" / "summary.md").read_text()
    assert "masked accuracy is the masked +2 probe" in summary and "Across 2 checkpoints" in summary
    with pytest.raises(ConfigError, match=r"sweep.offsets.*at least one offset > 0"):
        parse_config(dict(TINY, sweep={"checkpoints": ["final"], "offsets": [-1, 0]}))


# ----------------------------------------------------------------------------- capture, probe, report


def test_capture_then_probe_then_report(capsys, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "capture", config, "--out", out)
    assert code == 0, err
    assert f"stores written under {out / 'stores'}" in stdout
    assert (out / "config.json").is_file() and (out / "stores" / "memento" / "kvstore.h5").is_file()
    assert json.loads((out / "config.json").read_text())["config"] == parse_config(TINY).to_dict()
    assert not (out / "probes").exists()

    # report before probe: refused, naming the missing condition and the command to run
    before = snapshot(out)
    code, _, err = cli(capsys, "report", out)
    assert_refused(code, err, str(out), "memento", "kvprobe probe")
    assert snapshot(out) == before

    code, stdout, err = cli(capsys, "probe", out)
    assert code == 0, err
    assert "memento: linear probe accuracy (%)" in stdout
    assert re.search(r"^layer\s+-1\s+\+0\s+\+1$", stdout, re.M), stdout
    assert re.search(r"^\s+0 ", stdout, re.M) and re.search(r"^\s+3 ", stdout, re.M)
    assert (out / "probes" / "memento.json").is_file() and (out / "probes" / "memento.npz").is_file()

    code, stdout, err = cli(capsys, "report", out)
    assert code == 0, err
    report = out / "report"
    for name in REPORT_FILES:
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
        assert str(report / name) in stdout
    for fig in FIGURES:
        png = report / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    rows = (report / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + layers x offsets (one site, one probe)
    assert "memento" in (report / "summary.md").read_text()
    assert set(json.loads((out / "timings.json").read_text())) >= {"probe"}


def _table_stars(stdout: str) -> set[tuple[str, int, int]]:
    """(condition, layer, offset) of every starred cell of the leakage tables `kvprobe` printed."""
    stars, cond, offsets = set(), None, []
    for line in stdout.splitlines():
        if m := re.match(r"^(\S+): linear probe accuracy \(%\)", line):
            cond = m.group(1)
        elif line.startswith("layer "):
            offsets = [int(o) for o in line.split()[1:]]
        elif cond and re.match(r"^\s+\d+ ", line):
            cells = [line[6 + 8 * i: 14 + 8 * i] for i in range(len(offsets))]  # "%7.1f" plus "*" or " "
            stars |= {(cond, int(line[:5]), o) for o, c in zip(offsets, cells) if c.endswith("*")}
        elif not line.strip():
            cond = None
    return stars


def test_probe_run_and_report_star_the_same_cells(capsys, tmp_path):
    """One Holm correction over every cell of the run, whichever command shows the table: the stars
    `run`, `probe` and `report` print are the cells results.json marks significant, those summary.md
    stars, and those Holm over all of results.json's p-values gives."""
    two = dict(TINY, capture={**TINY["capture"], "pooling": ["mean"]},  # 256 features: fits in about a second
               conditions={"memento": {"keep_last_n_blocks": 0},
                           "restart": {"keep_last_n_blocks": 0, "restart_mode": True}},
               probe={**TINY["probe"], "linear_l2_grid": [1e-3]})
    out = tmp_path / "run"
    code, ran, err = cli(capsys, "run", write_config(tmp_path / "two.yaml", two), "--out", out)
    assert code == 0, err
    code, probed, err = cli(capsys, "probe", out)
    assert code == 0, err
    code, reported, err = cli(capsys, "report", out)
    assert code == 0, err

    rows = json.loads((out / "report" / "results.json").read_text())["rows"]
    assert len(rows) == 12  # 2 conditions x 2 layers x 3 offsets
    expected = {(r["condition"], r["layer"], r["offset"]) for r, p in zip(rows, holm([r["p_value"] for r in rows]))
                if p <= 0.05}
    assert {(r["condition"], r["layer"], r["offset"]) for r in rows if r["significant"]} == expected
    assert ("memento", 3, 0) in expected and not any(offset < 0 for _, _, offset in expected)  # direct, no control
    assert _table_stars(probed) == _table_stars(ran) == _table_stars(reported) == expected
    assert all(text.count("after Holm over all 12 cells") == 2 for text in (ran, probed, reported))

    headline = (out / "report" / "summary.md").read_text().split("### linear probe")[1].split("\n\n")[1]
    summary_stars = {("memento", int(line.split("|")[1]), o)
                     for line in headline.splitlines()[2:]
                     for o, cell in zip((-1, 0, 1), line.split("|")[2:-1]) if cell.strip().endswith("*")}
    assert summary_stars == {s for s in expected if s[0] == "memento"}


# ----------------------------------------------------------------------------- run, resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`kvprobe run CONFIG --out DIR` on the tiny config: (config path, run dir, exit code, stdout)."""
    root = tmp_path_factory.mktemp("run")
    config = write_config(root / "tiny.yaml", TINY)
    out = root / "run"
    code, stdout, err = cli_quiet("run", config, "--out", out)
    assert code == 0, err
    return config, out, stdout


def test_run_end_to_end(finished_run):
    config, out, stdout = finished_run
    assert "total expected size" in stdout
    assert "memento: linear probe accuracy (%), chance 10" in stdout
    assert f"report: {out / 'report' / 'summary.md'}" in stdout
    record = json.loads((out / "config.json").read_text())
    assert record["config"] == load_config(config).to_dict() and record["seed"] == 0 and "torch" in record["versions"]
    assert (out / "stores" / "memento" / "kvstore.h5").is_file()
    grid = json.loads((out / "probes" / "memento.json").read_text())
    assert grid  # probe results written
    for name in REPORT_FILES:
        assert (out / "report" / name).is_file(), name
    for fig in FIGURES:
        assert (out / "report" / "figures" / f"{fig}.png").is_file(), fig
    assert set(json.loads((out / "timings.json").read_text())) == {"capture", "probe", "report"}


def test_resume_after_a_finished_run_is_a_no_op(capsys, finished_run):
    config, out, _ = finished_run
    kept = [out / "config.json", out / "stores", out / "probes"]
    before = [snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in kept]
    code, stdout, err = cli(capsys, "run", config, "--out", out, "--resume")
    assert code == 0, err
    assert "[memento] store complete, skipping" in stdout
    assert "memento: linear probe accuracy (%)" in stdout
    assert [snapshot(p) if p.is_dir() else p.stat().st_mtime_ns for p in kept] == before
    assert "capture:" not in err  # no capture progress: nothing was captured again
    # probing a finished run again reads the results back too
    code, stdout, err = cli(capsys, "probe", out)
    assert code == 0 and "memento: linear probe accuracy" in stdout
    assert snapshot(out / "probes") == before[2]


def test_existing_out_dir_without_resume_or_overwrite_is_refused(capsys, finished_run):
    config, out, _ = finished_run
    before = snapshot(out)
    for args in (["run", config, "--out", out], ["capture", config, "--out", out]):
        code, _, err = cli(capsys, *args)
        assert_refused(code, err, str(out), "already exists", "--resume", "--overwrite")
        assert snapshot(out) == before


def test_resume_with_another_config_is_refused(capsys, finished_run):
    config, out, _ = finished_run
    before = snapshot(out)
    code, _, err = cli(capsys, "run", config, "--out", out, "--resume", "--set", "data.n_samples=400")
    assert_refused(code, err, str(out), "another config", "data")
    code, _, err = cli(capsys, "capture", config, "--out", out, "--resume", "--set", "capture.layers=[3]")
    assert_refused(code, err, str(out), "another config", "capture")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- bad input

def test_out_of_range_capture_errors_name_the_problem(capsys, tmp_path):
    """The messages themselves, from the dry run."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    code, _, err = cli(capsys, "capture", config, "--dry-run", "--set", "capture.layers=[0,9]")
    assert code == 2
    assert "layer 9 out of range: the model has 4 layers (0..3)" in error_line(err)
    code, _, err = cli(capsys, "capture", config, "--dry-run", "--set", "capture.offsets=[0,9]")
    assert code == 2
    assert re.search(r"offset \+9 .*block 10 does not exist: the sequence has 10 blocks", error_line(err))


@pytest.mark.parametrize("override, field", [("probe.pooling=last", "probe.pooling"),
                                             ("probe.layers=[2]", "probe.layers"),
                                             ("probe.offsets=[5]", "probe.offsets")])
def test_probe_cells_that_are_not_captured_are_refused_before_capturing(capsys, tmp_path, override, field):
    config = write_config(tmp_path / "tiny.yaml", TINY)  # captures mean pooling, layers 0 and 3, offsets -1..1
    code, _, err = cli(capsys, "capture", config, "--dry-run", "--set", override)
    assert code == 2
    assert field in error_line(err)


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    code, _, err = cli(capsys, "capture", "--out", tmp_path / "x", "--resume", "--overwrite")
    assert code == 2 and "not allowed with argument" in err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- docs


def test_docs_cover_every_subcommand_and_config_field():
    text = (REPO / "docs" / "cli.md").read_text()
    for command in ALL_SUBCOMMANDS:
        assert f"kvprobe {' '.join(command)}" in text, command
    for section, info in ExperimentConfig.model_fields.items():
        annotation = info.annotation
        fields = getattr(annotation, "model_fields", None)
        if not fields:  # name, seed, conditions (a mapping of MaskSection)
            assert f"`{section}`" in text, section
            continue
        for field in fields:
            assert f"`{section}.{field}`" in text, f"{section}.{field}"
    from kvprobe.config import MaskSection

    for field in MaskSection.model_fields:
        assert f"`conditions.NAME.{field}`" in text, field
    for code in ("0", "1", "2"):
        assert re.search(rf"^\|\s*{code}\s*\|", text, re.M), f"exit code {code}"



def test_the_bad_input_classes_in_the_docs_cite_cases_that_exist():
    text = (REPO / "docs" / "cli.md").read_text()
    table = text[text.index("### Bad input, class by class"):]
    table = table[:table.index("\n\n", table.index("| class |"))]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| class")]
    cited = {name for row in rows for name in re.findall(r"`([a-z0-9]+(?:-[a-z0-9]+)+)`", row.rsplit("|", 2)[1])}
    ids = set()
    for path in (REPO / "tests" / "cli").glob("test_bad_input*.py"):  # each table's case ids, as written
        ids |= set(re.findall(r'^\s+\("([a-z0-9-]+)"', path.read_text(), re.M))
    assert len(rows) >= 15 and all(row.rsplit("|", 2)[1].strip() for row in rows)  # every class cites cases
    assert cited and cited <= ids, f"cases the docs cite that no test holds: {sorted(cited - ids)}"
