"""The reconstruction stage of a run: what survives an erased block, in bits (`kvprobe.reconstruction`).

It reads every condition's store (no model): RUN/reconstruction/results.json holds each condition's
rows and the paired differences of the report's comparisons (memento - restart: the implicit channel,
in bits per token). `kvprobe run` runs it after the probes when the config's `reconstruct` section
has layers; `kvprobe reconstruct RUN` runs it on any run whose stores hold block text. A finished
stage is read back unless redone; the report draws it (`kvprobe.reporting.reconstruction`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..files import write_text
from ..store import StoreError
from .errors import ExperimentError
from .rundir import open_run_store

__all__ = ["reconstruction_path", "saved_reconstruction", "stage_reconstruct"]


def reconstruction_path(out: Path) -> Path:
    return out / "reconstruction" / "results.json"


def stage_reconstruct(cfg: ExperimentConfig, out: Path, *, redo: bool = False, progress: bool = True) -> dict[str, Any]:
    """Reconstruction probes on every condition's store; the saved results unless `redo`."""
    from ..reconstruction import compare_pairs, reconstruct_store

    from ..reconstruction import ReconstructionError

    path = reconstruction_path(out)
    settings = cfg.reconstruct.model_dump(mode="json")  # the section the results are fitted with
    if path.is_file() and not redo:
        saved = json.loads(path.read_text())
        if saved.get("settings") != settings:
            raise ExperimentError(f"{path} was fitted with other reconstruct settings ({saved.get('settings')}) than "
                                  f"the run's ({settings}): `kvprobe reconstruct {out} --redo`, with the same --set "
                                  "fields to keep them")
        return saved
    results = {}
    for i, cond in enumerate(cfg.conditions, 1):
        try:
            spec = cfg.reconstruction_spec(cond)
        except ValueError as e:  # what the section's types cannot say alone (decoder width a multiple of heads)
            raise ExperimentError(f"config field 'reconstruct': {e}") from None
        with open_run_store(out, cfg, cond) as store:
            try:
                results[cond] = reconstruct_store(store, cond, spec, progress=progress,
                                                  label=f"reconstruct {cond} ({i}/{len(cfg.conditions)})")
            except (StoreError, ReconstructionError) as e:  # a store without block text, too few blocks
                raise ExperimentError(f"reconstruct: {e}") from None
    pairs = [(a, b) for a, b in cfg.comparisons() if a in results and b in results]
    first = next(iter(results.values()))
    data = {"settings": settings, "positions": list(first.names), "conditions": list(results),
            "pairs": [list(p) for p in pairs],
            "config": {"target": spec.target, "positions": spec.positions, "k": spec.k, "vocab": spec.vocab,
                       "smoothing": spec.smoothing, "l2_grid": list(spec.l2_grid), "families": list(spec.probe.families),
                       "pooling": spec.probe.pooling},
            "rows": [r.to_dict() for res in results.values() for r in res.rows],
            "diffs": [d.to_dict() for d in compare_pairs(results, pairs, cfg.probe.n_boot)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1) + "\n")  # atomic: a half-written result is never read back
    return data


def saved_reconstruction(out: Path) -> dict[str, Any] | None:
    """The reconstruction results a run saved, if any. A run saved before 2026-12-07 named a difference
    `diff` (kvprobe's former BitsDiff); it is read under today's name, `difference` (`DiffResult`)."""
    path = reconstruction_path(out)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    for d in data.get("diffs", []):
        if "diff" in d:
            d["difference"] = d.pop("diff")
    return data
