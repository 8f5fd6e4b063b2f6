"""The Memento vLLM fork's KV cache, simulated token by token from its code, for testing masks.

A second, independent reference beside `reference_mask.py` (which restates SPEC section 2):
this one ports the fork's block tracking (microsoft/memento, `vllm/vllm/v1/core/block_masking/`
`processor.py` `process_token` and `tracker.py` `BlockMaskingState`/`BlockInfo`) and replays a
sequence through a simulated KV cache:

- each token is first "sampled" and passed to `process_token`, which may return a range to
  evict; the eviction happens before the token's own KV is computed (the fork compacts on the
  sampled <|summary_end|>);
- in restart mode an eviction also rewinds to the memento's <|summary_start|>: every cached
  position from there up to the current token is re-prefilled against the cache as it now is;
- then the token's KV is computed: it sees every cached position up to itself.

What a token "sees" is the set of cached positions when its KV was last computed; the
allow-matrix is that set per row. Nothing from kvprobe is used but the token ids; the
configuration is the fork's own keys (`keep_last_n_blocks`, `mask_delimiters`, `restart_mode`,
`keep_last_block_for_answer`, with `compact_on_summary_end` on and no assistant-section
filter, so every token is tracked as if generated).

With `prompt_length` P, positions before P are a prompt as the fork's scheduler serves it:
tracked by `process_prompt_tokens` (no compaction) and prefilled causally; at the first
generated token (position P), before it is processed, `_update_request_with_output` runs
`get_compaction_range(keep_last_n_blocks)` until it returns None, evicting each range
(memento mode only: the restart rewind over prompt blocks is not replayed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["fork_allow"]


@dataclass
class _Block:  # tracker.BlockInfo
    start: int
    end: int | None = None
    summary_start: int | None = None
    summary_end: int | None = None

    @property
    def complete(self) -> bool:
        return self.end is not None and self.summary_end is not None

    def evict_range(self, mask_delimiters: bool, restart_mode: bool) -> range:
        if restart_mode or mask_delimiters:  # get_restart_range ignores mask_delimiters
            return range(self.start, self.end + 1)
        return range(self.start + 1, self.end)  # get_content_range(mask_delimiters=False)


@dataclass
class _State:  # tracker.BlockMaskingState, the parts block masking uses
    blocks: list[_Block] = field(default_factory=list)
    open_blocks: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    summary_of: int | None = None  # the block whose summary is open

    def compaction(self, keep: int, mask_delimiters: bool, restart_mode: bool) -> tuple[int, range] | None:
        """get_compaction_range: the oldest pending block once more than `keep` are pending."""
        if keep < 0 or len(self.pending) <= keep:
            return None
        i = self.pending.pop(0)
        return i, self.blocks[i].evict_range(mask_delimiters, restart_mode)


def _process_token(state: _State, tok: int, pos: int, special, keep: int, mask_delimiters: bool,
                   restart_mode: bool, keep_last_block_for_answer: bool,
                   prompt: bool = False) -> tuple[range, int | None] | None:
    """processor.process_token: (range to evict, position to rewind to in restart mode) or None.
    prompt: processor.process_prompt_tokens, which tracks the same boundaries and never compacts."""
    deferred = (keep_last_block_for_answer and keep == 0) or prompt
    hit = None
    if tok == special.block_start:
        if deferred and not prompt and state.pending:  # a new block: the deferred one was not the last, flush it
            hit = state.compaction(0, mask_delimiters, restart_mode)
            if hit is not None:
                rewind = state.blocks[hit[0]].summary_start if restart_mode else None
                hit = (hit[1], rewind)
        state.blocks.append(_Block(start=pos))
        state.open_blocks.append(len(state.blocks) - 1)
    elif tok == special.block_end:
        if state.open_blocks:
            state.blocks[state.open_blocks.pop()].end = pos
    elif tok == special.summary_start:
        for i in reversed(range(len(state.blocks))):  # the most recently closed block without a summary
            blk = state.blocks[i]
            if blk.end is not None and blk.summary_start is None:
                blk.summary_start, state.summary_of = pos, i
                break
    elif tok == special.summary_end:
        i = state.summary_of
        if i is not None:
            state.blocks[i].summary_end, state.summary_of = pos, None
            if state.blocks[i].complete:
                state.pending.append(i)
            if not deferred:
                got = state.compaction(keep, mask_delimiters, restart_mode)
                if got is not None:  # restart: rewind to the summary that just ended
                    hit = (got[1], state.blocks[i].summary_start if restart_mode else None)
    return hit


def fork_allow(ids: list[int], special, *, keep_last_n_blocks: int, mask_delimiters: bool, restart_mode: bool,
               keep_last_block_for_answer: bool = False, prompt_length: int | None = None) -> torch.Tensor:
    """allow[q, k]: key k was in the fork's KV cache when q's KV was (last) computed. (T, T) bool."""
    if prompt_length is not None and (restart_mode or keep_last_block_for_answer):
        raise NotImplementedError("the prompt replay covers memento mode only")
    T = len(ids)
    state, cache = _State(), []  # cache: the cached positions, in order
    seen: dict[int, set[int]] = {}
    for pos, tok in enumerate(ids):
        if pos == prompt_length:  # scheduler._update_request_with_output: the prompt's compactions, then the token
            while (got := state.compaction(keep_last_n_blocks, mask_delimiters, restart_mode)) is not None:
                cache = [p for p in cache if p not in got[1]]
        prompt = prompt_length is not None and pos < prompt_length
        hit = _process_token(state, tok, pos, special, keep_last_n_blocks, mask_delimiters, restart_mode,
                             keep_last_block_for_answer, prompt)
        if hit is not None:
            evicted, rewind = hit
            cache = [p for p in cache if p not in evicted]
            if rewind is not None:  # re-prefill [rewind, pos) against the cache after eviction
                for p in cache:
                    if p >= rewind:
                        seen[p] = {k for k in cache if k <= p}
        cache.append(pos)
        seen[pos] = set(cache)
    allow = torch.zeros(T, T, dtype=torch.bool)
    for q, keys in seen.items():
        allow[q, sorted(keys)] = True
    return allow
