"""What in building and training a toy sets its leak: one factor at a time (issue 17).

    python experiments/recipe_study.py                    # every published recipe, resumable (1 thread)
    python experiments/recipe_study.py --only gpt2-init   # one recipe
    python experiments/recipe_study.py --only batch-256   # a recipe configured but not published (ON_REQUEST)
    python experiments/recipe_study.py --out DIR          # every published recipe into DIR (trained runs reused)
    python experiments/recipe_study.py --table-only       # rewrite the table and figure from the JSON

Each recipe is the faithful toy's recipe as this study trained it (`FORMER`: `TrainConfig`'s
defaults with the tied head and clipping at 1.0 the toy had before issue 30) with
one factor changed. Each is trained from seed 0 for the same number of steps on fresh data
(or, for `fixed-set`, on a fixed set for epochs) into runs/recipe_seeds/NAME-s0, the run
`experiments/recipe_seeds.py` reads as its seed 0 (one training run per recipe and seed,
a checkpoint every 50 steps), then read with
`toy_models.leakage.measure_leakage` (kvprobe's default span features, linear probe,
label-unique split): task accuracy; direct, masked +1, +2, +7 at every layer; the
fork's restart (the text baseline) and the text-controlled condition (every memento
text identical; chance 11.2%) at the last layer. Results land in
experiments/results/recipe_study/ (one JSON per recipe, results.md, recipe_study.png).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from kvprobe.data.passcodes import PasscodeConfig
from toy_models.model import build_model
from toy_models.leakage import MEMENTO, RESTART, STUDY_PROBE, TEXT_CONTROLLED, cell_record, measure_leakage
from toy_models.task import heldout_seed, task_accuracy
from toy_models.train import TrainConfig, train
from published import script_arguments, start, write_files

PROBE = STUDY_PROBE  # kvprobe's default probe, as every published study reads it (recipe_seeds too)

OUT = Path(__file__).resolve().parent / "results" / "recipe_study"
RESULTS = "experiments/results/recipe_study/results.md"  # render() keys: the committed file
README_TABLE = "README.md#recipe-table"  # and the README's excerpt (between <!-- recipe-table --> markers)
RUNS = Path("runs/recipe_seeds")  # one training run per (recipe, seed), shared with recipe_seeds.py
STEPS, EVERY = 400, 50
SAMPLES = 3000

# the faithful recipe as this study trained it: TrainConfig's defaults before issue 30 untied the head, dropped
# clipping (experiments/recipe_speed.py) and decayed the learning rate at the end; each recipe below changes it
# in one factor
FORMER = {"tied": True, "grad_clip": 1.0, "decay": 0}
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
    "shipped-recipe": ("the first shipped recipe: GPT-2 init, batch 256, lr 1e-3, warmup 200 + cosine, wd 0.1", {"init_embedding": "gpt2", "init_linear": "gpt2", "batch_size": 256, "warmup": 200, "schedule": "cosine", "weight_decay": 0.1}),
}
# the capacity study (the faithful recipe at three sizes; "faithful" above is d_model 128)
CAPACITY: dict[str, tuple[str, dict]] = {
    "d64": ("d_model 64 (2 heads, MLP 256), 4 layers", {"n_embd": 64}),
    "d192": ("d_model 192 (6 heads, MLP 768), 4 layers", {"n_embd": 192}),
}
RECIPES.update(CAPACITY)
# configured, but trained only when named with --only: four times the cost of a step each, and not in the
# published results (docs/toy.md: "Not run")
ON_REQUEST = ("batch-256", "shipped-recipe")
LAYERS = (0, 1, 2, 3)
OFFSETS = (0, 1, 2, 7)  # the causal control (-1) is at chance in every toy: see the figure reproductions
CONTROL_OFFSETS = (0, 1, 2, 7)
# the initialisation recipes (finding 1 of docs/toy.md), compared at about the same task accuracy
INIT = ("faithful", "gpt2-init", "linear-gpt2", "linear-0.1", "embed-0.02", "embed-0.1", "embed-0.3")
TC_CHANCE = PasscodeConfig(digit_sum=22).chance()  # the text-controlled condition's exact baseline, 11.17%


def train_recipe(name: str, seed: int = 0, steps: int = STEPS, threads: int | None = 1, runs: Path = RUNS,
                 command: str | None = None):
    """Train recipe `name` from `seed` into runs/NAME-sSEED (resuming; a checkpoint every EVERY steps).

    Returns (the model at `steps`, in eval mode; its TrainConfig). recipe_seeds.py trains through here too,
    so a recipe's seed-0 run is one run for both studies.
    """
    overrides = {**FORMER, **RECIPES[name][1]}
    config = replace(TrainConfig(steps=steps, eval_every=EVERY, save_every=EVERY, out_dir=str(runs / f"{name}-s{seed}"),
                                 threads=threads, seed=seed), **overrides)
    return train(config, resume=True, command=command or f"python experiments/recipe_study.py --only {name}"), config


def run_one(name: str, steps: int, samples: int, threads: int | None, out: Path = OUT) -> dict:
    """Train recipe `name` from seed 0 (resuming), measure it, write out/NAME.json; return the record."""
    what = RECIPES[name][0]
    model, config = train_recipe(name, 0, steps, threads)
    accuracy = task_accuracy(model, 2000, heldout_seed(2))
    rows = measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=samples, probe=PROBE)
    last = max(LAYERS)
    rows += measure_leakage(model, (RESTART, TEXT_CONTROLLED), (last,), CONTROL_OFFSETS, n_samples=samples,
                            probe=PROBE)
    record = {
        "recipe": name,
        "changes": what,
        "train_config": config.run_settings(),
        "task_accuracy": accuracy,
        "samples": samples,
        "cells": [cell_record(r, "n_train", "n_val") for r in rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def load(out: Path) -> dict:
    """Every recipe's committed JSON in results directory `out`: {"records": [...]}, in RECIPES order."""
    return {"records": [json.loads((Path(out) / f"{n}.json").read_text()) for n in RECIPES
                        if (Path(out) / f"{n}.json").is_file()]}


def _find(record: dict, condition: str, layer: int, offset: int) -> dict | None:
    return next((c for c in record["cells"] if (c["condition"], c["layer"], c["offset"]) == (condition, layer, offset)),
                None)


def _cell(record: dict, condition: str, layer: int, offset: int) -> str:
    """'acc [lo, hi]' in %, or '—' where the cell was not measured."""
    c = _find(record, condition, layer, offset)
    return "—" if c is None else f"{100 * c['accuracy']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]"


def _acc(record: dict, condition: str, offset: int, layer: int = 3) -> float:
    """Accuracy in % of one cell (the last layer by default)."""
    return 100 * _find(record, condition, layer, offset)["accuracy"]


def _parameters(settings: dict) -> int:
    model = build_model(0, tied=settings.get("tied", True), n_embd=settings.get("n_embd", 128),
                        n_layer=settings.get("n_layer", 4))
    return sum(p.numel() for p in model.parameters())


def results_table(data: dict) -> str:
    """results.md: one headline row per recipe, then every layer of the memento condition."""
    records = data["records"]
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
    return "\n".join(lines) + "\n"


def readme_table(data: dict) -> str:
    """The README's table (between <!-- recipe-table --> markers): the last layer with intervals, no +2."""
    last = max(LAYERS)
    lines = ["| recipe | task acc | direct | masked +1 | +7 | restart +1 (text) | text-controlled +1 |",
             "|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        lines.append("| " + " | ".join([
            f"{r['recipe']}: {r['changes']}", f"{100 * r['task_accuracy']:.1f}",
            *(_cell(r, "memento", last, o) for o in (0, 1, 7)),
            _cell(r, "restart", last, 1), _cell(r, "text-controlled", last, 1)]) + " |")
    return "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    """Everything written from the recipes' JSON: results.md and the README's excerpt ("file#marker")."""
    return {RESULTS: results_table(data), README_TABLE: readme_table(data)}


def toy_table(data: dict) -> str:
    """docs/toy.md's table: the last layer without intervals, +2 included (no markers there)."""
    lines = ["| recipe: what changes from the faithful one (`tied-clip`'s) | task acc | direct | masked +1 | +2 | +7 | "
             "restart +1 (text) | text-controlled +1 |", "|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        accs = [*(_acc(r, "memento", o) for o in (0, 1, 2, 7)), _acc(r, "restart", 1), _acc(r, "text-controlled", 1)]
        lines.append(f"| `{r['recipe']}`: {r['changes']} | {100 * r['task_accuracy']:.1f} | "
                     + " | ".join(f"{a:.1f}" for a in accs) + " |")
    return "\n".join(lines)


def quotes(data: dict) -> dict[str, str]:
    """The phrases README.md and docs/toy.md quote from the recipes' JSON (layer 3)."""
    records = data["records"]
    by = {r["recipe"]: r for r in records}
    a = lambda name, offset=1, condition="memento": f"{_acc(by[name], condition, offset):.1f}"  # noqa: E731
    pair = lambda name: f"{a(name, 0)}% / {a(name)}%"  # noqa: E731  direct / masked +1
    task = lambda name: f"{100 * by[name]['task_accuracy']:.1f}%"  # noqa: E731
    tasks = [100 * r["task_accuracy"] for r in records]
    steps, samples = records[0]["train_config"]["steps"], records[0]["samples"]
    chance = f"{100 * TC_CHANCE:.1f}%"
    above = sum(_find(r, "text-controlled", 3, 1)["ci_low"] > TC_CHANCE for r in records)  # interval above chance
    every = above == len(records)
    lowest = min(records, key=lambda r: _acc(r, "text-controlled", 1))
    shipped = _acc(by["faithful"], "memento", 1)  # the faithful recipe is the former shipped toy (tied-clip) at step 400
    flat = [_acc(by[n], "memento", 1) for n in ("fixed-set", "wd-0.1", "betas-999")]
    embed = ("embed-0.02", "embed-0.1", "embed-0.3", "faithful")  # embeddings N(0, 0.02 / 0.1 / 0.3 / 1)
    text_range = [f(100 * c["accuracy"] for r in records for c in r["cells"]
                    if (c["condition"], c["layer"], c["offset"]) == ("restart", 3, 1)) for f in (min, max)]
    return {
        # README.md
        "toys": f"What the {len(records)} toys show",
        "readme_steps": f"each {steps} steps from one",
        "task_range": f"(task accuracy {min(tasks):.0f}–{max(tasks):.0f}%), {samples:,} passcodes",
        "readme_init": f"{pair('faithful')}, GPT-2's N(0, 0.02) {pair('gpt2-init')};",
        "readme_linear": f"N(0, 0.1) linear layers read {pair('linear-0.1')};",
        "readme_learned": (f"{task('cosine')}: masked +1 {a('cosine')}%; untied head, {task('untied')}: "
                           f"{a('untied')}%; the former shipped run {shipped:.0f}% at step {steps}"),
        "readme_flat": f"barely move it ({min(flat):.0f}–{max(flat):.0f}%)",
        "readme_width": f"(d_model 64 / 128 / 192: {a('d64')} / {a('faithful')} / {a('d192')}%)",
        "readme_channel": f"text-controlled +1 lies above its {chance} chance in "
                          + (f"all {above}" if every else f"{above} of {len(records)}"),
        "readme_text": "the text baseline at {:.1f}–{:.1f}%".format(*text_range),
        # docs/toy.md
        "toy_steps": f"each for the same {steps} steps",
        "toy_samples": f"({samples:,} passcodes, linear probe, default features)",
        "toy_chance": f"text-controlled chance {chance[:-1]}:",
        "toy_table": toy_table(data),
        "toy_pattern": f"(direct {a('faithful', 0)}%, masked +1 {a('faithful')}%, text-controlled",
        "toy_pattern_tc": f"{a('faithful', 1, 'text-controlled')}% against {chance}), GPT-2's N(0, 0.02)",
        "toy_gpt2": f"barely more than their text ({pair('gpt2-init')}, text",
        "toy_gpt2_text": f"baseline {a('gpt2-init', 1, 'restart')}%). The linear layers' scale",
        "toy_linear_gpt2": f"alone: {pair('linear-gpt2')})",
        "toy_embed": "and masked +1 " + ", ".join(a(n) for n in embed) + ")",
        "toy_embed_direct": "read direct " + ", ".join(a(n, 0) for n in embed),
        "toy_d256": f"(about {_parameters({'n_embd': 256}) / 1e6:.1f}M parameters,",
        "toy_band": "at about the same task accuracy ({:.0f}–{:.0f}%)".format(
            *(f(100 * by[n]["task_accuracy"] for n in INIT) for f in (min, max))),
        "toy_linear_wide": f"read\n   {pair('linear-0.1')}. The embeddings'",
        "toy_text": "the restart text baseline stays at {:.1f}–{:.1f}%".format(*text_range),
        "toy_learned": (f"cosine decay (task {task('cosine')}) {a('cosine')}%, no clipping ({task('no-clip')}) "
                        f"{a('no-clip')}%, the faithful recipe"),
        "toy_learned_2": f"({task('faithful')}) {a('faithful')}%, untied head ({task('untied')}) {a('untied')}%.",
        "toy_flat": f"reads {a('fixed-set')}% (fresh samples {a('faithful')}%); weight decay 0.1",
        "toy_flat_2": f"{a('wd-0.1')}%; β₂ = 0.999 {a('betas-999')}%.",
        "toy_width": f"read masked +1 {a('d64')} / {a('faithful')} / {a('d192')}% at {steps} steps",
        "toy_channel": (f"lies above its {chance} baseline in " + ("every row" if every else f"{above} rows")
                        + " (the lowest, "
                        f"{_cell(lowest, 'text-controlled', 3, 1).replace(' [', '% [')}, is"),
    }


def write_figure(data: dict, out: Path) -> None:
    """out/recipe_study.png: direct, masked +1 and text-controlled +1 at the last layer per recipe, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
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
    fig.savefig(out / "recipe_study.png", dpi=130)
    plt.close(fig)


def default_recipes() -> list[str]:
    """The recipes a run without --only trains and measures: every recipe but those `ON_REQUEST`."""
    return [name for name in RECIPES if name not in ON_REQUEST]


def main() -> None:
    parser = script_arguments(__doc__, OUT)
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES),
                        help=f"recipes to run (default: all but {', '.join(ON_REQUEST)}, which run only when named)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    args = parser.parse_args()
    start(args)
    if not args.table_only:
        for name in args.only or default_recipes():
            if (args.out / f"{name}.json").is_file() and not args.only:
                continue
            r = run_one(name, args.steps, args.samples, args.threads, args.out)
            print(f"{name}: task {100 * r['task_accuracy']:.1f}%  direct {_cell(r, 'memento', 3, 0)}  "
                  f"+1 {_cell(r, 'memento', 3, 1)}  text-controlled +1 {_cell(r, 'text-controlled', 3, 1)}", flush=True)
    data = load(args.out)
    if data["records"]:
        write_files(render(data), args.out)
        write_figure(data, args.out)


if __name__ == "__main__":
    main()
