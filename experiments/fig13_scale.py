"""Fig. 13 with the paper's probe at the paper's scale: the MLP on every cell, 50,000 passcodes (issue 30).

    python experiments/fig13_scale.py                             # final and the paper-matched checkpoint (1 thread)
    python experiments/fig13_scale.py --checkpoint final          # one checkpoint (measured again if published)
    python experiments/fig13_scale.py --store-dir runs/f13        # keep each 50K store there (reused when present)
    python experiments/fig13_scale.py --table-only                # rewrite results.md from the JSON

`experiments/paper_figures.py` reads Fig. 13 at 5,000 passcodes, where the paper's 512-256-128 MLP
is short of data (it reads the direct memento at two thirds of what the linear probe reads).
The paper's toy figure was made at 50,000; `toy_reproduction.py` reads two of its cells there
with the MLP. This reads all 18 Fig. 13 cells with the MLP (one seed, early stopping with
patience 10 under a limit of `EPOCH_LIMIT` epochs that no cell reaches; each cell's kept epoch is
recorded), memento mode, target block 1, with 95% bootstrap intervals, against issue 30's band
(within 3 points of the paper, or the paper's value inside our interval), on two checkpoints:
the shipped `final`, and the shipped checkpoint whose task accuracy is nearest the paper's toy
at the end of its training (`matched_checkpoint`: Fig. 13's last training point, 94.7%).
`final` is trained past the paper's toy; the matched checkpoint asks whether the cells `final`
misses are the extra training. Without --checkpoint a checkpoint whose JSON is already in --out is
kept as it is. Results: experiments/results/fig13_scale/ (one JSON per checkpoint, results.md).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import toy_models
from toy_models.checkpoint import checkpoint_names, read_meta, resolve
from toy_models.leakage import MEMENTO, STUDY_PROBE, cell_record, measure_leakage
from kvprobe.probes.config import MLPConfig
from paper_figures import BAND, EPOCH_LIMIT, FIG13, TRAINING, in_band
from published import epoch_sentence, json_name, pct, results_json, run_each, script_arguments

OUT = Path(__file__).resolve().parent / "results" / "fig13_scale"
PROBE = replace(STUDY_PROBE, families=("mlp",), seeds=1, mlp=MLPConfig(max_epochs=EPOCH_LIMIT))  # as paper_figures' MLP
LAYERS, OFFSETS = (0, 1, 2, 3), tuple(range(-1, 8))
SHARD = 5000  # samples captured in memory at once: 50K in one shard would take about 18 GB
PAPER_TASK = TRAINING[-1][2]  # the paper's toy's task accuracy (%) at its last training point, read off Fig. 13
PAPER = {(layer, offset): (panel, paper) for (panel, layer, offset), (paper, _) in FIG13.items()}  # (l, o) -> (panel, %)


def matched_checkpoint() -> str:
    """The shipped checkpoint (`final` or one of the series) whose task accuracy (its meta.json) is nearest
    the paper's toy at the end of its training (`PAPER_TASK`)."""
    return min(["final", *checkpoint_names()], key=lambda n: abs(100 * read_meta(n)["task_accuracy"] - PAPER_TASK))


@contextmanager
def checkpoint_store(store_dir: Path | None, checkpoint: str) -> Iterator[Path]:
    """Where a checkpoint's 50K store lives while it is read: store_dir/<its JSON's stem> (kept, reused by a
    later run: fig13_seeds reads fig13_scale's), or a temporary folder deleted afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        yield store_dir / Path(json_name(checkpoint)).stem if store_dir else Path(tmp)


def measure(checkpoint: str, samples: int, seed: int, store_dir: Path | None = None) -> dict:
    """Every Fig. 13 cell of `checkpoint` with the MLP on `samples` passcodes (the store kept under `store_dir` if given)."""
    t0 = time.perf_counter()
    model = toy_models.load(checkpoint)
    rows = []
    with checkpoint_store(store_dir, checkpoint) as root:  # one store: captured by the first read, reused by the second
        for layers, offsets in (((0, 1, 2, 3), (-1, 0, 1)), ((3,), (2, 3, 4, 5, 6, 7))):  # Fig. 13's 18 cells
            rows += measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=samples, seed=seed,
                                    probe=replace(PROBE, layers=layers, offsets=offsets), store_dir=root,
                                    shard_size=SHARD)
    return {"checkpoint": checkpoint, "samples": samples, "seed": seed, "epoch_limit": EPOCH_LIMIT,
            "cells": [cell_record(r, "n_train", "epochs", "epochs_at_cap") for r in rows],
            "seconds": round(time.perf_counter() - t0, 1)}


def load(out: Path = OUT) -> dict[str, dict]:
    """checkpoint -> its measurement, `final` first, then the series in training order."""
    records = [results_json(out, p.name) for p in Path(out).glob("*.json")]
    return {r["checkpoint"]: r for r in sorted(records, key=lambda r: (r["checkpoint"] != "final", r["checkpoint"]))}


def cell(record: dict, layer: int, offset: int) -> dict:
    """One cell (layer, offset) of a checkpoint's record."""
    return next(c for c in record["cells"] if (c["layer"], c["offset"]) == (layer, offset))


def _task(record: dict) -> str:
    return f"{100 * read_meta(record['checkpoint'])['task_accuracy']:.1f}% task accuracy"


def missed_cells(record: dict) -> list[tuple[int, int]]:
    """(layer, offset) of the Fig. 13 cells `record` reads outside issue 30's band, in Fig. 13's order."""
    return [(l, o) for (_, l, o), (p, _) in FIG13.items() if not in_band(cell(record, l, o), p)]


def misses(record: dict) -> list[str]:
    return [f"{PAPER[l, o][0]}, layer {l}, {o:+d}: {100 * cell(record, l, o)['accuracy']:.1f} vs {PAPER[l, o][1]:.1f}"
            for l, o in missed_cells(record)]


def band_sentence(record: dict) -> str:
    missed = misses(record)
    return (f"{len(FIG13) - len(missed)} of {len(FIG13)} Fig. 13 cells in band with the paper's MLP at "
            f"{record['samples']:,} passcodes on `{record['checkpoint']}` ({_task(record)})"
            + (f" (outside: {'; '.join(missed)})" if missed else ""))


def results_md(data: dict[str, dict]) -> str:
    records = list(data.values())
    first = records[0]
    lines = [f"# Fig. 13 with the paper's MLP at {first['samples']:,} passcodes", "",
             f"`python experiments/fig13_scale.py` ({first['cells'][0]['n_train']:,} training passcodes, seed "
             f"{first['seed']}). The MLP as `paper_figures.py` fits it: one seed, early stopping on a label-unique "
             "holdout (patience 10). In band: within "
             f"{BAND:.0f} points of the paper, or the paper's value inside our 95% interval. `final` is the shipped "
             f"toy; the paper's toy ends its training at {PAPER_TASK:.1f}% task accuracy, and the shipped checkpoint "
             "nearest that is read beside it.", ""]
    for r in records:
        lines.append(f"- `{r['checkpoint']}` ({_task(r)}): {epoch_sentence(r['cells'], r['epoch_limit'])}; "
                     f"{r['seconds'] / 60:.0f} min at 1 thread.")
    lines += ["", "| cell | paper | " + " | ".join(f"`{r['checkpoint']}` MLP [95% CI] | − paper | in band | epoch"
                                                   for r in records) + " |",
              "|---|---|" + "---|---|---|---|" * len(records)]
    for (panel, layer, offset), (paper, source) in FIG13.items():
        cells = []
        for r in records:
            c = cell(r, layer, offset)
            cells.append(f"{pct(c)} | {100 * c['accuracy'] - paper:+.1f} | {'yes' if in_band(c, paper) else 'no'} | "
                         f"{c['epochs']}{' (limit: FLAGGED)' if c['epochs_at_cap'] else ''}")
        lines.append(f"| {panel}, layer {layer}, {offset:+d} | {paper:.1f} ({source}) | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {band_sentence(r)}." for r in records]
    return "\n".join(lines) + "\n"


def quotes(data: dict[str, dict]) -> dict[str, str]:
    final, matched = data["final"], data[matched_checkpoint()]
    return {"band": band_sentence(final), "matched": band_sentence(matched),
            "direct": f"direct {100 * cell(final, 3, 0)['accuracy']:.1f} at the last layer (paper {PAPER[3, 0][1]:.1f})",
            "matched_direct": f"direct {100 * cell(matched, 3, 0)['accuracy']:.1f} and masked +2 "
                              f"{100 * cell(matched, 3, 2)['accuracy']:.1f} at the last layer "
                              f"(paper {PAPER[3, 0][1]:.1f} and {PAPER[3, 2][1]:.1f})"}


def render(data: dict[str, dict]) -> dict[str, str]:
    return {"experiments/results/fig13_scale/results.md": results_md(data)}


def main() -> None:
    ap = script_arguments(__doc__, OUT)
    ap.add_argument("--checkpoint", nargs="+", default=None,
                    help="checkpoints to measure (default: final and matched_checkpoint(), each unless published)")
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", type=Path, default=None, help="keep each store under here (reused when present)")
    args = ap.parse_args()
    for name in args.checkpoint or ():
        try:
            resolve(name)
        except FileNotFoundError as e:  # one line, exit 2, nothing written
            ap.error(str(e))
    run_each(ap, args, args.checkpoint or ("final", matched_checkpoint()), args.checkpoint is not None,
             lambda checkpoint: measure(checkpoint, args.samples, args.seed, args.store_dir), load, render)


if __name__ == "__main__":
    main()
