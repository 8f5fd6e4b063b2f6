"""The causal stage of a run: interventions on the probe's cells, beside the probe map.

Runs when the config has a `causal` section with layers. It needs the model (the probes
do not): `kvprobe run` runs it after probing, on samples the probes never saw (those after
`data.n_samples`), and writes RUN/causal/causal.json + .npz; the report draws the causal
map beside the probe map. A finished stage is read back on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import GridResult
from ..causal import CausalResult, ProbeReader, causal_map, load_causal, save_causal
from ..config import ExperimentConfig
from ..data.passcodes import label_unique_split
from ..grid import LINEAR
from ..probes import fit_probes
from ..store import KVStore
from .errors import ExperimentError
from .resolve import make_source
from .rundir import store_dir

__all__ = ["causal_path", "saved_causal", "stage_causal"]


def causal_path(out: Path) -> Path:
    return out / "causal" / "causal"


def _reader(cfg: ExperimentConfig, out: Path, condition: str, grids: dict[str, GridResult]) -> ProbeReader | None:
    """A linear probe on the condition's store at the read cell, fitted on every stored
    sample at the strength the probe stage chose for that cell (else probe.linear.l2)."""
    cell = cfg.causal_read_cell()
    if cell is None:
        return None
    settings = cfg.probe_settings(LINEAR, condition)
    rows = [r for r in grids.get(condition, GridResult(condition, [], np.array([]), {})).rows
            if r.probe == LINEAR and r.cell == cell]
    l2 = rows[0].l2 if rows and rows[0].l2 is not None else settings.linear.l2
    with KVStore(store_dir(out, condition)) as store:
        x = store.features(cell.layer, cell.offset, cell.site, cell.pooling)
        y = store.labels
        val = label_unique_split(store.passcodes, settings.val_fraction, settings.split_seed)  # the probe stage's split
    x = x.reshape(len(x), -1)[None]  # (1, N, D)
    fit = fit_probes(x[:, ~val], y[~val], x[:, val], y[val], LINEAR, l2=l2, device=settings.device)
    return ProbeReader(cell, fit, cfg.capture.max_tokens)


def stage_causal(cfg: ExperimentConfig, out: Path, model: Any, grids: dict[str, GridResult], *,
                 progress: bool = True) -> CausalResult | None:
    """The causal map of the config's `causal` section (None when it asks for none)."""
    spec = cfg.causal_spec()
    if spec is None:
        return None
    path = causal_path(out)
    if path.with_suffix(".json").is_file():
        return load_causal(path)
    condition = cfg.causal_condition()
    source = make_source(cfg, cfg.data.n_samples + spec.n_samples)
    reader = _reader(cfg, out, condition, grids)
    try:
        result = causal_map(model, source, spec, start=cfg.data.n_samples, target_block=cfg.data.target_block,
                            reader=reader, progress=progress)
    except ValueError as e:
        raise ExperimentError(f"causal: {e}") from None
    if reader is not None:
        result.spec["reader_accuracy"] = float(reader.fit.accuracy[0])
    save_causal(result, path)
    return result


def saved_causal(out: Path) -> CausalResult | None:
    """The causal map a run saved, if any."""
    path = causal_path(out)
    return load_causal(path) if path.with_suffix(".json").is_file() else None
