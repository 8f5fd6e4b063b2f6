"""Synthetic Memento traces of a chosen length, for scale measurements and long-sequence tests.

Real traces reach 32K tokens (SPEC section 7). Cost and memory depend on the layout's shape
(length, number of blocks, memento length), not on what the tokens say, so
`LongTraceSource` lays out a trace of exactly `length` tokens from random ordinary token ids
(seeded):

    <prompt: 32 tokens> <think>
    ( <|block_start|> content <|block_end|> <|summary_start|> memento <|summary_end|> ) x n_blocks
    </think> <answer: the rest>

with `n_blocks` blocks of equal content length. The passcode block is `target_block`, by
default three blocks before the last, so a capture of offsets -1..+2 reads mementos deep in
the trace and its forward runs over nearly all of it. The labels are random digits; nothing
is injected (the trace is for timing and memory, not for leakage).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..memento.layout import SpecialTokens, parse_layout
from .samples import SampleBatch

__all__ = ["LongTraceSource"]

PROMPT_TOKENS = 32


class LongTraceSource:
    """`n_samples` traces of the same layout, `length` tokens each, with random content (seeded).

    special: the marker ids; ordinary tokens are drawn from `vocab` ids that are not markers.
    Every sample shares one layout, so a batch's mask is built once.
    """

    def __init__(self, n_samples: int, length: int, special: SpecialTokens, vocab: int, *, n_blocks: int = 50,
                 memento_len: int = 32, target_block: int | None = None, seed: int = 0) -> None:
        markers = {getattr(special, f) for f in ("think", "think_end", "block_start", "block_end", "summary_start",
                                                 "summary_end")}
        ordinary_ids = np.array([i for i in range(vocab) if i not in markers])
        per_block = (length - PROMPT_TOKENS - 3) // n_blocks  # each block: 4 markers, content, memento
        content = per_block - memento_len - 4
        if n_samples < 1 or content < 1:
            raise ValueError(f"a {length}-token trace cannot hold {n_blocks} blocks with {memento_len}-token mementos "
                             f"and {n_samples} sample(s): give a longer length or fewer blocks")
        self.n_samples, self.special, self.length = n_samples, special, length
        self.target_block = n_blocks - 3 if target_block is None else target_block
        rng = np.random.default_rng(seed)
        ordinary = lambda k: ordinary_ids[rng.integers(0, len(ordinary_ids), k)].tolist()  # noqa: E731
        s = special
        ids = ordinary(PROMPT_TOKENS) + [s.think]
        for _ in range(n_blocks):
            ids += [s.block_start] + ordinary(content) + [s.block_end, s.summary_start] + ordinary(memento_len)
            ids += [s.summary_end]
        ids += [s.think_end] + ordinary(length - len(ids) - 1)
        self.ids = torch.tensor(ids)  # (T,)
        self.layout = parse_layout(ids, special)
        self.labels = rng.integers(0, 10, (n_samples, 5))  # (n, 5) random digits

    def samples(self, start: int, stop: int) -> SampleBatch:
        k = stop - start
        return SampleBatch(np.arange(start, stop), self.ids[None].repeat(k, 1), None,
                           ["".join(map(str, r)) for r in self.labels[start:stop]], self.labels[start:stop],
                           [self.layout] * k)

    def describe(self) -> dict[str, Any]:
        return {"kind": "long-synthetic", "length": self.length, "n_blocks": self.layout.n_blocks,
                "target_block": self.target_block, "n_samples": self.n_samples}
