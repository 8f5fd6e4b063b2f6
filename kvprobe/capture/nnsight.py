"""nnsight 0.8 backend: read K/V inside the attention forward with `.source`.

`prepare` wraps the already loaded Hugging Face model in `nnsight.NNsight`, the
generic wrapper for any `torch.nn.Module`. It needs no tokenizer and hands the trace's
keyword arguments to the model's forward unchanged. (`nnsight.LanguageModel` is
deprecated in 0.8 in favour of `TransformersModel`, which builds a `transformers`
pipeline and refuses a pre-loaded model without a tokenizer. `capture_kv` works with
any nnsight envoy wrapping the causal LM, those included.)

`capture_kv` runs one trace of the model's own forward (its own attention
implementation and mask handling) and reads operations inside each attention module's
forward through `Envoy.source`, which labels every call and assignment
`{name}_{occurrence}` (`print(envoy.source)` lists them). `SITES` maps each
architecture to those operations:

    Llama, Mistral, Qwen2, Qwen3 (model.layers.{l}.self_attn)
        k -> apply_rotary_pos_emb_0.output[1]   keys after k_norm (if any) and RoPE
        v -> value_states_0.output              `value_states = v_proj(x).view(..).transpose(1, 2)`
    OLMo-2/3, Phi-3/4 (model.layers.{l}.self_attn; flat k_norm or fused qkv_proj first)
        k -> apply_rotary_pos_emb_0.output[1]
        v -> value_states_1.output              the second `value_states = ...`, after the reshape
    GPT-2 (transformer.h.{l}.attn; no RoPE, no key norm)
        k -> key_states_2.output                self-attention branch,
        v -> value_states_2.output              `.view(shape_kv).transpose(1, 2)`

All of them are head-major (B, n_kv_heads, T, d_head), exactly what the forward then
hands to `past_key_values.update`. The labels are tied to the `transformers` source;
`capture_kv` checks they exist and says which are missing if a release renames them.

nnsight serves values in execution order and raises `OutOfOrderError` for a value the
model already ran past, so reads are issued layer by layer, and within a layer in the
order of the forward's operation list (`Source.names`). Each read is gathered to the
requested positions inside the trace, only the gathered (B, n_kv, P, d_head) tensors are
saved, and the trace stops right after the deepest requested layer.

The memento mask needs nothing special: `attention_mask` goes to the model's forward,
where transformers' mask helpers return a 4D mask as-is. `use_cache=False`: no cache of
the full sequence is built.

Pitfalls: importing nnsight mounts a `.save` method on every Python object (its C
extension; `CONFIG.APP.PYMOUNT`), which makes anyio classes defined afterwards fail
("Attribute 'save' is missing its type annotation"): import anyio's backends first if
the process needs them. This module saves with `nnsight.save(value)`, which works with
or without the mount. Wrapping installs nnsight's controller as each module's forward, and reading
`.source` rewrites the attention forward permanently. Both are inert outside a trace
(the model computes the same function), but the module is changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from nnsight import NNsight, save

from .backend_helpers import architecture_entry, check_layers, gather_positions

# whether this backend can take a FlexAttention BlockMask (nnsight runs the Hugging Face model as it is, FlexAttention included)
READS_BLOCK_MASK = True

__all__ = ["SITES", "AttentionSites", "Read", "capture_kv", "prepare"]


@dataclass(frozen=True)
class Read:
    """The output of operation `op` in an attention module's `.source`; `item` picks one
    element of a tuple output (None: the output itself)."""

    op: str
    item: int | None = None


@dataclass(frozen=True)
class AttentionSites:
    """Where layer `{layer}`'s attention module sits and which operations carry K and V."""

    attention: str  # envoy path, '{layer}' is the block index
    k: Read
    v: Read


_ROPE_KEYS = Read("apply_rotary_pos_emb_0", item=1)  # (query_states, key_states)[1]
_LLAMA_STYLE = AttentionSites("model.layers.{layer}.self_attn", k=_ROPE_KEYS, v=Read("value_states_0"))
_RESHAPE_AFTER = AttentionSites("model.layers.{layer}.self_attn", k=_ROPE_KEYS, v=Read("value_states_1"))

# model_type -> where K and V live inside the model's attention forward
SITES: dict[str, AttentionSites] = {
    "gpt2": AttentionSites("transformer.h.{layer}.attn", k=Read("key_states_2"), v=Read("value_states_2")),
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "olmo2": _RESHAPE_AFTER,
    "olmo3": _RESHAPE_AFTER,
    "phi3": _RESHAPE_AFTER,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
}


def _sites_for(model_type: str) -> AttentionSites:
    return architecture_entry(SITES, model_type, "nnsight")


def prepare(model: Any) -> Any:
    """Wrap a loaded Hugging Face causal LM in `nnsight.NNsight` (in place, see module doc).

    Raises ValueError if the architecture is not in `SITES`.
    """
    _sites_for(model.config.model_type)
    return NNsight(model)


def _plan(wrapped: Any, sites: AttentionSites, layers: list[int]) -> list[tuple[int, str, Any, int | None]]:
    """(layer, kind, source operation, tuple item) for every read, in execution order."""
    plan = []
    for layer in layers:
        source = wrapped.get(sites.attention.format(layer=layer)).source
        reads = {"k": sites.k, "v": sites.v}
        missing = [read.op for read in reads.values() if read.op not in source.names]
        if missing:
            raise ValueError(
                f"kvprobe nnsight backend: {sites.attention.format(layer=layer)}.source has no operation "
                f"{', '.join(missing)} (this transformers release changed the attention forward; "
                "print(envoy.source) and update SITES)"
            )
        for kind in sorted(reads, key=lambda kind: source.names.index(reads[kind].op)):
            plan.append((layer, kind, source.node(reads[kind].op), reads[kind].item))
    return plan


@torch.no_grad()
def capture_kv(
    wrapped: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    layers: Sequence[int],
    positions: torch.Tensor,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K and V of `layers` at `positions`, read inside the attention forward.

    input_ids (B, T); attention_mask: additive (B, 1, T, T) float mask (or BlockMask,
    for a model running flex_attention); position_ids (B, T); positions (B, P)
    absolute positions per row. Returns {layer: (K, V)}, each (B, n_kv, P, d_head).
    """
    config = wrapped._module.config
    sites = _sites_for(config.model_type)
    layers = check_layers(layers, config.num_hidden_layers)
    if not layers:
        return {}
    plan = _plan(wrapped, sites, layers)

    captured: dict[tuple[int, str], torch.Tensor] = {}
    with wrapped.trace(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ) as tracer:
        for layer, kind, operation, item in plan:
            states = operation.output if item is None else operation.output[item]  # (B, n_kv, T, d_head)
            captured[(layer, kind)] = save(gather_positions(states, positions))  # (B, n_kv, P, d_head)
        tracer.stop()  # nothing past the deepest requested layer is needed
    return {layer: (captured[(layer, "k")], captured[(layer, "v")]) for layer in layers}
