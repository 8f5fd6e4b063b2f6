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

Sliding window. A model whose attention layers slide (OLMo-3, Mistral, Qwen3 with
`use_sliding_window`) lets query q see key k only if q - k < W as well. The window is a
property of a model's layer, not of the memento condition, so it is not a `MaskConfig` field
(the condition's name and equality ignore it): it is `MaskTables.window` (None: no window),
set by `mask_tables(..., window=W)` or `tables.windowed(W)`, which shares the four tables, so
one set of tables gives both a full-attention layer's mask and a sliding layer's. Positions are
row indices, as in transformers' own sliding mask (`kv_idx > q_idx - W`); left padding shifts
both ends of a row alike, so the difference is the distance in position ids.

Both the dense builder and the FlexAttention `mask_mod` evaluate one predicate,
`_allowed`, on per-token lookup tables (`MaskTables`, O(T)), so the two cannot drift apart.
The FlexAttention `BlockMask` is built from the same tables by interval arithmetic over the
layout's boundaries (`block_mask_from_tables`): its cost grows with the tiles and blocks, not
with T squared, so a 32K-token mask takes milliseconds, on the host or on the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from .config import MaskConfig  # the options, torch-free (kvprobe.memento.config); re-exported here
from .layout import Layout

__all__ = [
    "MaskConfig",
    "MaskTables",
    "additive_mask",
    "allow_from_tables",
    "allow_matrix",
    "block_mask_from_tables",
    "flex_block_mask",
    "flex_mask_mod",
    "mask_tables",
]

_NEVER = torch.iinfo(torch.int32).max  # eviction point of a block that is never evicted


@dataclass(frozen=True)
class MaskTables:
    """Per-token lookup tables that define the mask of a padded batch: O(B x T), never T x T.

    hide_block:   (B, T) int32 block whose hideable set holds the token, else -1
    memento_of:   (B, T) int32 block whose memento span holds the token, else -1: SS..SE, or with
                               keep_last_block_for_answer what the fork re-prefills, SS up to the
                               next <|block_start|> (the last block's memento is never re-prefilled)
    n_completed:  (B, T) int32 blocks evicted for q: SE < q (SE <= q: evict_before_summary_end;
                               next <|block_start|> <= q: keep_last_block_for_answer)
    valid:        (B, T) bool  real (non-padding) token
    window:       sliding window W (key k visible to query q only if q - k < W), None for none:
                  a layer's property, not the condition's (`windowed` gives a copy with one)

    These are what an SFT collator ships to the device (`tensors`, `from_tensors`); the dense
    matrix (`allow_from_tables`) and the block-sparse one (`block_mask_from_tables`) are built there.
    """

    hide_block: torch.Tensor
    memento_of: torch.Tensor
    n_completed: torch.Tensor
    valid: torch.Tensor
    config: MaskConfig
    window: int | None = None

    FIELDS = ("hide_block", "memento_of", "n_completed", "valid")

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"a sliding window must be an integer >= 1 (or None for none), got {self.window!r}")

    def windowed(self, window: int | None) -> "MaskTables":
        """The same tables (shared, not copied) under sliding window `window` (None: no window)."""
        return replace(self, window=window)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T)."""
        return tuple(self.valid.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "MaskTables":
        return MaskTables(*(getattr(self, f).to(device) for f in self.FIELDS), self.config, self.window)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four (B, T) tables by name, e.g. for a data collator's batch."""
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: MaskConfig,
                     window: int | None = None) -> "MaskTables":
        """Tables from `tensors()` output (on any device), checked for names and shapes."""
        missing = [f for f in cls.FIELDS if f not in tensors]
        if missing:
            raise ValueError(f"mask tables need {', '.join(cls.FIELDS)}; missing {', '.join(missing)}")
        shapes = {tuple(tensors[f].shape) for f in cls.FIELDS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"mask tables must all be (B, T), got shapes {sorted(shapes)}")
        return cls(*(tensors[f] for f in cls.FIELDS[:3]), tensors["valid"].bool(), config, window)


def mask_tables(
    layouts: Sequence[Layout],
    length: int,
    config: MaskConfig,
    device: torch.device | str = "cpu",
    truncate: bool = False,
    window: int | None = None,
    prefill_end: Sequence[int | None] | None = None,
) -> MaskTables:
    """Build the lookup tables for a batch of layouts padded to `length` tokens, under sliding
    window `window` (None: none; see `MaskTables.window`).

    `prefill_end`: per layout, the prompt's length (its first generated position), or None.
    Read only under `config.prefill_causal`: a block is then evicted no earlier than
    prefill_end (prompt blocks stay visible to the whole prompt, the fork's causal prefill).

    A layout that reaches beyond `length` is refused, unless `truncate`: then the tables
    describe its first `length` positions, which is exact for those queries (a query's
    row depends on positions up to its own only) — what a capture that stops early needs.
    """
    B = len(layouts)
    if prefill_end is not None and len(prefill_end) != B:
        raise ValueError(f"{len(prefill_end)} prefill_end values for {B} layouts")
    if config.prefill_causal and prefill_end is None:  # else the name would say prefill and the rule would not
        raise ValueError("MaskConfig(prefill_causal=True) needs each sample's prompt length: pass prefill_end "
                         "(None for a sample whose prompt holds no blocks)")
    hide_block = torch.full((B, length), -1, dtype=torch.int32)
    memento_of = torch.full((B, length), -1, dtype=torch.int32)
    valid = torch.zeros((B, length), dtype=torch.bool)
    max_blocks = max((lay.n_blocks for lay in layouts), default=0)
    evict_at = torch.full((B, max(max_blocks, 1)), _NEVER, dtype=torch.int32)  # first query that no longer sees it
    for b, lay in enumerate(layouts):
        if lay.stop > length and not truncate:
            raise ValueError(f"layout {b} reaches position {lay.stop}, beyond the batch length {length}")
        valid[b, lay.offset : lay.stop] = True  # slices clip at `length`
        for blk in lay.blocks:
            hide_block[b, blk.content.start : blk.content.stop] = blk.index
            if config.mask_delimiters:
                hide_block[b, [p for p in blk.delimiters if p < length]] = blk.index
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
        if config.prefill_causal and prefill_end is not None and prefill_end[b] is not None:
            evict_at[b].clamp_(min=int(prefill_end[b]))  # _NEVER stays never
    # blocks evicted for q = how many eviction points are <= q: a sorted search, O(T log blocks)
    q = torch.arange(length, dtype=torch.int32)
    evict_sorted = evict_at.sort(dim=1).values.contiguous()  # (B, blocks)
    n_completed = torch.searchsorted(evict_sorted, q.expand(B, -1).contiguous(), right=True).to(torch.int32)  # (B, T)
    return MaskTables(hide_block, memento_of, n_completed, valid, config, window).to(device)


def _visible(t: MaskTables, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The memento rule without causality: both tokens real and key k not hidden from query q.
    Index tensors broadcast together (dense) or are 0-d (flex)."""
    cfg = t.config
    blk = t.hide_block[b, k]
    hideable = blk >= 0
    visible = t.valid[b, k] & t.valid[b, q]
    if cfg.keep_last_n_blocks >= 0:
        # completed blocks are 0..n_completed(q)-1; the last N of them stay visible
        visible = visible & ~(hideable & (blk < t.n_completed[b, q] - cfg.keep_last_n_blocks))
    if cfg.restart_mode:
        # the fork with keep N re-prefills a memento while its N most recent blocks are kept
        seen = cfg.keep_last_n_blocks if cfg.restart_sees_kept_blocks and cfg.keep_last_n_blocks > 0 else 0
        mem = t.memento_of[b, q]
        visible = visible & ~(hideable & (mem >= 0) & (blk <= mem - seen))
    return visible


def _allowed(t: MaskTables, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask predicate: causal, inside the sliding window if any, and visible; a padding query
    attends to itself only, so no softmax row is empty."""
    causal = k <= q
    if t.window is not None:
        causal = causal & (q - k < t.window)
    return (causal & _visible(t, b, q, k)) | ((q == k) & ~t.valid[b, q])


def allow_from_tables(t: MaskTables) -> torch.Tensor:
    """Boolean allow-matrix of the tables' batch on their device, True where query may attend key.
    Returns (B, 1, T, T): quadratic, for short sequences."""
    B, T = t.shape
    device = t.valid.device
    b = torch.arange(B, device=device)[:, None, None]
    q = torch.arange(T, device=device)[None, :, None]
    k = torch.arange(T, device=device)[None, None, :]
    return _allowed(t, b, q, k)[:, None]  # (B, 1, T, T)


def allow_matrix(
    layouts: Sequence[Layout], length: int, config: MaskConfig = MaskConfig(), device: torch.device | str = "cpu",
    truncate: bool = False, window: int | None = None, prefill_end: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Boolean allow-matrix, True where query may attend key. Returns (B, 1, T, T) on `device`.
    `truncate`: layouts may reach beyond `length` (the mask of their first `length` tokens).
    `window`: a sliding window W (q - k < W), None for none.
    `prefill_end`: per layout, the prompt's length (see `mask_tables`)."""
    if prefill_end is not None:
        return allow_from_tables(mask_tables(layouts, length, config, device, truncate, window, prefill_end))
    # rows that share a layout share a mask: build each distinct one once
    distinct = list(dict.fromkeys(layouts))
    masks = allow_from_tables(mask_tables(distinct, length, config, device, truncate, window))  # (U, 1, T, T)
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
    layouts: Sequence[Layout], length: int, config: MaskConfig = MaskConfig(), device: torch.device | str = "cpu",
    window: int | None = None, prefill_end: Sequence[int | None] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` with the same semantics as `allow_matrix`."""
    return _mask_mod(mask_tables(layouts, length, config, device, window=window, prefill_end=prefill_end))


def _mask_mod(t: MaskTables) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return _allowed(t, b, q_idx, kv_idx)

    return mask_mod


def _cuts(state: torch.Tensor, length: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 0..length into intervals on which every column of `state` (T, C) is constant and
    that never cross a tile edge. Returns (starts, stops), each (R,), R <= tiles + state changes."""
    changes = (state[1:] != state[:-1]).any(dim=1).nonzero().flatten() + 1  # first position of each new run
    edges = torch.arange(0, length, block_size, device=state.device)
    starts = torch.unique(torch.cat([edges, changes]))  # sorted
    stops = torch.cat([starts[1:], starts.new_tensor([length])])
    return starts, stops


def _tile_reduce(cells: torch.Tensor, q_tile: torch.Tensor, k_tile: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """Reduce a (Rq, Rk) int grid of intervals to (n, n) tiles with `how` ('amin': all, 'amax': any)."""
    init = 1 if how == "amin" else 0
    rows = cells.new_full((cells.shape[0], n), init).scatter_reduce(1, k_tile.expand_as(cells), cells, how)  # (Rq, n)
    return rows.new_full((n, n), init).scatter_reduce(0, q_tile[:, None].expand_as(rows), rows, how)  # (n, n)


def block_mask_from_tables(t: MaskTables, block_size: int = 128):
    """A block-sparse FlexAttention `BlockMask` straight from the tables, by interval arithmetic.

    Per row, every query has a state (blocks evicted, memento it belongs to, real or padding)
    and every key one (hideable block, real or padding), each constant on runs between the
    layout's boundaries. Splitting both axes at those boundaries and at the tile edges gives
    a grid of intervals, Rq x Rk with R <= tiles + boundaries, on which the memento rule is
    constant and causality reduces to comparing interval ends: an interval pair is wholly
    allowed if its rule says visible and its last key precedes its first query, partly if
    the first key precedes the last query. A tile is "full" if all its pairs are wholly allowed
    (and it lies inside `T`: a ragged last tile never is), "partial" if some pair is partly
    allowed. A sliding window W is a second diagonal band, compared on interval ends the same way:
    wholly inside if the farthest pair, last query to first key, is under W apart; partly if the
    nearest, first query to last key, is. Time and memory grow with tiles squared and blocks, not with T squared: a few
    milliseconds at 32K tokens. `mask_mod` (the same predicate) runs inside partial tiles only.
    Equal to `create_block_mask` on the predicate (tested on random layouts and every option).
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, T = t.shape
    device = t.valid.device
    n = -(-T // block_size)  # tiles per side
    partial = torch.zeros(B, 1, n, n, dtype=torch.bool, device=device)
    full = torch.zeros(B, 1, n, n, dtype=torch.bool, device=device)
    for row in range(B):
        b = torch.tensor(row, device=device)
        q_state = torch.stack([t.n_completed[row], t.memento_of[row], t.valid[row].int()], dim=1)  # (T, 3)
        k_state = torch.stack([t.hide_block[row], t.valid[row].int()], dim=1)  # (T, 2)
        qs, qe = _cuts(q_state, T, block_size)  # (Rq,) each
        ks, ke = _cuts(k_state, T, block_size)  # (Rk,) each
        visible = _visible(t, b, qs[:, None], ks[None, :])  # (Rq, Rk): the rule is constant per interval pair
        pad_q = ~t.valid[row, qs][:, None]  # a padding query sees only itself
        whole = visible & (ke[None, :] - 1 <= qs[:, None])
        some = visible & (ks[None, :] <= qe[:, None] - 1)
        if t.window is not None:  # q - k < W for every pair (whole), for some pair (some)
            whole &= (qe[:, None] - 1) - ks[None, :] < t.window
            some &= qs[:, None] - (ke[None, :] - 1) < t.window
        on_diagonal = torch.maximum(qs[:, None], ks[None, :]) < torch.minimum(qe[:, None], ke[None, :])
        single = (qe - qs == 1)[:, None] & (ke - ks == 1)[None, :]
        some |= pad_q & on_diagonal
        whole |= pad_q & on_diagonal & single
        q_tile, k_tile = qs // block_size, ks // block_size
        every = _tile_reduce(whole.to(torch.uint8), q_tile, k_tile, n, "amin").bool()  # (n, n)
        any_ = _tile_reduce(some.to(torch.uint8), q_tile, k_tile, n, "amax").bool()  # (n, n)
        if T % block_size:  # the ragged last tile row and column hold positions past T: never full
            every[-1, :] = False
            every[:, -1] = False
        full[row, 0] = every
        partial[row, 0] = any_ & ~every

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 1, n, n) -> count, column order
        dense = tiles.to(torch.int32)
        return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=_mask_mod(t),
                                    seq_lengths=(T, T))


def flex_block_mask(
    layouts: Sequence[Layout],
    length: int,
    config: MaskConfig = MaskConfig(),
    device: torch.device | str = "cpu",
    block_size: int = 128,
    chunk_rows: int | None = None,
    *,
    truncate: bool = False,
    window: int | None = None,
):
    """A block-sparse FlexAttention `BlockMask` for the memento mask of a batch, built on `device`
    from the layouts' boundaries (`block_mask_from_tables`): what torch's `create_block_mask`
    builds, without its dense (B, 1, T, T) evaluation (about 10 GB and seconds at 32K tokens).
    `truncate`: layouts may reach beyond `length` (the mask of their first `length` tokens).
    `window`: a sliding window W (q - k < W), None for none.
    `chunk_rows` belonged to the chunked builder this replaces; it is accepted, ignored and
    warned about, for one release."""
    if chunk_rows is not None:
        warnings.warn("flex_block_mask: chunk_rows is ignored (the mask is built from the layout's intervals, "
                      "not in chunks of rows) and will be removed", DeprecationWarning, stacklevel=2)
    return block_mask_from_tables(mask_tables(layouts, length, config, device, truncate, window), block_size)
