"""Where a site is in one parsed sequence: the positions a probe reads (SPEC section 3).

The sites' names and meanings are `kvprobe.grid.SITES`.
"""

from __future__ import annotations

from ..grid import BLOCK_END, MEMENTO, MEMENTO_TEXT, SITES
from .layout import Layout

__all__ = ["site_positions"]


def site_positions(layout: Layout, site: str, block: int) -> list[int]:
    """Positions of `site` for block index `block` in one layout; raises ValueError if absent."""
    if not 0 <= block < layout.n_blocks:
        raise ValueError(f"block {block} does not exist: the sequence has {layout.n_blocks} blocks (0..{layout.n_blocks - 1})")
    b = layout.blocks[block]
    if site in (MEMENTO, MEMENTO_TEXT):
        if not b.completed:
            raise ValueError(f"block {block} has no finished memento")
        if len(b.memento_text) == 0:
            raise ValueError(f"the memento of block {block} is empty")
        return list(b.memento if site == MEMENTO else b.memento_text)
    if site == BLOCK_END:
        if b.end is None:
            raise ValueError(f"block {block} has no <|block_end|>")
        return [b.end]
    raise ValueError(f"unknown site {site!r}; expected one of {SITES}")

