"""Toy checkpoints on disk: write one, find the shipped ones, load one.

A checkpoint is a directory that `GPT2LMHeadModel.from_pretrained` and
`AutoTokenizer.from_pretrained` both read: model.safetensors, config.json, the
tokenizer files, and meta.json (seed, step, task accuracy, wall time, the command
that made it). Checkpoints inside a training run also hold train_state.pt
(optimizer, scheduler, step, RNG), loadable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from kvprobe.experiment.kinds import refusing_damaged_weights

from .vocab import build_tokenizer

__all__ = ["CHECKPOINT_DIR", "checkpoint_names", "load", "load_tokenizer", "read_meta", "resolve", "save_checkpoint"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
META = "meta.json"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(
    model: GPT2LMHeadModel, path: str | Path, meta: dict[str, Any], train_state: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint directory atomically: a crash mid-write leaves no partial checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # model.safetensors + config.json
    build_tokenizer().save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def checkpoint_names() -> list[str]:
    """Names of the shipped training series in training order, e.g. 'series/step_001000'."""
    series = CHECKPOINT_DIR / "series"
    if not series.is_dir():
        return []
    return sorted(f"series/{d.name}" for d in series.iterdir() if (d / "model.safetensors").is_file())


def resolve(name_or_path: str | Path) -> Path:
    """A shipped checkpoint name ('final', 'series/step_001000') or any checkpoint directory."""
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        shipped = CHECKPOINT_DIR / str(name_or_path)
        if (shipped / "config.json").is_file():
            path = shipped
        else:
            contrasts = sorted(f"{d.name}/final" for d in CHECKPOINT_DIR.iterdir() if (d / "final" / "config.json").is_file())
            names = ", ".join(["final", *checkpoint_names(), *contrasts])
            raise FileNotFoundError(
                f"no toy checkpoint {str(name_or_path)!r}: not a checkpoint directory and not a shipped name ({names})"
            )
    return path


def read_meta(name_or_path: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint ({} if it has none)."""
    meta = resolve(name_or_path) / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load(name_or_path: str = "final", attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """Load a toy checkpoint in eval mode (on the CPU, fp32). A damaged weights file is a
    `kvprobe.experiment.kinds.CheckpointError` naming it ("damaged checkpoint ...")."""
    path = resolve(name_or_path)
    with refusing_damaged_weights(path):
        model = GPT2LMHeadModel.from_pretrained(path, attn_implementation=attn_implementation)
    return model.eval()


def load_tokenizer(name_or_path: str = "final") -> PreTrainedTokenizerBase:
    """The tokenizer saved with a toy checkpoint (what `AutoTokenizer.from_pretrained(dir)` gives)."""
    return AutoTokenizer.from_pretrained(resolve(name_or_path))
