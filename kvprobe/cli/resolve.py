"""Turn config sections into live objects: the model and the sample source.

This is CLI-level code: it may import `toy_models`; the library never does.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..capture.spec import SampleSource
from ..config import DataSection, ExperimentConfig, ModelSection
from .common import UsageError

__all__ = ["load_model", "make_source", "process_device"]


def process_device(device: str, env: Mapping[str, str] = os.environ) -> str:
    """The device this process uses: a bare "cuda" becomes "cuda:$LOCAL_RANK" under a
    launcher (torchrun, accelerate) that starts several processes, so each rank has its GPU."""
    if device == "cuda" and int(env.get("WORLD_SIZE", 1)) > 1 and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def load_model(section: ModelSection) -> Any:
    """The model a config names, in eval mode, on its device and dtype (or spread by its device map)."""
    if section.device.startswith("cuda") and not section.device_map and not torch.cuda.is_available():
        raise UsageError(f"model.device {section.device!r}: CUDA is not available on this machine")
    if section.kind == "toy":
        import toy_models

        try:
            model = toy_models.load(section.checkpoint, attn_implementation=section.attn_implementation)
        except FileNotFoundError as e:
            raise UsageError(f"model.checkpoint: {e}") from None
    else:
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
                **spread,
            )
        except ImportError as e:  # device maps need accelerate
            raise UsageError(f"model: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise UsageError(f"model.checkpoint: cannot load {section.checkpoint!r}: {str(e).splitlines()[0]}") from None
        if section.device_map:
            return model.eval()
    return model.to(device=process_device(section.device), dtype=getattr(torch, section.dtype)).eval()


def make_source(cfg: ExperimentConfig) -> SampleSource:
    """The passcode samples a config asks for."""
    data: DataSection = cfg.data
    if data.kind == "toy":
        if cfg.model.kind != "toy":
            raise UsageError("data.kind: 'toy' samples need model.kind 'toy'")
        from toy_models.source import ToyPasscodeSource

        try:
            return ToyPasscodeSource(data.n_samples, seed=cfg.seed, target_block=data.target_block,
                                     digit_sum=data.digit_sum, shared_background=data.shared_background)
        except ValueError as e:
            raise UsageError(f"data: {e}") from None
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..trace_source import TracePasscodeSource
    from ..traces import read_generated, read_jsonl

    if not data.traces:
        raise UsageError("data.traces: a traces file is needed when data.kind is 'traces'")
    if not Path(data.traces).is_file():
        raise UsageError(f"data.traces: no such file {data.traces!r}")
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer or cfg.model.checkpoint)
    try:
        path = Path(data.traces)
        traces = read_jsonl(path) if path.suffix == ".jsonl" else [read_generated(path)]
        return TracePasscodeSource(
            traces, tokenizer, data.n_samples, seed=cfg.seed,
            target_block=data.target_block, template=data.template, where=data.where, offsets=cfg.capture.offsets,
        )
    except ValueError as e:
        raise UsageError(f"data: {e}") from None
