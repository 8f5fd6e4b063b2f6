"""How much a toy checkpoint leaks, in one call: capture and linear probes per condition.

    from toy_models.leakage import MEMENTO, RESTART, TEXT_CONTROLLED, measure_leakage
    rows = measure_leakage(model, (MEMENTO, RESTART, TEXT_CONTROLLED), layers=(0, 3), offsets=(0, 1))

The studies that compare many toys (the recipe study, capacity, the figure
reproductions) all read a checkpoint the same way through this function: kvprobe's
default features (the whole memento span, `tail_mean`), kvprobe's linear probe, the
label-unique split. Conditions:

    memento          memento attention (keep 0), random passcodes: what the paper probes
    restart          the fork's restart (memento KV recomputed from the texts, delimiters
                     hidden): only what the memento texts carry, the text baseline
    text-controlled  memento attention, passcodes with digit sum 22: the memento texts
                     carry nothing of the passcode, so a masked memento reads the KV
                     channel alone (chance 11.17%, the exact majority baseline)
    text-identical   the same with one background for every sample: every memento text
                     identical, the channel with no distractors (chance 11.17%)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from kvprobe.analysis import CellResult, ProbeConfig, probe_store
from kvprobe.capture import CaptureConfig, plan_capture, run_capture, store_meta
from kvprobe.memento.masks import MaskConfig
from kvprobe.store import KVStore, StoreError, differs

from .source import ToyPasscodeSource

__all__ = ["MEMENTO", "RESTART", "TEXT_CONTROLLED", "TEXT_IDENTICAL", "Condition", "cell_record", "measure_leakage"]


@dataclass(frozen=True)
class Condition:
    """A probing condition on the toy: the mask the features are captured under and the passcodes."""

    name: str
    mask: MaskConfig
    text_controlled: bool = False  # passcodes with digit sum 22
    shared_background: bool = False  # and one background for every sample

    def source(self, n_samples: int, seed: int, target_block: int = 1) -> ToyPasscodeSource:
        if self.text_controlled:
            return ToyPasscodeSource.text_controlled(n_samples, seed=seed, target_block=target_block,
                                                     shared_background=self.shared_background)
        return ToyPasscodeSource(n_samples=n_samples, seed=seed, target_block=target_block)


MEMENTO = Condition("memento", MaskConfig(keep_last_n_blocks=0))
RESTART = Condition("restart", MaskConfig(keep_last_n_blocks=0, mask_delimiters=True, restart_mode=True))
TEXT_CONTROLLED = Condition("text-controlled", MaskConfig(keep_last_n_blocks=0), text_controlled=True)
TEXT_IDENTICAL = Condition("text-identical", MaskConfig(keep_last_n_blocks=0), text_controlled=True,
                           shared_background=True)

RECORD_FIELDS = ("condition", "layer", "offset", "accuracy", "ci_low", "ci_high", "chance", "l2")


def cell_record(row: CellResult, *extra: str) -> dict:
    """What the toy studies keep of a probed cell (plus any `extra` CellResult fields), for JSON."""
    return {k: getattr(row, k) for k in (*RECORD_FIELDS, *extra)}


STUDY_PROBE = ProbeConfig(families=("linear",), shuffled_control=False, n_boot=1000)


def check_kept(store: KVStore, model, source: ToyPasscodeSource, spec: CaptureConfig) -> None:
    """Refuse (`StoreError`, one line) a store kept in a `store_dir` that these weights, passcodes and capture
    config did not make: reusing it would read another checkpoint's or another capture's features. The
    comparison is the store's own (`kvprobe.store.differs`): the weights by their parameter hash, not their
    path, so a store moves with its checkpoint."""
    what = differs(store.config, store_meta(model, source, plan_capture(model, source, spec)))
    if what is not None:
        name = store.config["model"].get("name", "?") if what == "model" else what
        raise StoreError(f"{store.path}: kept store made by another {what} ({name}); "
                         "give a store_dir of its own or delete it")


def measure_leakage(
    model,
    conditions: Sequence[Condition] = (MEMENTO,),
    layers: Sequence[int] = (0, 1, 2, 3),
    offsets: Sequence[int] = (-1, 0, 1, 2, 7),
    *,
    n_samples: int = 3000,
    seed: int = 0,
    target_block: int = 1,
    probe: ProbeConfig = STUDY_PROBE,
    spec: CaptureConfig | None = None,
    store_dir: str | Path | None = None,
    shard_size: int | None = None,
) -> list[CellResult]:
    """Linear-probe accuracy of every (condition, layer, offset) cell, with intervals.

    `spec` sets the features (default: kvprobe's CaptureConfig defaults); its layers,
    offsets, mask and target block are taken from the arguments. Stores go to a
    temporary directory unless `store_dir` is given (then one store per condition,
    kept, and reused by a later call only if these weights, passcodes and capture config
    made it: `check_kept`). Rows come back as `CellResult`s named by condition. `shard_size`: samples a shard holds in
    memory while it is captured (default: all of them in one shard; give e.g. 5,000 at 50K samples).
    """
    base = spec or CaptureConfig(layers=tuple(layers))
    rows: list[CellResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(store_dir) if store_dir is not None else Path(tmp)
        for cond in conditions:
            cspec = replace(base, layers=tuple(layers), offsets=tuple(offsets), mask=cond.mask,
                            target_block=target_block, shard_size=shard_size or max(n_samples, 1), compression="none")
            path, source = root / cond.name, cond.source(n_samples, seed, target_block)
            kept = (path / "kvstore.h5").is_file()
            if not kept:
                run_capture(model, source, cspec, path, progress=False)
            with KVStore(path) as store:
                if kept:  # a store this call did not capture
                    check_kept(store, model, source, cspec)
                grid = probe_store(store, cond.name, replace(probe, pooling=cspec.pooling[0]), progress=False)
            rows.extend(grid.rows)
    return rows
