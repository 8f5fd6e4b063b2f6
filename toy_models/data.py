"""Synthetic toy sequences: 10 blocks of 5 random digits, each followed by its memento.

One sequence is 122 tokens:

    <think>
    <|block_start|> d d d d d <|block_end|> <|summary_start|> s s s <|summary_end|>   x 10
    </think>

Block i (0-based) starts at position 1 + 12*i. Its memento `s s s` is the zero-padded
3-digit cumulative sum of every block digit so far (blocks 0..i), at most 10*5*9 = 450.
Every sequence shares this one layout, so one parsed `Layout` serves a whole batch.
(Issue #3 quoted 112 tokens and blocks at 1 + 11*i; that arithmetic drops one token per
block: the 12 tokens above are 4 markers + 5 digits + 3 memento digits.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvprobe.memento.layout import Layout, parse_layout

from .vocab import SPECIAL

__all__ = [
    "BLOCK_LEN",
    "MEMENTO_DIGITS",
    "MEMENTO_POSITIONS",
    "N_BLOCKS",
    "N_DIGITS",
    "SEQ_LEN",
    "ToyBatch",
    "block_start",
    "generate",
    "layout",
]

N_BLOCKS = 10
N_DIGITS = 5  # digits per block
MEMENTO_DIGITS = 3
BLOCK_LEN = 1 + N_DIGITS + 1 + 1 + MEMENTO_DIGITS + 1  # 12 tokens: BS d*5 BE SS s*3 SE
SEQ_LEN = 1 + N_BLOCKS * BLOCK_LEN + 1  # 122


def block_start(i: int) -> int:
    """Position of block i's <|block_start|>."""
    return 1 + BLOCK_LEN * i


# (10, 5) positions of the block digits and (10, 3) of the memento digits
DIGIT_POSITIONS = np.array([[block_start(i) + 1 + j for j in range(N_DIGITS)] for i in range(N_BLOCKS)])
MEMENTO_POSITIONS = np.array(
    [[block_start(i) + N_DIGITS + 3 + j for j in range(MEMENTO_DIGITS)] for i in range(N_BLOCKS)]
)


def _template() -> np.ndarray:
    """The marker tokens of a sequence, with -1 where digits go. (122,)"""
    t = np.full(SEQ_LEN, -1, dtype=np.int64)
    t[0] = SPECIAL.think
    t[-1] = SPECIAL.think_end
    for i in range(N_BLOCKS):
        s = block_start(i)
        t[s] = SPECIAL.block_start
        t[s + N_DIGITS + 1] = SPECIAL.block_end
        t[s + N_DIGITS + 2] = SPECIAL.summary_start
        t[s + BLOCK_LEN - 1] = SPECIAL.summary_end
    return t


_TEMPLATE = _template()


def layout() -> Layout:
    """The Memento layout every toy sequence shares (10 completed blocks)."""
    return parse_layout(np.where(_TEMPLATE < 0, 0, _TEMPLATE).tolist(), SPECIAL)


@dataclass
class ToyBatch:
    """A batch of toy sequences.

    input_ids: (N, 122) int64 token ids
    digits:    (N, 10, 5) int64 block digits
    mementos:  (N, 10, 3) int64 memento digits (hundreds, tens, units of the running sum)
    """

    input_ids: torch.Tensor
    digits: torch.Tensor
    mementos: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def generate(n: int, seed: int, *, block_digits: dict[int, np.ndarray] | None = None) -> ToyBatch:
    """Draw `n` toy sequences from a numpy Generator seeded with `seed`.

    block_digits: optional {block index: (n, 5) digits} that replace the random digits
    of those blocks (passcode injection: the target block's digits are the passcode).
    All other blocks keep the digits they have without forcing, and every memento is
    recomputed, so the sequences stay consistent.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, 10, size=(n, N_BLOCKS, N_DIGITS), dtype=np.int64)  # (N, 10, 5)
    for block, forced in (block_digits or {}).items():
        if not isinstance(block, (int, np.integer)) or not 0 <= block < N_BLOCKS:
            raise ValueError(f"block_digits: block index must be in 0..{N_BLOCKS - 1}, got {block!r}")
        forced = np.asarray(forced)
        if forced.shape != (n, N_DIGITS):
            raise ValueError(f"block_digits[{block}]: expected shape ({n}, {N_DIGITS}), got {forced.shape}")
        if not np.issubdtype(forced.dtype, np.integer) or forced.min(initial=0) < 0 or forced.max(initial=0) > 9:
            raise ValueError(f"block_digits[{block}]: digits must be integers in 0..9")
        digits[:, block] = forced
    running = digits.sum(-1).cumsum(-1)  # (N, 10), at most 450
    mementos = np.stack([running // 100, running // 10 % 10, running % 10], axis=-1)  # (N, 10, 3)
    ids = np.broadcast_to(_TEMPLATE, (n, SEQ_LEN)).copy()  # (N, 122)
    ids[:, DIGIT_POSITIONS.ravel()] = digits.reshape(n, -1)
    ids[:, MEMENTO_POSITIONS.ravel()] = mementos.reshape(n, -1)
    return ToyBatch(torch.from_numpy(ids), torch.from_numpy(digits), torch.from_numpy(mementos))
