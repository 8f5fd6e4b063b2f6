"""Plan and capture every condition of an experiment (all inputs are checked before anything is written)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..capture import CapturePlan, plan_capture, run_capture
from ..capture.run import model_identity
from ..config import ExperimentConfig
from ..store import StoreError, verify_store
from .errors import ExperimentError
from .kinds import ModelKind, model_kind
from .resolve import load_model, make_source
from .rundir import record_model, store_dir

__all__ = ["Plans", "capture_all", "check_sweep", "plan_all", "sweep_kind"]


@dataclass
class Plans:
    """A validated capture: the model, the samples, and one plan per condition."""

    model: Any
    source: Any
    plans: dict[str, CapturePlan]

    def summary(self) -> str:
        total = sum(p.estimate_bytes() for p in self.plans.values())
        parts = [f"[{cond}]\n{plan.summary()}\n" for cond, plan in self.plans.items()]
        source_line = getattr(self.source, "summary", None)  # trace sources say which token ids they feed
        if callable(source_line):
            parts.insert(0, source_line() + "\n")
        parts.append(f"total expected size: {total:,} bytes ({total / 1e9:.3f} GB) for {len(self.plans)} condition(s)")
        return "\n".join(parts)


def plan_all(cfg: ExperimentConfig) -> Plans:
    """Load the model and samples, validate every condition's capture and the sweep's checkpoints
    (`check_sweep`); writes nothing."""
    model = load_model(cfg.model)
    source = make_source(cfg)
    plans = {}
    for cond in cfg.conditions:
        try:
            plans[cond] = plan_capture(model, source, cfg.capture_spec(cond))
        except ValueError as e:
            raise ExperimentError(f"capture: {e}") from None
    check_sweep(cfg)
    return Plans(model, source, plans)


def sweep_kind(cfg: ExperimentConfig) -> ModelKind:
    """The model kind of a config's sweep, refused unless it has a checkpoint series to sweep."""
    kind = model_kind(cfg.model.kind)
    if kind.checkpoint_step is None or kind.task_accuracy is None or kind.make_source is None:
        raise ExperimentError(f"sweep.checkpoints: model kind {kind.name!r} has no checkpoint series to sweep "
                              "(the toy has: model.kind: toy)")
    return kind


def check_sweep(cfg: ExperimentConfig) -> None:
    """Refuse a sweep before any work: a model kind without checkpoints to sweep, or a name in
    sweep.checkpoints that does not load as one of its checkpoints (each is loaded, then dropped)."""
    if not cfg.sweep.checkpoints:
        return
    sweep_kind(cfg)
    for name in cfg.sweep.checkpoints:
        try:
            load_model(cfg.model.model_copy(update={"checkpoint": name}))
        except ExperimentError as e:
            raise ExperimentError(f"sweep.checkpoints: {str(e).removeprefix('model.checkpoint: ')}") from None


def capture_all(cfg: ExperimentConfig, out: Path, plans: Plans, *, mode: str, progress: bool = True,
                rank: int = 0, world_size: int = 1) -> list[Path]:
    """Capture every condition of `cfg` under out/stores/ (complete stores are skipped on resume,
    once they verify; a damaged shard is captured again). The model's identity goes to
    out/model.json, and a resume with another model is refused."""
    identity = model_identity(plans.model, cfg.model.checkpoint)
    record_model(out, identity)
    paths = []
    for cond, plan in plans.plans.items():
        path = store_dir(out, cond)
        store_mode = mode
        if mode == "resume" and not path.exists():
            store_mode = "create"
        if mode == "resume" and (path / "kvstore.h5").exists():
            problems = verify_store(path)
            if not problems:
                print(f"[{cond}] store complete, skipping")
                paths.append(path)
                continue
            print(f"[{cond}] {problems[0]}: capturing the damaged shard(s) again")
        try:
            run_capture(plans.model, plans.source, plan.spec, path, mode=store_mode, model_name=cfg.model.checkpoint,
                        progress=progress, rank=rank, world_size=world_size, identity=identity)
        except StoreError as e:
            raise ExperimentError(str(e)) from None
        paths.append(path)
    return paths
