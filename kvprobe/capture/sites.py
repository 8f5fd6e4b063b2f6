"""Canonical names of the values kvprobe captures, and shared tensor helpers.

Hook-point names follow TransformerLens conventions, one scheme for every backend:

    blocks.{l}.attn.k   keys of layer l as the KV cache holds them: after any key norm
                        and after RoPE; (B, n_kv_heads, T, d_head)
    blocks.{l}.attn.v   values of layer l; (B, n_kv_heads, T, d_head)

Each backend module maps these names to where the values live in its framework.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, TypeVar

import torch

__all__ = ["SITE_RE", "architecture_entry", "check_layers", "gather_positions", "parse_site", "site_name"]

SITE_RE = re.compile(r"^blocks\.(\d+)\.attn\.([kv])$")


def site_name(layer: int, kind: str) -> str:
    """'blocks.{layer}.attn.{kind}' for kind in 'k', 'v'."""
    if kind not in ("k", "v"):
        raise ValueError(f"site kind must be 'k' or 'v', got {kind!r}")
    return f"blocks.{layer}.attn.{kind}"


def parse_site(name: str) -> tuple[int, str]:
    """'blocks.3.attn.k' -> (3, 'k')."""
    m = SITE_RE.match(name)
    if not m:
        raise ValueError(f"not a kvprobe site name: {name!r} (expected 'blocks.{{l}}.attn.k' or '.v')")
    return int(m.group(1)), m.group(2)


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
