"""An experiment directory: refuse to overwrite, resume only the same config, record timings.

    OUT/config.json            resolved config, seed, versions (written first)
    OUT/stores/CONDITION/      KV stores (resumable shard by shard)
    OUT/probes/CONDITION.json  probe results per cell (+ .npz per-sample scores)
    OUT/sweep/sweep.json       leakage across training checkpoints (toy)
    OUT/report/                results.json/csv, summary.md, figures (PNG + PDF)
    OUT/timings.json           wall time of each stage
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..capture.run import package_versions
from ..config import ExperimentConfig
from .errors import ExperimentError

RUN_PACKAGES = ("kvprobe", "torch", "transformers", "h5py", "numpy", "scikit-learn")

__all__ = ["check_out_dir", "prepare_out_dir", "record_timing", "store_dir"]


def check_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing directory unless resume or overwrite is asked, and a resume
    with another config than the run it continues. Touches nothing."""
    resolved = cfg.to_dict()
    record = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            return
        if not resume:
            raise ExperimentError(f"{out}: output directory already exists (use --resume to continue it or --overwrite)")
        elif record.is_file():
            previous = json.loads(record.read_text())["config"]
            if previous != resolved:
                diff = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
                raise ExperimentError(f"{out}: was run with another config (sections differ: {', '.join(diff)}); "
                                 "use a new --out or --overwrite")
        else:
            raise ExperimentError(f"{out}: exists but holds no kvprobe run (no config.json)")


def prepare_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool, stage: str) -> Path:
    """Create (or reopen with resume) an experiment directory holding the resolved config.

    Checks as `check_out_dir` does; with overwrite an existing directory is deleted.
    """
    check_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    resolved = cfg.to_dict()
    record = out / "config.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        record.write_text(json.dumps({"config": resolved, "seed": cfg.seed, "versions": package_versions(RUN_PACKAGES),
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return out


def record_timing(out: Path, stage: str, seconds: float) -> None:
    """Add one stage's wall time to out/timings.json."""
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(seconds, 2)
    path.write_text(json.dumps(timings, indent=2) + "\n")


def store_dir(out: Path, condition: str) -> Path:
    return out / "stores" / condition
