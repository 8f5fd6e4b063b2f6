"""Run a Hugging Face causal LM under a memento mask, safely.

Transformers passes a 4D `attention_mask` straight to the attention implementation.
That is what we want, with two traps (SPEC section 2): `eager` adds a *boolean* mask
as +1/0 (causality lost), and the flash-attention implementations ignore custom 4D
masks altogether. `masked_forward` therefore builds an additive float mask in the
model's dtype for `eager`/`sdpa`, a FlexAttention `BlockMask` for `flex_attention`,
and refuses anything else with a message naming the implementations that work.

Length. The dense mask is T x T: at 32K tokens 2 GiB in bf16 (4 in fp32) per row, built
in seconds. Above `DENSE_MASK_MAX_TOKENS` (8,192: 128 MiB per bf16 row) kvprobe builds no
dense mask: a model loaded with `flex_attention` gets the interval-built `BlockMask`
(milliseconds, O(T) memory), `flex_for_long` switches a model that supports
FlexAttention to it, and anything else is refused with one line naming the memory the
dense mask would take. Every mask is built on the device the model's inputs live on.

Sliding windows. A model whose layers slide (OLMo-3, Mistral, Qwen3 with `use_sliding_window`)
gets the window folded into the memento mask (`MaskTables.window`) wherever a forward is longer
than the window (`mask_windows`): one windowed mask when every layer slides, and for a model that
mixes full and sliding layers (`config.layer_types`) a dict {"full_attention": mask,
"sliding_attention": windowed mask}, which transformers' decoders (OLMo-3, Qwen2/3, Gemma, ...)
take as they are and route by each layer's kind. Anything else is refused by `check_window`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Any, Iterator, Sequence

import torch

from .layout import Layout, SpecialTokens, parse_batch
from .masks import MaskConfig, MaskTables, additive_mask, allow_from_tables, block_mask_from_tables, mask_tables
from ..errors import KVProbeError

__all__ = [
    "DENSE_MASK_IMPLEMENTATIONS",
    "DENSE_MASK_MAX_TOKENS",
    "attention_mask_from_tables",
    "check_length",
    "flex_shapes",
    "dense_mask_bytes",
    "flex_for_long",
    "UnsupportedAttentionError",
    "check_window",
    "mask_windows",
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
# the longest sequence given a dense (B, 1, T, T) mask; longer ones need FlexAttention's BlockMask
DENSE_MASK_MAX_TOKENS = 8192


class UnsupportedAttentionError(KVProbeError, ValueError):
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


_MASK_PER_KIND = re.compile(r"isinstance\(\s*(?:\w+\s*:=\s*)?attention_mask\s*,\s*dict\s*\)")
MASK_KINDS = ("full_attention", "sliding_attention")


@functools.lru_cache(maxsize=None)
def _forward_takes_dict(cls: type) -> bool:
    try:
        return bool(_MASK_PER_KIND.search(inspect.getsource(cls.forward)))
    except (OSError, TypeError):
        return False


def _takes_mask_per_kind(model: Any) -> bool:
    """Whether `model`'s decoder takes `attention_mask` as a dict {layer kind: mask} and hands each
    layer the mask of its kind (transformers' `causal_mask_mapping`, read from the decoder's source)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return any(_forward_takes_dict(type(m)) for m in (decoder, model) if isinstance(m, torch.nn.Module))


def _window_problem(model: Any) -> str | None:
    """Why a windowed memento mask cannot reach `model`'s sliding layers exactly, or None if it can."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window, layers = sliding_window_layers(model)
    if window is None or len(layers) == cfg.num_hidden_layers:
        return None  # no window, or one windowed mask for every layer
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if not kinds or not kinds <= set(MASK_KINDS):
        return (f"its layer kinds {sorted(kinds)} are not {' and '.join(MASK_KINDS)}, so kvprobe cannot tell "
                "which mask each layer takes")
    if not _takes_mask_per_kind(model):
        return (f"{type(model).__name__} mixes full and sliding layers but does not take an attention_mask per "
                "layer kind (a dict), so one mask would reach both")
    return None


def mask_windows(model: Any, length: int) -> dict[str | None, int | None]:
    """The masks a memento-masked forward of `length` tokens gives `model`, as {layer kind: window}:
    {None: None} one mask, no window (none, or `length` within it, where it hides nothing);
    {None: W} one mask windowed with W (every layer slides); {"full_attention": None,
    "sliding_attention": W} one mask per layer kind (passed as a dict). Refuses, with
    `check_window`'s line, a model whose layers the masks cannot reach exactly."""
    window, layers = sliding_window_layers(model)
    if window is None or length <= window:
        return {None: None}
    check_window(model, length)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if len(layers) == cfg.num_hidden_layers:
        return {None: window}
    return {"full_attention": None, "sliding_attention": window}


def check_window(model: Any, length: int) -> None:
    """Refuse a memento-masked forward of `length` tokens that a sliding window would make inexact.

    The window is folded into the memento mask (`mask_windows`): one windowed mask for a model whose
    layers all slide, one mask per layer kind for a model that mixes them and takes a dict. A model
    that mixes them any other way is refused above the window (within it the window hides nothing)."""
    window, layers = sliding_window_layers(model)
    if window is None or length <= window:
        return
    problem = _window_problem(model)
    if problem is not None:
        name = getattr(model.config, "model_type", type(model).__name__)
        raise UnsupportedAttentionError(
            f"{name}: layers {layers} use sliding-window attention (window {window}) and this forward is "
            f"{length} tokens long; {problem}: the windowed memento mask cannot reach those layers alone. "
            f"Capture sequences of at most {window} tokens")


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


def dense_mask_bytes(batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a dense additive (batch, 1, length, length) mask in `dtype`."""
    return batch * length * length * torch.empty((), dtype=dtype).element_size()


def _spread(model: Any) -> bool:
    """Dispatched over several devices (`device_map`): a BlockMask's tables live on one device and
    accelerate's hooks move tensors, not the mask function's closure, so such a model masks densely."""
    return len(set((getattr(model, "hf_device_map", None) or {0: 0}).values())) > 1


def _supports_flex(model: Any) -> bool:
    """Whether FlexAttention can run this model's memento mask: its architecture supports it
    (transformers' `_supports_flex_attn`) and it is not spread over devices."""
    return bool(getattr(model, "_supports_flex_attn", False)) and not _spread(model)


def _no_flex_reason(model: Any) -> str:
    if _spread(model):
        return f"{type(model).__name__} is spread over devices (device_map), where a BlockMask cannot follow"
    return f"{type(model).__name__} does not support FlexAttention"


@contextlib.contextmanager
def flex_for_long(model: Any, length: int) -> Iterator[str]:
    """Run a `length`-token memento-masked forward inside this; yields the attention
    implementation it runs with.

    Up to `DENSE_MASK_MAX_TOKENS` the model's own. Longer: `flex_attention`, switching a model
    loaded with `eager`/`sdpa` to it when its architecture supports FlexAttention (transformers'
    `_supports_flex_attn`), since the dense mask would be T x T, and switching it back on the
    way out, so shorter forwards after it keep the model's own kernel. A model that cannot
    switch is left as it is, and `attention_mask_from_tables` refuses the length."""
    impl = attention_implementation(model)
    switch = length > DENSE_MASK_MAX_TOKENS and impl in DENSE_MASK_IMPLEMENTATIONS and _supports_flex(model)
    if not switch:
        yield impl
        return
    model.set_attn_implementation("flex_attention")
    try:
        yield "flex_attention"
    finally:
        model.set_attn_implementation(impl)


def flex_shapes(model: Any, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context for a forward of `model` on `device`: on CPU under FlexAttention, every new length
    compiles with static shapes. transformers compiles FlexAttention once, and after a second
    length dynamo recompiles with dynamic shapes, which inductor's CPU FlexAttention template
    fails to compile (torch 2.13: "'cur_qSplitSize8' was not declared"); the recompile limit
    rises so that many trace lengths never fall back to eager FlexAttention, whose math path is
    T x T. Elsewhere (GPUs use the Triton template) nothing changes."""
    if torch.device(device).type != "cpu" or attention_implementation(model) not in FLEX_IMPLEMENTATIONS:
        return contextlib.nullcontext()
    from torch import _dynamo

    limit = "recompile_limit" if hasattr(_dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    return _dynamo.config.patch(automatic_dynamic_shapes=False, **{limit: 1024})


def check_length(model: Any, length: int, block_mask_ok: bool = True) -> None:
    """Refuse a memento-masked forward of `length` tokens that `model` cannot mask: a sliding window
    the mask does not carry (`check_window`), or, above `DENSE_MASK_MAX_TOKENS`, a dense T x T mask
    where FlexAttention cannot take over (the model neither runs nor supports it, or the caller,
    `block_mask_ok=False`, takes dense masks only). One line naming the memory the mask would take."""
    check_window(model, length)
    if length <= DENSE_MASK_MAX_TOKENS:
        return
    flex = attention_implementation(model) in FLEX_IMPLEMENTATIONS or _supports_flex(model)
    if flex and block_mask_ok:
        return
    why = "this capture backend takes dense masks only" if flex else _no_flex_reason(model)
    gib = dense_mask_bytes(1, length, model.dtype) / 2**30
    raise UnsupportedAttentionError(
        f"a {length}-token memento mask would be dense, {gib:.1f} GiB per sequence ({why}; above "
        f"{DENSE_MASK_MAX_TOKENS} tokens kvprobe uses FlexAttention): use at most {DENSE_MASK_MAX_TOKENS} tokens")


def attention_mask_from_tables(model: Any, tables: MaskTables, block_size: int = 128) -> Any:
    """The `attention_mask` a memento-masked forward of `model` takes, built from `tables` on
    their device: a FlexAttention `BlockMask` for `flex_attention` (interval-built, O(T)), else
    the additive (B, 1, T, T) float mask in the model's dtype (SPEC pitfall: never boolean),
    refused above `DENSE_MASK_MAX_TOKENS` with the memory it would take. A sliding window
    (`mask_windows`) is folded in: one windowed mask, or a dict of masks by layer kind; a model
    the window cannot reach exactly is refused there (`check_window`), for every caller."""
    windows = mask_windows(model, tables.shape[1])
    built = {w: _one_mask(model, tables.windowed(w), block_size) for w in dict.fromkeys(windows.values())}
    masks = {kind: built[w] for kind, w in windows.items()}
    return masks[None] if None in masks else masks


def _one_mask(model: Any, tables: MaskTables, block_size: int) -> Any:
    impl = attention_implementation(model)
    B, T = tables.shape
    if impl in FLEX_IMPLEMENTATIONS:
        return block_mask_from_tables(tables, block_size)
    if T > DENSE_MASK_MAX_TOKENS:
        need = dense_mask_bytes(B, T, model.dtype)
        flex = ("load it with attn_implementation='flex_attention'" if _supports_flex(model)
                else _no_flex_reason(model))
        raise UnsupportedAttentionError(
            f"a {T}-token memento mask for {impl!r} attention is dense: {need / 2**30:.1f} GiB for {B} row(s) "
            f"in {str(model.dtype).removeprefix('torch.')} (limit {DENSE_MASK_MAX_TOKENS} tokens); {flex}, "
            "or use fewer tokens")
    return additive_mask(allow_from_tables(tables), dtype=model.dtype)  # (B, 1, T, T), built in place


def _block_mask_rows(mask: Any, index: torch.Tensor) -> Any:
    """A BlockMask's rows picked by `index` (B,), the mask_mod's batch index remapped to them."""
    from torch.nn.attention.flex_attention import BlockMask

    inner = mask.mask_mod
    pick = lambda t: t[index]  # noqa: E731

    def mask_mod(b, h, q_idx, kv_idx):
        return inner(index[b], h, q_idx, kv_idx)

    return BlockMask.from_kv_blocks(pick(mask.kv_num_blocks), pick(mask.kv_indices), pick(mask.full_kv_num_blocks),
                                    pick(mask.full_kv_indices), BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=mask.seq_lengths)


def memento_inputs(
    model: Any,
    input_ids: torch.Tensor,
    layouts: Sequence[Layout],
    config: MaskConfig = MaskConfig(),
    attention_mask: torch.Tensor | None = None,
    truncate: bool = False,
) -> dict[str, Any]:
    """The `attention_mask` and `position_ids` keyword arguments for a memento-masked forward.

    input_ids: (B, T), on the device the mask is built on. Returns a float (B, 1, T, T) mask
    in the model's dtype, or a FlexAttention BlockMask for a model running flex_attention (for a
    model that mixes full and sliding layers, above the window: a dict of them by layer kind,
    `mask_windows`), and (B, T) position ids. A dense mask above `DENSE_MASK_MAX_TOKENS` is refused
    (`flex_for_long` switches a model that supports FlexAttention first). `truncate`: the layouts may reach beyond
    T (input_ids are the first T tokens of longer rows, as a capture that stops early passes).
    """
    T = input_ids.shape[1]
    device = input_ids.device
    distinct = list(dict.fromkeys(layouts))  # rows that share a layout share a mask: build each once
    mask = attention_mask_from_tables(model, mask_tables(distinct, T, config, device=device, truncate=truncate))
    if len(distinct) < len(layouts):
        row = {lay: u for u, lay in enumerate(distinct)}
        index = torch.tensor([row[lay] for lay in layouts], device=device)
        pick = lambda m: m[index] if isinstance(m, torch.Tensor) else _block_mask_rows(m, index)  # noqa: E731
        mask = {kind: pick(m) for kind, m in mask.items()} if isinstance(mask, dict) else pick(mask)  # (B, 1, T, T)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :T]
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
    truncate: bool = False,
    **forward_kwargs: Any,
) -> Any:
    """Forward `model` on input_ids (B, T) under the memento mask; returns the model's output.

    Give either parsed `layouts` or the `special` token ids to parse them from.
    `attention_mask` (B, T) marks real tokens of a padded batch. `truncate`: the layouts
    may reach beyond T (input_ids are the first T tokens of longer rows). Extra keyword
    arguments (use_cache, output_hidden_states, ...) go to the model.
    """
    if layouts is None:
        if special is None:
            raise ValueError("masked_forward needs either layouts or special token ids")
        layouts = parse_batch(input_ids, special, attention_mask, allow_unfinished=allow_unfinished)
    if len(layouts) != input_ids.shape[0]:
        raise ValueError(f"{len(layouts)} layouts for a batch of {input_ids.shape[0]} rows")
    kwargs = memento_inputs(model, input_ids, layouts, config, attention_mask, truncate)
    with flex_shapes(model, input_ids.device):
        return model(input_ids=input_ids, **kwargs, **forward_kwargs)
