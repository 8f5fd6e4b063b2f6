"""Shared CLI plumbing: the bad-input error, parsers with examples, configs from --config/--set."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from ..config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config
from ..experiment.errors import ExperimentError

__all__ = ["UsageError", "add_parser", "experiment_config"]


UsageError = ExperimentError
"""Bad input from the user: printed as one line, exit code 2 (the experiment layer's own error)."""


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with usage examples."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set {pair!r}: expected FIELD=VALUE, e.g. data.n_samples=2000")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config from --config (or the built-in default) with --set overrides applied."""
    overrides = _overrides(getattr(args, "set", []) or [])
    try:
        if getattr(args, "config", None):
            return load_config(args.config, overrides)
        return parse_config(apply_overrides({}, overrides), "built-in config")
    except ConfigError as e:
        raise UsageError(str(e)) from None
