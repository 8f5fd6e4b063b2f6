"""Run a Hugging Face causal LM under a memento mask, safely.

Transformers passes a 4D `attention_mask` straight to the attention implementation.
That is what we want, with two traps (SPEC section 2): `eager` adds a *boolean* mask
as +1/0 (causality lost), and the flash-attention implementations ignore custom 4D
masks altogether. `masked_forward` therefore builds an additive float mask in the
model's dtype for `eager`/`sdpa`, a FlexAttention `BlockMask` for `flex_attention`,
and refuses anything else with a message naming the implementations that work.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from .layout import Layout, SpecialTokens, parse_batch
from .masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask

__all__ = [
    "DENSE_MASK_IMPLEMENTATIONS",
    "UnsupportedAttentionError",
    "check_window",
    "sliding_window_layers",
    "attention_implementation",
    "cache_argument",
    "check_implementation",
    "input_device",
    "masked_forward",
    "memento_inputs",
]

# attention implementations that honour an additive float (B, 1, T, T) mask
DENSE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")
FLEX_IMPLEMENTATIONS = ("flex_attention",)


class UnsupportedAttentionError(ValueError):
    """The model's attention implementation would ignore or mis-read a memento mask."""


def check_implementation(impl: str, allowed: tuple[str, ...] = DENSE_MASK_IMPLEMENTATIONS + FLEX_IMPLEMENTATIONS,
                         who: str = "a memento mask needs a 4D mask") -> str:
    """`impl` if it is in `allowed`, else UnsupportedAttentionError saying `who` needs what and why.
    The one check every masked computation (forward, generation, SFT stage 2) makes."""
    if impl not in allowed:
        raise UnsupportedAttentionError(
            f"{who}: attention implementation {impl!r} ignores custom 4D masks; load the model with "
            f"attn_implementation in {allowed} ('sdpa' on CPU, 'flex_attention' for long sequences on GPU)"
        )
    return impl


def attention_implementation(model: Any, allowed: tuple[str, ...] = DENSE_MASK_IMPLEMENTATIONS + FLEX_IMPLEMENTATIONS,
                             who: str = "a memento mask needs a 4D mask") -> str:
    """The model's attention implementation, checked by `check_implementation`."""
    return check_implementation(getattr(model.config, "_attn_implementation", None) or "eager", allowed, who)


def sliding_window_layers(model: Any) -> tuple[int | None, list[int]]:
    """(window, layers) of a model's sliding-window attention layers, or (None, []) if it has none.

    transformers 5 names each layer's kind in `config.layer_types` ('sliding_attention' for
    OLMo-3, Gemma, ...); older configs (Mistral) set `sliding_window` for every layer, and
    Qwen2/3 only with `use_sliding_window`."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None, []
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None:
        layers = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    elif getattr(cfg, "use_sliding_window", True):
        layers = list(range(cfg.num_hidden_layers))
    else:
        layers = []
    return (int(window), layers) if layers else (None, [])


def check_window(model: Any, length: int) -> None:
    """Refuse a memento-masked forward of `length` tokens that a sliding window would change.

    kvprobe's memento mask carries no window yet, so a layer with one would see keys beyond it.
    Sequences no longer than the window are exact (the window then hides nothing)."""
    window, layers = sliding_window_layers(model)
    if window is not None and length > window:
        name = getattr(model.config, "model_type", type(model).__name__)
        raise UnsupportedAttentionError(
            f"{name}: layers {layers} use sliding-window attention (window {window}) and this forward is "
            f"{length} tokens long; kvprobe's memento mask does not fold the window in yet, so those layers "
            f"would see keys beyond it. Capture sequences of at most {window} tokens")


def input_device(model: Any) -> torch.device:
    """The device a model's input ids go to: where its input embedding runs.

    For a model dispatched over several devices (`from_pretrained(device_map=...)`),
    that is the embedding's execution device, which accelerate records on the module's
    hook (its weights may sit on "meta" when offloaded); otherwise the weight's device.
    """
    embedding = model.get_input_embeddings()
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
    return embedding.weight.device


def position_ids_for(attention_mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe). (B, T)"""
    if attention_mask is None:
        return torch.arange(shape[1], device=device).expand(shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache by: `cache` (transformers >= 5.x, where
    `past_key_values` is deprecated and warns), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def memento_inputs(
    model: Any,
    input_ids: torch.Tensor,
    layouts: Sequence[Layout],
    config: MaskConfig = MaskConfig(),
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The `attention_mask` and `position_ids` keyword arguments for a memento-masked forward.

    input_ids: (B, T). Returns a float (B, 1, T, T) mask in the model's dtype (or a
    FlexAttention BlockMask) and (B, T) position ids.
    """
    impl = attention_implementation(model)
    T = input_ids.shape[1]
    check_window(model, T)
    device = input_ids.device
    if impl in FLEX_IMPLEMENTATIONS:
        mask: Any = flex_block_mask(layouts, T, config, device=device)
    else:
        mask = additive_mask(allow_matrix(layouts, T, config, device=device), dtype=model.dtype)  # built in place
    return {"attention_mask": mask, "position_ids": position_ids_for(attention_mask, input_ids.shape, device)}


def masked_forward(
    model: Any,
    input_ids: torch.Tensor,
    *,
    special: SpecialTokens | None = None,
    layouts: Sequence[Layout] | None = None,
    config: MaskConfig = MaskConfig(),
    attention_mask: torch.Tensor | None = None,
    allow_unfinished: bool = False,
    **forward_kwargs: Any,
) -> Any:
    """Forward `model` on input_ids (B, T) under the memento mask; returns the model's output.

    Give either parsed `layouts` or the `special` token ids to parse them from.
    `attention_mask` (B, T) marks real tokens of a padded batch. Extra keyword
    arguments (use_cache, output_hidden_states, ...) go to the model.
    """
    if layouts is None:
        if special is None:
            raise ValueError("masked_forward needs either layouts or special token ids")
        layouts = parse_batch(input_ids, special, attention_mask, allow_unfinished=allow_unfinished)
    if len(layouts) != input_ids.shape[0]:
        raise ValueError(f"{len(layouts)} layouts for a batch of {input_ids.shape[0]} rows")
    kwargs = memento_inputs(model, input_ids, layouts, config, attention_mask)
    return model(input_ids=input_ids, **kwargs, **forward_kwargs)
