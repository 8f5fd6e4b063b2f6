"""The recipe study's contrasts over seeds, at matched steps and at matched task accuracy (issue 26).

    python experiments/recipe_seeds.py                      # every contrast x 3 seeds, resumable
    python experiments/recipe_seeds.py --only faithful      # one recipe's seeds
    python experiments/recipe_seeds.py --table-only         # rewrite results.md from the JSON

`experiments/recipe_study.py` trains each recipe once (seed 0) for 400 steps, where the
leak is still falling and recipes that learn at different speeds sit at different
points of their curves. Here each recipe of a contrast the docs state as a finding
(initialisation scale, linear-layer scale, embedding scale, capacity) is trained from
3 seeds (model init and data), a checkpoint every 50 steps, and read twice, last layer,
memento mode, direct and masked +1 (3,000 passcodes, kvprobe's default probe): at 400
steps (matched steps) and at the first checkpoint whose logged task accuracy reaches
60% (matched task accuracy). results.md gives each recipe's mean and standard
deviation over seeds, and for each pair of neighbours in a contrast whether the
difference of means exceeds the sum of their standard deviations ("separated") or not.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from recipe_study import EVERY, PROBE, RECIPES, RUNS, STEPS, train_recipe  # one training run per (recipe, seed), shared

OUT = Path(__file__).resolve().parent / "results" / "recipe_seeds"
SEEDS = (0, 1, 2)
TARGET, SAMPLES = 0.60, 3000
CONTRASTS = {  # the findings docs/toy.md states, each an ordered series of recipes (recipe_study.RECIPES)
    "initialisation scale": ("gpt2-init", "faithful"),
    "linear-layer scale": ("linear-gpt2", "faithful", "linear-0.1"),
    "embedding scale": ("embed-0.02", "embed-0.1", "embed-0.3", "faithful"),
    "capacity (d_model 64, 128, 192)": ("d64", "faithful", "d192"),
}


def recipes() -> list[str]:
    return list(dict.fromkeys(name for series in CONTRASTS.values() for name in series))


def _cells(model, samples: int) -> dict[str, dict]:
    from toy_models.leakage import MEMENTO, cell_record, measure_leakage

    rows = measure_leakage(model, (MEMENTO,), (3,), (0, 1), n_samples=samples, probe=PROBE)
    return {("direct" if r.offset == 0 else "masked +1"): cell_record(r) for r in rows}


def run_one(name: str, seed: int, out: Path = OUT, runs: Path = RUNS, samples: int = SAMPLES) -> dict:
    """Train recipe `name` from `seed` (resuming), read it at STEPS and at TARGET task accuracy; write its JSON."""
    import toy_models

    what = RECIPES[name][0]
    run = runs / f"{name}-s{seed}"
    model, _ = train_recipe(name, seed, STEPS, 1, runs, command=f"python experiments/recipe_seeds.py --only {name}")
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    curve = [(e["step"], e["task_accuracy"]) for e in log if e.get("task_accuracy") is not None]
    reached = next(((s, a) for s, a in curve if a >= TARGET), None)
    record = {"recipe": name, "changes": what, "seed": seed, "steps": STEPS, "target": TARGET, "samples": samples,
              "task_curve": curve,
              "at_steps": {"step": STEPS, "task_accuracy": curve[-1][1], "cells": _cells(model, samples)},
              "at_accuracy": None}
    if reached is not None:
        ckpt = toy_models.load(str(run / f"step_{reached[0]:06d}"))
        record["at_accuracy"] = {"step": reached[0], "task_accuracy": reached[1], "cells": _cells(ckpt, samples)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-s{seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def load(out: Path = OUT) -> dict:
    """Every committed record, {recipe: [records by seed]}."""
    data: dict[str, list[dict]] = {}
    for path in sorted(Path(out).glob("*-s*.json")):
        record = json.loads(path.read_text())
        data.setdefault(record["recipe"], []).append(record)
    return {"records": {k: sorted(v, key=lambda r: r["seed"]) for k, v in data.items()}}


def _stats(records: list[dict], when: str, cell: str) -> tuple[float, float, list[float]] | None:
    """Mean, standard deviation (0 for one seed) and the per-seed values of a cell, in %."""
    values = [100 * r[when]["cells"][cell]["accuracy"] for r in records if r[when] is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values


def _fmt(stat: tuple[float, float, list[float]] | None) -> str:
    if stat is None:
        return "—"
    mean, sd, values = stat
    if len(values) == 1:
        return f"{mean:.1f} (one seed)"
    return f"{mean:.1f} ± {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def results_table(data: dict) -> str:
    """results.md: per contrast, each recipe's mean ± sd over seeds, and which neighbours are separated."""
    records = data["records"]
    lines = [f"# The recipe study's contrasts over seeds ({len(SEEDS)} seeds, {SAMPLES:,} passcodes, layer 3)", "",
             "Linear probe accuracy (%), memento mode: mean ± standard deviation over seeds (each seed's value). "
             f"'{STEPS} steps': matched steps; 'at {100 * TARGET:.0f}% task': the first checkpoint (every {EVERY} "
             "steps) whose logged task accuracy reached it. Two neighbouring recipes are 'separated' when their means "
             "differ by more than the sum of their standard deviations. Remade by `python experiments/recipe_seeds.py`.",
             ""]
    for contrast, series in CONTRASTS.items():
        lines += [f"## {contrast}", "", f"| recipe | seeds | masked +1, {STEPS} steps | masked +1, at {100 * TARGET:.0f}% "
                  f"task (step) | direct, {STEPS} steps | direct, at {100 * TARGET:.0f}% task |", "|---|---|---|---|---|---|"]
        for name in series:
            rs = records.get(name, [])
            steps = ", ".join(str(r["at_accuracy"]["step"]) if r["at_accuracy"] else "never" for r in rs)
            lines.append(f"| {name} | {len(rs)} | {_fmt(_stats(rs, 'at_steps', 'masked +1'))} | "
                         f"{_fmt(_stats(rs, 'at_accuracy', 'masked +1'))} ({steps}) | "
                         f"{_fmt(_stats(rs, 'at_steps', 'direct'))} | {_fmt(_stats(rs, 'at_accuracy', 'direct'))} |")
        lines.append("")
        lines += [f"- {line}" for line in _verdicts(records, series).values()]
        lines.append("")
    return "\n".join(lines)


def _verdicts(records: dict, series: tuple[str, ...]) -> dict[str, str]:
    """For one contrast, by when it was read ("at_steps", "at_accuracy"): masked +1 of each pair of
    neighbouring recipes, and whether they are separated (means further apart than the sum of their sds)."""
    out = {}
    for when, label in (("at_steps", f"{STEPS} steps"), ("at_accuracy", f"{100 * TARGET:.0f}% task")):
        verdicts = []
        for a, b in zip(series, series[1:]):
            sa, sb = (_stats(records.get(n, []), when, "masked +1") for n in (a, b))
            if sa is None or sb is None or len(sa[2]) < 2 or len(sb[2]) < 2:
                verdicts.append(f"{a} / {b}: too few seeds")
                continue
            gap = sb[0] - sa[0]
            verdicts.append(f"{a} → {b}: {gap:+.1f} pp, {'separated' if abs(gap) > sa[1] + sb[1] else 'within spread'}")
        out[when] = f"masked +1 at {label}: " + "; ".join(verdicts)
    return out


def quotes(data: dict) -> dict[str, str]:
    """The verdicts docs/toy.md quotes (the contrasts whose seeds are all in)."""
    init, linear, embed, capacity = (_verdicts(data["records"], CONTRASTS[c]) for c in
                                     ("initialisation scale", "linear-layer scale", "embedding scale",
                                      "capacity (d_model 64, 128, 192)"))
    return {"init_steps": init["at_steps"], "init_accuracy": init["at_accuracy"],
            "linear_steps": linear["at_steps"], "linear_accuracy": linear["at_accuracy"],
            "embed_steps": embed["at_steps"], "embed_accuracy": embed["at_accuracy"],
            "capacity_steps": capacity["at_steps"], "capacity_accuracy": capacity["at_accuracy"]}


def render(data: dict) -> dict[str, str]:
    return {"experiments/results/recipe_seeds/results.md": results_table(data)}


def main() -> None:
    import torch

    from kvprobe.cli.runtime import reproducible_blas

    reproducible_blas()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=recipes(), help="recipes to run (default: every contrast's)")
    ap.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--runs", type=Path, default=RUNS, help="where the training runs go (resumed)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.table_only:
        for seed in args.seeds:  # seed-major: every recipe gets its first seed before any gets a third
            for name in args.only or recipes():
                if not (args.out / f"{name}-s{seed}.json").is_file():
                    run_one(name, seed, args.out, args.runs)
                    print(f"{name} seed {seed} done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(results_table(load(args.out)))


if __name__ == "__main__":
    main()  # run as a script, its folder (with recipe_study.py) is first on sys.path
