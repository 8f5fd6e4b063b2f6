"""Model kinds: the table the experiment layer looks a config's `model.kind` up in.

One row per kind, no `if kind == ...` chains. A kind says how to load its models, and
optionally how to make its own passcode samples (`data.kind` of the same name), the
training step of a checkpoint and its task accuracy (what a sweep across training
checkpoints needs). `hf` is built in; other kinds are plugins registered under the
entry-point group `kvprobe.model_kinds` (the toy registers `toy` from
`toy_models.kind`), so the library never imports them itself.

A checkpoint's weight files are loaded only as safetensors or through torch's weights-only
unpickler; a load that fails on them (`refusing_damaged_weights`) is a `CheckpointError` naming
the file: damaged (truncated, not safetensors), or a pickle the safe unpickler refuses (a
pickle can run code, so kvprobe never loads one unsafely). `remote_code` lists the code a
checkpoint ships for ``model.trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ExperimentError

if TYPE_CHECKING:
    from ..config import ExperimentConfig, ModelSection
    from ..data.samples import SampleSource

__all__ = ["ENTRY_POINT_GROUP", "CheckpointError", "ModelKind", "model_kind", "refusing_damaged_weights",
           "remote_code", "weights_problem"]

ENTRY_POINT_GROUP = "kvprobe.model_kinds"


@dataclass(frozen=True)
class ModelKind:
    """How the experiment layer gets models of one kind, and what else the kind offers.

    load(section) -> model: the checkpoint `section.checkpoint` names, in eval mode, not yet
        moved to its device; FileNotFoundError / OSError when there is no such checkpoint,
        CheckpointError when its weights are damaged or unsafe (`refusing_damaged_weights`).
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


class CheckpointError(ExperimentError):
    """A checkpoint kvprobe will not load: a damaged weights file, or a pickle that torch's weights-only
    unpickler refuses. The message names the file."""


_PICKLED = (".bin", ".pt", ".pth", ".ckpt")  # weight files torch.load reads: pytorch_model*.bin, model*.pt, ...


def _weight_file(f: Path) -> bool:
    """Whether `f` holds a model's weights (not training_args.bin, optimizer.pt or another training file)."""
    return f.suffix == ".safetensors" or (f.suffix in _PICKLED and f.name.startswith(("pytorch_model", "model")))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def weights_problem(checkpoint: str | Path) -> str | None:
    """Why a local checkpoint's weight files cannot be loaded safely, naming the file; None when each opens
    (or `checkpoint` is no local directory, e.g. a hub id). Each safetensors header is read, each pickled
    file loaded with torch's weights-only unpickler: call it once a load has failed."""
    root = Path(checkpoint)
    if not root.is_dir():
        return None
    for f in sorted(root.iterdir()):
        if not _weight_file(f) or not f.is_file():
            continue
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt"):
                    pass
            else:
                import torch

                torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            why = str(e).split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0]
            return (f"{f} holds a pickle that kvprobe will not load: torch's weights-only unpickler refuses it ({why}); "
                    "if you trust it, convert the checkpoint to safetensors (model.save_pretrained saves safetensors)")
        except Exception as e:  # a truncated or foreign file: whatever its reader raises
            return f"damaged checkpoint {f}: {_first_line(e)}; save or download it again"
    return None


@contextlib.contextmanager
def refusing_damaged_weights(checkpoint: str | Path) -> Iterator[None]:
    """Around a load of `checkpoint`: a failure that its weight files explain (`weights_problem`) becomes a
    CheckpointError naming the file; a safetensors or unpickling error on files kvprobe cannot look at (a hub
    id's cache) one naming the checkpoint. Any other failure passes unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError) as e:
        problem = weights_problem(checkpoint)
        if problem is not None:
            raise CheckpointError(problem) from None
        if isinstance(e, (SafetensorError, pickle.UnpicklingError)):
            raise CheckpointError(f"cannot load the weights of {str(checkpoint)!r} safely: {_first_line(e)}") from None
        raise


def remote_code(checkpoint: str | Path) -> list[str]:
    """The code a local checkpoint ships for ``trust_remote_code``: its *.py files and the classes its
    config.json's ``auto_map`` names ([] for a hub id, or a directory with neither)."""
    root = Path(checkpoint)
    if not root.is_dir():
        return []
    code = sorted(str(f) for f in root.glob("*.py"))
    try:
        auto_map = json.loads((root / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):  # no config, or not one: the load says so
        auto_map = {}
    names = [v for value in (auto_map.values() if isinstance(auto_map, dict) else ())
             for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return code + [f"auto_map: {n}" for n in sorted(set(names))]


def _load_hf(section: ModelSection) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    spread: dict[str, Any] = {}
    if section.device_map:  # max_memory copied: accelerate rewrites it in place (sizes to ints)
        max_memory = dict(section.max_memory) if section.max_memory else None
        spread = {"device_map": section.device_map, "max_memory": max_memory}
    try:
        with refusing_damaged_weights(section.checkpoint):
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
