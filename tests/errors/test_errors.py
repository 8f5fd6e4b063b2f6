"""One base for kvprobe's bad-input errors (kvprobe/errors.py), and the command line's one boundary for them."""

from __future__ import annotations

import pytest

from kvprobe import KVProbeError
from kvprobe.config import ConfigError
from kvprobe.data.traces import TraceError
from kvprobe.experiment.errors import ExperimentError
from kvprobe.memento.forward import UnsupportedAttentionError
from kvprobe.memento.layout import LayoutError
from kvprobe.store import StoreError
from kvprobe.training.encode import OverlengthError

REFUSALS = (ConfigError, ExperimentError, LayoutError, OverlengthError, StoreError, TraceError,
            UnsupportedAttentionError)


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: e.__name__)
def test_every_refusal_is_a_kvprobe_error_and_still_a_value_error(error):
    assert issubclass(error, KVProbeError) and issubclass(error, ValueError)


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: e.__name__)
def test_the_command_line_turns_any_refusal_into_one_line_and_exit_2(error, monkeypatch, capsys):
    import kvprobe.cli as cli

    def refuse(args):
        raise error("data.n_samples: must be >= 100, got 5")

    parser = cli.build_parser()
    args = parser.parse_args(["layout"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, refuse))
    assert cli.main(["layout"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvprobe: error: data.n_samples: must be >= 100, got 5"]


class _Fixed:
    """A parser whose one command raises (what a subcommand does with input it refuses)."""

    def __init__(self, parser, args, func):
        self.parser, self.args, self.func = parser, args, func

    def parse_args(self, argv):
        self.args.func = self.func
        return self.args

    def __getattr__(self, name):
        return getattr(self.parser, name)


@pytest.mark.parametrize("module, old, new", [
    ("kvprobe.capture", "CaptureSpec", "CaptureConfig"), ("kvprobe.capture.spec", "CaptureSpec", "CaptureConfig"),
    ("kvprobe.causal", "CausalSpec", "CausalConfig"), ("kvprobe.analysis", "ProbeSettings", "ProbeConfig"),
    ("kvprobe.data.passcodes", "PasscodeSpec", "PasscodeConfig")])
def test_an_option_class_under_its_old_name_still_imports_with_a_warning(module, old, new):
    """One suffix for option classes (`*Config`): the old names work for one release, each naming the new one."""
    import importlib

    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new}"):
        assert getattr(mod, old) is getattr(mod, new)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        getattr(mod, "NoSuchName")
