"""Model kinds: the table the experiment layer looks a config's `model.kind` up in.

One row per kind, no `if kind == ...` chains. A kind says how to load its models, and
optionally how to make its own passcode samples (`data.kind` of the same name), the
training step of a checkpoint and its task accuracy (what a sweep across training
checkpoints needs). `hf` is built in; other kinds are plugins registered under the
entry-point group `kvprobe.model_kinds` (the toy registers `toy` from
`toy_models.kind`), so the library never imports them itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from .errors import ExperimentError

if TYPE_CHECKING:
    from ..config import ExperimentConfig, ModelSection
    from ..data.samples import SampleSource

__all__ = ["ENTRY_POINT_GROUP", "ModelKind", "model_kind"]

ENTRY_POINT_GROUP = "kvprobe.model_kinds"


@dataclass(frozen=True)
class ModelKind:
    """How the experiment layer gets models of one kind, and what else the kind offers.

    load(section) -> model: the checkpoint `section.checkpoint` names, in eval mode, not yet
        moved to its device; FileNotFoundError / OSError when there is no such checkpoint.
    make_source(cfg, n_samples) -> SampleSource: the kind's own passcode samples (None: the
        kind reads traces only).
    checkpoint_step(name) -> int | None: a checkpoint's training step (sweeps; None: no sweeps).
    task_accuracy(model, n) -> float: the task accuracy of a checkpoint on n held-out sequences.
    reads_text: whether the kind's models take text through a Hugging Face tokenizer, so that
        traces (`data.kind: traces`) can be tokenized for them (a toy vocabulary cannot).
    """

    name: str
    load: Callable[[ModelSection], Any]
    make_source: Callable[[ExperimentConfig, int], SampleSource] | None = None
    checkpoint_step: Callable[[str], int | None] | None = None
    task_accuracy: Callable[[Any, int], float] | None = None
    reads_text: bool = False


def _load_hf(section: ModelSection) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    spread: dict[str, Any] = {}
    if section.device_map:  # max_memory copied: accelerate rewrites it in place (sizes to ints)
        max_memory = dict(section.max_memory) if section.max_memory else None
        spread = {"device_map": section.device_map, "max_memory": max_memory}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            section.checkpoint,
            dtype=getattr(torch, section.dtype),
            attn_implementation=section.attn_implementation,
            trust_remote_code=section.trust_remote_code,
            local_files_only=not section.allow_download,  # offline unless the config allows downloads
            **spread,
        )
    except ImportError as e:  # device maps need accelerate
        raise ExperimentError(f"model: {str(e).splitlines()[0]}") from None
    return model.eval()


HF = ModelKind("hf", load=_load_hf, reads_text=True)


@functools.cache
def _plugins() -> dict[str, Any]:
    """The installed entry points of `kvprobe.model_kinds`, by name (read once per process)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_kind(name: str) -> ModelKind:
    """The kind called `name`: built in, or registered under `kvprobe.model_kinds`."""
    if name == HF.name:
        return HF
    found = _plugins()
    if name not in found:
        known = sorted({HF.name, *found})
        raise ExperimentError(f"model.kind: no model kind {name!r} is installed (known: {', '.join(known)})")
    kind = found[name].load()
    if not isinstance(kind, ModelKind) or kind.name != name:
        raise ExperimentError(f"model.kind: the plugin registered as {name!r} is not a ModelKind named {name!r}")
    return kind
