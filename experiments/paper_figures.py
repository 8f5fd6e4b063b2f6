"""The toy's two published figures, cell by cell: ours [95% interval], paper, difference.

    python experiments/paper_figures.py                       # both figures on the shipped final toy (1 thread)
    python experiments/paper_figures.py --samples 20000       # tighter intervals (into --out DIR)
    python experiments/paper_figures.py --table-only          # rewrite tables and figures from cells.json

Fig. 13 of the paper (appendix A.4.2; keep_last_n_blocks = 0, target block T_2):
accuracy by layer (direct, masked +1, causal control), masked accuracy by distance at
the last layer, and masked +1 across training checkpoints. The blog heatmap of the
public microsoft/memento repository (blogpost/figures/kv_leakage_heatmap.png;
keep_last_n_blocks = 1, target block 2 counted from 0, layers 0..3, distances -2..+7).
Paper values that the text states are exact; the rest are read off the published
figures (about +-1 point; heatmap cells are printed in the figure). Ours: the shipped
toy read with kvprobe's default features (the whole memento span, `tail_mean`) and its
linear probe (the paper's probe was an MLP; its features are not stated).
Results go to experiments/results/paper_figures/.
"""

from __future__ import annotations

import json
from pathlib import Path

import toy_models
from kvprobe.memento.masks import MaskConfig
from toy_models.leakage import MEMENTO, Condition, cell_record, measure_leakage
from toy_models.task import heldout_seed, task_accuracy
from published import pct, results_json, script_arguments, start, write_files

OUT = Path(__file__).resolve().parent / "results" / "paper_figures"
KEEP1 = Condition("memento-keep1", MaskConfig(keep_last_n_blocks=1))

# (panel, layer, offset) -> (paper %, "text" or "figure")
FIG13 = {
    **{("by layer: direct", l, 0): (v, "figure") for l, v in enumerate((13.5, 96.5, 95.7, 93.6))},
    ("by layer: masked +1", 0, 1): (13.1, "text"), ("by layer: masked +1", 1, 1): (15.8, "figure"),
    ("by layer: masked +1", 2, 1): (23.0, "figure"), ("by layer: masked +1", 3, 1): (26.2, "text"),
    **{("by layer: causal control", l, -1): (10.0, "figure") for l in range(4)},
    ("by distance, last layer", 3, 2): (21.4, "text"),
    **{("by distance, last layer", 3, d): (v, "figure") for d, v in ((3, 18.1), (4, 16.3), (5, 14.7), (6, 13.6))},
    ("by distance, last layer", 3, 7): (13.0, "text"),  # "1.3x chance"
}
HEATMAP_ROWS = {  # layer -> d = -2 .. +7, printed in the published heatmap
    3: (10.1, 10.1, 95.1, 81.3, 36.6, 21.7, 19.4, 16.9, 15.5, 14.0),
    2: (10.1, 10.1, 96.4, 87.6, 33.8, 20.9, 19.4, 16.5, 15.5, 14.2),
    1: (10.1, 10.1, 98.1, 94.7, 15.1, 13.4, 13.5, 13.1, 13.2, 12.3),
    0: (10.2, 10.1, 13.1, 12.7, 12.4, 12.2, 12.0, 11.9, 11.8, 11.7),
}
HEATMAP = {(l, d): v for l, row in HEATMAP_ROWS.items() for d, v in zip(range(-2, 8), row)}
TRAINING = ((5, 17.5, 76.5), (20, 19.2, 92.3), (50, 19.0, 94.7))  # (epoch, masked %, task %), read off Fig. 13


def measure(samples: int, seed: int) -> dict:
    """Every cell both figures need, on the shipped final toy and its series."""
    model = toy_models.load("final")
    cells = []
    for r in measure_leakage(model, (MEMENTO,), (0, 1, 2, 3), tuple(range(-1, 8)), n_samples=samples, seed=seed):
        cells.append({"figure": "fig13", **cell_record(r)})
    for r in measure_leakage(model, (KEEP1,), (0, 1, 2, 3), tuple(range(-2, 8)), n_samples=samples, seed=seed,
                             target_block=2):
        cells.append({"figure": "heatmap", **cell_record(r)})
    series = []
    for name in [*toy_models.checkpoint_names(), "final"]:
        ck = toy_models.load(name)
        (r,) = measure_leakage(ck, (MEMENTO,), (3,), (1,), n_samples=samples, seed=seed)
        series.append({"checkpoint": name, "task_accuracy": task_accuracy(ck, 2000, heldout_seed(2)), **cell_record(r)})
    return {"samples": samples, "seed": seed, "model": "toy final", "cells": cells, "series": series}


def _find(cells: list[dict], figure: str, layer: int, offset: int) -> dict:
    return next(c for c in cells if (c["figure"], c["layer"], c["offset"]) == (figure, layer, offset))


def _row(label: str, ours: dict, paper: float, source: str) -> str:
    a, lo, hi = (100 * ours[k] for k in ("accuracy", "ci_low", "ci_high"))
    inside = "yes" if lo <= paper <= hi else "no"
    return f"| {label} | {a:.1f} [{lo:.1f}, {hi:.1f}] | {paper:.1f} ({source}) | {a - paper:+.1f} | {inside} |"


README_ROWS = (  # (label, figure, layer, offset, paper %): the README's excerpt of both figures
    *((f"Fig. 13, {name}, layer {l}", "fig13", l, o, FIG13[(panel, l, o)][0]) for name, panel, l, o in (
        ("direct", "by layer: direct", 1, 0), ("direct", "by layer: direct", 3, 0),
        ("causal control", "by layer: causal control", 3, -1), ("masked +1", "by layer: masked +1", 0, 1),
        ("masked +1", "by layer: masked +1", 3, 1), ("masked +2", "by distance, last layer", 3, 2),
        ("masked +7", "by distance, last layer", 3, 7))),
    *((f"heatmap, layer {l}, d = {d:+d}{what}".replace("+0", "0"), "heatmap", l, d, HEATMAP[(l, d)]) for l, d, what in (
        (3, 0, " (direct)"), (3, 1, " (kept)"), (3, 2, " (first masked)"), (3, 7, ""), (1, 2, ""), (0, 2, ""))),
)


def _heatmap_gaps(cells: list[dict]) -> list[float]:
    return [abs(100 * _find(cells, "heatmap", l, d)["accuracy"] - p) for (l, d), p in HEATMAP.items()]


def readme_table(data: dict) -> str:
    """The README's table (between <!-- paper-table --> markers): ours [95%] against the paper."""
    cells, series = data["cells"], data["series"]
    lines = ["| cell | ours | paper | ours − paper |", "|---|---|---|---|"]
    for label, figure, layer, offset, paper in README_ROWS:
        c = _find(cells, figure, layer, offset)
        lines.append(f"| {label} | {pct(c)} | {paper:.1f} | {100 * c['accuracy'] - paper:+.1f} |")
    task = f"{100 * series[0]['task_accuracy']:.0f}% → {100 * series[-1]['task_accuracy']:.0f}%"
    ours = " → ".join(f"{100 * s['accuracy']:.1f}" for s in series)
    paper = " → ".join(f"{m:.1f}" for _, m, _ in TRAINING)
    lines.append(f"| masked +1, layer 3, across the series ({task} task accuracy) | {ours} | {paper} "
                 f"({TRAINING[0][2]:.1f}% → {TRAINING[-1][2]:.1f}%) | |")
    return "\n".join(lines)


def quotes(data: dict) -> dict[str, str]:
    """The phrases README.md and docs/toy.md quote from cells.json (tests/project/test_published.py checks them)."""
    cells, series = data["cells"], data["series"]
    f13 = {(c["layer"], c["offset"]): c for c in cells if c["figure"] == "fig13"}
    heat = {(c["layer"], c["offset"]): c for c in cells if c["figure"] == "heatmap"}
    gaps = _heatmap_gaps(cells)
    a = lambda c: f"{100 * c['accuracy']:.1f}"  # noqa: E731
    return {
        "fig13_layer2": f"masked +1 {a(f13[2, 1])} against about 23; direct {a(f13[2, 0])} against 95.7",
        "fig13_masked1": f"{a(f13[3, 1])}% at the first masked memento against the paper's 26.2%",
        "fig13_direct": f"direct {a(f13[3, 0])} against 93.6",
        "fig13_fade": f"{100 * f13[3, 7]['accuracy'] / 10:.1f}x chance at +7",
        "heatmap_gap": (f"direct {a(heat[3, 0])} against 95.1, first masked {a(heat[3, 2])} against 36.6; mean "
                        f"|difference| {sum(gaps) / len(gaps):.1f} points over {len(gaps)} cells, largest {max(gaps):.1f}"),
        "series": (f"masked +1 falls from {a(series[0])}% to {a(series[-1])}% as task accuracy climbs from "
                   f"{100 * series[0]['task_accuracy']:.0f}% to {100 * series[-1]['task_accuracy']:.0f}% "
                   f"({a(series[1])}% already at the second checkpoint)"),
        "series_end": f"our series stops at {100 * series[-1]['task_accuracy']:.0f}% task accuracy",
    }


def load(out: Path = OUT) -> dict:
    """The committed measurement: cells.json of results directory `out`."""
    return results_json(out, "cells.json")


def render(data: dict) -> dict[str, str]:
    """Everything written from cells.json: the results table and the README's excerpt ("file#marker")."""
    return {"experiments/results/paper_figures/results.md": results_table(data), "README.md#paper-table": readme_table(data)}


def results_table(data: dict) -> str:
    cells = data["cells"]
    head = ["| cell | ours [95% CI] | paper | ours − paper | paper inside our interval |", "|---|---|---|---|---|"]
    lines = [f"# The toy's published figures, cell by cell ({data['samples']} passcodes, shipped `final`)", "",
             "Remade by `python experiments/paper_figures.py`. Ours: linear probe on kvprobe's default features "
             "(whole memento span, `tail_mean`), 95% bootstrap interval over validation passcodes. Paper: "
             "'text' values are stated in the paper; 'figure' values are read off the plot (about ±1 point).", "",
             "## Fig. 13 (keep_last_n_blocks = 0, target T_2)", "", *head]
    for (panel, layer, offset), (paper, source) in FIG13.items():
        lines.append(_row(f"{panel}, layer {layer}, offset {offset:+d}", _find(cells, "fig13", layer, offset),
                          paper, source))
    lines += ["", "### Across training (masked +1, last layer)", "",
              "| checkpoint | task accuracy | masked +1 [95% CI] |", "|---|---|---|"]
    for s in data["series"]:
        lines.append(f"| {s['checkpoint']} | {100 * s['task_accuracy']:.1f} | {100 * s['accuracy']:.1f} "
                     f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}] |")
    lines.append("| paper (epochs 5, 20, 50) | " + ", ".join(f"{t:.1f}" for _, _, t in TRAINING) + " | "
                 + ", ".join(f"{m:.1f}" for _, m, _ in TRAINING) + " (figure) |")
    lines += ["", "## Blog heatmap (keep_last_n_blocks = 1, target block 2; d = +1 is the kept block)", "", *head]
    for (layer, d), paper in sorted(HEATMAP.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        lines.append(_row(f"layer {layer}, d = {d:+d}", _find(cells, "heatmap", layer, d), paper, "figure"))
    diffs = _heatmap_gaps(cells)
    lines += ["", f"Heatmap: mean |ours − paper| = {sum(diffs) / len(diffs):.1f} points over {len(diffs)} cells; "
              f"largest {max(diffs):.1f}."]
    return "\n".join(lines) + "\n"


def write_figures(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = data["cells"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    for (name, offset, color) in (("direct", 0, "#1f77b4"), ("masked +1", 1, "#d62728"), ("causal control", -1, "#2ca02c")):
        ours = [_find(cells, "fig13", l, offset) for l in range(4)]
        ys = [100 * c["accuracy"] for c in ours]
        err = [[y - 100 * c["ci_low"] for y, c in zip(ys, ours)], [100 * c["ci_high"] - y for y, c in zip(ys, ours)]]
        axes[0].errorbar(range(4), ys, yerr=err, color=color, marker="o", capsize=3, label=f"{name} (ours)")
        axes[0].plot(range(4), [FIG13[(f"by layer: {name}", l, offset)][0] for l in range(4)], color=color,
                     linestyle=":", marker="x", label=f"{name} (paper)")
    axes[0].set(xlabel="layer", ylabel="probe accuracy (%)", title="Fig. 13 left: by layer (keep 0)", xticks=range(4))
    d = list(range(1, 8))
    ours = [_find(cells, "fig13", 3, o) for o in d]
    ys = [100 * c["accuracy"] for c in ours]
    axes[1].errorbar(d, ys, yerr=[[y - 100 * c["ci_low"] for y, c in zip(ys, ours)],
                                  [100 * c["ci_high"] - y for y, c in zip(ys, ours)]],
                     color="#d62728", marker="o", capsize=3, label="ours, last layer")
    paper = [FIG13.get(("by layer: masked +1", 3, 1) if o == 1 else ("by distance, last layer", 3, o))[0] for o in d]
    axes[1].plot(d, paper, color="#d62728", linestyle=":", marker="x", label="paper, last layer")
    axes[1].set(xlabel="distance from target block", ylabel="masked probe accuracy (%)",
                title="Fig. 13 centre: by distance (keep 0)")
    grid = np.array([[100 * _find(cells, "heatmap", l, o)["accuracy"] - HEATMAP[(l, o)] for o in range(-2, 8)]
                     for l in (3, 2, 1, 0)])
    lim = max(5.0, float(np.abs(grid).max()))
    im = axes[2].imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(4):
        for j in range(10):
            axes[2].text(j, i, f"{grid[i, j]:+.0f}", ha="center", va="center", fontsize=7)
    axes[2].set(xticks=range(10), xticklabels=[f"{o:+d}" for o in range(-2, 8)], yticks=range(4),
                yticklabels=[f"layer {l}" for l in (3, 2, 1, 0)], xlabel="distance d",
                title="Blog heatmap (keep 1): ours − paper (points)")
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes[:2]:
        ax.axhline(10, color="black", linestyle="--", linewidth=1)
        ax.legend(fontsize=7)
    fig.savefig(out / "paper_figures.png", dpi=130)
    plt.close(fig)


def main() -> None:
    parser = script_arguments(__doc__, OUT)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start(args)
    if not args.table_only:
        (args.out / "cells.json").write_text(json.dumps(measure(args.samples, args.seed), indent=1) + "\n")
    data = load(args.out)
    write_files(render(data), args.out)
    write_figures(data, args.out)


if __name__ == "__main__":
    main()
