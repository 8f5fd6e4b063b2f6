"""Hypothesis strategies for random valid Memento token sequences and padded batches.

Each generated sequence comes with the structure it was built from (`Sample.blocks` etc.),
so tests can check the parser against ground truth rather than against itself.

    prompt        0..4 ordinary tokens, with or without <think> somewhere in it
    per block     [fillers] BS content BE [fillers] SS memento-text SE
                  content and memento text may be empty; fillers are ordinary tokens
                  between markers (outside any block's content and memento)
    unfinished    optionally a trailing block cut off at a random point (BS.., ..BE, ..SS..)
    answer        optionally </think> followed by 0..3 ordinary tokens (never after an
                  unfinished block)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from tests.helpers.models import ORDINARY_IDS, PAD_ID, SPECIAL

__all__ = ["ExpectedBlock", "PaddedBatch", "Sample", "memento_sequences", "padded_batches"]


@dataclass
class ExpectedBlock:
    """Where the generator put one block's markers (positions in the unpadded sequence)."""

    start: int
    end: int | None
    summary_start: int | None
    summary_end: int | None
    content: list[int] = field(default_factory=list)  # the content token ids


@dataclass
class Sample:
    """A generated sequence and the structure it was built from."""

    ids: list[int]
    prompt_stop: int  # one past the last prompt token
    blocks: list[ExpectedBlock]
    think_end: int | None
    unfinished: bool  # the last block is not completed

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PaddedBatch:
    """Generated samples padded into one batch. offsets[b] is the first real position of row b."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    samples: list[Sample]
    offsets: list[int]
    side: str  # "left" or "right"


ordinary = st.sampled_from(ORDINARY_IDS)


def _tokens(max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(ordinary, min_size=0, max_size=max_size)


@st.composite
def memento_sequences(
    draw,
    *,
    max_blocks: int = 5,
    max_content: int = 4,
    max_memento: int = 3,
    max_filler: int = 2,
    bridge_fillers: bool = True,
    allow_unfinished: bool = False,
    answer: bool | None = None,
) -> Sample:
    """A random valid Memento sequence (never empty).

    bridge_fillers=False keeps <|block_end|> and <|summary_start|> adjacent (a filler there
    sees the block's content and stays visible later, a leak that tests of restart mode
    must exclude). answer=None draws whether to end with </think> + answer.
    """
    ids: list[int] = []
    prompt = draw(_tokens(4))
    if draw(st.booleans()):
        prompt.insert(draw(st.integers(0, len(prompt))), SPECIAL.think)
    ids += prompt
    prompt_stop = len(ids)

    blocks: list[ExpectedBlock] = []
    for _ in range(draw(st.integers(0, max_blocks))):
        if blocks:  # fillers before the first block belong to the prompt
            ids += draw(_tokens(max_filler))
        start = len(ids)
        ids.append(SPECIAL.block_start)
        content = draw(_tokens(max_content))
        ids += content
        end = len(ids)
        ids.append(SPECIAL.block_end)
        if bridge_fillers:
            ids += draw(_tokens(max_filler))
        summary_start = len(ids)
        ids.append(SPECIAL.summary_start)
        ids += draw(_tokens(max_memento))
        summary_end = len(ids)
        ids.append(SPECIAL.summary_end)
        blocks.append(ExpectedBlock(start, end, summary_start, summary_end, content))

    unfinished = allow_unfinished and draw(st.booleans())
    if unfinished:
        if blocks:
            ids += draw(_tokens(max_filler))
        start = len(ids)
        ids.append(SPECIAL.block_start)
        content = draw(_tokens(max_content))
        ids += content
        blk = ExpectedBlock(start, None, None, None, content)
        stage = draw(st.sampled_from(["content", "block_end", "memento"]))
        if stage in ("block_end", "memento"):
            blk.end = len(ids)
            ids.append(SPECIAL.block_end)
            if bridge_fillers:
                ids += draw(_tokens(max_filler))
        if stage == "memento":
            blk.summary_start = len(ids)
            ids.append(SPECIAL.summary_start)
            ids += draw(_tokens(max_memento))
        blocks.append(blk)

    think_end = None
    with_answer = draw(st.booleans()) if answer is None else answer
    if with_answer and not unfinished:
        if blocks:
            ids += draw(_tokens(max_filler))
        think_end = len(ids)
        ids.append(SPECIAL.think_end)
        ids += draw(_tokens(3))

    if not ids:  # an empty prompt and nothing else: make it one ordinary token
        ids = [draw(ordinary)]
        prompt_stop = 1
    return Sample(ids, prompt_stop, blocks, think_end, unfinished)


@st.composite
def padded_batches(
    draw,
    *,
    min_rows: int = 1,
    max_rows: int = 3,
    side: str | None = None,
    max_extra_pad: int = 2,
    **sequence_kwargs,
) -> PaddedBatch:
    """A batch of random sequences padded to one length (plus 0..max_extra_pad extra padding),
    all on the left or all on the right (side=None draws which)."""
    samples = draw(st.lists(memento_sequences(**sequence_kwargs), min_size=min_rows, max_size=max_rows))
    side = side or draw(st.sampled_from(["left", "right"]))
    T = max(len(s) for s in samples) + draw(st.integers(0, max_extra_pad))
    input_ids = torch.full((len(samples), T), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.long)
    offsets = []
    for b, s in enumerate(samples):
        off = T - len(s) if side == "left" else 0
        input_ids[b, off : off + len(s)] = torch.tensor(s.ids)
        attention_mask[b, off : off + len(s)] = 1
        offsets.append(off)
    return PaddedBatch(input_ids, attention_mask, samples, offsets, side)
