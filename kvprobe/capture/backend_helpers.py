"""Helpers the capture backends share: position gathering, layer checks, per-architecture tables.

What is read has one name everywhere (`CaptureConfig.tensors`, `kvprobe.grid.TENSORS`): "k", the keys of a layer
as the KV cache holds them (after any key norm and after RoPE), and "v", its values,
each (B, n_kv_heads, T, d_head). Each backend's per-architecture table says where
those live in its framework (docs/backends.md); kvprobe defines no hook-point names of
its own (in TransformerLens's bridge `blocks.{l}.attn.k` is the pre-RoPE projection,
not the cached key).
"""

from __future__ import annotations

from typing import Mapping, Sequence, TypeVar

import torch

__all__ = ["architecture_entry", "check_layers", "gather_positions"]


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Select per-row positions from head-major states.

    states (B, H, T, D); positions (B, P) long -> (B, H, P, D).
    """
    B, H, _, D = states.shape
    idx = positions.to(states.device)[:, None, :, None].expand(B, H, positions.shape[1], D)
    return states.gather(2, idx)


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Distinct layers in execution order; ValueError naming any layer out of range."""
    for layer in layers:
        if not 0 <= int(layer) < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted({int(layer) for layer in layers})


T = TypeVar("T")


def architecture_entry(table: Mapping[str, T], model_type: str, backend: str) -> T:
    """The per-architecture entry of a backend's site table; ValueError naming the supported ones."""
    if model_type not in table:
        raise ValueError(
            f"kvprobe {backend} backend: no K/V site table for architecture {model_type!r}; "
            f"supported: {', '.join(sorted(table))}"
        )
    return table[model_type]
