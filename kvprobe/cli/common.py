"""Shared CLI plumbing: the bad-input error, parsers with examples, configs from CONFIG and --set,
KEY=VALUE values, and options kept for one release under an old name."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import KVProbeWarning
from ..files import UniqueKeyLoader
from ..experiment.errors import ExperimentError
from ..memento.config import MaskConfig

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = [
    "CLIDeprecationWarning",
    "Deprecated",
    "NETWORK_OPT_IN",
    "UsageError",
    "add_config_args",
    "add_mask_args",
    "add_parser",
    "default_threads",
    "experiment_config",
    "key_values",
    "mask_from_args",
    "network_allowed",
    "one_line_deprecations",
    "parse_value",
]


UsageError = ExperimentError
"""Bad input from the user: printed as one line, exit code 2 (the experiment layer's own error)."""

NETWORK_OPT_IN = "KVPROBE_ALLOW_NETWORK"  # =1: a command may reach the network where a flag asks it to


def network_allowed() -> bool:
    """Whether the user opted in to the network (`KVPROBE_ALLOW_NETWORK=1`): `export --push-to-hub`
    and W&B online logging need it; everything else stays offline regardless."""
    return os.environ.get(NETWORK_OPT_IN, "").strip() == "1"


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


# ----------------------------------------------------------------------------- values


_TAG = "tag:yaml.org,2002:"


class _ValueLoader(UniqueKeyLoader):
    """YAML for one command-line value (a key given twice is refused), its plain words read as YAML 1.2
    (and JSON) read them: only true/false are booleans and numbers are JSON's, so 1e-5 is a number while no, on, 010,
    1:30 and 2024-01-01 stay text (PyYAML's YAML 1.1 would make them False, True, 8, 90, a date)."""


_ValueLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in found if tag[len(_TAG):] not in ("bool", "int", "float", "timestamp", "value")]
    for first, found in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _kind, _pattern, _first in (  # int before float: "5" is an int
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?(?:0|[1-9][0-9]*)", "-+0123456789"),
    ("float", r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+.0123456789"),
):
    _ValueLoader.add_implicit_resolver(_TAG + _kind, re.compile(rf"^(?:{_pattern})$"), list(_first))


def parse_value(text: str) -> Any:
    """The VALUE of --set FIELD=VALUE and of every KEY=VALUE option, read as YAML (JSON is a subset):
    2000, 1e-5, true, null, [0, 3], {a: 1}, "a quoted string"; any other word is a string.
    ValueError (one line) when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_ValueLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        detail = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"not valid YAML ({detail}); to pass it as text, put it in quotes: \"...\"") from None


def key_values(pairs: Sequence[str], option: str, metavar: str = "KEY=VALUE",
               example: str = "max_steps=10") -> dict[str, Any]:
    """KEY=VALUE strings of a repeatable option as a mapping (a key given again: the last value);
    VALUE by `parse_value`. A pair without '=' or a key, or an invalid value, is bad input (exit 2)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: expected {metavar}, e.g. {example}")
        try:
            out[key] = parse_value(value)
        except ValueError as e:
            raise UsageError(f"{option} {pair!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------- configs


def add_config_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The config (positional CONFIG), --set overrides and --resume/--overwrite, as `capture` and
    `run` take them. Not required (`capture`): the built-in toy config without it, and the
    deprecated --config FILE still names it."""
    what = "experiment config (.yaml, .toml or .json)"
    if required:
        p.add_argument("config", metavar="CONFIG", help=what)
    else:
        p.add_argument("config", metavar="CONFIG", nargs="?", default=None, help=f"{what}; default: built-in toy config")
        p.add_argument("--config", dest="config_option", metavar="CONFIG", action=Deprecated,
                       use=f"the positional CONFIG, `{p.prog} CONFIG`", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set data.n_samples=2000 (repeatable; YAML values)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete OUT first (only a directory kvprobe made)")


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config CONFIG names (or the built-in default) with --set overrides applied."""
    from ..config import ConfigError, apply_overrides, load_config, parse_config  # pydantic: when a command reads one

    overrides = key_values(getattr(args, "set", []) or [], "--set", "FIELD=VALUE", "data.n_samples=2000")
    path = getattr(args, "config", None)
    if getattr(args, "config_option", None):
        if path:
            raise UsageError(f"two configs, {path} and --config {args.config_option}: give one, as CONFIG")
        path = args.config_option
    try:
        if path:
            return load_config(path, overrides)
        return parse_config(apply_overrides({}, overrides), "built-in config")
    except ConfigError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------- deprecated options


class CLIDeprecationWarning(FutureWarning):
    """An option or form of a command kept for one release under its old name. A FutureWarning,
    which Python shows by default (a DeprecationWarning it hides outside __main__); `kvprobe`
    prints it as one line, `kvprobe: warning: ...` (`one_line_deprecations`)."""


def deprecated(old: str, use: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {use}",
                  CLIDeprecationWarning, stacklevel=2)


class Deprecated(argparse.Action):
    """An option under its old name: stores its value as `store` does and warns that it is
    deprecated, naming what to use instead (`use=`)."""

    def __init__(self, option_strings: Sequence[str], dest: str, use: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        deprecated(option_string or self.dest, self.use)
        setattr(namespace, self.dest, values)


# the library's renames (kvprobe.config.sections.RENAMED_KEYS, the option classes' old field names)
LIBRARY_DEPRECATIONS = r"(config key '|(CaptureConfig|ProbeConfig)\b).* is deprecated; use "


@contextlib.contextmanager
def one_line_deprecations() -> Iterator[None]:
    """While `kvprobe` runs, an old option's or an old config key's name is shown on stderr as one line,
    `kvprobe: warning: ...`: a CLIDeprecationWarning, or a DeprecationWarning the library raises (which
    Python would hide outside __main__); so is a `kvprobe.errors.KVProbeWarning`. Other warnings keep Python's format; a caller that records
    warnings, e.g. pytest, still gets them."""
    original = warnings.formatwarning

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        if issubclass(category, (CLIDeprecationWarning, KVProbeWarning)) or (
                issubclass(category, DeprecationWarning) and re.match(LIBRARY_DEPRECATIONS, str(message))):
            return f"kvprobe: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", LIBRARY_DEPRECATIONS, DeprecationWarning)
            yield
    finally:
        warnings.formatwarning = original


# ----------------------------------------------------------------------------- masks


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
