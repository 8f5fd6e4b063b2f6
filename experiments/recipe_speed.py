"""What makes a toy recipe learn the task slower: one factor at a time, 3 seeds, per step and per second (issue 30).

    python experiments/recipe_speed.py                 # every recipe x 3 seeds to 1,000 steps (resumable, 1 thread)
    python experiments/recipe_speed.py --only untied   # one recipe's seeds
    python experiments/recipe_speed.py --table-only    # rewrite results.md and the figure from the JSON

The toy shipped before issue 30 ("tied-clip") ties its output head to the token
embedding and clips the gradient norm at 1.0; an independent build of the same
architecture, data and optimiser, with neither, learned 2.4x faster per step. Here each
factor is switched alone and both together, every other setting at the toy's recipe
(PyTorch-default init, AdamW lr 1e-3 constant, betas (0.9, 0.98), batch 64 of fresh
sequences, no weight decay). Each recipe is trained from seeds 0, 1, 2 for STEPS steps
into runs/recipe_speed/NAME-sS (model init and data both follow the seed), its task
accuracy logged every 50 steps on 1,000 held-out sequences.

Per step: the logged task accuracy at matched steps, and the first logged step at or
above each accuracy target. Per second: seconds per training step of each recipe,
timed in this one process with the recipes taking turns (ROUNDS rounds of TIMED
steps each, after WARM untimed steps), so every recipe is timed under the same load;
time to a target is its step times that recipe's seconds per step.
Results: experiments/results/recipe_speed/ (results.json, results.md, recipe_speed.png).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from published import save_json, script_arguments, start, write_files

OUT = Path(__file__).resolve().parent / "results" / "recipe_speed"
RUNS = Path("runs/recipe_speed")
STEPS, EVERY, SEEDS = 1000, 50, (0, 1, 2)
AT_STEPS = (200, 400, 600, 800, 1000)
TARGETS = (0.70, 0.80, 0.85)
WARM, TIMED, ROUNDS = 3, 10, 3
# name -> (what it is, TrainConfig overrides); every other field at TrainConfig's defaults, with no final decay
RECIPES: dict[str, tuple[str, dict]] = {
    "tied-clip": ("tied head, gradient clipping at 1.0 (the toy shipped before issue 30)", {"tied": True, "grad_clip": 1.0}),
    "untied": ("untied head, clipping at 1.0", {"tied": False, "grad_clip": 1.0}),
    "no-clip": ("tied head, no clipping", {"tied": True, "grad_clip": None}),
    "untied-no-clip": ("untied head, no clipping (the independent build's; the shipped toy's before its final decay)",
                       {"tied": False, "grad_clip": None}),
}


def config_of(name: str, seed: int, runs: Path = RUNS, steps: int = STEPS):
    """The TrainConfig of recipe `name` from `seed`, into runs/NAME-sSEED."""
    from toy_models.train import TrainConfig

    base = TrainConfig(steps=steps, eval_every=EVERY, save_every=EVERY, seed=seed, threads=1, decay=0,
                       out_dir=str(runs / f"{name}-s{seed}"))  # the learning rate constant throughout, as compared
    return replace(base, **RECIPES[name][1])


def train_one(name: str, seed: int, runs: Path = RUNS) -> list[tuple[int, float]]:
    """Train (or resume) recipe `name` from `seed`; its logged (step, task accuracy) curve."""
    from toy_models.train import LOG_FILE, train

    config = config_of(name, seed, runs)
    train(config, resume=True, command=f"python experiments/recipe_speed.py --only {name}")
    log = [json.loads(line) for line in (Path(config.out_dir) / LOG_FILE).read_text().splitlines()]
    return [(e["step"], e["task_accuracy"]) for e in log]


def seconds_per_step(names: list[str]) -> dict[str, list[float]]:
    """Each recipe's seconds per training step, ROUNDS measurements of TIMED steps, the recipes taking turns."""
    from toy_models.model import build_model
    from toy_models.task import memento_attention
    from toy_models.train import make_optimizer, make_scheduler, train_step, training_batch

    setups = {}
    for name in names:
        config = config_of(name, 0)
        model = build_model(0, init=config.init, tied=config.tied).train()
        optimizer = make_optimizer(model, config)
        setups[name] = (config, model, optimizer, make_scheduler(optimizer, config), memento_attention(model, 0))
    times: dict[str, list[float]] = {name: [] for name in names}
    step = {name: 0 for name in names}

    def run(name: str, n: int) -> float:
        config, model, optimizer, scheduler, attention = setups[name]
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(model, optimizer, scheduler, training_batch(config, step[name]), attention, config.grad_clip)
            step[name] += 1
        return (time.perf_counter() - t0) / n

    for name in names:
        run(name, WARM)
    for _ in range(ROUNDS):
        for name in names:
            times[name].append(round(run(name, TIMED), 4))
    return times


def first_at(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first logged step whose task accuracy is at or above `target` (None: never, within the run)."""
    return next((s for s, a in curve if a >= target), None)


def load(out: Path = OUT) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def summary(data: dict) -> dict[str, dict]:
    """Per recipe: task accuracy (%) at each of AT_STEPS over seeds, steps and seconds to each target."""
    out = {}
    for name, curves in data["curves"].items():
        sps = statistics.median(data["seconds_per_step"][name])
        logged = [dict(c) for c in curves.values()]  # per seed: step -> task accuracy
        at = {s: [100 * acc[s] for acc in logged if s in acc] for s in AT_STEPS}
        reach = {t: [first_at(c, t) for c in curves.values()] for t in TARGETS}
        out[name] = {"at": at, "reach": reach, "s_per_step": sps, "seeds": len(curves)}
    return out


def results_table(data: dict) -> str:
    s = summary(data)
    steps_head = " | ".join(f"step {n:,}" for n in AT_STEPS)
    lines = [f"# How fast each toy recipe learns the task ({len(SEEDS)} seeds, {STEPS:,} steps)", "",
             "Task accuracy (%, 1,000 held-out sequences, logged every 50 steps): mean ± standard deviation over "
             "seeds. 'Steps to' a target: the first logged step at or above it, per seed ('—': not within "
             f"{STEPS:,} steps). Seconds per step: the median of {ROUNDS} timings of {TIMED} steps, the recipes "
             f"taking turns in one process on 1 thread (1-minute load average {_load(data)} before and after the "
             "timing, on 2 cores); minutes to a target = mean steps × seconds per step. "
             "Remade by `python experiments/recipe_speed.py`.", "",
             f"| recipe | what | {steps_head} | s/step |", "|---|---|" + "---|" * (len(AT_STEPS) + 1)]
    for name, row in s.items():
        cells = " | ".join(_mean_sd(row["at"][n]) if row["at"][n] else "—" for n in AT_STEPS)
        lines.append(f"| {name} | {RECIPES[name][0]} | {cells} | {row['s_per_step']:.3f} |")
    lines += ["", "| recipe | " + " | ".join(f"steps to {100 * t:.0f}% (per seed)" for t in TARGETS) + " | "
              + " | ".join(f"minutes to {100 * t:.0f}%" for t in TARGETS) + " |", "|---|" + "---|" * (2 * len(TARGETS))]
    for name, row in s.items():
        steps = " | ".join(", ".join("—" if v is None else f"{v:,}" for v in row["reach"][t]) for t in TARGETS)
        minutes = " | ".join(_minutes(row, t) for t in TARGETS)
        lines.append(f"| {name} | {steps} | {minutes} |")
    lines += ["", f"- {quotes(data)['verdict']}", ""]
    return "\n".join(lines)


def _load(data: dict) -> str:
    return " and ".join(f"{v:.2f}" for v in data["load_average"])


def _minutes(row: dict, target: float) -> str:
    reached = row["reach"][target]
    if None in reached:
        return f"— ({sum(v is None for v in reached)} seed(s) never)"
    return f"{statistics.mean(reached) * row['s_per_step'] / 60:.1f}"


def quotes(data: dict) -> dict[str, str]:
    """The phrases the docs quote: each recipe's mean task accuracy at step 1,000, and the verdict."""
    s = summary(data)
    acc = {name: statistics.mean(row["at"][STEPS]) for name, row in s.items()}
    gain = {name: acc[name] - acc["tied-clip"] for name in acc}
    ratio = s["untied-no-clip"]["s_per_step"] / s["tied-clip"]["s_per_step"]
    verdict = (f"At step {STEPS:,} the tied, clipped recipe reads {acc['tied-clip']:.1f}% task accuracy; untying the "
               f"head alone adds {gain['untied']:+.1f} points, dropping clipping alone {gain['no-clip']:+.1f}, both "
               f"{gain['untied-no-clip']:+.1f} (mean of {len(SEEDS)} seeds); a step of the untied, unclipped recipe "
               f"costs {ratio:.2f}x the tied, clipped one's")
    return {"verdict": verdict, "speed_table": _readme_table(s)}


def _readme_table(s: dict) -> str:
    rows = ["| recipe | task accuracy at step 1,000 (3 seeds) | s/step |", "|---|---|---|"]
    rows += [f"| {name} | {_mean_sd(row['at'][STEPS])} | {row['s_per_step']:.3f} |" for name, row in s.items()]
    return "\n".join(rows)


def figure(data: dict, path: Path) -> None:
    """Task accuracy against step and against seconds: each recipe's seed mean, its seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summary(data)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, curves in data["curves"].items():
        steps = np.array([st for st, _ in next(iter(curves.values()))])
        acc = 100 * np.array([[a for _, a in c] for c in curves.values()])  # (seeds, evaluations)
        for ax, x in zip(axes, (steps, steps * s[name]["s_per_step"] / 60)):
            line, = ax.plot(x, acc.mean(0), label=name)
            ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("minutes on 1 thread (steps x measured s/step)")
    axes[0].set_ylabel("task accuracy (%)")
    axes[0].legend(frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"How fast each toy recipe learns ({len(SEEDS)} seeds: mean, range shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render(data: dict) -> dict[str, str]:
    return {"experiments/results/recipe_speed/results.md": results_table(data)}


def main() -> None:
    ap = script_arguments(__doc__, OUT)
    ap.add_argument("--only", nargs="*", choices=list(RECIPES), help="recipes to train (default: all)")
    ap.add_argument("--runs", type=Path, default=RUNS, help="where the training runs go (resumed)")
    args = ap.parse_args()
    start(args)
    if not args.table_only:
        names = args.only or list(RECIPES)
        curves = {name: {str(seed): train_one(name, seed, args.runs) for seed in SEEDS} for name in names}
        if set(names) == set(RECIPES):
            load_before = os.getloadavg()[0]
            timings = seconds_per_step(list(RECIPES))
            save_json({"steps": STEPS, "seeds": list(SEEDS), "recipes": {n: RECIPES[n][1] for n in RECIPES},
                       "curves": curves, "seconds_per_step": timings,
                       "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}, args.out)
    data = load(args.out)
    write_files(render(data), args.out)
    figure(data, args.out / "recipe_speed.png")
    print(results_table(data))


if __name__ == "__main__":
    main()
