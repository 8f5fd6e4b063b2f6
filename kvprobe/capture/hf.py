"""Transformers backend: read K/V from the cache the model's own forward pass returns.

The cache holds exactly what SPEC section 3 calls "KV states": keys after RoPE and any
key norm, and values, per KV head. This backend is the reference the others are
checked against.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from .sites import gather_positions

__all__ = ["capture_kv", "prepare"]


def prepare(model: Any) -> Any:
    """Nothing to wrap: the backend runs the Hugging Face model itself."""
    return model


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def capture_kv(
    model: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    layers: Sequence[int],
    positions: torch.Tensor,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K and V of `layers` at `positions`.

    input_ids (B, T); attention_mask: additive (B, 1, T, T) float mask (or BlockMask);
    position_ids (B, T); positions (B, P) absolute positions per row.
    Returns {layer: (K, V)}, each (B, n_kv, P, d_head).
    """
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}  # (B, T, vocab) logits are GBs at 32K tokens
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)
    cache = out.past_key_values
    result = {}
    for layer in layers:
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (B, n_kv, T, d_head)
        result[layer] = (gather_positions(keys, positions), gather_positions(values, positions))
    return result
