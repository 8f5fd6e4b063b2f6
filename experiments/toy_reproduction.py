"""The paper's toy figure at its scale, 50,000 passcodes, remade by one command (issue 15, issue 26).

    python experiments/toy_reproduction.py                   # kvprobe run experiments/toy_reproduction.yaml
    python experiments/toy_reproduction.py --run runs/x      # where the run directory goes (resumed)
    python experiments/toy_reproduction.py --table-only      # re-render the files from results.json

Runs `kvprobe --threads 1 run experiments/toy_reproduction.yaml` (capture, linear probes on
every layer x offset with a shuffled-label control, the paper's MLP on its cells, the
training sweep, report), copies the report into --out (experiments/results/toy_reproduction/:
summary.md, results.json/csv, figures/, run_config.json, timings.json) and renders README.md
there and the README's paragraph from results.json, timings.json and run_config.json alone (`render`).
"""

from __future__ import annotations

from pathlib import Path

from published import against, epoch_sentence, pct, run_config_study, run_results

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "toy_reproduction.yaml"
OUT = HERE / "results" / "toy_reproduction"
COPIED = ("summary.md", "results.json", "results.csv")
# (label, probe, layer, offset, paper %, how the paper states it): memento mode, memento site
PAPER = (("masked +1, first layer (0)", "mlp", 0, 1, 13.1, "13.1%"),
         ("masked +1, last layer (3)", "mlp", 3, 1, 26.2, "26.2% (24.9% in the main text)"))
PAPER_SWEEP = "17-19%"  # SPEC section 4: the masked leakage across training stays flat


def load(out: Path = OUT) -> dict:
    """results.json, timings.json and run_config.json of results directory `out`."""
    return run_results(out)


def _row(data: dict, probe: str, layer: int, offset: int) -> dict:
    return next(r for r in data["rows"] if (r["condition"], r["site"], r["layer"], r["offset"], r["probe"])
                == ("memento", "memento", layer, offset, probe))


def _minutes(data: dict) -> str:
    t = data["timings"]
    return (f"{sum(t.values()) / 60:.0f} min: capture {t['capture'] / 60:.0f}, probes {t['probe'] / 60:.0f}, "
            f"sweep {t['sweep'] / 60:.0f}")


def _sweep(data: dict) -> tuple[dict, dict]:
    points = sorted(data["sweep"], key=lambda p: p["task_accuracy"])
    return points[0], points[-1]


def _headline(data: dict) -> tuple[dict, dict, dict, dict, dict]:
    """What the prose quotes: the MLP's masked +1 at the first and last layer, the linear probe's at the
    last, and the sweep's points of lowest and highest task accuracy."""
    first, last = (_row(data, "mlp", layer, 1) for layer in (0, 3))
    return (first, last, _row(data, "linear", 3, 1), *_sweep(data))


def readme(data: dict) -> str:
    """experiments/results/toy_reproduction/README.md, from results.json, timings.json and run_config.json."""
    first = _row(data, "linear", 3, 1)
    n = first["n_train"] + first["n_val"]
    lines = ["# The paper's toy figure at 50,000 passcodes, on the shipped toy (`final`)", "",
             "`python experiments/toy_reproduction.py` (`kvprobe --threads 1 run experiments/toy_reproduction.yaml`, "
             f"{_minutes(data)}, on this project's 2-core CPU machine while other jobs ran), with the probe strength "
             "extended past its grid's edge (issue 26). Memento mode, memento site, "
             f"{n:,} passcodes ({first['n_train']:,} training, {first['n_val']:,} validation). Files: `summary.md` "
             "(the report), `results.csv`/`results.json`, `figures/`, `run_config.json`, `timings.json`; this file "
             "is rendered from `results.json` by the script. The stores are not committed.", "",
             "## Against the paper (Fig. 13's cells; the paper's probe is the MLP)", "",
             "| cell | probe | this run | paper | this run − paper | |", "|---|---|---|---|---|---|"]
    for label, probe, layer, offset, paper, stated in PAPER:
        r = _row(data, probe, layer, offset)
        lines.append(f"| {label} | {probe} | {pct(r)} | {stated} | {100 * r['accuracy'] - paper:+.1f} | "
                     f"{against(r, paper)} |")
    lines.append(f"| masked +1, last layer (3) | linear | {pct(first)} | — | — | |")
    mlp = [_row(data, "mlp", layer, offset) for _, probe, layer, offset, _, _ in PAPER if probe == "mlp"]
    stop = data["run_config"]["config"]["probe"]["mlp"]  # the run's own MLP settings
    lines += ["", f"The MLP (early stopping with patience {stop['patience']}, the latest of its seeds): "
                  f"{epoch_sentence(mlp, stop['max_epochs'])}."]
    lo, hi = _sweep(data)
    lines += ["", "## Across training (last layer, masked +1, linear probe)", "",
              "| checkpoint | task accuracy | masked +1 |", "|---|---|---|"]
    for p in sorted(data["sweep"], key=lambda p: p["step"]):
        lines.append(f"| {p['checkpoint']} | {100 * p['task_accuracy']:.1f}% | {100 * p['masked_accuracy']:.1f}% "
                     f"[{100 * p['masked_ci_low']:.1f}, {100 * p['masked_ci_high']:.1f}] |")
    lines += ["", f"From {100 * lo['task_accuracy']:.0f}% to {100 * hi['task_accuracy']:.0f}% task accuracy the "
              f"masked leak goes from {100 * lo['masked_accuracy']:.1f}% to {100 * hi['masked_accuracy']:.1f}%; the "
              f"paper's stays at {PAPER_SWEEP} over 77% to 95%."]
    return "\n".join(lines) + "\n"


def readme_summary(data: dict) -> str:
    """The README's paragraph on this run (between <!-- reproduction-summary --> markers)."""
    first, last, linear, lo, hi = _headline(data)
    n = linear["n_train"] + linear["n_val"]
    return (f"**The paper's toy figure at its scale** (`python experiments/toy_reproduction.py`, on the "
            f"shipped `final`, {n:,} passcodes, "
            f"MLP probes on the paper's cells, the training series; {_minutes(data)} on 1 thread; "
            "[results](experiments/results/toy_reproduction/README.md)): the MLP, the paper's probe, reads masked +1 "
            f"at {100 * first['accuracy']:.1f}% [{100 * first['ci_low']:.1f}, {100 * first['ci_high']:.1f}] at the "
            f"first layer (paper 13.1%) and {100 * last['accuracy']:.1f}% [{100 * last['ci_low']:.1f}, "
            f"{100 * last['ci_high']:.1f}] at the last (paper 26.2%, 24.9% in the main text); the linear probe "
            f"reads {100 * linear['accuracy']:.1f}% at the last layer. Across training the masked leak goes from "
            f"{100 * lo['masked_accuracy']:.1f}% at {100 * lo['task_accuracy']:.0f}% task accuracy to "
            f"{100 * hi['masked_accuracy']:.1f}% at {100 * hi['task_accuracy']:.0f}%; the paper's stays at "
            f"{PAPER_SWEEP}. {seeds_sentence(last)}")


def seeds_sentence(row: dict) -> str:
    """What the MLP's seeds read on one cell, seed 0 first: how far one initialisation moves it."""
    reads = [f"{100 * a:.1f}" for a in row["accuracy_seeds"]]
    spread = 100 * (max(row["accuracy_seeds"]) - min(row["accuracy_seeds"]))
    return (f"The MLP's {len(reads)} seeds read {', '.join(reads[:-1])} and {reads[-1]}% at the last layer "
            f"(seed 0 first): one initialisation moves the cell by {spread:.1f} points.")


STAGES = (("capture", "50K passcodes x 4 layers x 10 offsets, K+V, float16"),
          ("probe", "linear on 40 cells (strength path, refit, shuffled-label refit); the MLP on 2 cells x 3 seeds "
                    "+ shuffled labels in one batched run"),
          ("sweep", "{n_sweep} checkpoints x (10K capture + linear probes on 3 cells)"),
          ("report", "tables and figures"))


def timings_table(data: dict) -> str:
    """benchmarks/RESULTS.md's table of the run's stage times (between <!-- reproduction-timings --> markers)."""
    t = data["timings"]
    lines = ["| stage | wall time | what it did |", "|---|---|---|"]
    lines += [f"| {stage} | {t[stage] / 60:.1f} min ({t[stage]:.0f} s) | {what.format(n_sweep=len(data['sweep']))} |"
              for stage, what in STAGES if stage in t]
    lines.append(f"| **total** | **{sum(t.values()) / 60:.1f} min** | |")
    return "\n".join(lines)


def quotes(data: dict) -> dict[str, str]:
    """The phrases docs/toy.md quotes from results.json."""
    first, last, linear, lo, hi = _headline(data)
    return {
        "mlp": f"masked +1 at {100 * first['accuracy']:.1f}% at the first layer and {100 * last['accuracy']:.1f}% "
               "at the last",
        "linear": f"the linear probe reads {100 * linear['accuracy']:.1f}% there",
        "sweep": f"from {100 * lo['masked_accuracy']:.1f}% to {100 * hi['masked_accuracy']:.1f}% as task accuracy "
                 f"climbs from {100 * lo['task_accuracy']:.0f}% to {100 * hi['task_accuracy']:.0f}%",
    }


def render(data: dict) -> dict[str, str]:
    return {"experiments/results/toy_reproduction/README.md": readme(data),
            "README.md#reproduction-summary": readme_summary(data),
            "benchmarks/RESULTS.md#reproduction-timings": timings_table(data)}


def main() -> int:
    return run_config_study(__doc__, CONFIG, Path("runs/toy_reproduction"), OUT, COPIED, render)


if __name__ == "__main__":
    raise SystemExit(main())
