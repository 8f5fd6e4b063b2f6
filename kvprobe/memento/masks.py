"""Memento attention masks (SPEC section 2), dense and as a FlexAttention `mask_mod`.

Base rule: query q may attend key j iff j <= q, except that a key in content(i) is
hidden from every query q > SE_i, where SE_i is the position of block i's
<|summary_end|>. `keep_last_n_blocks` = -1 disables hiding, 0 hides every completed
block, N > 0 keeps the N most recently completed blocks (as seen from q) visible.
`mask_delimiters` hides <|block_start|>/<|block_end|> together with the content.
Restart mode: tokens of M_i (<|summary_start|> .. <|summary_end|>) may not attend
content(j) (plus delimiters if hidden) for any j <= i. The Memento vLLM fork's restart
always evicts the delimiters too, so `mask_delimiters` defaults to True in restart mode
(the fork's restart) and to False in memento mode (the Qwen3/OLMo3 convention).

Three options model where the fork's served inference departs from that rule
(`vllm/v1/core/block_masking/processor.py` and `tracker.py` in microsoft/memento):
- `evict_before_summary_end`: the fork compacts as soon as <|summary_end|> is sampled,
  before that token's KV is computed, so a block counts as completed already for its own
  <|summary_end|> (SE_i <= q instead of SE_i < q).
- `restart_sees_kept_blocks`: with keep N > 0 in restart mode the fork evicts the oldest
  pending block and re-prefills the newest memento, which still sees the N kept blocks,
  its own among them: M_i loses blocks j <= i - N only (False: every j <= i).
- `keep_last_block_for_answer` (keep 0 only): the fork defers each eviction to the next
  <|block_start|>, so the last block before </think> is never evicted; in restart mode
  the memento (and any filler before the next block) is re-prefilled at that point.

Both the dense builder and the FlexAttention `mask_mod` evaluate one predicate,
`_allowed`, on per-token lookup tables, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .layout import Layout

__all__ = [
    "MaskConfig",
    "MaskTables",
    "additive_mask",
    "allow_matrix",
    "flex_block_mask",
    "flex_mask_mod",
    "mask_tables",
]

_NEVER = torch.iinfo(torch.int32).max  # eviction point of a block that is never evicted


@dataclass(frozen=True)
class MaskConfig:
    """Which memento mask to build.

    keep_last_n_blocks: -1 plain causal, 0 hide every completed block, N keep N most recent.
    mask_delimiters: hide <|block_start|> and <|block_end|> with the content. None (default)
        follows the fork: hidden in restart mode, visible in memento mode.
    restart_mode: memento tokens cannot see any block up to their own (paper's ablation).
    evict_before_summary_end: the fork's served timing, a block hidden already from its own
        <|summary_end|> (False: kvprobe's base rule, <|summary_end|> sees its block).
    restart_sees_kept_blocks: restart with keep N > 0 as the fork serves it, the memento
        still sees the N most recent blocks (False: it sees none up to its own).
    keep_last_block_for_answer: the fork's option of that name (keep 0 only): a block is
        evicted at the next <|block_start|>, so the last one stays visible to the answer.
    """

    keep_last_n_blocks: int = 0
    mask_delimiters: bool | None = None
    restart_mode: bool = False
    evict_before_summary_end: bool = False
    restart_sees_kept_blocks: bool = False
    keep_last_block_for_answer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last_n_blocks, int) or self.keep_last_n_blocks < -1:
            raise ValueError(f"keep_last_n_blocks must be an integer >= -1, got {self.keep_last_n_blocks!r}")
        if self.mask_delimiters is None:  # the fork's restart always evicts the delimiters (SPEC section 2)
            object.__setattr__(self, "mask_delimiters", self.restart_mode)
        if self.keep_last_block_for_answer and self.keep_last_n_blocks != 0:
            raise ValueError("keep_last_block_for_answer works with keep_last_n_blocks=0 only (as in the fork), "
                             f"got keep_last_n_blocks={self.keep_last_n_blocks}")

    @property
    def name(self) -> str:
        """The mask's canonical name, the report's vocabulary: 'memento', 'restart' (the fork's
        restart: delimiters hidden), 'restart-delims-visible' (a kvprobe-only control),
        'memento-delims-hidden', 'memento-keep1', 'causal', ... Suffixes name what departs
        from each mode's default: '-evict-at-se' the fork's timing, '-sees-kept' and
        '-keeps-last-block' the fork's options above.

        The report reads a condition's meaning from this name, whatever the condition is called."""
        if self.keep_last_n_blocks == -1 and not self.restart_mode:
            return "causal"  # nothing is evicted, so the timing of eviction does not matter
        base = "restart" if self.restart_mode else "memento"
        if self.keep_last_n_blocks == -1:
            base += "-keepall"
        elif self.keep_last_n_blocks > 0:
            base += f"-keep{self.keep_last_n_blocks}"
        if self.restart_mode and self.restart_sees_kept_blocks and self.keep_last_n_blocks > 0:
            base += "-sees-kept"
        if self.mask_delimiters != self.restart_mode:
            base += "-delims-hidden" if self.mask_delimiters else "-delims-visible"
        if self.keep_last_block_for_answer:  # evicts at the next <|block_start|>: the timing flag is moot
            return base + "-keeps-last-block"
        # keep-all evicts nothing; in restart mode <|summary_end|> is memento, blind to its block either way
        timing = self.evict_before_summary_end and self.keep_last_n_blocks >= 0 and not self.restart_mode
        return base + ("-evict-at-se" if timing else "")


@dataclass(frozen=True)
class MaskTables:
    """Per-token lookup tables that define the mask of a padded batch.

    hide_block:   (B, T) int   block whose hideable set holds the token, else -1
    memento_of:   (B, T) int   block whose memento span holds the token, else -1: SS..SE, or with
                               keep_last_block_for_answer what the fork re-prefills, SS up to the
                               next <|block_start|> (the last block's memento is never re-prefilled)
    n_completed:  (B, T) int   blocks evicted for q: SE < q (SE <= q: evict_before_summary_end;
                               next <|block_start|> <= q: keep_last_block_for_answer)
    valid:        (B, T) bool  real (non-padding) token
    """

    hide_block: torch.Tensor
    memento_of: torch.Tensor
    n_completed: torch.Tensor
    valid: torch.Tensor
    config: MaskConfig

    def to(self, device: torch.device | str) -> "MaskTables":
        return MaskTables(
            self.hide_block.to(device),
            self.memento_of.to(device),
            self.n_completed.to(device),
            self.valid.to(device),
            self.config,
        )


def mask_tables(
    layouts: Sequence[Layout], length: int, config: MaskConfig, device: torch.device | str = "cpu"
) -> MaskTables:
    """Build the lookup tables for a batch of layouts padded to `length` tokens."""
    B = len(layouts)
    hide_block = torch.full((B, length), -1, dtype=torch.int32)
    memento_of = torch.full((B, length), -1, dtype=torch.int32)
    valid = torch.zeros((B, length), dtype=torch.bool)
    max_blocks = max((lay.n_blocks for lay in layouts), default=0)
    evict_at = torch.full((B, max(max_blocks, 1)), _NEVER, dtype=torch.int32)  # first query that no longer sees it
    for b, lay in enumerate(layouts):
        if lay.stop > length:
            raise ValueError(f"layout {b} reaches position {lay.stop}, beyond the batch length {length}")
        valid[b, lay.offset : lay.stop] = True
        for blk in lay.blocks:
            hide_block[b, blk.content.start : blk.content.stop] = blk.index
            if config.mask_delimiters:
                hide_block[b, list(blk.delimiters)] = blk.index
            if config.keep_last_block_for_answer:  # evicted (and re-prefilled) at the next <|block_start|>
                nxt = lay.blocks[blk.index + 1].start if blk.index + 1 < lay.n_blocks else None
                if blk.summary_end is not None and nxt is not None:
                    evict_at[b, blk.index] = nxt
                    memento_of[b, blk.memento.start : nxt] = blk.index
                continue
            if blk.memento:
                memento_of[b, blk.memento.start : blk.memento.stop] = blk.index
            if blk.summary_end is not None:
                evict_at[b, blk.index] = blk.summary_end + (0 if config.evict_before_summary_end else 1)
    q = torch.arange(length, dtype=torch.int32)
    n_completed = (evict_at[:, None, :] <= q[None, :, None]).sum(-1).to(torch.int32)  # (B, T)
    return MaskTables(hide_block, memento_of, n_completed, valid, config).to(device)


def _allowed(t: MaskTables, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask predicate on index tensors that broadcast together (dense) or are 0-d (flex)."""
    cfg = t.config
    blk = t.hide_block[b, k]
    hideable = blk >= 0
    allowed = (k <= q) & t.valid[b, k] & t.valid[b, q]
    if cfg.keep_last_n_blocks >= 0:
        # completed blocks are 0..n_completed(q)-1; the last N of them stay visible
        allowed = allowed & ~(hideable & (blk < t.n_completed[b, q] - cfg.keep_last_n_blocks))
    if cfg.restart_mode:
        # the fork with keep N re-prefills a memento while its N most recent blocks are kept
        seen = cfg.keep_last_n_blocks if cfg.restart_sees_kept_blocks and cfg.keep_last_n_blocks > 0 else 0
        mem = t.memento_of[b, q]
        allowed = allowed & ~(hideable & (mem >= 0) & (blk <= mem - seen))
    # a padding query attends to itself only, so no softmax row is empty
    return allowed | ((q == k) & ~t.valid[b, q])


def allow_matrix(
    layouts: Sequence[Layout], length: int, config: MaskConfig = MaskConfig(), device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean allow-matrix, True where query may attend key. Returns (B, 1, T, T) on `device`."""
    # rows that share a layout share a mask: build each distinct one once
    distinct = list(dict.fromkeys(layouts))
    t = mask_tables(distinct, length, config, device)
    b = torch.arange(len(distinct), device=device)[:, None, None]
    q = torch.arange(length, device=device)[None, :, None]
    k = torch.arange(length, device=device)[None, None, :]
    masks = _allowed(t, b, q, k)[:, None]  # (U, 1, T, T)
    if len(distinct) == len(layouts):
        return masks
    row = {lay: i for i, lay in enumerate(distinct)}
    return masks[torch.tensor([row[lay] for lay in layouts], device=device)]  # (B, 1, T, T)


def additive_mask(allow: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive float mask from a boolean allow-matrix: 0 where allowed, dtype min elsewhere.

    This is the form every attention implementation reads the same way (SPEC pitfall:
    `eager` adds a boolean mask as +1/0).
    """
    if allow.dtype != torch.bool:
        raise TypeError(f"additive_mask takes a boolean allow-matrix, got {allow.dtype}")
    mask = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    return mask.masked_fill_(~allow, torch.finfo(dtype).min)


def flex_mask_mod(
    layouts: Sequence[Layout], length: int, config: MaskConfig = MaskConfig(), device: torch.device | str = "cpu"
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` with the same semantics as `allow_matrix`."""
    return _mask_mod(mask_tables(layouts, length, config, device))


def _mask_mod(t: MaskTables) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return _allowed(t, b, q_idx, kv_idx)

    return mask_mod


def flex_block_mask(
    layouts: Sequence[Layout],
    length: int,
    config: MaskConfig = MaskConfig(),
    device: torch.device | str = "cpu",
    block_size: int = 128,
    chunk_rows: int = 2048,
):
    """A block-sparse FlexAttention `BlockMask` for the memento mask of a batch.

    torch's `create_block_mask` evaluates the mask densely, (B, 1, T, T) plus int32
    temporaries of the same size: about 10 GB at 32K tokens, the very cost flex is meant
    to avoid. Here the predicate is evaluated `chunk_rows` query rows at a time and each
    chunk is reduced at once to (block_size x block_size) tiles: a tile with every entry
    allowed is "full" (no mask_mod call inside it), one with some allowed is "partial".
    The result is what `create_block_mask` builds (tested), in O(chunk_rows x T) memory.
    `chunk_rows` is rounded down to a multiple of `block_size` (at least one tile row).
    """
    from torch.nn.attention.flex_attention import BlockMask

    t = mask_tables(layouts, length, config, device)
    B, n = len(layouts), -(-length // block_size)  # tiles per side
    rows_per_chunk = max(1, chunk_rows // block_size) * block_size
    b = torch.arange(B, device=device)[:, None, None]
    k = torch.arange(length, device=device)[None, None, :]
    partial = torch.zeros(B, 1, n, n, dtype=torch.bool, device=device)
    full = torch.zeros(B, 1, n, n, dtype=torch.bool, device=device)
    for start in range(0, length, rows_per_chunk):
        stop = min(start + rows_per_chunk, length)
        q = torch.arange(start, stop, device=device)
        allowed = _allowed(t, b, q[None, :, None], k[..., :stop])  # (B, rows, stop): keys after the rows are causal-masked
        rows = -(-len(q) // block_size) * block_size
        allowed = torch.nn.functional.pad(allowed, (0, n * block_size - stop, 0, rows - len(q)))  # False outside
        tiled = allowed.view(B, rows // block_size, block_size, n, block_size)
        some, every = tiled.any(dim=4).any(dim=2), tiled.all(dim=4).all(dim=2)  # (B, q tiles, n), no int copies
        tiles = slice(start // block_size, start // block_size + rows // block_size)
        full[:, 0, tiles] = every
        partial[:, 0, tiles] = some & ~every

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 1, n, n) -> count, column order
        dense = tiles.to(torch.int32)
        return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=_mask_mod(t),
                                    seq_lengths=(length, length))
