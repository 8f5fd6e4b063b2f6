"""What in building and training a toy sets its leak: one factor at a time (issue 17).

    python experiments/recipe_study.py                    # every recipe, resumable
    python experiments/recipe_study.py --only gpt2-init   # one recipe
    python experiments/recipe_study.py --table-only       # rewrite the table and figure

Each recipe is the faithful toy's recipe (`toy_models.train.TrainConfig` defaults) with
one factor changed. Each is trained for the same number of steps on fresh data (or, for
`fixed-set`, on a fixed set for epochs) into runs/recipe_study/NAME, then read with
`toy_models.leakage.measure_leakage` (kvprobe's default span features, linear probe,
label-unique split): task accuracy; direct, masked +1, +2, +7 at every layer; the
fork's restart (the text baseline) and the text-controlled condition (every memento
text identical; chance 11.2%) at the last layer. Results land in
experiments/results/recipe_study/ (one JSON per recipe, results.md, recipe_study.png).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from toy_models.model import build_model
from toy_models.leakage import MEMENTO, RESTART, TEXT_CONTROLLED, cell_record, measure_leakage
from toy_models.task import heldout_seed, task_accuracy
from toy_models.train import TrainConfig, train

OUT = Path(__file__).resolve().parent / "results" / "recipe_study"
RUNS = Path("runs/recipe_study")
STEPS = 400
SAMPLES = 3000

# name -> (what changes, TrainConfig overrides of the faithful recipe)
RECIPES: dict[str, tuple[str, dict]] = {
    "faithful": ("nothing (PyTorch-default init, batch 64, lr 1e-3 constant, no weight decay)", {}),
    "gpt2-init": ("GPT-2 init: embeddings and linear N(0, 0.02)", {"init_embedding": "gpt2", "init_linear": "gpt2"}),
    "linear-gpt2": ("linear layers GPT-2 init, embeddings N(0, 1)", {"init_linear": "gpt2"}),
    "embed-0.02": ("embeddings N(0, 0.02), linear PyTorch-default", {"init_embedding": 0.02}),
    "fixed-set": ("a fixed set of 4,000 sequences seen for epochs (6.4 at 400 steps)", {"train_set": 4000}),
    "untied": ("untied output head", {"tied": False}),
    "cosine": ("warmup 50 + cosine decay", {"schedule": "cosine", "warmup": 50}),
    "wd-0.1": ("weight decay 0.1", {"weight_decay": 0.1}),
    "no-clip": ("no gradient clipping", {"grad_clip": None}),
    "betas-999": ("Adam betas (0.9, 0.999)", {"beta2": 0.999}),
    "embed-0.1": ("embeddings N(0, 0.1)", {"init_embedding": 0.1}),
    "embed-0.3": ("embeddings N(0, 0.3)", {"init_embedding": 0.3}),
    "linear-0.1": ("linear layers N(0, 0.1), embeddings N(0, 1)", {"init_linear": 0.1}),
    "batch-256": ("batch 256 (lr 1e-3)", {"batch_size": 256}),
    "shipped-recipe": ("the former shipped recipe: GPT-2 init, batch 256, lr 1e-3, warmup 200 + cosine, wd 0.1", {"init_embedding": "gpt2", "init_linear": "gpt2", "batch_size": 256, "warmup": 200, "schedule": "cosine", "weight_decay": 0.1}),
}
# the capacity study (the faithful recipe at three sizes; "faithful" above is d_model 128)
CAPACITY: dict[str, tuple[str, dict]] = {
    "d64": ("d_model 64 (2 heads, MLP 256), 4 layers", {"n_embd": 64}),
    "d192": ("d_model 192 (6 heads, MLP 768), 4 layers", {"n_embd": 192}),
}
RECIPES.update(CAPACITY)
LAYERS = (0, 1, 2, 3)
OFFSETS = (0, 1, 2, 7)  # the causal control (-1) is at chance in every toy: see the figure reproductions
CONTROL_OFFSETS = (0, 1, 2, 7)


def run_one(name: str, steps: int, samples: int, threads: int | None) -> dict:
    """Train recipe `name` (resuming), measure it, write OUT/NAME.json; return the record."""
    what, overrides = RECIPES[name]
    config = replace(TrainConfig(steps=steps, eval_every=steps, save_every=steps, out_dir=str(RUNS / name),
                                 threads=threads), **overrides)
    model = train(config, resume=True, command=f"python experiments/recipe_study.py --only {name}")
    accuracy = task_accuracy(model, 2000, heldout_seed(2))
    rows = measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=samples)
    last = max(LAYERS)
    rows += measure_leakage(model, (RESTART, TEXT_CONTROLLED), (last,), CONTROL_OFFSETS, n_samples=samples)
    record = {
        "recipe": name,
        "changes": what,
        "train_config": config.run_settings(),
        "task_accuracy": accuracy,
        "samples": samples,
        "cells": [cell_record(r, "n_train", "n_val") for r in rows],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _cell(record: dict, condition: str, layer: int, offset: int) -> str:
    for c in record["cells"]:
        if (c["condition"], c["layer"], c["offset"]) == (condition, layer, offset):
            return f"{100 * c['accuracy']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]"
    return "—"


def _parameters(settings: dict) -> int:
    model = build_model(0, tied=settings.get("tied", True), n_embd=settings.get("n_embd", 128),
                        n_layer=settings.get("n_layer", 4))
    return sum(p.numel() for p in model.parameters())


def write_table(records: list[dict]) -> None:
    """results.md: one headline row per recipe, then every layer of the memento condition."""
    last = max(LAYERS)
    head = ["recipe", "what changes", "params", "task acc", "direct", "+1", "+2", "+7", "restart +1 (text)",
            "text-controlled +1 (chance 11.2)"]
    lines = [f"# Recipe study: what sets the toy's leak ({records[0]['samples']} passcodes, layer {last}, "
             f"{records[0]['train_config']['steps']} steps)", "",
             "Linear probe accuracy (%) [95% bootstrap interval over validation passcodes]; chance 10% "
             "except the text-controlled column (exact baseline 11.2%). Remade by "
             "`python experiments/recipe_study.py`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lines.append("| " + " | ".join([
            r["recipe"], r["changes"], f"{_parameters(r['train_config']):,}", f"{100 * r['task_accuracy']:.1f}",
            *(_cell(r, "memento", last, o) for o in (0, 1, 2, 7)),
            _cell(r, "restart", last, 1), _cell(r, "text-controlled", last, 1)]) + " |")
    lines += ["", "## Every layer (memento condition): direct / +1 / +2 / +7", "",
              "| recipe | " + " | ".join(f"layer {l}" for l in LAYERS) + " |", "|" + "---|" * (len(LAYERS) + 1)]
    for r in records:
        cells = []
        for layer in LAYERS:
            vals = [next((c["accuracy"] for c in r["cells"] if (c["condition"], c["layer"], c["offset"])
                          == ("memento", layer, o)), float("nan")) for o in (0, 1, 2, 7)]
            cells.append(" / ".join(f"{100 * v:.1f}" for v in vals))
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")


def write_figure(records: list[dict]) -> None:
    """recipe_study.png: direct and masked +1 at the last layer per recipe, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(LAYERS)
    names = [r["recipe"] for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4.2), constrained_layout=True)
    for i, (cond, off, color, label) in enumerate([("memento", 0, "#1f77b4", "direct"),
                                                   ("memento", 1, "#d62728", "masked +1"),
                                                   ("text-controlled", 1, "#9467bd", "text-controlled +1")]):
        ys, lo, hi = [], [], []
        for r in records:
            c = next(c for c in r["cells"] if (c["condition"], c["layer"], c["offset"]) == (cond, last, off))
            ys.append(100 * c["accuracy"]); lo.append(100 * (c["accuracy"] - c["ci_low"]))
            hi.append(100 * (c["ci_high"] - c["accuracy"]))
        x = [j + (i - 1) * 0.27 for j in range(len(names))]
        ax.bar(x, ys, width=0.27, color=color, label=label, yerr=[lo, hi], capsize=2)
    ax.axhline(10, color="black", linestyle="--", linewidth=1, label="chance (10%)")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel(f"probe accuracy, layer {last} (%)")
    ax.set_title("What sets the toy's leak: one factor changed at a time")
    ax.set_ylim(0, 118)
    ax.legend(loc="upper center", fontsize=8, ncols=4)
    fig.savefig(OUT / "recipe_study.png", dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="recipes to run (default all)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        for name in args.only or RECIPES:
            if (OUT / f"{name}.json").is_file() and not args.only:
                continue
            r = run_one(name, args.steps, args.samples, args.threads)
            print(f"{name}: task {100 * r['task_accuracy']:.1f}%  direct {_cell(r, 'memento', 3, 0)}  "
                  f"+1 {_cell(r, 'memento', 3, 1)}  text-controlled +1 {_cell(r, 'text-controlled', 3, 1)}", flush=True)
    records = [json.loads((OUT / f"{n}.json").read_text()) for n in RECIPES if (OUT / f"{n}.json").is_file()]
    if records:
        write_table(records)
        write_figure(records)


if __name__ == "__main__":
    main()
