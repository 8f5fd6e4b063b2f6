"""A brute-force memento mask written directly from SPEC section 2, for testing kvprobe.memento.masks.

Deliberately naive: plain Python loops over every (query, key) pair, one rule at a time,
in the words of the spec. It reads only the raw marker positions of a parsed `Layout`
(block_start, block_end, summary_start, summary_end, offset, length) and recomputes every
set itself; it uses nothing from kvprobe/memento/masks.py (not even its MaskConfig: the options
are plain arguments).

SPEC section 2, restated as this module applies it. SE_i is the position of block i's
<|summary_end|>; content(i) the tokens strictly between its <|block_start|> and <|block_end|>.

1. Causal: query q may attend key k only if k <= q.
2. A key in content(i) (and, with mask_delimiters, block i's <|block_start|> and
   <|block_end|>) is hidden from q when block i is completed for q (SE_i < q) and is not
   among the keep_last_n_blocks most recently completed blocks for q.
   keep_last_n_blocks = -1 disables this rule (plain causal).
3. Restart mode: a query in memento M_i (<|summary_start|> .. <|summary_end|> inclusive)
   may not attend content(j) (with mask_delimiters: nor block j's delimiters) for any
   j <= i. This rule applies on its own, whatever keep_last_n_blocks is.
   With restart_sees_kept_blocks and keep_last_n_blocks = N > 0 (the fork re-prefills M_i
   while its N most recent blocks are still cached): for any j <= i - N only.
5. keep_last_block_for_answer (with keep_last_n_blocks = 0): block i is completed for q
   only once the next block has started (q >= that block's <|block_start|>); the last
   block never is. In restart mode the re-prefilled span of block i is <|summary_start|>
   up to (not including) the next <|block_start|>, and the last block has none.
6. Sliding window W (a model layer's, not SPEC section 2's; None: none): query q may attend
   key k only if q - k < W as well, counted in row positions (transformers' sliding mask).
4. Nothing else is ever hidden: prompt, mementos, answer, and ordinary tokens that sit
   between markers outside a block's content.

Choices the spec leaves open, matching kvprobe's documented behaviour:
- An unfinished trailing block (only with allow_unfinished): its content runs to the end
  of the sequence if <|block_end|> is missing; its memento runs from <|summary_start|> to
  the end of the sequence if <|summary_end|> is missing; it is never completed.
- Padding: a real query never attends a padding key. What a padding query attends is not
  specified (its output reaches no real token); the reference gives it only its own key,
  and tests compare padding rows only on the invariants that matter (see test_masks.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["reference_allow", "reference_allow_batch"]


def _hideable_sets(layout, mask_delimiters: bool) -> list[set[int]]:
    """For each block, the key positions that can be hidden with it (content, maybe delimiters)."""
    stop = layout.offset + layout.length
    sets = []
    for blk in layout.blocks:
        content_stop = blk.end if blk.end is not None else stop
        hideable = set(range(blk.start + 1, content_stop))
        if mask_delimiters:
            hideable.add(blk.start)
            if blk.end is not None:
                hideable.add(blk.end)
        sets.append(hideable)
    return sets


def _memento_spans(layout, keep_last_block_for_answer: bool = False) -> list[set[int]]:
    """For each block, its memento M_i: <|summary_start|> .. <|summary_end|> inclusive (rule 5:
    up to the next block's start, none for the last block)."""
    stop = layout.offset + layout.length
    spans = []
    for i, blk in enumerate(layout.blocks):
        if keep_last_block_for_answer:
            nxt = layout.blocks[i + 1].start if i + 1 < len(layout.blocks) else None
            done = blk.summary_end is not None and nxt is not None
            spans.append(set(range(blk.summary_start, nxt)) if done else set())
        elif blk.summary_start is None:
            spans.append(set())
        else:
            last = blk.summary_end if blk.summary_end is not None else stop - 1
            spans.append(set(range(blk.summary_start, last + 1)))
    return spans


def reference_allow(
    layout,
    length: int,
    keep_last_n_blocks: int,
    mask_delimiters: bool,
    restart_mode: bool,
    evict_before_summary_end: bool = False,
    restart_sees_kept_blocks: bool = False,
    keep_last_block_for_answer: bool = False,
    window: int | None = None,
) -> list[list[bool]]:
    """allow[q][k]: may query q attend key k. `layout` positions index a row of `length` tokens."""
    real = set(range(layout.offset, layout.offset + layout.length))
    hideable = _hideable_sets(layout, mask_delimiters)
    mementos = _memento_spans(layout, keep_last_block_for_answer)
    seen_by_restart = keep_last_n_blocks if restart_sees_kept_blocks and keep_last_n_blocks > 0 else 0

    def completed_for(i: int, q: int) -> bool:
        blk = layout.blocks[i]
        if blk.summary_end is None:
            return False
        if keep_last_block_for_answer:
            return i + 1 < len(layout.blocks) and layout.blocks[i + 1].start <= q
        return blk.summary_end < q or (evict_before_summary_end and blk.summary_end == q)
    n_blocks = len(layout.blocks)

    allow = [[False] * length for _ in range(length)]
    for q in range(length):
        # blocks completed as seen from q, oldest first (ordered by the position of SE_i)
        # the Memento vLLM fork (scheduler.py, process_token) compacts as soon as a
        # <|summary_end|> is sampled, before that token's KV is computed: for the fork a
        # block is completed at its own <|summary_end|> already
        completed = sorted((blk.summary_end, i) for i, blk in enumerate(layout.blocks) if completed_for(i, q))
        completed_ids = [i for _, i in completed]
        if keep_last_n_blocks > 0:
            still_visible = completed_ids[-keep_last_n_blocks:]
        else:
            still_visible = []
        hidden_by_base_rule = [i for i in completed_ids if i not in still_visible]
        own_memento = [i for i in range(n_blocks) if q in mementos[i]]

        for k in range(length):
            if q not in real:
                allow[q][k] = q == k
                continue
            if k not in real or k > q:
                continue
            if window is not None and q - k >= window:
                continue
            ok = True
            for i in range(n_blocks):
                if k not in hideable[i]:
                    continue
                if keep_last_n_blocks >= 0 and i in hidden_by_base_rule:
                    ok = False
                if restart_mode:
                    for m in own_memento:
                        if i <= m - seen_by_restart:
                            ok = False
            allow[q][k] = ok
    return allow


def reference_allow_batch(
    layouts: Sequence,
    length: int,
    keep_last_n_blocks: int = 0,
    mask_delimiters: bool = False,
    restart_mode: bool = False,
    evict_before_summary_end: bool = False,
    restart_sees_kept_blocks: bool = False,
    keep_last_block_for_answer: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """The reference mask of a padded batch as a bool tensor (B, 1, T, T)."""
    rows = [reference_allow(lay, length, keep_last_n_blocks, mask_delimiters, restart_mode, evict_before_summary_end,
                            restart_sees_kept_blocks, keep_last_block_for_answer, window)
            for lay in layouts]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(layouts), 1, length, length)
