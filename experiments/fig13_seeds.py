"""Are fig13_scale's misses one probe seed's luck? Its cells outside the band, refitted with three MLP seeds.

    python experiments/fig13_seeds.py                             # both checkpoints fig13_scale publishes (1 thread)
    python experiments/fig13_seeds.py --checkpoint final          # one of them (measured again if published)
    python experiments/fig13_seeds.py --store-dir runs/f13        # the stores fig13_scale kept there (reused)
    python experiments/fig13_seeds.py --table-only                # rewrite results.md from the JSON

`experiments/fig13_scale.py` fits one MLP seed per cell, and `toy_reproduction.py`'s three seeds
spread one cell by a few points. This takes, for each checkpoint fig13_scale publishes, the Fig. 13
cells its committed reading puts outside issue 30's band (a rule on the committed JSON, not a choice)
and fits each again with seeds 0, 1 and 2 on the same 50,000 passcodes: the same store, the same
probe (`fig13_scale.PROBE`), seeds 0..2. Seed 0 reads exactly what fig13_scale read (a test checks it).
It reports each seed, their mean and interval (the interval of the seeds' mean prediction), and
whether the paper's value is within the seeds' range. Results: experiments/results/fig13_seeds/.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import toy_models
from toy_models.checkpoint import resolve
from toy_models.leakage import MEMENTO, cell_record, measure_leakage
import fig13_scale
from paper_figures import in_band
from published import pct, run_each, script_arguments

OUT = Path(__file__).resolve().parent / "results" / "fig13_seeds"
SEEDS = 3
PROBE = replace(fig13_scale.PROBE, seeds=SEEDS)


def measure(checkpoint: str, store_dir: Path | None = None) -> dict:
    """The missed cells of `checkpoint` (from fig13_scale's committed record), each fitted with `SEEDS` seeds."""
    t0 = time.perf_counter()
    record = fig13_scale.load()[checkpoint]
    model = toy_models.load(checkpoint)
    rows = []
    with fig13_scale.checkpoint_store(store_dir, checkpoint) as store:  # one store: captured by the first cell
        for layer, offset in fig13_scale.missed_cells(record):  # the store fig13_scale captures: every layer and offset
            rows += measure_leakage(model, (MEMENTO,), fig13_scale.LAYERS, fig13_scale.OFFSETS,
                                    n_samples=record["samples"], seed=record["seed"], store_dir=store,
                                    probe=replace(PROBE, layers=(layer,), offsets=(offset,)), shard_size=fig13_scale.SHARD)
    return {"checkpoint": checkpoint, "samples": record["samples"], "seed": record["seed"], "seeds": SEEDS,
            "cells": [cell_record(r, "accuracy_seeds", "n_train", "epochs", "epochs_at_cap") for r in rows],
            "seconds": round(time.perf_counter() - t0, 1)}


def load(out: Path = OUT) -> dict[str, dict]:
    """checkpoint -> its measurement, in fig13_scale's order (`final` first)."""
    return fig13_scale.load(out)


def cell_sentence(record: dict, cell: dict) -> str:
    panel, paper = fig13_scale.PAPER[cell["layer"], cell["offset"]]
    seeds = ", ".join(f"{100 * a:.1f}" for a in cell["accuracy_seeds"])
    inside = min(cell["accuracy_seeds"]) <= paper / 100 <= max(cell["accuracy_seeds"])
    return (f"`{record['checkpoint']}`, {panel}, layer {cell['layer']}, {cell['offset']:+d}: seeds {seeds} "
            f"(mean {100 * cell['accuracy']:.1f}; paper {paper:.1f}, {'within' if inside else 'outside'} the seeds' range)")


def results_md(data: dict[str, dict]) -> str:
    lines = ["# fig13_scale's misses, three MLP seeds each", "",
             f"`python experiments/fig13_seeds.py`: the Fig. 13 cells `fig13_scale.py` reads outside issue 30's band, "
             f"fitted again with seeds 0..{SEEDS - 1} on the same {next(iter(data.values()))['samples']:,} passcodes "
             "and store (seed 0 is fig13_scale's fit). The interval is that of the seeds' mean prediction, over "
             "validation passcodes.", "",
             "| checkpoint | cell | paper | seeds 0, 1, 2 | mean [95% CI] | mean − paper | mean in band | epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data.values():
        for c in r["cells"]:
            panel, paper = fig13_scale.PAPER[c["layer"], c["offset"]]
            lines.append(f"| `{r['checkpoint']}` | {panel}, layer {c['layer']}, {c['offset']:+d} | {paper:.1f} | "
                         + ", ".join(f"{100 * a:.1f}" for a in c["accuracy_seeds"]) + f" | {pct(c)} | "
                         f"{100 * c['accuracy'] - paper:+.1f} | {'yes' if in_band(c, paper) else 'no'} | "
                         f"{c['epochs']}{' (limit: FLAGGED)' if c['epochs_at_cap'] else ''} |")
    lines += [""] + [f"- `{r['checkpoint']}`: {r['seconds'] / 60:.0f} min at 1 thread." for r in data.values()]
    return "\n".join(lines) + "\n"


def quotes(data: dict[str, dict]) -> dict[str, str]:
    return {"seeds": "; ".join(cell_sentence(r, c) for r in data.values() for c in r["cells"])}


def render(data: dict[str, dict]) -> dict[str, str]:
    return {"experiments/results/fig13_seeds/results.md": results_md(data)}


def main() -> None:
    ap = script_arguments(__doc__, OUT)
    ap.add_argument("--checkpoint", nargs="+", default=None,
                    help="checkpoints (default: those fig13_scale publishes, each unless published here)")
    ap.add_argument("--store-dir", type=Path, default=None, help="fig13_scale's --store-dir (its stores reused)")
    args = ap.parse_args()
    published = fig13_scale.load()
    for name in args.checkpoint or ():
        if name not in published:
            ap.error(f"fig13_scale publishes no reading of {name!r} ({', '.join(published)})")
        resolve(name)
    run_each(ap, args, args.checkpoint or published, args.checkpoint is not None,
             lambda checkpoint: measure(checkpoint, args.store_dir), load, render)


if __name__ == "__main__":
    main()
