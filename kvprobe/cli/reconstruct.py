"""`kvprobe reconstruct`: what survives an erased block, in bits, on a run's stores (kvprobe.reconstruction)."""

from __future__ import annotations

import argparse

from ..grid import MEMENTO
from .common import UsageError, add_parser, key_values

__all__ = ["register"]

PREFIX = "reconstruct."


def _table(data: dict) -> str:
    """Bits per token (memento site, first family) by layer (rows) and offset (columns), per condition and pair."""
    family = data["config"]["families"][0]
    rows = [r for r in data["rows"] if r["probe"] == family and r["site"] == MEMENTO]
    layers, offsets = sorted({r["layer"] for r in rows}), sorted({r["offset"] for r in rows})
    head = "layer " + "".join(f"{o:>+9d}" for o in offsets)
    lines = []
    for cond in data["conditions"]:
        cells = {(r["layer"], r["offset"]): r["bits"] for r in rows if r["condition"] == cond}
        lines += [f"{cond}: bits per token ({family} probe)", head]
        lines += [f"{layer:>5} " + "".join(f"{cells[(layer, o)]:>9.3f}" if (layer, o) in cells else " " * 9
                                          for o in offsets) for layer in layers]
    for a, b in data["pairs"]:
        cells = {(d["layer"], d["offset"]): d for d in data["diffs"] if (d["a"], d["b"], d["probe"]) == (a, b, family)}
        lines += [f"{a} - {b}: bits per token (* interval above 0)", head]
        lines += [f"{layer:>5} " + "".join(
            f"{d['difference']:>+8.3f}{'*' if d['ci_low'] > 0 else ' '}" if (d := cells.get((layer, o))) else " " * 9
            for o in offsets) for layer in layers]
    return "\n".join(lines)


def _reconstruct(args: argparse.Namespace) -> int:
    from ..experiment import open_run

    out, cfg = open_run(args.run_dir)
    overrides = key_values(args.set, "--set", "FIELD=VALUE", "reconstruct.k=8")
    outside = [k for k in overrides if not k.startswith(PREFIX)]
    if outside:
        raise UsageError(f"--set {outside[0]}: only reconstruct.* fields can change on a finished run")
    if overrides:
        from ..config import ConfigError, apply_overrides, parse_config

        try:
            cfg = parse_config(apply_overrides(cfg.to_dict(), overrides), "--set")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    from ..experiment import stage_reconstruct  # torch: once the run and the settings are found
    from ..experiment.reconstruct import reconstruction_path, saved_reconstruction

    if overrides and reconstruction_path(out).is_file() and not args.redo:
        raise UsageError(f"{reconstruction_path(out)} exists: add --redo to refit it with the --set fields")
    if reconstruction_path(out).is_file() and not args.redo:  # read back, with the settings it was fitted with
        data = saved_reconstruction(out)
    else:
        data = stage_reconstruct(cfg, out, redo=args.redo)
    print(_table(data))
    print(f"results: {reconstruction_path(out)} (`kvprobe report {out}` draws them)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "reconstruct", "read the erased target block's text back from the mementos' KV, in bits per token",
        "  kvprobe reconstruct runs/repro\n"
        "  kvprobe reconstruct runs/repro --redo --set reconstruct.target=ends --set reconstruct.k=8",
    )
    p.add_argument("run_dir", help="a directory made by `kvprobe capture` or `kvprobe run` (stores with block text)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a reconstruct.* field of the run's config, e.g. --set reconstruct.vocab=128 "
                        "(repeatable; YAML values)")
    p.add_argument("--redo", action="store_true", help="refit even where results exist")
    p.set_defaults(func=_reconstruct)
