"""`kvprobe capture`: KV states of mementos into one HDF5 store per mask condition."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .common import UsageError, add_config_args, add_parser, experiment_config

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    cfg = experiment_config(args)
    from ..experiment import capture_all, check_out_dir, plan_all, prepare_out_dir  # torch: once the config is read

    if args.dry_run:
        from ..experiment.resolve import no_remote_code

        with no_remote_code():  # a plan runs none of the checkpoint's own code
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
        "  kvprobe capture experiments/toy_reproduction.yaml --dry-run\n"
        "  kvprobe capture experiments/toy_reproduction.yaml --out runs/toy\n"
        "  kvprobe capture experiments/toy_reproduction.yaml --out runs/toy --set data.n_samples=2000 --resume\n"
        "  torchrun --nproc-per-node 4 -m kvprobe capture experiments/qwen3_8b_memento.yaml --out runs/q8\n"
        "      (each rank writes its own shards of one store; the last to finish writes the index)",
    )
    add_config_args(p, required=False)
    p.add_argument("--out", help="experiment directory; stores go to OUT/stores/CONDITION")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan and expected size only")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="this process's rank in a split capture (default: $RANK, as torchrun sets it, else 0)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="number of processes splitting the capture (default: $WORLD_SIZE, else 1)")
    p.set_defaults(func=run)

