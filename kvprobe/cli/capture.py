"""`kvprobe capture`: KV states of mementos into one HDF5 store per mask condition."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..capture import CapturePlan, plan_capture, run_capture
from ..config import ConfigError, ExperimentConfig
from ..store import StoreError
from .common import UsageError, add_parser, check_out_dir, experiment_config, prepare_out_dir, store_dir
from .resolve import load_model, make_source


@dataclass
class Plans:
    """A validated capture: the model, the samples, and one plan per condition."""

    model: Any
    source: Any
    plans: dict[str, CapturePlan]

    def summary(self) -> str:
        total = sum(p.estimate_bytes() for p in self.plans.values())
        parts = [f"[{cond}]\n{plan.summary()}\n" for cond, plan in self.plans.items()]
        parts.append(f"total expected size: {total:,} bytes ({total / 1e9:.3f} GB) for {len(self.plans)} condition(s)")
        return "\n".join(parts)


def plan_all(cfg: ExperimentConfig) -> Plans:
    """Load the model and samples and validate every condition's capture; writes nothing."""
    model = load_model(cfg.model)
    source = make_source(cfg)
    plans = {}
    for cond in cfg.conditions:
        try:
            plans[cond] = plan_capture(model, source, cfg.capture_spec(cond))
        except ValueError as e:
            raise UsageError(f"capture: {e}") from None
    return Plans(model, source, plans)


def capture_all(cfg: ExperimentConfig, out: Path, plans: Plans, *, mode: str, progress: bool = True,
                rank: int = 0, world_size: int = 1) -> list[Path]:
    """Capture every condition of `cfg` under out/stores/ (complete stores are skipped on resume)."""
    paths = []
    for cond, plan in plans.plans.items():
        path = store_dir(out, cond)
        store_mode = mode
        if mode == "resume" and not path.exists():
            store_mode = "create"
        if mode == "resume" and (path / "kvstore.h5").exists():
            print(f"[{cond}] store complete, skipping")
            paths.append(path)
            continue
        try:
            run_capture(plans.model, plans.source, plan.spec, path, mode=store_mode, model_name=cfg.model.checkpoint,
                        progress=progress, rank=rank, world_size=world_size)
        except StoreError as e:
            raise UsageError(str(e)) from None
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    cfg = experiment_config(args)
    if args.dry_run:
        print(plan_all(cfg).summary())
        return 0
    if not args.out:
        raise UsageError("--out: an output directory is needed (or use --dry-run)")
    rank, world = args.rank, args.world_size
    if not 0 <= rank < world:
        raise UsageError(f"--rank {rank} is not in 0..{world - 1} (--world-size {world})")
    if rank == 0:
        check_out_dir(Path(args.out), cfg, resume=args.resume, overwrite=args.overwrite)
    plans = plan_all(cfg)  # every input is checked before anything is written
    print(plans.summary())
    # rank 0 prepares the directory; the others wait for it and join
    joining = rank > 0
    if joining:
        _wait_for(Path(args.out) / "config.json")
    out = prepare_out_dir(Path(args.out), cfg, resume=args.resume or joining, overwrite=args.overwrite and rank == 0,
                          stage="capture")
    capture_all(cfg, out, plans, mode="resume" if args.resume else "create", rank=rank, world_size=world)
    print(f"stores written under {out / 'stores'}")
    return 0


def _wait_for(path: Path, timeout_s: float = 1800.0) -> None:
    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout_s:
            raise UsageError(f"{path}: rank 0 did not prepare the output directory within {timeout_s:.0f} s")
        time.sleep(1.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "capture",
        "capture memento KV states into HDF5 stores (one per mask condition)",
        "  kvprobe capture --config experiments/toy_reproduction.yaml --dry-run\n"
        "  kvprobe capture --config experiments/toy_reproduction.yaml --out runs/toy\n"
        "  kvprobe capture --config experiments/toy_reproduction.yaml --out runs/toy --set data.n_samples=2000 --resume\n"
        "  torchrun --nproc-per-node 4 -m kvprobe capture --config experiments/qwen3_8b_memento.yaml --out runs/q8\n"
        "      (each rank writes its own shards of one store; the last to finish writes the index)",
    )
    add_config_args(p)
    p.add_argument("--out", help="experiment directory; stores go to OUT/stores/CONDITION")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan and expected size only")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="this process's rank in a split capture (default: $RANK, as torchrun sets it, else 0)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="number of processes splitting the capture (default: $WORLD_SIZE, else 1)")
    p.set_defaults(func=run)


def add_config_args(p: argparse.ArgumentParser, with_config: bool = True) -> None:
    if with_config:
        p.add_argument("--config", help="experiment config (.yaml, .toml or .json); default: built-in toy config")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set data.n_samples=2000 (repeatable; YAML values)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete OUT first")


__all__ = ["Plans", "add_config_args", "capture_all", "plan_all", "register", "ConfigError"]
