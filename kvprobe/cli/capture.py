"""`kvprobe capture`: KV states of mementos into one HDF5 store per mask condition."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..capture import plan_capture, run_capture
from ..config import ConfigError, ExperimentConfig
from ..store import StoreError
from .common import UsageError, add_parser, experiment_config, prepare_out_dir, store_dir
from .resolve import load_model, make_source


def capture_all(cfg: ExperimentConfig, out: Path, *, mode: str, dry_run: bool = False, progress: bool = True) -> list[Path]:
    """Capture every condition of `cfg` under out/stores/; with dry_run only print the plans."""
    model = load_model(cfg.model)
    source = make_source(cfg)
    plans = {}
    for cond in cfg.conditions:
        try:
            plans[cond] = plan_capture(model, source, cfg.capture_spec(cond))
        except ValueError as e:
            raise UsageError(f"capture: {e}") from None
    total = sum(p.estimate_bytes() for p in plans.values())
    for cond, plan in plans.items():
        print(f"[{cond}]\n{plan.summary()}\n")
    print(f"total expected size: {total:,} bytes ({total / 1e9:.3f} GB) for {len(plans)} condition(s)")
    if dry_run:
        return []
    paths = []
    for cond, plan in plans.items():
        path = store_dir(out, cond)
        store_mode = mode
        if mode == "resume" and not path.exists():
            store_mode = "create"
        if mode == "resume" and (path / "kvstore.h5").exists():
            print(f"[{cond}] store complete, skipping")
            paths.append(path)
            continue
        try:
            run_capture(model, source, plan.spec, path, mode=store_mode, model_name=cfg.model.checkpoint,
                        progress=progress)
        except StoreError as e:
            raise UsageError(str(e)) from None
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    cfg = experiment_config(args)
    if args.dry_run:
        capture_all(cfg, Path(args.out or "."), mode="create", dry_run=True)
        return 0
    if not args.out:
        raise UsageError("--out: an output directory is needed (or use --dry-run)")
    out = prepare_out_dir(Path(args.out), cfg, resume=args.resume, overwrite=args.overwrite, stage="capture")
    capture_all(cfg, out, mode="resume" if args.resume else "create")
    print(f"stores written under {out / 'stores'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "capture",
        "capture memento KV states into HDF5 stores (one per mask condition)",
        "  kvprobe capture --config experiments/toy_small.yaml --dry-run\n"
        "  kvprobe capture --config experiments/toy_small.yaml --out runs/toy\n"
        "  kvprobe capture --config experiments/toy_small.yaml --out runs/toy --set data.n_samples=2000 --resume",
    )
    add_config_args(p)
    p.add_argument("--out", help="experiment directory; stores go to OUT/stores/CONDITION")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan and expected size only")
    p.set_defaults(func=run)


def add_config_args(p: argparse.ArgumentParser, with_config: bool = True) -> None:
    if with_config:
        p.add_argument("--config", help="experiment config (.yaml, .toml or .json); default: built-in toy config")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set data.n_samples=2000 (repeatable; YAML values)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete OUT first")


__all__ = ["add_config_args", "capture_all", "register", "ConfigError"]
