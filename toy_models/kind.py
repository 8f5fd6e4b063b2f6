"""The toy as a kvprobe model kind (`model.kind: toy`), registered as an entry point.

kvprobe's experiment layer finds it under the entry-point group `kvprobe.model_kinds`
(pyproject.toml), so the library itself never imports the toy.
"""

from __future__ import annotations

from typing import Any

from kvprobe.experiment.kinds import ModelKind

from .checkpoint import load, read_meta
from .source import ToyPasscodeSource
from .task import task_accuracy

__all__ = ["KIND"]


def _load(section: Any) -> Any:
    return load(section.checkpoint, attn_implementation=section.attn_implementation)


def _source(cfg: Any, n_samples: int) -> ToyPasscodeSource:
    data = cfg.data
    return ToyPasscodeSource(n_samples, seed=cfg.seed, target_block=data.target_block, digit_sum=data.digit_sum,
                             shared_background=data.shared_background)


def _step(name: str) -> int | None:
    return read_meta(name).get("step")


def _task_accuracy(model: Any, n: int) -> float:
    return task_accuracy(model, n=n)


KIND = ModelKind("toy", load=_load, make_source=_source, checkpoint_step=_step, task_accuracy=_task_accuracy)
