"""TransformerLens 4.x backend: read K/V at the hook points of a `TransformerBridge`.

`prepare` wraps an already loaded Hugging Face causal LM in a `TransformerBridge` with
TransformerLens' own builder for pre-loaded modules
(`transformer_lens.model_bridge.sources.build_bridge_from_module`): same weights, no
conversion code of ours, no tokenizer and no hub access needed.

The bridge re-implements attention step by step so that every intermediate has a hook
point. `capture_kv` hooks the points that carry what the KV cache holds (SPEC section
3): keys after any key norm and after RoPE, and values, per KV head. Which hook point
that is depends on the architecture; `HOOKS` maps kvprobe's site kinds to it:

    rotary models (Llama, Mistral, Qwen2/3, OLMo-2/3)
        k -> blocks.{l}.attn.hook_rot_k   fires after q/k norm and RoPE
        v -> blocks.{l}.attn.hook_v       alias of blocks.{l}.attn.v.hook_out
    GPT-2 (learned absolute positions: no RoPE, no key norm)
        k -> blocks.{l}.attn.hook_k       alias of blocks.{l}.attn.k.hook_out
        v -> blocks.{l}.attn.hook_v

TransformerLens hands these hook functions its own layout, (B, T, n_kv_heads, d_head)
(the hook points carry a conversion from Hugging Face's head-major layout); the hooks
here transpose back and gather only the requested positions, so only (B, n_kv, P,
d_head) per site leaves the model. The forward stops after the deepest requested layer.

Not in the table: Phi-3/Phi-4. TransformerLens 4.3 wraps their fused-qkv attention in
`JointQKVPositionEmbeddingsAttentionBridge`, which has a `hook_rot_k` point but applies
RoPE without firing it; `hook_k` there is pre-RoPE. Use the nnsight or transformers
backend for them.

The memento mask: the bridge passes a 4D `attention_mask` straight to the Hugging Face
model, whose mask helpers return a 4D mask unchanged, and the bridge's attention adds it
to the scores in place of its own causal mask (`AttentionBridge.
_apply_reconstruct_attention_mask`: "HuggingFace-style 4D masks ... are treated as
authoritative"). A boolean 4D mask is converted to additive there; a FlexAttention
`BlockMask` is not understood, so this backend takes dense masks only.

Pitfall: building a bridge changes the Hugging Face model in place. Its attention (and
other) submodules are replaced by bridge components and its attention implementation is
switched to "eager" (TransformerLens' design; the weights are shared, not copied). The
model still computes the same function, but pass `copy.deepcopy(model)` to `prepare` if
the original module tree must stay untouched.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformer_lens.model_bridge.sources import build_bridge_from_module

from .backend_helpers import architecture_entry, check_layers, gather_positions

# whether this backend can take a FlexAttention BlockMask (the bridge adds a dense 4D mask to its scores; a BlockMask is not understood)
READS_BLOCK_MASK = False

__all__ = ["HOOKS", "capture_kv", "prepare"]

_ROTARY = {"k": "blocks.{layer}.attn.hook_rot_k", "v": "blocks.{layer}.attn.hook_v"}

# model_type -> {site kind: TransformerLens hook-point name}; '{layer}' is the block index
HOOKS: dict[str, dict[str, str]] = {
    "gpt2": {"k": "blocks.{layer}.attn.hook_k", "v": "blocks.{layer}.attn.hook_v"},
    "llama": _ROTARY,
    "mistral": _ROTARY,
    "olmo2": _ROTARY,
    "olmo3": _ROTARY,
    "qwen2": _ROTARY,
    "qwen3": _ROTARY,
}


def _hooks_for(model_type: str) -> dict[str, str]:
    return architecture_entry(HOOKS, model_type, "lens")


def prepare(model: Any) -> Any:
    """Wrap a loaded Hugging Face causal LM in a TransformerLens `TransformerBridge`.

    The bridge shares the model's weights and modifies the model in place (see the
    module docstring). Raises ValueError if the architecture is not in `HOOKS`.
    """
    _hooks_for(model.config.model_type)
    # adapters are keyed by the Hugging Face class name ("Qwen3ForCausalLM", ...)
    return build_bridge_from_module(model, type(model).__name__, hf_config=model.config)


@torch.no_grad()
def capture_kv(
    bridge: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    layers: Sequence[int],
    positions: torch.Tensor,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K and V of `layers` at `positions`, read at the bridge's hook points.

    input_ids (B, T); attention_mask: additive float (B, 1, T, T) mask (boolean works
    too; a FlexAttention BlockMask does not); position_ids (B, T); positions (B, P)
    absolute positions per row. Returns {layer: (K, V)}, each (B, n_kv, P, d_head).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4:
        raise TypeError(
            "kvprobe lens backend needs a dense 4D (B, 1, T, T) attention mask; "
            f"got {type(attention_mask).__name__} (the bridge re-implements attention eagerly)"
        )
    hooks = _hooks_for(bridge.original_model.config.model_type)
    n_layers = bridge.cfg.n_layers
    layers = check_layers(layers, n_layers)
    if not layers:
        return {}

    captured: dict[tuple[int, str], torch.Tensor] = {}

    def capture(layer: int, kind: str) -> Any:
        def hook(states: torch.Tensor, hook: Any) -> None:
            # TransformerLens layout (B, T, n_kv, d_head) -> head-major (B, n_kv, T, d_head)
            captured[(layer, kind)] = gather_positions(states.transpose(1, 2), positions)  # (B, n_kv, P, d_head)

        return hook

    hook_points = bridge.hook_dict  # every hook-point name, aliases included
    fwd_hooks = []
    for layer in layers:
        for kind, template in hooks.items():
            name = template.format(layer=layer)
            if name not in hook_points:
                raise ValueError(f"kvprobe lens backend: the bridge has no hook point {name!r}")
            fwd_hooks.append((name, capture(layer, kind)))

    stop = max(layers) + 1
    bridge.run_with_hooks(
        input_ids,
        fwd_hooks=fwd_hooks,
        return_type=None,
        stop_at_layer=stop if stop < n_layers else None,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    missing = [(layer, kind) for layer in layers for kind in hooks if (layer, kind) not in captured]
    if missing:
        raise RuntimeError(f"kvprobe lens backend: hook points did not fire for (layer, kind) {missing}")
    return {layer: (captured[(layer, "k")], captured[(layer, "v")]) for layer in layers}
