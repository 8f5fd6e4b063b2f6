"""Experiment tracking: a run's config, per-cell metrics and report figures, logged to TensorBoard or W&B.

`kvprobe run`, `probe` and `demo` take `--log-to tensorboard|wandb` (docs/report.md, "Tracking"); the
experiment layer calls `track_run` once the results (and the report) are written:

    track_run(["tensorboard"], RUN / "tracking", name="repro", config=cfg.to_dict(), rows=rows, figures=pngs)

Every cell becomes one scalar per metric (`METRICS`), tagged CONDITION/PROBE/SITE/layerL/+OFFSET/METRIC (`cell_tag`)
at step 0, so TensorBoard's and W&B's own views group them by condition. Logs stay inside the run directory
(RUN/tracking/tensorboard/NNN/, RUN/tracking/wandb/wandb/offline-run-.../), each call a fresh sub-run:
a resumed or re-probed run never writes into earlier logs. W&B runs offline (`wandb sync` uploads it
later) unless the caller passes `online=True` (the CLI: KVPROBE_ALLOW_NETWORK=1). Neither package is
imported before a tracker opens; `require` checks both are installed without importing them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import KVProbeError

if TYPE_CHECKING:
    from ..analysis import CellResult

__all__ = ["METRICS", "TRACKERS", "TensorBoardTracker", "Tracker", "TrackingError", "WandbTracker", "cell_metrics", "cell_tag",
           "require", "track_run"]

TRACKERS = ("tensorboard", "wandb")  # each is also the name of the package it needs
# what each cell logs: accuracy and its 95% interval, the chosen L2 strength, validation samples, Holm p
METRICS = ("accuracy", "ci_low", "ci_high", "l2", "n_val", "p_holm")
PROJECT = "kvprobe"  # the W&B project runs are filed under


class TrackingError(KVProbeError):
    """A tracker could not start (W&B online without a login, say): bad input, one line."""


def cell_tag(row: CellResult) -> str:
    """A cell's name in the tracker: condition/probe/site/layer/offset."""
    return f"{row.condition}/{row.probe}/{row.site}/layer{row.layer}/{row.offset:+d}"


def cell_metrics(rows: Iterable[CellResult]) -> dict[str, float]:
    """{cell_tag/metric: value} of every cell; a metric a cell lacks (no chosen strength) is left out."""
    out = {}
    for r in rows:
        for metric in METRICS:
            value = getattr(r, metric)
            if value is not None:
                out[f"{cell_tag(r)}/{metric}"] = float(value)
    return out


def require(trackers: Sequence[str]) -> None:
    """Each tracker's package is installed (else ModuleNotFoundError naming it); nothing is imported."""
    for name in trackers:
        _known(name)
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _known(name: str) -> None:
    """ValueError unless `name` is one of TRACKERS."""
    if name not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r} (known: {', '.join(TRACKERS)})")


class Tracker(Protocol):
    """One tracking run: the config, the cells, the figures, then `close`. `dir` is where it writes."""

    dir: Path

    def log_config(self, config: dict) -> None: ...

    def log_cells(self, rows: Sequence[CellResult]) -> None: ...

    def log_figures(self, paths: Sequence[Path]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files under ROOT/tensorboard/NNN (the next free number): scalars, the config as text, PNGs as images."""

    def __init__(self, root: Path, name: str):
        import tensorboard  # noqa: F401  (torch's writer needs it; a missing one names the package)
        from torch.utils.tensorboard import SummaryWriter

        self.dir = _fresh_dir(root / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("run", name)

    def log_config(self, config: dict) -> None:
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # a code block

    def log_cells(self, rows: Sequence[CellResult]) -> None:
        for tag, value in cell_metrics(rows).items():
            self.writer.add_scalar(tag, value, 0)

    def log_figures(self, paths: Sequence[Path]) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            with Image.open(p) as img:
                pixels = np.asarray(img.convert("RGB"))
            self.writer.add_image(f"figures/{p.stem}", pixels, 0, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under ROOT/wandb, offline unless `online`: the config, scalars plus a table of the cells, images."""

    def __init__(self, root: Path, name: str, *, online: bool = False):
        import wandb

        where = root / "wandb"
        where.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  disable_code=True, disable_job_creation=True)
        try:
            self.run = wandb.init(dir=where, project=PROJECT, name=name, mode="online" if online else "offline",
                                  reinit="create_new", settings=settings)
        except wandb.errors.Error as e:  # online without `wandb login`, no W&B server reachable, ...
            raise TrackingError(f"wandb: could not start a run ({type(e).__name__}: {e})") from None
        self.dir = Path(self.run.dir).parent  # .../wandb/offline-run-DATE-ID (or run-DATE-ID online)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_cells(self, rows: Sequence[CellResult]) -> None:
        import wandb

        columns = ["condition", "probe", "site", "layer", "offset", *METRICS]
        data = [[getattr(r, c) for c in columns] for r in rows]
        data = [[None if isinstance(v, float) and math.isnan(v) else v for v in d] for d in data]
        self.run.log({**cell_metrics(rows), "cells": wandb.Table(columns=columns, data=data)})

    def log_figures(self, paths: Sequence[Path]) -> None:
        import wandb

        if paths:
            self.run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in paths})

    def close(self) -> None:
        import wandb

        self.run.finish()
        if wandb.run is None:  # W&B's service writes the run's .wandb file out only as it shuts down
            wandb.teardown()


def _fresh_dir(root: Path) -> Path:
    """ROOT/NNN, one past the highest number there: a new sub-run, never an earlier one's folder."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    path = root / f"{max(taken, default=0) + 1:03d}"
    path.mkdir()
    return path


def open_tracker(kind: str, root: Path, name: str, *, online: bool = False) -> Tracker:
    """A tracker of `kind` (one of TRACKERS) writing under `root`."""
    _known(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(root, name)
    return WandbTracker(root, name, online=online)


def track_run(trackers: Sequence[str], root: Path, *, name: str, config: dict, rows: Sequence[CellResult],
              figures: Iterable[Path] = (), online: bool = False) -> list[Path]:
    """Log the config, every cell's metrics and the PNG figures to each tracker; returns where each wrote."""
    pngs = [Path(p) for p in figures if Path(p).suffix == ".png"]
    written = []
    for kind in trackers:
        tracker = open_tracker(kind, Path(root), name, online=online)
        try:
            tracker.log_config(config)
            tracker.log_cells(rows)
            tracker.log_figures(pngs)
        finally:
            tracker.close()
        written.append(tracker.dir)
    return written
