"""Shared CLI plumbing: the bad-input error, parsers with examples, configs, output dirs."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..capture.run import package_versions
from ..config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config

RUN_PACKAGES = ("kvprobe", "torch", "transformers", "h5py", "numpy", "scikit-learn")

__all__ = ["UsageError", "add_parser", "check_out_dir", "experiment_config", "prepare_out_dir", "record_timing", "store_dir"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


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


def check_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing directory unless resume or overwrite is asked, and a resume
    with another config than the run it continues. Touches nothing."""
    resolved = cfg.to_dict()
    record = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            return
        if not resume:
            raise UsageError(f"{out}: output directory already exists (use --resume to continue it or --overwrite)")
        elif record.is_file():
            previous = json.loads(record.read_text())["config"]
            if previous != resolved:
                diff = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
                raise UsageError(f"{out}: was run with another config (sections differ: {', '.join(diff)}); "
                                 "use a new --out or --overwrite")
        else:
            raise UsageError(f"{out}: exists but holds no kvprobe run (no config.json)")


def prepare_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool, stage: str) -> Path:
    """Create (or reopen with resume) an experiment directory holding the resolved config.

    Checks as `check_out_dir` does; with overwrite an existing directory is deleted.
    """
    check_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    resolved = cfg.to_dict()
    record = out / "config.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        record.write_text(json.dumps({"config": resolved, "seed": cfg.seed, "versions": package_versions(RUN_PACKAGES),
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return out


def record_timing(out: Path, stage: str, seconds: float) -> None:
    """Add one stage's wall time to out/timings.json."""
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(seconds, 2)
    path.write_text(json.dumps(timings, indent=2) + "\n")


def store_dir(out: Path, condition: str) -> Path:
    return out / "stores" / condition
