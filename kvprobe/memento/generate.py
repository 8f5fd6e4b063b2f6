"""A reference generator that physically compacts the KV cache, as a Memento server does.

The dense path (`kvprobe.memento.forward.masked_forward`) runs a whole sequence at once under a
memento mask. A serving engine instead generates token by token and, when a block's
memento is complete, evicts that block's KV entries from the cache. SPEC section 2 makes
the two paths a contract: they must give the same KV states and logits. This module is
the compacting path, written for clarity rather than speed, on any transformers causal
LM with `eager` or `sdpa` attention:

- every token keeps its original position id; positions never shift after an eviction,
  so the cache holds keys at non-contiguous positions (`GenerationResult.kept_positions`);
- each forward gets an explicit additive float mask over exactly the keys in the cache,
  rows taken from the same predicate as the dense mask (`kvprobe.memento.masks`);
- when `<|summary_end|>` is produced (or teacher-forced), every key that no later query
  may see under `MaskConfig` is dropped from every layer (index_select on the sequence
  axis): completed blocks' content (older than the `keep_last_n_blocks` most recent),
  with their delimiters when `mask_delimiters` is set;
- restart mode, as the Memento vLLM fork does it: the memento is generated with its block
  visible, then, once `<|summary_end|>` is in, its tokens (`<|summary_start|>` ..
  `<|summary_end|>`) are re-prefilled against the compacted cache without access to any
  block, their new KV replaces the old, and generation continues from the new logits.

One sequence at a time (B = 1). Sliding-window and other non-`DynamicLayer` caches are
refused. See docs/generation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .forward import (
    DENSE_MASK_IMPLEMENTATIONS,
    attention_implementation,
    cache_argument,
    input_device,
    sliding_window_layers,
)
from .layout import Layout, LayoutError, SpecialTokens, parse_layout
from .masks import MaskConfig, additive_mask, flex_mask_mod

__all__ = ["GenerationResult", "evictable_positions", "generate_with_compaction"]


@dataclass
class GenerationResult:
    """What `generate_with_compaction` produced.

    ids:            (T,) long, every token; index = original position id (prompt first)
    prompt_length:  number of prompt tokens at the start of `ids`
    kept_positions: (K,) long, ascending: the positions whose KV the final cache holds, in
                    cache order (cache slot s holds position kept_positions[s])
    cache:          the final `DynamicCache`; layer l holds keys/values (1, n_kv, K, d_head)
    logits:         (T, V) float32 on CPU, or None with keep_logits=False. Row p is the
                    next-token distribution after position p as the generator used it
                    (row T-1 predicts a token that was never generated). In restart mode the
                    row of each <|summary_end|> comes from the re-prefill; rows inside a
                    memento (<|summary_start|> .. before <|summary_end|>) are the
                    generation-time ones, computed with the block visible.
    stop_reason:    "max_new_tokens", "eos", or "invalid structure: ..." when the model chose
                    a token that breaks Memento structure (that token is not kept)
    """

    ids: torch.Tensor
    prompt_length: int
    kept_positions: torch.Tensor
    cache: DynamicCache
    logits: torch.Tensor | None
    special: SpecialTokens
    config: MaskConfig
    stop_reason: str

    @property
    def new_ids(self) -> torch.Tensor:
        """(T - prompt_length,) the generated (or teacher-forced) tokens."""
        return self.ids[self.prompt_length :]

    @property
    def layout(self) -> Layout:
        """Memento structure of `ids` (the last block may be unfinished)."""
        return parse_layout(self.ids, self.special, allow_unfinished=True)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each (1, n_kv, K, d_head), slot s at kept_positions[s]."""
        cached = self.cache.layers[layer]
        return cached.keys, cached.values


def evictable_positions(layout: Layout, config: MaskConfig) -> list[int]:
    """Positions whose KV no query after the layout's last token may see, ascending.

    Under the base rule (SPEC section 2) a key in content(i) is hidden from query q once
    block i is older than the `keep_last_n_blocks` most recent blocks completed before q.
    That set only grows with q, so these keys can be dropped for good. Restart mode hides
    more, but only from memento queries, and only while they are computed: it never makes
    a key evictable by itself.
    """
    if config.keep_last_n_blocks < 0:
        return []
    completed = [b for b in layout.blocks if b.completed]  # blocks complete in order: a prefix
    stale = completed[: max(len(completed) - config.keep_last_n_blocks, 0)]
    out: list[int] = []
    for b in stale:
        out.extend(b.content)
        if config.mask_delimiters:
            out.extend(b.delimiters)
    return sorted(out)


class _CompactingRun:
    """The state of one generation: token ids, the cache, and which position each slot holds."""

    def __init__(self, model: Any, special: SpecialTokens, config: MaskConfig, keep_logits: bool) -> None:
        self.model = model
        self.special = special
        self.config = config
        self.base = replace(config, restart_mode=False)  # rows used while tokens are generated
        self.keep_logits = keep_logits
        self.device = input_device(model)
        self.cache = DynamicCache(config=model.config)
        if not all(type(layer) is DynamicLayer for layer in self.cache.layers):
            kinds = sorted({type(layer).__name__ for layer in self.cache.layers})
            raise ValueError(f"generate_with_compaction needs a cache of plain DynamicLayer, this model uses {kinds}")
        self.ids: list[int] = []
        self.kept: list[int] = []  # position held by each cache slot, ascending
        self.logits: list[torch.Tensor] = []  # one (V,) row per position, on CPU
        self.last: torch.Tensor | None = None  # (V,) logits after the newest token
        self.prefill_end: list[int] | None = None  # [prompt length] under config.prefill_causal
        self.prompt_pending = False  # prefill_causal: the prompt's blocks await the first generated token

    def layout(self) -> Layout:
        return parse_layout(self.ids, self.special, allow_unfinished=True)

    @torch.no_grad()
    def forward(self, layout: Layout, start: int, config: MaskConfig) -> torch.Tensor:
        """Run the tokens at positions start..len(ids)-1 as queries over the cache plus
        themselves, append their KV to the cache. Returns their logits (Q, V).

        `layout` is the structure of `ids`; the mask rows are the dense mask's rows for the
        queries, restricted to the keys the cache holds.
        """
        stop = len(self.ids)
        queries = torch.arange(start, stop)  # (Q,)
        keys = torch.tensor(self.kept + list(range(start, stop)))  # (K + Q,), cache order
        # the dense predicate evaluated on (query, key) index grids, as kvprobe.memento.masks builds it
        allowed = flex_mask_mod([layout], stop, config, prefill_end=self.prefill_end)(torch.tensor(0), None, queries[:, None], keys[None, :])
        mask = additive_mask(allowed[None, None], dtype=self.model.dtype).to(self.device)  # (1, 1, Q, K + Q)
        out = self.model(
            input_ids=torch.tensor([self.ids[start:stop]], device=self.device),
            position_ids=queries[None].to(self.device),
            attention_mask=mask,
            **{cache_argument(self.model): self.cache},
            use_cache=True,
        )
        self.kept.extend(range(start, stop))
        return out.logits[0].float().cpu()  # (Q, V)

    def compact(self, drop: set[int]) -> None:
        """Remove the cache slots holding positions in `drop`, in every layer."""
        slots = [s for s, p in enumerate(self.kept) if p not in drop]
        if len(slots) == len(self.kept):
            return
        index = torch.tensor(slots)
        for layer in self.cache.layers:  # layers may sit on different devices under a device map
            layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.to(layer.values.device))
        self.kept = [self.kept[s] for s in slots]

    def record(self, logits: torch.Tensor) -> None:
        """Store logits (Q, V) for the newest Q positions."""
        self.last = logits[-1]
        if self.keep_logits:
            self.logits.extend(logits.unbind(0))

    def prefill(self, prompt: list[int]) -> None:
        """The prompt in one forward, under the full config (restart rows included): exactly
        the dense forward's rows for those positions. Then drop what is already stale."""
        self.ids.extend(prompt)
        layout = self.layout()
        if self.config.prefill_causal:  # the fork's prefill: causal, prompt blocks evicted at the first new token
            self.prefill_end = [len(prompt)]
            self.prompt_pending = True
        self.record(self.forward(layout, 0, self.config))
        if not self.prompt_pending:
            self.compact(set(evictable_positions(layout, self.config)))

    def step(self, token: int) -> None:
        """Append one token, run it, and compact (and restart-recompute) if it ends a memento.

        Raises LayoutError, leaving the run unchanged, if the token breaks Memento structure.
        """
        self.ids.append(token)
        try:
            layout = self.layout()
        except LayoutError:
            self.ids.pop()
            raise
        position = len(self.ids) - 1
        if self.prompt_pending:  # the first generated token: compact the prompt's blocks before its KV
            self.compact(set(evictable_positions(parse_layout(self.ids[:-1], self.special, allow_unfinished=True),
                                                 self.config)))
            self.prompt_pending = False
        self.record(self.forward(layout, position, self.base))
        if token != self.special.summary_end:
            return
        drop = set(evictable_positions(layout, self.config))
        if not self.config.restart_mode:
            self.compact(drop)
            return
        # restart: drop the memento's generation-time KV too, then re-prefill it blind to blocks
        memento = layout.blocks[-1].memento  # <|summary_start|> .. this <|summary_end|>
        self.compact(drop | set(memento))
        recomputed = self.forward(layout, memento.start, self.config)  # (len(memento), V)
        self.last = recomputed[-1]
        if self.keep_logits:
            self.logits[position] = recomputed[-1]


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or sampled next token from logits (V,)."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _as_id_list(ids: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{name}: one sequence of shape (T,) or (1, T) (B = 1 only), got {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


def _refuse_unmodelled(model: Any, config: MaskConfig) -> None:
    """Refuse what the generator does not model: the fork's timing options, masks the model would ignore,
    sliding-window attention."""
    fork_only = [f for f in ("evict_before_summary_end", "restart_sees_kept_blocks", "keep_last_block_for_answer")
                 if getattr(config, f)]
    if fork_only:
        raise ValueError(f"the reference generator compacts after <|summary_end|>'s KV is computed (kvprobe's base "
                         f"rule); the fork's {', '.join(fork_only)} is a mask option for teacher-forced passes "
                         "only, not modelled here")
    attention_implementation(model, DENSE_MASK_IMPLEMENTATIONS, "generate_with_compaction builds dense float masks")
    window, windowed = sliding_window_layers(model)
    if window is not None:
        raise ValueError(f"generate_with_compaction does not support sliding-window attention (layers {windowed}, "
                         f"window {window})")


def _forced_tokens(forced_ids: Sequence[int] | torch.Tensor | None,
                   max_new_tokens: int | None) -> tuple[list[int], int]:
    """The teacher-forced tokens (F,) and the number of new tokens, which defaults to F."""
    forced = _as_id_list(forced_ids, "forced_ids") if forced_ids is not None else []
    if max_new_tokens is None:
        if forced_ids is None:
            raise ValueError("give max_new_tokens (or forced_ids, whose length is then the default)")
        max_new_tokens = len(forced)
    if max_new_tokens < len(forced):
        raise ValueError(f"max_new_tokens={max_new_tokens} is shorter than forced_ids ({len(forced)} tokens)")
    return forced, max_new_tokens


def _decode(run: _CompactingRun, forced: list[int], max_new_tokens: int, temperature: float,
            generator: torch.Generator | None, stop_ids: set[int]) -> str:
    """Step `run` through the forced tokens, then freely chosen ones; returns why it stopped."""
    for i in range(max_new_tokens):
        if i < len(forced):
            try:
                run.step(forced[i])
            except LayoutError as e:
                raise LayoutError(f"forced_ids[{i}] breaks Memento structure: {e}") from None
            continue
        assert run.last is not None
        token = _choose(run.last, temperature, generator)
        try:
            run.step(token)
        except LayoutError as e:  # the model broke the structure: stop before that token
            return f"invalid structure: {e}"
        if token in stop_ids:
            return "eos"
    return "max_new_tokens"


def generate_with_compaction(
    model: Any,
    prompt_ids: Sequence[int] | torch.Tensor,
    special: SpecialTokens,
    config: MaskConfig = MaskConfig(),
    *,
    max_new_tokens: int | None = None,
    forced_ids: Sequence[int] | torch.Tensor | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_ids: Sequence[int] = (),
    keep_logits: bool = True,
) -> GenerationResult:
    """Generate from `model` with memento attention and physical KV compaction (B = 1).

    prompt_ids: (T0,) or (1, T0). The prompt runs in one forward under the dense mask rows
    (with `config.prefill_causal`, the fork's way: causally, its completed blocks compacted
    just before the first generated token's forward), then tokens are produced one at a time; every token (the last included) is run through
    the model, so the cache and `logits` cover the whole sequence.

    forced_ids: (F,) teacher-forces the first F new tokens (a full Memento sequence can be
    replayed token by token); generation continues freely after them up to
    `max_new_tokens`, which defaults to F. temperature 0 is greedy; above 0 samples from
    softmax(logits / temperature) with a CPU generator seeded by `seed`. Free generation
    stops after producing a token in `eos_token_ids`, or before a token that would break
    Memento structure (a second <|block_start|> inside a block, say): the mask is only
    defined on valid structure. A forced token that breaks it raises LayoutError.
    """
    _refuse_unmodelled(model, config)
    prompt = _as_id_list(prompt_ids, "prompt_ids")
    if not prompt:
        raise ValueError("prompt_ids is empty: the generator needs at least one token to condition on")
    forced, max_new_tokens = _forced_tokens(forced_ids, max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop_ids = set(int(i) for i in eos_token_ids)

    run = _CompactingRun(model, special, config, keep_logits)
    run.prefill(prompt)
    stop_reason = _decode(run, forced, max_new_tokens, temperature, generator, stop_ids)
    return GenerationResult(
        ids=torch.tensor(run.ids, dtype=torch.long),
        prompt_length=len(prompt),
        kept_positions=torch.tensor(run.kept, dtype=torch.long),
        cache=run.cache,
        logits=torch.stack(run.logits) if keep_logits else None,
        special=special,
        config=config,
        stop_reason=stop_reason,
    )
