"""Transformers backend: read K/V from the cache the model's own forward pass returns.

The cache holds exactly what SPEC section 3 calls "KV states": keys after RoPE and any
key norm, and values, per KV head. This backend is the reference the others are
checked against. It can also set KV (`forward_patched`): the causal experiments'
interchange and ablation run through it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from ..memento.forward import cache_argument
from .backend_helpers import gather_positions


def _keep_every_position(cache: DynamicCache) -> None:
    """Make a cache's sliding-window layers keep every position: transformers' sliding layer stores only
    the last window - 1 tokens (attention still gets them all, and the memento mask holds the window),
    but a capture reads K/V at absolute positions from the cache after the forward."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            layers[i] = DynamicLayer()

# whether this backend can take a FlexAttention BlockMask (the model runs its own attention, FlexAttention included)
READS_BLOCK_MASK = True

__all__ = ["KVPatch", "PatchingCache", "StoppingCache", "capture_kv", "forward_patched", "prepare"]


def prepare(model: Any) -> Any:
    """Nothing to wrap: the backend runs the Hugging Face model itself."""
    return model


class _Stop(Exception):
    """Raised by `StoppingCache` once the deepest captured layer has stored its K/V."""


class StoppingCache(DynamicCache):
    """A `DynamicCache` that ends the forward pass as soon as layer `last` has stored its K/V.

    A layer's K/V depend on the layers below it only, so the rest of that layer (its attention
    and MLP), the layers above it, the final norm and the head are never run. Capturing the
    toy's last layer skips about a fifth of every forward; a sweep of an early layer of a deep
    model skips almost all of it. A model that never routes layer `last` through
    `Cache.update` simply runs to the end.
    """

    def __init__(self, last: int, config: Any = None) -> None:
        super().__init__(config=config)
        _keep_every_position(self)
        self.last = last

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.last:
            raise _Stop
        return out


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
    """K and V of `layers` at `positions`, from a forward that stops after the deepest of them.

    input_ids (B, T); attention_mask: additive (B, 1, T, T) float mask (or BlockMask);
    position_ids (B, T); positions (B, P) absolute positions per row.
    Returns {layer: (K, V)}, each (B, n_kv, P, d_head).
    """
    cache = StoppingCache(max(layers), config=model.config)
    # should a model run to the end after all, its (B, T, vocab) logits (GBs at 32K tokens) stay unmade
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
              **{cache_argument(model): cache}, **extra)
    except _Stop:
        pass
    result = {}
    for layer in layers:
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (B, n_kv, T, d_head)
        result[layer] = (gather_positions(keys, positions), gather_positions(values, positions))
    return result


@dataclass(frozen=True)
class KVPatch:
    """New K and V for some positions of one layer, as the cache holds them (K post-RoPE).

    positions (B, P) absolute positions per row; keys, values (B, n_kv, P, d_head).
    """

    layer: int
    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class PatchingCache(DynamicCache):
    """A `DynamicCache` that writes patched K/V over the model's own as each layer stores
    them, so every later query of that layer (and so every later layer) reads the patch.

    transformers' attention layers all route their K/V through `Cache.update` and attend
    what it returns; overriding it sets KV for any architecture without per-model hooks.
    """

    def __init__(self, patches: Sequence[KVPatch], config: Any = None) -> None:
        super().__init__(config=config)
        _keep_every_position(self)
        self.patches = {p.layer: p for p in patches}
        if len(self.patches) != len(patches):
            raise ValueError("one patch per layer: merge the positions of a layer into one KVPatch")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        patch = self.patches.get(layer_idx)
        if patch is not None:  # (B, n_kv, T, d_head): scatter the patch at its positions
            index = patch.positions.to(key_states.device)[:, None, :, None].expand(
                -1, key_states.shape[1], -1, key_states.shape[3])
            key_states = key_states.scatter(2, index, patch.keys.to(key_states))
            value_states = value_states.scatter(2, index, patch.values.to(value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def forward_patched(
    model: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    patches: Sequence[KVPatch] = (),
) -> tuple[torch.Tensor, Any]:
    """One forward with the K/V of some (layer, positions) replaced: (logits (B, T, vocab),
    the cache it filled, patched entries included). No patches: the plain forward.

    input_ids (B, T); attention_mask additive (B, 1, T, T) (or a BlockMask); position_ids (B, T).
    """
    cache = PatchingCache(patches, config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                **{cache_argument(model): cache}, use_cache=True)
    return out.logits, cache
