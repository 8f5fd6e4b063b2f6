"""`kvprobe run`, `kvprobe probe`, `kvprobe report`: the experiment pipeline from a config."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..reporting.tracking import TRACKERS  # the module imports nothing heavy: --help stays fast
from .common import NETWORK_OPT_IN, UsageError, add_config_args, add_parser, experiment_config, network_allowed

__all__ = ["add_log_to", "register", "tracking"]



def _single_process(command: str) -> None:
    """`run`, `probe` and `report` are one-process commands; under torchrun every rank would repeat them."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise UsageError(f"kvprobe {command} runs in one process, not under a launcher (WORLD_SIZE={world}): "
                         "split the capture with `torchrun ... -m kvprobe capture`, then run `kvprobe probe` and "
                         "`kvprobe report` once")


def add_log_to(p: argparse.ArgumentParser) -> None:
    """--log-to TRACKER (repeatable): where `run`, `probe` and `demo` also send the results."""
    p.add_argument("--log-to", action="append", default=[], metavar="TRACKER",
                   help=f"also log the config, every cell's metrics and the figures to {' or '.join(TRACKERS)} "
                        f"(repeatable), under OUT/tracking; wandb runs offline unless {NETWORK_OPT_IN}=1 "
                        "(needs the 'track' extra)")


def tracking(args: argparse.Namespace) -> dict:
    """--log-to checked before anything is written (known trackers, their packages installed): the
    pipeline's `log_to` and `online` (W&B reaches the network only with the opt-in)."""
    from ..reporting.tracking import require

    log_to = tuple(dict.fromkeys(args.log_to))
    try:
        require(log_to)  # a missing package: ModuleNotFoundError, one line naming the 'track' extra (cli.EXTRA_OF)
    except ValueError as e:
        raise UsageError(f"--log-to: {e}") from None
    return {"log_to": log_to, "online": network_allowed()}


def _run(args: argparse.Namespace) -> int:
    _single_process("run")
    cfg = experiment_config(args)
    track = tracking(args)
    from ..experiment import leakage_table, run_pipeline, start_run  # torch: once the config is read

    out, plans = start_run(cfg, Path(args.out), resume=args.resume, overwrite=args.overwrite)
    grids = run_pipeline(cfg, out, plans, resume=args.resume, **track)
    print(leakage_table(grids))
    print(f"report: {out / 'report' / 'summary.md'}; figures: {out / 'report' / 'figures'}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    _single_process("probe")
    track = tracking(args)
    from ..experiment import open_run

    out, cfg = open_run(args.run_dir)
    from ..experiment import leakage_table, record_timing, stage_probe  # torch: once the run is found
    from ..experiment.pipeline import stage_track

    # --redo sets a condition's old results aside (.NAME.redo) and deletes them only once the new ones are
    # written: a store refused as damaged, or any other failure, puts them back
    probes = out / "probes"
    for cond in cfg.conditions:  # a --redo killed mid-way: the old results back, unless new ones are whole
        new_whole = (probes / f"{cond}.json").is_file()  # written last
        for old in sorted(probes.glob(f".{cond}.*.redo")):
            if new_whole:
                old.unlink()
            else:
                os.replace(old, probes / old.name[1:-len(".redo")])
    moved = sorted(p for cond in cfg.conditions for p in probes.glob(f"{cond}.*")) if args.redo else []
    for p in moved:
        os.replace(p, p.with_name(f".{p.name}.redo"))
    t = time.perf_counter()
    try:
        grids = stage_probe(cfg, out)
    except BaseException:
        for p in moved:
            os.replace(p.with_name(f".{p.name}.redo"), p)
        raise
    for p in moved:
        p.with_name(f".{p.name}.redo").unlink()
    record_timing(out, "probe", time.perf_counter() - t)
    stage_track(cfg, out, grids, **track)  # the cells and config; figures come with `kvprobe report`'s report
    print(leakage_table(grids))
    return 0


def _report(args: argparse.Namespace) -> int:
    _single_process("report")
    from ..experiment import open_run

    out, cfg = open_run(args.run_dir)
    from ..experiment import leakage_table, stage_probe, stage_report, stage_sweep  # torch: once the run is found

    missing = [c for c in cfg.conditions if not (out / "probes" / f"{c}.json").is_file()]
    if missing:
        raise UsageError(f"{out}: no probe results for condition(s) {', '.join(missing)} (run `kvprobe probe {out}`)")
    grids = stage_probe(cfg, out, progress=False)  # reads the saved results
    sweep = stage_sweep(cfg, out)
    paths = stage_report(cfg, out, grids, sweep)
    print(leakage_table(grids))
    print("\n".join(str(p) for p in paths))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "run", "run a whole experiment from a config: capture, probe, sweep, report (resumable)",
        "  kvprobe run experiments/toy_reproduction.yaml --out runs/repro\n"
        "  kvprobe run experiments/toy_reproduction.yaml --out runs/repro --resume   # after an interruption\n"
        "  kvprobe run experiments/custom_study.toml --out runs/custom --set data.n_samples=2000\n"
        "  kvprobe run experiments/toy_reproduction.yaml --out runs/repro --log-to tensorboard",
    )
    add_config_args(p, required=True)
    p.add_argument("--out", required=True, help="experiment directory")
    add_log_to(p)
    p.set_defaults(func=_run)

    p = add_parser(
        sub, "probe", "train probes on the stores of a run directory and print the leakage table",
        "  kvprobe probe runs/repro\n  kvprobe probe runs/repro --redo --log-to wandb",
    )
    p.add_argument("run_dir", help="a directory made by `kvprobe capture` or `kvprobe run`")
    p.add_argument("--redo", action="store_true", help="refit probes even where results exist")
    add_log_to(p)
    p.set_defaults(func=_probe)

    p = add_parser(
        sub, "report", "write tables (JSON, CSV, Markdown) and figures (PNG, PDF) from probe results",
        "  kvprobe report runs/repro",
    )
    p.add_argument("run_dir", help="a directory with probe results")
    p.set_defaults(func=_report)
