"""Does this machine retrain the shipped toy bit for bit? The shipped run's first steps, retrained and compared.

    python experiments/retrain_check.py                    # 450 steps into runs/retrain_check (resumable, 1 thread)
    python experiments/retrain_check.py --steps 650        # up to another shipped series checkpoint
    python experiments/retrain_check.py --table-only       # rewrite results.md from results.json

Trains the shipped run's config (toy_models/checkpoints/train_config.json, seed 0) for `--steps`
steps at one thread, with the learning rate constant to the end: the shipped run's own schedule up
to its decay (from step 2,100), so the weights at `--steps` are the ones the shipped run had there
if the arithmetic is the same. Then compares, against what ships: the logged training loss and task
accuracy at every 50 steps (`training_log.jsonl`), and every weight tensor of
`series/step_NNNNNN` at `--steps` (a shipped series checkpoint). `results.json` records this
machine's CPU, the kernels torch dispatched to and MKL's setting (`toy_models.train.describe_hardware`):
what a run's last bits depend on. Results go to experiments/results/retrain_check/.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from toy_models.checkpoint import checkpoint_names, read_meta, resolve
from toy_models.config import TrainConfig
from toy_models.train import describe_hardware, train
from published import results_json, save_json, script_arguments, start, write_files

OUT = Path(__file__).resolve().parent / "results" / "retrain_check"
RESULTS = "experiments/results/retrain_check/results.md"  # render() key: the committed file
SHIPPED = resolve("final").parent  # toy_models/checkpoints: train_config.json, training_log.jsonl, series/


def shipped_config(steps: int, run: Path) -> TrainConfig:
    """The shipped run's TrainConfig, cut at `steps` with a constant rate (its schedule up to the decay).

    A setting the saved config lacks takes what runs used before it was added (`TrainConfig.from_run_settings`)."""
    config = TrainConfig.from_run_settings(json.loads((SHIPPED / "train_config.json").read_text()))
    if config.schedule != "constant":
        raise ValueError(f"the shipped run's schedule is {config.schedule!r}: only a constant rate can be cut short")
    if not 0 < steps <= config.steps - config.decay_steps:
        raise ValueError(f"--steps must be in 1..{config.steps - config.decay_steps} (the shipped run's "
                         f"constant rate; its decay starts there), got {steps}")
    return replace(config, steps=steps, decay=0.0, out_dir=str(run), threads=1)


def _log(path: Path) -> dict[int, dict]:
    return {e["step"]: e for e in map(json.loads, path.read_text().splitlines())}


def check_steps(steps: int, run: Path) -> tuple[str, TrainConfig]:
    """The shipped series checkpoint at `steps` and the cut config that retrains it into `run`
    (ValueError if there is no such checkpoint, or the rate was not constant up to it)."""
    name = f"series/step_{steps:06d}"
    if name not in checkpoint_names():
        raise ValueError(f"no shipped checkpoint {name}; the series has {', '.join(checkpoint_names())}")
    return name, shipped_config(steps, run)


def measure(steps: int, run: Path) -> dict:
    """Retrain (resuming in `run`), then compare the log and the weights at `steps` with what ships."""
    name, config = check_steps(steps, run)
    if not (run / f"step_{steps:06d}" / "model.safetensors").is_file():  # a longer run already has it
        train(config, resume=True, command=f"python experiments/retrain_check.py --steps {steps}")
    ours, shipped = _log(run / "training_log.jsonl"), _log(SHIPPED / "training_log.jsonl")
    log = [[s, shipped[s]["loss"], ours[s]["loss"], shipped[s]["task_accuracy"], ours[s]["task_accuracy"]]
           for s in sorted(ours) if s in shipped and s <= steps]
    a = load_file(resolve(name) / "model.safetensors")
    b = load_file(run / f"step_{steps:06d}" / "model.safetensors")
    differing = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    return {"steps": steps, "checkpoint": name, "hardware": describe_hardware(torch.device("cpu")),
            "shipped_hardware": read_meta(name)["hardware"], "log": log,
            "first_step_differing": next((s for s, la, lb, aa, ab in log if (la, aa) != (lb, ab)), None),
            "tensors": len(a), "tensors_differing": len(differing),
            "max_abs_difference": max(differing.values(), default=0.0)}


def verdict(data: dict) -> str:
    """One sentence: bit for bit (the weights at `steps` and every logged number equal), or where it parted."""
    first = data["first_step_differing"]
    if not data["tensors_differing"] and first is None:
        return (f"the retrain is bit for bit: every one of the {data['tensors']} weight tensors at step "
                f"{data['steps']} is identical, and so is every logged loss and task accuracy")
    before = [row[0] for row in data["log"] if first is not None and row[0] < first]
    agree = ("agree to the last logged digit at every logged step" if first is None else
             f"agree to the last logged digit up to step {before[-1]} and first differ at step {first}" if before
             else f"first differ at step {first}")
    ours, shipped = data["log"][-1][4], data["log"][-1][3]
    return (f"the retrain is not bit for bit: the logged loss and task accuracy {agree}, and at step "
            f"{data['steps']}, {data['tensors_differing']} of {data['tensors']} weight tensors differ (largest "
            f"difference {data['max_abs_difference']:.3f}); task accuracy {100 * ours:.1f}% against the shipped "
            f"{100 * shipped:.1f}%")


def quotes(data: dict) -> dict[str, str]:
    """The phrases the prose quotes (published.SOURCES)."""
    return {"verdict": verdict(data)}


def render(data: dict) -> dict[str, str]:
    """results.md: the verdict, the machines, and the logged steps side by side."""
    lines = ["# Retraining the shipped toy on this machine", "",
             f"`python experiments/retrain_check.py --steps {data['steps']}`: {verdict(data)}.", "",
             f"- this machine: {data['hardware']}",
             f"- the shipped run (`{data['checkpoint']}/meta.json`): {data['shipped_hardware']}", "",
             "| step | loss, shipped | loss, here | task accuracy, shipped | task accuracy, here |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {a:.6f} | {b:.6f} | {c:.6f} | {d:.6f} |" for s, a, b, c, d in data["log"]]
    return {RESULTS: "\n".join(lines) + "\n"}


def load(out: Path = OUT) -> dict:
    """The committed measurement (results.json of results directory `out`)."""
    return results_json(out)


def main() -> int:
    parser = script_arguments(__doc__, OUT)
    parser.add_argument("--steps", type=int, default=450, help="a shipped series checkpoint's step (default 450)")
    parser.add_argument("--run", type=Path, default=Path("runs/retrain_check"), help="the training run (resumed)")
    args = parser.parse_args()
    if args.threads != 1:
        parser.error("the shipped run was trained at 1 thread; --threads must be 1")
    if not args.table_only:
        try:
            check_steps(args.steps, args.run)
        except ValueError as e:  # bad --steps: one line, exit 2, nothing written
            parser.error(str(e))
    start(args)
    if not args.table_only:
        save_json(measure(args.steps, args.run), args.out)
    write_files(render(load(args.out)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
