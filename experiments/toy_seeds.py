"""Are fig13_scale's misses the training run's luck? The shipped recipe from two more seeds, each read like `final`.

    python experiments/toy_seeds.py                         # train seeds 1 and 2 (resumable), read each (1 thread)
    python experiments/toy_seeds.py --seed 2                # one of them (measured again if published)
    python experiments/toy_seeds.py --runs runs/toy_seeds   # where the training runs live (kept, resumed, reused)
    python experiments/toy_seeds.py --table-only            # rewrite results.md from the JSON

`experiments/fig13_scale.py` reads Fig. 13 on the shipped `final` (training seed 0) with the paper's
MLP at 50,000 passcodes: two cells miss issue 30's band, and `fig13_seeds.py` shows that three probe
seeds miss them too. This asks whether they are one training run's luck: the shipped recipe
(`toy_models/checkpoints/train_config.json`, only the seed changed; the seed draws the initial
weights and every training batch) trained from seeds 1 and 2 for its 3,000 steps, each final
checkpoint read on all 18 Fig. 13 cells as fig13_scale reads `final` (`fig13_scale.measure`: the same
50,000 passcodes, the MLP, probe seed 0). Seed 0 is the shipped `final`; its reading is fig13_scale's
committed one. The report gives each toy's cells, the three toys' range, and for each cell whether
the paper's value lies within that range. Without --seed a seed whose JSON is already in --out is kept.
Results: experiments/results/toy_seeds/ (one JSON per trained seed, results.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import toy_models
from toy_models.checkpoint import CHECKPOINT_DIR, read_meta
from toy_models.config import TrainConfig
from toy_models.train import train
import fig13_scale
from paper_figures import BAND, FIG13, in_band
from published import printed_cell, readme_example_code, results_json, run_each, script_arguments

OUT = Path(__file__).resolve().parent / "results" / "toy_seeds"
RUNS = Path("runs/toy_seeds")  # one training run per seed: RUNS/seed_N
SEEDS = (0, 1, 2)  # seed 0 is the shipped `final`: its README example is read here, its Fig. 13 by fig13_scale
README_CELLS = ("layer 3 offset +0", "layer 3 offset +1", "layer 3 offset +2")  # the done-when's cells, and +2


def recipe(seed: int, runs: Path = RUNS) -> TrainConfig:
    """The shipped `final`'s training config (its train_config.json) with another `seed`, run in runs/seed_N."""
    shipped = TrainConfig.from_run_settings(json.loads((CHECKPOINT_DIR / "train_config.json").read_text()))
    return replace(shipped, seed=seed, out_dir=str(runs / f"seed_{seed}"))


def readme_example(model) -> dict[str, dict]:
    """What the README's library example (its code block, run as tests/project/test_readme.py runs it) prints
    with `model` in place of the shipped `final`: printed cell ('layer 3 offset +1') -> accuracy, interval (%,
    as printed) and significance. It runs in a temporary folder (it writes study/memento)."""
    code = readme_example_code()
    printed = io.StringIO()
    with (tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), contextlib.redirect_stdout(printed),
          mock.patch.object(toy_models, "load", lambda *a, **k: model)):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    cells = {}
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("layer ")]  # as test_readme reads it
    for cell, (accuracy, low, high), significant in map(printed_cell, lines):
        cells[cell] = {"accuracy": accuracy, "ci_low": low, "ci_high": high, "significant": significant}
    return cells


def measure(seed: int, runs: Path, samples: int, passcode_seed: int) -> dict:
    """Train the shipped recipe from `seed` (resuming a run in runs/seed_N; a finished one is reused), then read
    its last checkpoint on every Fig. 13 cell as fig13_scale reads `final`, and with the README example.
    Seed 0 is the shipped `final`: only its README example is read (fig13_scale reads its Fig. 13)."""
    if seed == 0:
        t0 = time.perf_counter()
        return {"checkpoint": "seed 0 (`final`)", "train_seed": 0,
                "readme_example": readme_example(toy_models.load("final")), "seconds": round(time.perf_counter() - t0, 1)}
    config = recipe(seed, runs)
    train(config, resume=True, command=f"python experiments/toy_seeds.py --seed {seed}")
    t0 = time.perf_counter()  # the reading alone: the training's time is its meta.json's
    last = Path(config.out_dir) / f"step_{config.steps:06d}"
    meta = read_meta(last)
    record = fig13_scale.measure(str(last), samples, passcode_seed)
    return {**record, "checkpoint": f"seed {seed}", "train_seed": seed, "train_config": config.run_settings(),
            "task_accuracy": meta["task_accuracy"], "train_minutes": round(meta["wall_time_s"] / 60, 1),
            "train_hardware": meta["hardware"], "readme_example": readme_example(toy_models.load(str(last))),
            "seconds": round(time.perf_counter() - t0, 1)}


def load(out: Path = OUT) -> dict[int, dict]:
    """training seed -> its Fig. 13 reading: seed 0 is fig13_scale's committed `final`, then this script's seeds."""
    data = {}
    for path in sorted(Path(out).glob("seed_*.json")):
        record = results_json(out, path.name)
        if record["train_seed"] == 0:  # the shipped toy: fig13_scale's reading of its Fig. 13, beside its README example
            record = {**fig13_scale.load()["final"], **record, "task_accuracy": read_meta("final")["task_accuracy"]}
        data[record["train_seed"]] = record
    return data


def _value(record: dict, layer: int, offset: int) -> float:
    return 100 * fig13_scale.cell(record, layer, offset)["accuracy"]


def spreads(data: dict[int, dict]) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(panel, layer, offset) of each Fig. 13 cell -> (lowest, highest) reading over the toys, in %."""
    return {(panel, l, o): (min(v), max(v)) for (panel, l, o) in FIG13
            for v in [[_value(r, l, o) for r in data.values()]]}


def in_band_count(record: dict) -> int:
    return len(FIG13) - len(fig13_scale.missed_cells(record))


def results_md(data: dict[int, dict]) -> str:
    records = list(data.values())
    trained = [r for r in records if r["train_seed"] != 0]
    lines = ["# Fig. 13 on toys trained from three seeds, the paper's MLP at 50,000 passcodes", "",
             "`python experiments/toy_seeds.py`: the shipped recipe trained from seeds "
             f"{', '.join(str(r['train_seed']) for r in trained)} (seed 0 is the shipped `final`, read by "
             "`fig13_scale.py`), each final checkpoint read on every Fig. 13 cell as fig13_scale reads `final` "
             f"({records[0]['samples']:,} passcodes, passcode seed {records[0]['seed']}, the MLP, probe seed 0). "
             "In band: within 3 points of the paper, or the paper's value inside the toy's 95% interval.", ""]
    for r in records:
        extra = (f"; trained in {r['train_minutes']:.0f} min ({r['train_hardware']}), read in "
                 f"{r['seconds'] / 60:.0f} min at 1 thread" if "train_minutes" in r else "")
        lines.append(f"- {r['checkpoint']}: {100 * r['task_accuracy']:.1f}% task accuracy, "
                     f"{in_band_count(r)} of {len(FIG13)} cells in band{extra}.")
    lines += ["", "| cell | paper | " + " | ".join(r["checkpoint"] for r in records)
              + " | toys' range | spread | paper within the range |",
              "|---|---|" + "---|" * len(records) + "---|---|---|"]
    ranges = spreads(data)
    for (panel, layer, offset), (paper, _) in FIG13.items():
        cells = [f"{_value(r, layer, offset):.1f}{'' if in_band(fig13_scale.cell(r, layer, offset), paper) else ' (out)'}"
                 for r in records]
        low, high = ranges[panel, layer, offset]
        lines.append(f"| {panel}, layer {layer}, {offset:+d} | {paper:.1f} | " + " | ".join(cells)
                     + f" | {low:.1f}–{high:.1f} | {high - low:.1f} | {'yes' if low <= paper <= high else 'no'} |")
    lines += ["", "(out): outside the band for that toy.", "",
              "## The README example on each toy", "",
              "The README's library example (linear probe, 5,000 passcodes, its code as written) with each toy in "
              "place of `final`; issue 30 asks for direct ≥ 93 and masked +1 within 25–45 at the last layer.", "",
              "| printed cell | " + " | ".join(r["checkpoint"] for r in records) + " |",
              "|---|" + "---|" * len(records)]
    for name in README_CELLS:
        lines.append(f"| {name} | " + " | ".join(_printed(r["readme_example"][name]) for r in records) + " |")
    return "\n".join(lines) + "\n"


def _printed(cell: dict) -> str:
    return f"{cell['accuracy']:.1f} [{cell['ci_low']:.1f}, {cell['ci_high']:.1f}]"


def _readme_row(data: dict[int, dict], name: str) -> str:
    return ", ".join(f"{r['readme_example'][name]['accuracy']:.1f}" for r in data.values())


def quotes(data: dict[int, dict]) -> dict[str, str]:
    records = list(data.values())
    within = sum(low <= paper <= high for (low, high), (paper, _) in zip(spreads(data).values(), FIG13.values()))

    def row(layer: int, offset: int) -> str:
        return ", ".join(f"{_value(r, layer, offset):.1f}" for r in records)

    accuracy = ", ".join(f"{100 * r['task_accuracy']:.1f}%" for r in records)
    return {"toys": f"trained from seeds {', '.join(str(s) for s in data)} ({accuracy} "
                    f"task accuracy), {', '.join(str(in_band_count(r)) for r in records)} of {len(FIG13)} Fig. 13 cells "
                    f"in band; direct at the last layer {row(3, 0)} (paper {fig13_scale.PAPER[3, 0][1]:.1f}), masked +2 "
                    f"{row(3, 2)} (paper {fig13_scale.PAPER[3, 2][1]:.1f}), masked +1 {row(3, 1)} "
                    f"(paper {fig13_scale.PAPER[3, 1][1]:.1f}); the paper's value lies within the {len(data)} toys' range "
                    f"in {within} of {len(FIG13)} cells",
            "spread": _spread_sentence(data),
            "readme": f"the README example reads masked +1 at the last layer {_readme_row(data, README_CELLS[1])} "
                      f"and direct {_readme_row(data, README_CELLS[0])} on the toys of seeds "
                      f"{', '.join(str(s) for s in data)} (issue 30 asks for 25–45 and at least 93)"}


def _spread_sentence(data: dict[int, dict]) -> str:
    ranges = spreads(data)
    (panel, layer, offset), (low, high) = max(ranges.items(), key=lambda kv: kv[1][1] - kv[1][0])
    over = sum(hi - lo > BAND for lo, hi in ranges.values())
    return (f"the training seed alone moves {panel}, layer {layer}, {offset:+d} by {high - low:.1f} points "
            f"({low:.1f} to {high:.1f}), and {over} of {len(ranges)} Fig. 13 cells by more than the band's "
            f"{BAND:.0f} points")


def render(data: dict[int, dict]) -> dict[str, str]:
    return {"experiments/results/toy_seeds/results.md": results_md(data)}


def main() -> None:
    ap = script_arguments(__doc__, OUT)
    ap.add_argument("--seed", type=int, nargs="+", default=None,
                    help=f"training seeds (default: {', '.join(map(str, SEEDS))}, each unless published; 0 is `final`)")
    ap.add_argument("--runs", type=Path, default=RUNS, help="the training runs, one folder per seed (resumed, reused)")
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--passcode-seed", type=int, default=0)
    args = ap.parse_args()
    for seed in args.seed or ():
        try:
            recipe(seed, args.runs)
        except ValueError as e:  # one line, exit 2, nothing written
            ap.error(str(e))
    run_each(ap, args, [f"seed_{s}" for s in args.seed or SEEDS], args.seed is not None,
             lambda name: measure(int(name.removeprefix("seed_")), args.runs, args.samples, args.passcode_seed),
             load, render)


if __name__ == "__main__":
    main()
