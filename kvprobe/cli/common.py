"""Shared CLI plumbing: the bad-input error, parsers with examples, configs from --config/--set."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import yaml

from ..config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config
from ..experiment.errors import ExperimentError
from ..memento.masks import MaskConfig

__all__ = ["UsageError", "add_mask_args", "add_parser", "default_threads", "experiment_config", "mask_from_args"]


UsageError = ExperimentError
"""Bad input from the user: printed as one line, exit code 2 (the experiment layer's own error)."""


def _busy_cores() -> float:
    """How many cores other jobs keep busy now: the 1-minute load average, capped by the number of
    other runnable threads at this moment (the median of a few reads of /proc/loadavg), so a job
    that has just finished does not count for the minute its load average takes to decay."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return 0.0
    try:
        now = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                now.append(int(f.read().split()[3].split("/")[0]) - 1)  # runnable threads, less this one
            time.sleep(0.01)
        return min(load, float(sorted(now)[2]))
    except (OSError, ValueError, IndexError):
        return load


def default_threads() -> int:
    """torch's CPU threads when --threads is not given: $KVPROBE_THREADS if set, else the cores
    this process may run on, less the cores other jobs keep busy (`_busy_cores`), at least 1.

    torch's own default takes every core; its OpenMP workers spin while they wait for each
    other, so when another job holds one of the cores a 2-thread torch runs 10-30x slower
    than a 1-thread one (measured on the project's 2-core machine)."""
    pinned = os.environ.get("KVPROBE_THREADS", "").strip()
    if pinned:
        if not pinned.isdigit() or int(pinned) < 1:
            raise UsageError(f"KVPROBE_THREADS must be a whole number >= 1, got {pinned!r}")
        return int(pinned)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, int(cores - _busy_cores() + 0.5)))


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
    p.add_argument("--mask-delimiters", action=argparse.BooleanOptionalAction, default=None,
                   help="hide the block delimiters with the content (default: hidden in restart mode, as the "
                        "vLLM fork's restart evicts them; visible otherwise)")
    if restart:
        p.add_argument("--restart-mode", action="store_true",
                       help="restart mode: mementos see no block, only the earlier mementos (the paper's ablation, "
                            "the vLLM fork's restart)")


def mask_from_args(args: argparse.Namespace) -> MaskConfig:
    """The MaskConfig the mask flags of `add_mask_args` ask for; a bad value is bad input (exit 2)."""
    if args.keep_last_n_blocks < -1:
        raise UsageError(f"--keep-last-n-blocks must be >= -1, got {args.keep_last_n_blocks}")
    return MaskConfig(keep_last_n_blocks=args.keep_last_n_blocks, mask_delimiters=args.mask_delimiters,
                      restart_mode=getattr(args, "restart_mode", False))
