"""The toy's masked leak with the memento text taken out of it (issue 17, point 2).

    python experiments/text_controlled.py                 # shipped final toy, 3,000 passcodes (1 thread)
    python experiments/text_controlled.py --out DIR       # the same run into DIR
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

from pathlib import Path

import toy_models
from kvprobe.analysis import apply_holm
from toy_models.leakage import MEMENTO, RESTART, TEXT_CONTROLLED, TEXT_IDENTICAL, cell_record, measure_leakage
from published import pct, results_json, run_toy_study

OUT = Path(__file__).resolve().parent / "results" / "text_controlled"
CONDITIONS = (MEMENTO, RESTART, TEXT_CONTROLLED, TEXT_IDENTICAL)
LAYERS = (1, 3)
OFFSETS = (-1, 0, 1, 2, 7)
SUMMARY = "experiments/results/text_controlled/summary.md"  # render() keys: the committed file
README_TABLE = "README.md#text-table"  # and the README's excerpt (between <!-- text-table --> markers)
# docs/toy.md's labels for the conditions, in its table of layer 3
DOC_LABELS = {
    "memento": "memento (random passcodes)",
    "restart": "restart (the fork's, delimiters hidden: texts only)",
    "text-controlled": "text-controlled (digit sum 22)",
    "text-identical": "text-identical (and a shared background)",
}


def measure(checkpoint: str, samples: int, seed: int) -> dict:
    """Every condition at every (layer, offset), Holm over the table: {"checkpoint", "samples", "seed", "rows"}."""
    rows = measure_leakage(toy_models.load(checkpoint), CONDITIONS, LAYERS, OFFSETS, n_samples=samples, seed=seed)
    apply_holm(rows)
    return {"checkpoint": checkpoint, "samples": samples, "seed": seed,
            "rows": [cell_record(r, "p_holm") for r in rows]}


def load(out: Path) -> dict:
    """The committed results.json of results directory `out`."""
    return results_json(out)


def _cells(data: dict, condition: str) -> dict:
    """(layer, offset) -> row of `condition`."""
    return {(r["layer"], r["offset"]): r for r in data["rows"] if r["condition"] == condition}


def summary(data: dict) -> str:
    """summary.md: one row per condition, accuracy [95%] at every (layer, offset), `*` where Holm says above chance."""
    cells = [(l, o) for l in LAYERS for o in OFFSETS]
    lines = [f"# Text-controlled leakage on the toy `{data['checkpoint']}` ({data['samples']} passcodes per "
             "condition, linear probe)", "",
             "Accuracy (%) [95% bootstrap interval]; `*` = above the condition's own chance after Holm over the "
             "table. Remade by `python experiments/text_controlled.py`.", "",
             "| condition | chance | " + " | ".join(f"layer {l} {o:+d}" for l, o in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for cond in CONDITIONS:
        got = _cells(data, cond.name)
        chance = next(iter(got.values()))["chance"]
        lines.append(f"| {cond.name} | {100 * chance:.2f} | " + " | ".join(
            pct(got[c]) + ("*" if got[c]["p_holm"] <= 0.05 else "") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def readme_table(data: dict) -> str:
    """The README's table: the last layer, direct and masked +1, +2, +7, with intervals."""
    last, offsets = max(LAYERS), (0, 1, 2, 7)
    lines = [f"| condition (layer {last}) | chance | direct (0) | masked +1 | masked +2 | masked +7 |",
             "|---|---|---|---|---|---|"]
    for cond in CONDITIONS:
        got = _cells(data, cond.name)
        lines.append(f"| {cond.name} | {100 * got[last, 0]['chance']:.2f} | "
                     + " | ".join(pct(got[last, o]) for o in offsets) + " |")
    return "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    """Everything written from results.json: summary.md and the README's excerpt ("file#marker")."""
    return {SUMMARY: summary(data), README_TABLE: readme_table(data)}


def toy_table(data: dict) -> str:
    """docs/toy.md's table: the README's cells without intervals (no markers there)."""
    last = max(LAYERS)
    lines = ["| condition | chance | direct | masked +1 | +2 | +7 |", "|---|---|---|---|---|---|"]
    for cond in CONDITIONS:
        got = _cells(data, cond.name)
        lines.append(f"| {DOC_LABELS[cond.name]} | {100 * got[last, 0]['chance']:.2f} | "
                     + " | ".join(f"{100 * got[last, o]['accuracy']:.1f}" for o in (0, 1, 2, 7)) + " |")
    return "\n".join(lines)


def quotes(data: dict) -> dict[str, str]:
    """The phrases README.md and docs/toy.md quote from results.json (layer 3)."""
    _, restart, controlled, identical = (_cells(data, c.name) for c in CONDITIONS)
    a = lambda r: f"{100 * r['accuracy']:.1f}%"  # noqa: E731
    chance = f"{100 * controlled[3, 1]['chance']:.2f}%"
    text = 100 * (restart[3, 1]["accuracy"] - restart[3, 1]["chance"])
    return {
        "samples": f"{data['samples']:,} passcodes per condition",
        "chance": f"its exact chance of {chance}",
        "text_points": f"carry about {text:.0f} points above chance at the first masked memento",
        "restart": f"(restart: {a(restart[3, 1])})",
        "readme_channel": f"it still reads {a(controlled[3, 1])} against {chance}",
        "toy_channel": f"memento still reads {a(controlled[3, 1])} against an {chance} baseline",
        "readme_identical": f"almost perfectly even 7 blocks later ({a(identical[3, 7])})",
        "toy_identical": f"({a(identical[3, 7])}): what limits a probe at a distance",
        "toy_table": toy_table(data),
    }


def main() -> None:
    data = run_toy_study(__doc__, OUT, measure, load, render)
    print(summary(data), end="")


if __name__ == "__main__":
    main()
