"""Sites: the named positions of a block that a probe can read (SPEC section 3).

    memento       the whole memento span, <|summary_start|> .. <|summary_end|> inclusive
    memento_text  only the memento text between the markers
    block_end     the block's <|block_end|> delimiter
"""

from __future__ import annotations

from .layout import Layout

__all__ = ["SITES", "offset_role", "site_positions"]

SITES = ("memento", "memento_text", "block_end")


def site_positions(layout: Layout, site: str, block: int) -> list[int]:
    """Positions of `site` for block index `block` in one layout; raises ValueError if absent."""
    if not 0 <= block < layout.n_blocks:
        raise ValueError(f"block {block} does not exist: the sequence has {layout.n_blocks} blocks (0..{layout.n_blocks - 1})")
    b = layout.blocks[block]
    if site in ("memento", "memento_text"):
        if not b.completed:
            raise ValueError(f"block {block} has no finished memento")
        if len(b.memento_text) == 0:
            raise ValueError(f"the memento of block {block} is empty")
        return list(b.memento if site == "memento" else b.memento_text)
    if site == "block_end":
        if b.end is None:
            raise ValueError(f"block {block} has no <|block_end|>")
        return [b.end]
    raise ValueError(f"unknown site {site!r}; expected one of {SITES}")


def offset_role(offset: int) -> str:
    """SPEC section 3's name for a memento at `offset` blocks from the target block: 'causal control'
    (before it: must read chance), 'direct' (its own memento) or 'masked' (written after it was hidden)."""
    return "causal control" if offset < 0 else "direct" if offset == 0 else "masked"
