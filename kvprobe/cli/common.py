"""Shared CLI plumbing: the bad-input error, parsers with examples, configs from --config/--set."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from ..config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config
from ..experiment.errors import ExperimentError
from ..memento.masks import MaskConfig

__all__ = ["UsageError", "add_mask_args", "add_parser", "experiment_config", "mask_from_args"]


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


def add_mask_args(p: argparse.ArgumentParser, *, restart: bool = True) -> None:
    """The mask flags every command shares, named as `MaskConfig`'s fields (SPEC section 2)."""
    p.add_argument("--keep-last-n-blocks", type=int, default=0,
                   help="-1 causal, 0 hide every completed block (default, the paper), N keep the last N visible")
    p.add_argument("--mask-delimiters", action="store_true", help="hide the block delimiters with the content")
    if restart:
        p.add_argument("--restart-mode", action="store_true",
                       help="restart mode: mementos see no block, only the earlier mementos (the ablation)")


def mask_from_args(args: argparse.Namespace) -> MaskConfig:
    """The MaskConfig the mask flags of `add_mask_args` ask for; a bad value is bad input (exit 2)."""
    if args.keep_last_n_blocks < -1:
        raise UsageError(f"--keep-last-n-blocks must be >= -1, got {args.keep_last_n_blocks}")
    return MaskConfig(keep_last_n_blocks=args.keep_last_n_blocks, mask_delimiters=args.mask_delimiters,
                      restart_mode=getattr(args, "restart_mode", False))
