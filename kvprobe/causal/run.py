"""The causal map: both interventions on every cell over a sample source, with intervals.

    spec = CausalConfig(layers=(0, 1, 2, 3), offsets=(0, 1, 2))
    result = causal_map(model, source, spec, start=5000)    # samples the probes never saw
    for row in result.rows: print(row.intervention, row.cell.label, row.delta_loss_memento)
    save_causal(result, "runs/x/causal/causal")

Donors: each sample takes the K/V of the next sample in its batch with the same layout (in
source order, wrapping; a sample whose layout no other in its batch has gets no donor and
no interchange numbers).
On the toy with a fixed digit sum and a shared background, base and donor differ only in
the target block's digits, every memento text is the same, and `text_identical` is 1: any
downstream change of an interchange is the implicit channel's alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..capture.backends import get_patcher
from ..data.samples import SampleSource
from ..files import replacing, together, write_text
from ..stats import bootstrap_ci
from ..grid import Cell
from .config import FORK_RESTART, CausalConfig  # noqa: F401  (the options, torch-free; re-exported here)
from .effects import (
    INTERVENTIONS,
    BatchEffects,
    ProbeReader,
    batch_effects,
    pair_donors,
)
from ..errors import renamed

__all__ = ["CausalResult", "CausalRow", "CausalConfig", "causal_map", "load_causal", "save_causal"]

METRICS = ("delta_loss_memento", "delta_loss_all", "delta_loss_answer", "flip_memento", "flip_all", "follow_donor",
           "follow_base")


@dataclass
class CausalRow:
    """One intervention on one cell, summarised over samples (means with 95% bootstrap intervals)."""

    intervention: str
    site: str
    offset: int
    layer: int
    pooling: str
    n: int
    delta_loss_memento: float
    delta_loss_memento_low: float
    delta_loss_memento_high: float
    delta_loss_all: float
    delta_loss_all_low: float
    delta_loss_all_high: float
    flip_memento: float | None
    flip_all: float | None = None
    delta_loss_answer: float | None = None  # None: no sample has an answer (the toy)
    follow_donor: float | None = None
    follow_base: float | None = None
    text_identical: float | None = None  # interchange: share of (base, donor) pairs whose tokens differ only in the target block

    @property
    def cell(self) -> Cell:
        return Cell(self.site, self.offset, self.layer, self.pooling)


@dataclass
class CausalResult:
    """Every row, the per-sample effects behind them ((intervention, cell) -> metric -> (n,)), the spec."""

    rows: list[CausalRow]
    per_sample: dict[tuple[str, Cell], dict[str, np.ndarray]]
    spec: dict[str, Any] = field(default_factory=dict)
    reader: str | None = None  # the probe cell the follow rates decode, as Cell.label

    def row(self, intervention: str, cell: Cell) -> CausalRow:
        for r in self.rows:
            if r.intervention == intervention and r.cell == cell:
                return r
        raise KeyError(f"no {intervention} row for {cell.label}")


def _text_identical(ids: torch.Tensor, donor: np.ndarray, layouts: list, target_block: int) -> np.ndarray:
    """(B,) whether each row and its donor differ only inside the target block's content."""
    same = ids == ids[torch.as_tensor(donor)]
    for row, lay in enumerate(layouts):
        same[row, list(lay.blocks[target_block].content)] = True
    return same.all(-1).numpy()


def _summarise(name: str, cell: Cell, values: dict[str, np.ndarray], n_boot: int, identical: float) -> CausalRow:
    def mean_ci(x: np.ndarray) -> tuple[float, float, float]:
        x = x[~np.isnan(x)]
        if len(x) < 2:
            return float("nan"), float("nan"), float("nan")
        ci = bootstrap_ci(x, n_boot=n_boot, seed=0)
        return float(ci.estimate), float(ci.low), float(ci.high)

    def mean_or_none(x: np.ndarray) -> float | None:
        return None if np.isnan(x).all() else float(np.nanmean(x))

    m, a = mean_ci(values["delta_loss_memento"]), mean_ci(values["delta_loss_all"])
    return CausalRow(name, cell.site, cell.offset, cell.layer, cell.pooling, len(values["delta_loss_all"]),
                     *m, *a, flip_memento=mean_or_none(values["flip_memento"]),
                     flip_all=mean_or_none(values["flip_all"]),
                     delta_loss_answer=mean_or_none(values["delta_loss_answer"]),
                     follow_donor=mean_or_none(values["follow_donor"]), follow_base=mean_or_none(values["follow_base"]),
                     text_identical=identical if name == "interchange" else None)


def causal_map(model: Any, source: SampleSource, spec: CausalConfig, *, start: int = 0, target_block: int | None = None,
               reader: ProbeReader | None = None, progress: bool = True) -> CausalResult:
    """Ablation and interchange on every cell of `spec`, over samples [start, start + n_samples)."""
    forward = get_patcher(spec.backend)
    target = getattr(source, "target_block", None) if target_block is None else target_block
    if target is None:
        raise ValueError("the target block is unknown: give target_block (the source names none)")
    stop = start + spec.n_samples
    if stop > source.n_samples:
        raise ValueError(f"samples {start}..{stop - 1} asked for, the source has {source.n_samples}")
    if spec.n_samples < 2 or spec.batch_size < 2:
        raise ValueError("n_samples and batch_size must be >= 2 (each sample needs a donor)")
    cells = spec.cells()
    collected: dict[tuple[str, Cell], list[BatchEffects]] = {(i, c): [] for i in INTERVENTIONS for c in cells}
    identical = []
    bar = tqdm(total=spec.n_samples, unit="sample", desc="causal", disable=not progress)
    with torch.inference_mode():
        for lo in range(start, stop, spec.batch_size):
            batch = source.samples(lo, min(lo + spec.batch_size, stop))
            donor = pair_donors(batch.layouts)
            paired = donor >= 0
            identical.append(_text_identical(batch.input_ids, np.where(paired, donor, np.arange(len(donor))),
                                             batch.layouts, target)[paired])
            effects = batch_effects(model, forward, batch, cells, target_block=target, mask=spec.mask,
                                    ablate_with=spec.ablate_with, donor=donor, reader=reader)
            for key, value in effects.items():
                collected[key].append(value)
            bar.update(len(batch.index))
    bar.close()
    pairs = np.concatenate(identical)
    share = float(pairs.mean()) if len(pairs) else float("nan")
    per_sample = {key: {m: np.concatenate([getattr(e, m) for e in parts]) for m in METRICS}
                  for key, parts in collected.items()}
    rows = [_summarise(name, cell, per_sample[(name, cell)], spec.n_boot, share) for name, cell in collected]
    meta = {**asdict(spec), "mask": spec.mask.name, "ablate_with": spec.ablate_with.name, "start": start,
            "target_block": target}
    return CausalResult(rows, per_sample, meta, reader.cell.label if reader else None)


def save_causal(result: CausalResult, path: str | os.PathLike) -> None:
    """path.json (rows, spec) and path.npz (per-sample effects), both or neither (`kvprobe.files.together`)."""
    path = Path(path)
    arrays = {f"{name}|{cell.label}|{m}": v for (name, cell), d in result.per_sample.items() for m, v in d.items()}
    with together():
        with replacing(path.with_suffix(".npz"), "wb") as f:
            np.savez_compressed(f, **arrays)
        write_text(path.with_suffix(".json"), json.dumps({"rows": [asdict(r) for r in result.rows],
                                                          "spec": result.spec, "reader": result.reader}, indent=1))


def load_causal(path: str | os.PathLike) -> CausalResult:
    """Read what `save_causal` wrote."""
    path = Path(path)
    data = json.loads(path.with_suffix(".json").read_text())
    arrays = np.load(path.with_suffix(".npz"))
    per_sample: dict[tuple[str, Cell], dict[str, np.ndarray]] = {}
    for name in arrays.files:
        intervention, site, offset, layer, pooling, metric = name.split("|")
        per_sample.setdefault((intervention, Cell.parse(f"{site}|{offset}|{layer}|{pooling}")), {})[metric] = arrays[name]
    return CausalResult([CausalRow(**r) for r in data["rows"]], per_sample, data["spec"], data.get("reader"))


__getattr__ = renamed(__name__, {"CausalSpec": "CausalConfig"})  # the old names, for one release
