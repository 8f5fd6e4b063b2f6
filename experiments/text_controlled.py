"""The toy's masked leak with the memento text taken out of it (issue 17, point 2).

    python experiments/text_controlled.py                 # shipped final toy, 3,000 passcodes
    python experiments/text_controlled.py --table-only    # rewrite summary.md from results.json

On the toy a memento is the running sum of every digit so far, so a masked memento's
*text* already says something about the passcode. Four conditions on the same toy:

    memento          random passcodes, memento attention: what the paper probes
    restart          the fork's restart (texts only, delimiters hidden): the text baseline
    text-controlled  passcodes with digit sum 22: the texts carry nothing of the passcode,
                     the other blocks stay random; a masked memento reads the KV channel alone
    text-identical   the same with one background shared by every sample: every memento
                     text identical, the channel without distractors

Chance is 10% for random passcodes and the exact majority baseline, 11.17%, for digit
sum 22; each cell's p-value is the exact test against its own chance, Holm-corrected
over the table. Results: experiments/results/text_controlled/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import toy_models
from kvprobe.analysis import apply_holm
from toy_models.leakage import MEMENTO, RESTART, TEXT_CONTROLLED, TEXT_IDENTICAL, cell_record, measure_leakage

OUT = Path(__file__).resolve().parent / "results" / "text_controlled"
CONDITIONS = (MEMENTO, RESTART, TEXT_CONTROLLED, TEXT_IDENTICAL)
LAYERS = (1, 3)
OFFSETS = (-1, 0, 1, 2, 7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="final")
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        rows = measure_leakage(toy_models.load(args.checkpoint), CONDITIONS, LAYERS, OFFSETS,
                               n_samples=args.samples, seed=args.seed)
        apply_holm(rows)
        (OUT / "results.json").write_text(json.dumps({
            "checkpoint": args.checkpoint, "samples": args.samples, "seed": args.seed,
            "rows": [cell_record(r, "p_holm") for r in rows]}, indent=1) + "\n")
    data = json.loads((OUT / "results.json").read_text())
    cells = [(l, o) for l in LAYERS for o in OFFSETS]
    lines = [f"# Text-controlled leakage on the toy `{data['checkpoint']}` ({data['samples']} passcodes per "
             "condition, linear probe)", "",
             "Accuracy (%) [95% bootstrap interval]; `*` = above the condition's own chance after Holm over the "
             "table. Remade by `python experiments/text_controlled.py`.", "",
             "| condition | chance | " + " | ".join(f"layer {l} {o:+d}" for l, o in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for cond in CONDITIONS:
        got = {(r["layer"], r["offset"]): r for r in data["rows"] if r["condition"] == cond.name}
        chance = next(iter(got.values()))["chance"]
        lines.append(f"| {cond.name} | {100 * chance:.2f} | " + " | ".join(
            f"{100 * got[c]['accuracy']:.1f} [{100 * got[c]['ci_low']:.1f}, {100 * got[c]['ci_high']:.1f}]"
            + ("*" if got[c]["p_holm"] <= 0.05 else "") for c in cells) + " |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
