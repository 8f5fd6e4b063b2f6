"""Pick the shipped checkpoints out of a finished training run.

    python -m toy_models.ship runs/toy            # writes toy_models/checkpoints/

`final/` is the run's last checkpoint; `series/step_XXXXXX/` are the intermediate
checkpoints that first reach evenly spaced task-accuracy targets from 75% up to 95% (or
up to the best accuracy the run logged before its end, if lower), for the
leakage-versus-training experiment. Each is re-evaluated on a fresh held-out set and
copied without its optimizer state; the run's training_log.jsonl and train_config.json
are copied beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import CHECKPOINT_DIR, META, TRAIN_STATE, load
from .task import heldout_seed, task_accuracy
from .train import CONFIG_FILE, LOG_FILE

__all__ = ["SHIP_HELDOUT_SET", "select_series", "ship"]

SHIP_HELDOUT_SET = 2  # fresh held-out set for the accuracy written to shipped meta.json


def _checkpoints(run_dir: Path) -> list[tuple[int, float, Path]]:
    """(step, accuracy logged at that step, dir) of every checkpoint evaluated at its own step."""
    out = []
    for d in sorted(run_dir.glob("step_[0-9]*")):
        meta = json.loads((d / META).read_text())
        if meta.get("task_accuracy_step") == meta["step"] and meta.get("task_accuracy") is not None:
            out.append((meta["step"], meta["task_accuracy"], d))
    return out


def select_series(accuracies: list[float], n: int = 7, lo: float = 0.75, hi: float = 0.95) -> list[int]:
    """Indices of the checkpoints (in training order) that first reach n targets evenly spaced in [lo, hi].

    Taking the first checkpoint at or above each target makes the series rise in both
    step and accuracy even where the logged accuracy wobbles from one evaluation to the next.
    `hi` is capped at the best accuracy logged, so a run that stops short of it still
    gives a series spanning what it reached.
    """
    chosen: list[int] = []
    hi = min(hi, max(accuracies, default=hi))
    for target in np.linspace(lo, hi, n):
        first = next((i for i, a in enumerate(accuracies) if a >= target), None)
        if first is not None and first not in chosen:
            chosen.append(first)
    return chosen


def _copy(src: Path, dst: Path, device: str, samples: int) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(TRAIN_STATE))
    meta = json.loads((dst / META).read_text())
    model = load(str(dst)).to(device)
    keep = meta.get("config", {}).get("keep_last_n_blocks", 0)  # read under the mask it was trained with
    meta["task_accuracy_during_training"] = meta.pop("task_accuracy")
    meta["task_accuracy"] = round(task_accuracy(model, samples, heldout_seed(SHIP_HELDOUT_SET), keep_last_n_blocks=keep), 6)
    meta["task_accuracy_eval"] = {"heldout_set": SHIP_HELDOUT_SET, "samples": samples, "mask": f"memento keep{keep}"}
    meta["source"] = str(src)
    (dst / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def ship(run_dir: str | Path, dest: str | Path = CHECKPOINT_DIR, n: int = 7, device: str = "cpu",
         samples: int = 5000) -> list[dict]:
    """Copy the run's final checkpoint and an accuracy series into `dest`; return their metas."""
    run = Path(run_dir)
    ckpts = _checkpoints(run)
    if not ckpts:
        raise FileNotFoundError(f"{run}: no evaluated checkpoints")
    dest = Path(dest)
    if (dest / "series").exists():
        shutil.rmtree(dest / "series")
    *earlier, last = ckpts
    chosen = select_series([a for _, a, _ in earlier], n) if n else []
    if chosen:
        (dest / "series").mkdir(parents=True)
    metas = [_copy(ckpts[i][2], dest / "series" / ckpts[i][2].name, device, samples) for i in chosen]
    metas.append(_copy(last[2], dest / "final", device, samples))
    for name in (LOG_FILE, CONFIG_FILE):
        shutil.copyfile(run / name, dest / name)
    return metas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--dest", default=str(CHECKPOINT_DIR))
    parser.add_argument("-n", type=int, default=7, help="checkpoints in the series (0: the final checkpoint alone)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    for meta in ship(args.run_dir, args.dest, args.n, args.device, args.samples):
        print(f"step {meta['step']:6d}  task accuracy {meta['task_accuracy']:.4f} "
              f"(during training {meta['task_accuracy_during_training']:.4f})")


if __name__ == "__main__":
    main()
