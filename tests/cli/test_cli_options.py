"""The command line's names a newcomer can guess: the config is positional, output goes to --out,
every VALUE is read by one parser, old names keep working for a release with a one-line note,
and `kvprobe toy` comes from the toy plugin (entry-point group `kvprobe.cli`)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from kvprobe.cli import build_parser, plugins
from kvprobe.cli.common import CLIDeprecationWarning, experiment_config, key_values, parse_value
from tests.helpers.cli_support import TINY, assert_refused, cli, write_config

SMALL = {**TINY, "data": {**TINY["data"], "n_samples": 100}, "capture": {**TINY["capture"], "batch_size": 100}}


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subcommands(sub, prefix + (name,))


# ----------------------------------------------------------------------------- the config: positional


def test_capture_takes_the_config_positionally_and_the_old_flag_with_a_note(capsys, tmp_path, monkeypatch):
    config = write_config(tmp_path / "small.yaml", SMALL)
    monkeypatch.chdir(tmp_path)
    code, positional, err = cli(capsys, "capture", config, "--dry-run")
    assert code == 0 and err == "", err
    assert "samples        100 in 1 shard(s)" in positional
    with pytest.warns(CLIDeprecationWarning, match=r"--config is deprecated .* `kvprobe capture CONFIG`"):
        code, flagged, err = cli(capsys, "capture", "--config", config, "--dry-run")
    assert code == 0, err
    assert flagged == positional
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yaml"]


def test_capture_refuses_two_configs(capsys, tmp_path):
    with pytest.warns(CLIDeprecationWarning):
        code, out, err = cli(capsys, "capture", tmp_path / "a.yaml", "--config", tmp_path / "b.yaml", "--dry-run")
    assert_refused(code, err, "a.yaml", "b.yaml", "give one")
    assert out == ""


def test_run_and_capture_name_the_config_alike():
    parsers = dict(_subcommands(build_parser()))
    for command in ("run", "capture"):
        positional = [a for a in parsers[(command,)]._actions if not a.option_strings and a.dest == "config"]
        assert len(positional) == 1 and positional[0].metavar == "CONFIG", command
    assert "CONFIG" in parsers[("capture",)].format_usage() and "--config" not in parsers[("capture",)].format_help()


def test_the_deprecation_note_is_one_line_on_stderr(tmp_path):
    """The installed command, outside pytest's warning capture: the note, then the refusal, one line each."""
    exe = shutil.which("kvprobe", path=os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)]))
    assert exe, "the kvprobe console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default: FutureWarning shown
    proc = subprocess.run([exe, "capture", "--config", "missing.yaml", "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "kvprobe: warning: --config is deprecated and will be removed in the next release; use the positional "
        "CONFIG, `kvprobe capture CONFIG`",
        "kvprobe: error: missing.yaml: no such config file",
    ]


def test_an_old_config_key_is_one_line_on_stderr_too(tmp_path):
    """A renamed config key warns through the library (a DeprecationWarning, which Python hides outside
    __main__); the command still shows it, one line per key, and goes on."""
    exe = shutil.which("kvprobe", path=os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)]))
    config = write_config(tmp_path / "old.yaml", {**TINY, "capture": {**TINY["capture"], "kinds": ["k", "v"]},
                                                  "probe": {"linear_l2": 0.001}})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([exe, "capture", str(config), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "deprecated" in line]
    assert notes == ["kvprobe: warning: config key 'capture.kinds' is deprecated; use 'capture.tensors'",
                     "kvprobe: warning: config key 'probe.linear_l2' is deprecated; use 'probe.linear.l2'"]

# ----------------------------------------------------------------------------- output: --out


def test_every_output_option_is_called_out():
    """An option naming where a command writes is --out; an old name is only a hidden, deprecated alias."""
    odd = []
    for command, parser in _subcommands(build_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith(("--output", "--out-", "--out_", "--dest", "--save-dir")) and flag != "--out":
                    if action.help != argparse.SUPPRESS:
                        odd.append(f"kvprobe {' '.join(command)} {flag}")
    assert odd == []


SFT = ["sft", "--model", "/m", "--traces", "t.jsonl"]


def test_sft_writes_to_out_and_takes_output_dir_with_a_note():
    parser = build_parser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # --out: no note
        assert parser.parse_args([*SFT, "--out", "runs/a"]).out == "runs/a"
    with pytest.warns(CLIDeprecationWarning, match=r"--output-dir is deprecated .*; use --out$"):
        assert parser.parse_args([*SFT, "--output-dir", "runs/b"]).out == "runs/b"
    help_text = dict(_subcommands(parser))[("sft",)].format_help()
    assert "--out OUT" in help_text and "--output-dir" not in help_text and "OUT/tokenized" in help_text


def test_sft_needs_one_output_directory(capsys):
    code, out, err = cli(capsys, *SFT)
    assert code == 2 and out == "" and err.splitlines()[-1].endswith("--out is required")
    code, out, err = cli(capsys, *SFT, "--out", "a", "--output-dir", "b")  # refused before the note
    assert code == 2 and out == "" and "--output-dir: not allowed with argument --out" in err.splitlines()[-1]


def test_sft_output_dir_still_reaches_the_command(capsys, tmp_path):
    with pytest.warns(CLIDeprecationWarning):
        code, _, err = cli(capsys, *SFT, "--output-dir", tmp_path / "out", "--keep-last-n-blocks", "-2")
    assert_refused(code, err, "--keep-last-n-blocks")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- VALUE: one parser


@pytest.mark.parametrize("text, value", [
    ("2000", 2000), ("-1", -1), ("0.5", 0.5), ("1e-5", 1e-5), ("1.0e-05", 1e-5), (".inf", float("inf")),
    ("true", True), ("false", False), ("null", None), ("", None),
    ("[0, 3]", [0, 3]), ("[[memento, x]]", [["memento", "x"]]), ("{a: 1}", {"a": 1}), ('{"min_lr": 1e-6}', {"min_lr": 1e-6}),
    ('"01"', "01"), ("'[x'", "[x"), ("cosine", "cosine"), ("/ckpt/Qwen3-8B", "/ckpt/Qwen3-8B"),
    # YAML 1.1 words that are text here, as JSON and YAML 1.2 read them (save_strategy=no is a word)
    ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("010", "010"), ("1:30", "1:30"),
    ("2024-01-01", "2024-01-01"), ("0x1F", "0x1F"),
])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_every_key_value_option_reads_values_alike():
    assert key_values(["save_strategy=no", "warmup_ratio=0.03", "bf16=true", "x=1", "x=2"], "--training-arg") == {
        "save_strategy": "no", "warmup_ratio": 0.03, "bf16": True, "x": 2}
    args = argparse.Namespace(config=None, set=["data.n_samples=2000", "capture.layers=[0, 3]",
                                                "probe.shuffled_control=false", "name=no"])
    cfg = experiment_config(args)
    assert cfg.data.n_samples == 2000 and cfg.capture.layers == (0, 3) and cfg.name == "no"
    assert cfg.probe.shuffled_control in (False, ())


@pytest.mark.parametrize("pair, needles", [
    ("capture.layers=[0,", ["--set 'capture.layers=[0,'", "not valid YAML", "quotes"]),
    ("name=!x", ["--set 'name=!x'", "not valid YAML"]),
    ("capture.layers", ["--set 'capture.layers'", "FIELD=VALUE"]),
    ("=1", ["--set '=1'", "FIELD=VALUE"]),
])
def test_a_bad_set_is_one_line_exit_2(capsys, tmp_path, monkeypatch, pair, needles):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "capture", "--dry-run", "--set", pair)
    assert_refused(code, err, *needles)
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, option", [
    (["serve", "--model-path", "/m", "--print", "--block-masking-arg", "debug=[x"], "--block-masking-arg"),
    (["serve", "--model-path", "/m", "--print", "--block-masking-arg", "debug"], "--block-masking-arg"),
    (["generate-offline", "--prompts", "p.jsonl", "--out", "OUT", "--model-path", "/m", "--llm-arg", "a={"], "--llm-arg"),
    ([*SFT, "--out", "OUT", "--training-arg", "=1"], "--training-arg"),
])
def test_a_bad_key_value_is_one_line_exit_2(capsys, tmp_path, argv, option):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, out, err = cli(capsys, *argv)
    assert_refused(code, err, option)
    assert out == "" and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- kvprobe toy: a plugin


def test_the_toy_command_is_the_toy_plugins_entry_point():
    found = plugins.plugin_commands()["toy"]
    assert found.value == "toy_models.cli:register"  # pyproject.toml; `pip install -e .` registers it
    parsers = dict(_subcommands(build_parser()))
    assert {("toy", "train"), ("toy", "eval")} <= set(parsers)


@pytest.mark.parametrize("argv", [["toy", "eval", "final"], ["toy", "train", "--steps", "3", "--out", "x"],
                                  ["toy"], ["toy", "--help"]])
def test_without_the_toy_plugin_kvprobe_toy_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plugins, "plugin_commands", lambda: {})
    code, out, err = cli(capsys, *argv)
    assert_refused(code, err, "kvprobe toy", "not installed", "toy_models", "kvprobe.cli")
    assert out == "" and list(tmp_path.iterdir()) == []
    code, out, _ = cli(capsys, "--help")  # the other commands are all there, and toy says why it is not
    assert code == 0 and "not available" in " ".join(out.split()) and "capture" in out


def test_a_broken_plugin_is_refused_in_one_line_and_breaks_nothing_else(capsys, monkeypatch):
    broken = EntryPoint(name="toy", value="no_such_module_for_kvprobe:register", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "plugin_commands", lambda: {"toy": broken})
    code, _, err = cli(capsys, "toy", "eval")
    assert_refused(code, err, "kvprobe toy", "failed to load", "ModuleNotFoundError")
    assert cli(capsys, "layout")[0] == 0


def register_hello(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hello", help="say hello")
    p.set_defaults(func=lambda args: print("hello") or 0)


def test_other_plugins_add_their_commands(capsys, monkeypatch):
    hello = EntryPoint(name="hello", value=f"{__name__}:register_hello", group=plugins.ENTRY_POINT_GROUP)
    taken = EntryPoint(name="run", value=f"{__name__}:register_hello", group=plugins.ENTRY_POINT_GROUP)
    real = plugins.plugin_commands()
    monkeypatch.setattr(plugins, "plugin_commands", lambda: {**real, "hello": hello, "run": taken})
    assert cli(capsys, "hello") == (0, "hello\n", "")
    assert "run a whole experiment" in cli(capsys, "--help")[1]  # a built-in name stays the built-in's
