"""Fig. 13 with the paper's probe at the paper's scale: the MLP on every cell, 50,000 passcodes (issue 30).

    python experiments/fig13_scale.py                             # shipped final toy (1 thread)
    python experiments/fig13_scale.py --store-dir runs/f13        # keep the 50K store there (reused when present)
    python experiments/fig13_scale.py --table-only                # rewrite results.md from results.json

`experiments/paper_figures.py` reads Fig. 13 at 5,000 passcodes, where the paper's 512-256-128 MLP
is short of data (it reads the direct memento at two thirds of what the linear probe reads).
The paper's toy figure was made at 50,000; `toy_reproduction.py` reads two of its cells there
with the MLP. This reads all 18 Fig. 13 cells of the shipped `final` with the MLP (one seed, early
stopping with patience 10 under a limit of `EPOCH_LIMIT` epochs that no cell reaches; each cell's
kept epoch is recorded), memento mode, target block 1, with 95% bootstrap intervals, against
issue 30's band (within 3 points of the paper, or the paper's value inside our interval).
Results: experiments/results/fig13_scale/.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import toy_models
from toy_models.leakage import MEMENTO, STUDY_PROBE, cell_record, measure_leakage
from kvprobe.probes.config import MLPConfig
from paper_figures import BAND, EPOCH_LIMIT, FIG13, in_band
from published import epoch_sentence, pct, results_json, save_json, start, toy_study_arguments, write_files

OUT = Path(__file__).resolve().parent / "results" / "fig13_scale"
PROBE = replace(STUDY_PROBE, families=("mlp",), seeds=1, mlp=MLPConfig(max_epochs=EPOCH_LIMIT))  # as paper_figures' MLP
LAYERS, OFFSETS = (0, 1, 2, 3), tuple(range(-1, 8))
SHARD = 5000  # samples captured in memory at once: 50K in one shard would take about 18 GB


def measure(checkpoint: str, samples: int, seed: int, store_dir: Path | None = None) -> dict:
    """Every Fig. 13 cell with the MLP on `samples` passcodes (the store is kept in `store_dir` if given)."""
    t0 = time.perf_counter()
    model = toy_models.load(checkpoint)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = store_dir or Path(tmp)  # one store: captured by the first read, reused by the second
        for layers, offsets in (((0, 1, 2, 3), (-1, 0, 1)), ((3,), (2, 3, 4, 5, 6, 7))):  # Fig. 13's 18 cells
            rows += measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=samples, seed=seed,
                                    probe=replace(PROBE, layers=layers, offsets=offsets), store_dir=root,
                                    shard_size=SHARD)
    return {"checkpoint": checkpoint, "samples": samples, "seed": seed, "epoch_limit": EPOCH_LIMIT,
            "cells": [cell_record(r, "n_train", "epochs", "epochs_at_cap") for r in rows],
            "seconds": round(time.perf_counter() - t0, 1)}


def load(out: Path = OUT) -> dict:
    return results_json(out)


def _cell(data: dict, layer: int, offset: int) -> dict:
    return next(c for c in data["cells"] if (c["layer"], c["offset"]) == (layer, offset))


def misses(data: dict) -> list[str]:
    return [f"{panel}, layer {l}, {o:+d}: {100 * _cell(data, l, o)['accuracy']:.1f} vs {p:.1f}"
            for (panel, l, o), (p, _) in FIG13.items() if not in_band(_cell(data, l, o), p)]


def results_md(data: dict) -> str:
    n_train = data["cells"][0]["n_train"]
    lines = [f"# Fig. 13 with the paper's MLP at {data['samples']:,} passcodes, on `{data['checkpoint']}`", "",
             f"`python experiments/fig13_scale.py` ({n_train:,} training passcodes, seed {data['seed']}, "
             f"{data['seconds'] / 60:.0f} min at 1 thread). The MLP as `paper_figures.py` fits it: one seed, "
             "early stopping on a label-unique holdout (patience 10): "
             f"{epoch_sentence(data['cells'], data['epoch_limit'])}. "
             "In band: within "
             f"{BAND:.0f} points of the paper, or the paper's value inside our 95% interval.", "",
             "| cell | ours, MLP [95% CI] | paper | ours − paper | in band | kept epoch |",
             "|---|---|---|---|---|---|"]
    for (panel, layer, offset), (paper, source) in FIG13.items():
        c = _cell(data, layer, offset)
        lines.append(f"| {panel}, layer {layer}, {offset:+d} | {pct(c)} | {paper:.1f} ({source}) | "
                     f"{100 * c['accuracy'] - paper:+.1f} | {'yes' if in_band(c, paper) else 'no'} | "
                     f"{c['epochs']}{' (limit: FLAGGED)' if c['epochs_at_cap'] else ''} |")
    missed = misses(data)
    lines += ["", f"{len(FIG13) - len(missed)} of {len(FIG13)} cells in band"
              + (f"; outside: {'; '.join(missed)}." if missed else ".")]
    return "\n".join(lines) + "\n"


def quotes(data: dict) -> dict[str, str]:
    missed = misses(data)
    return {"band": f"{len(FIG13) - len(missed)} of {len(FIG13)} Fig. 13 cells in band with the paper's MLP at "
                    f"{data['samples']:,} passcodes" + (f" (outside: {'; '.join(missed)})" if missed else ""),
            "direct": f"direct {100 * _cell(data, 3, 0)['accuracy']:.1f} at the last layer (paper 93.6)"}


def render(data: dict) -> dict[str, str]:
    return {"experiments/results/fig13_scale/results.md": results_md(data)}


def main() -> None:
    ap = toy_study_arguments(__doc__, OUT, samples=50000)
    ap.add_argument("--store-dir", type=Path, default=None, help="keep the store here (reused when present)")
    args = ap.parse_args()
    start(args)
    if not args.table_only:
        save_json(measure(args.checkpoint, args.samples, args.seed, args.store_dir), args.out)
    data = load(args.out)
    write_files(render(data), args.out)
    print(results_md(data), end="")


if __name__ == "__main__":
    main()
