"""Memento layout: where the prompt, blocks, mementos and answer sit in a token sequence.

A Memento trace (SPEC section 1) reads

    <prompt> <think>
    <|block_start|> T_1 <|block_end|> <|summary_start|> M_1 <|summary_end|>
    ...
    </think> <answer>

`parse_layout` walks the six marker tokens with a small state machine and returns a
`Layout` whose positions index the (possibly padded) row they came from. Tokens that
are not markers may stand anywhere (a newline between `<|block_end|>` and
`<|summary_start|>` in real text, say); they belong to whatever region they sit in.
Every structural error raises `LayoutError` naming the position and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from ..errors import KVProbeError

__all__ = [
    "SPECIAL_TOKEN_STRINGS",
    "Block",
    "Layout",
    "LayoutError",
    "SpecialTokens",
    "parse_batch",
    "parse_layout",
]

# field name -> the token's text, as the Memento tokenizers spell it
SPECIAL_TOKEN_STRINGS: dict[str, str] = {
    "think": "<think>",
    "think_end": "</think>",
    "block_start": "<|block_start|>",
    "block_end": "<|block_end|>",
    "summary_start": "<|summary_start|>",
    "summary_end": "<|summary_end|>",
}


class LayoutError(KVProbeError, ValueError):
    """A token sequence (or tokenizer) does not have valid Memento structure."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the six Memento marker tokens."""

    think: int
    think_end: int
    block_start: int
    block_end: int
    summary_start: int
    summary_end: int

    def __post_init__(self) -> None:
        ids = [getattr(self, f) for f in SPECIAL_TOKEN_STRINGS]
        if len(set(ids)) != len(ids):
            raise LayoutError(f"special token ids must be distinct, got {dict(zip(SPECIAL_TOKEN_STRINGS, ids))}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpecialTokens":
        """Look the six markers up in a Hugging Face tokenizer; raise if any is missing."""
        vocab = tokenizer.get_vocab()
        missing = [text for text in SPECIAL_TOKEN_STRINGS.values() if text not in vocab]
        if missing:
            raise LayoutError(
                f"special token(s) {', '.join(missing)} missing from the tokenizer "
                "(add them first, e.g. kvprobe.data.traces.add_memento_tokens)"
            )
        return cls(**{field: vocab[text] for field, text in SPECIAL_TOKEN_STRINGS.items()})

    def name_of(self, token_id: int) -> str | None:
        for field, text in SPECIAL_TOKEN_STRINGS.items():
            if getattr(self, field) == token_id:
                return text
        return None


@dataclass(frozen=True)
class Block:
    """One thinking block and its memento. Positions index the row the layout came from.

    `end`, `summary_start` and `summary_end` are None while that part has not been
    produced yet (only possible with ``allow_unfinished=True``, for the last block).
    """

    index: int
    start: int  # position of <|block_start|>
    end: int | None  # position of <|block_end|>
    summary_start: int | None  # position of <|summary_start|>
    summary_end: int | None  # position of <|summary_end|>
    stop: int  # one past the last position this block's structure reaches

    @property
    def content(self) -> range:
        """Tokens strictly between <|block_start|> and <|block_end|> (SPEC's content(i))."""
        return range(self.start + 1, self.end if self.end is not None else self.stop)

    @property
    def delimiters(self) -> tuple[int, ...]:
        """Positions of <|block_start|> and (if produced) <|block_end|>."""
        return (self.start,) if self.end is None else (self.start, self.end)

    @property
    def memento(self) -> range:
        """The memento M_i with its markers: <|summary_start|> .. <|summary_end|> inclusive."""
        if self.summary_start is None:
            return range(0)
        last = self.summary_end if self.summary_end is not None else self.stop - 1
        return range(self.summary_start, last + 1)

    @property
    def memento_text(self) -> range:
        """The memento's own tokens, strictly between its two markers."""
        m = self.memento
        if not m:
            return m
        return range(m.start + 1, self.summary_end if self.summary_end is not None else m.stop)

    @property
    def completed(self) -> bool:
        """True once <|summary_end|> has been produced: later queries may lose the block."""
        return self.summary_end is not None


@dataclass(frozen=True)
class Layout:
    """The Memento structure of one sequence.

    `offset`..`offset+length` are the row's real (non-padding) tokens; every range and
    position here is absolute in the row, so it indexes model inputs and outputs directly.
    """

    offset: int
    length: int
    prompt: range  # tokens before the first <|block_start|> (includes <think>)
    blocks: tuple[Block, ...]
    think_end: int | None  # position of </think>, if present
    answer: range  # tokens after </think> (empty if none)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_completed(self) -> int:
        return sum(b.completed for b in self.blocks)

    @property
    def stop(self) -> int:
        return self.offset + self.length

    def block_of(self, position: int) -> int | None:
        """Index of the block whose content holds `position`, else None."""
        for b in self.blocks:
            if position in b.content:
                return b.index
        return None


# parser states
_PROMPT, _IN_BLOCK, _AFTER_BLOCK, _IN_SUMMARY, _BETWEEN, _ANSWER = range(6)


def parse_layout(
    ids: Sequence[int] | torch.Tensor,
    special: SpecialTokens,
    *,
    allow_unfinished: bool = False,
    offset: int = 0,
) -> Layout:
    """Parse the Memento structure of one unpadded token sequence.

    ids: (T,) token ids. `offset` is added to every position (the number of left-padding
    tokens before this sequence in its row). With ``allow_unfinished=True`` a trailing
    block whose memento is not finished (a generation in progress) is accepted.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise LayoutError(f"parse_layout takes one sequence of shape (T,), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    T = len(ids)
    s = special
    blocks: list[Block] = []
    state = _PROMPT
    cur: dict[str, int | None] = {}
    first_block: int | None = None
    think_end: int | None = None
    seen_think = False

    def fail(pos: int, problem: str) -> LayoutError:
        return LayoutError(f"position {pos + offset}: {problem}")

    def close_block(stop: int) -> None:
        blocks.append(Block(index=len(blocks), stop=stop + offset, **cur))  # type: ignore[arg-type]

    for pos, tok in enumerate(ids):
        name = s.name_of(tok)
        if name is None:
            continue
        p = pos + offset
        if state == _ANSWER:
            raise fail(pos, "second </think>" if tok == s.think_end else f"{name} after </think>")
        if tok == s.think:
            if state != _PROMPT or first_block is not None:
                raise fail(pos, "<think> after the prompt")
            if seen_think:
                raise fail(pos, "second <think>")
            seen_think = True
        elif tok == s.block_start:
            if state == _IN_BLOCK:
                raise fail(pos, f"nested <|block_start|>: block opened at position {cur['start']} is not closed")
            if state in (_AFTER_BLOCK, _IN_SUMMARY):
                raise fail(pos, f"<|block_start|> before the memento of block {len(blocks)} is finished")
            if first_block is None:
                first_block = pos
            cur = {"start": p, "end": None, "summary_start": None, "summary_end": None}
            state = _IN_BLOCK
        elif tok == s.block_end:
            if state != _IN_BLOCK:
                raise fail(pos, "<|block_end|> with no open block")
            cur["end"] = p
            state = _AFTER_BLOCK
        elif tok == s.summary_start:
            if state == _IN_BLOCK:
                raise fail(pos, f"<|summary_start|> inside block opened at position {cur['start']} (no <|block_end|>)")
            if state != _AFTER_BLOCK:
                raise fail(pos, "summary with no block: <|summary_start|> not preceded by <|block_end|>")
            cur["summary_start"] = p
            state = _IN_SUMMARY
        elif tok == s.summary_end:
            if state != _IN_SUMMARY:
                raise fail(pos, "<|summary_end|> with no open <|summary_start|>")
            cur["summary_end"] = p
            close_block(pos + 1)
            state = _BETWEEN
        elif tok == s.think_end:
            if state in (_IN_BLOCK, _AFTER_BLOCK, _IN_SUMMARY):
                raise fail(pos, f"</think> while block {len(blocks)} (opened at position {cur['start']}) is unfinished")
            think_end = p
            state = _ANSWER

    if state in (_IN_BLOCK, _AFTER_BLOCK, _IN_SUMMARY):
        if not allow_unfinished:
            what = {_IN_BLOCK: "unclosed block", _AFTER_BLOCK: "block without memento", _IN_SUMMARY: "unclosed memento"}
            raise LayoutError(
                f"position {cur['start']}: {what[state]} at the end of the sequence "
                "(pass allow_unfinished=True for a generation in progress)"
            )
        close_block(T)

    prompt_stop = first_block if first_block is not None else (think_end - offset if think_end is not None else T)
    return Layout(
        offset=offset,
        length=T,
        prompt=range(offset, prompt_stop + offset),
        blocks=tuple(blocks),
        think_end=think_end,
        answer=range(think_end + 1, T + offset) if think_end is not None else range(T + offset, T + offset),
    )


def parse_batch(
    input_ids: torch.Tensor,
    special: SpecialTokens,
    attention_mask: torch.Tensor | None = None,
    *,
    allow_unfinished: bool = False,
) -> list[Layout]:
    """Parse a padded batch.

    input_ids: (B, T); attention_mask: (B, T) with 1 for real tokens. Each row's real
    tokens must be contiguous (left or right padding); positions in the returned
    layouts index the padded row.
    """
    if input_ids.dim() != 2:
        raise LayoutError(f"parse_batch takes input_ids of shape (B, T), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return [parse_layout(row, special, allow_unfinished=allow_unfinished) for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise LayoutError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    layouts = []
    for b, (row, keep) in enumerate(zip(input_ids, attention_mask.bool())):
        real = keep.nonzero().flatten()
        if len(real) == 0:
            raise LayoutError(f"row {b}: no real tokens (attention_mask is all zero)")
        first, last = int(real[0]), int(real[-1])
        if last - first + 1 != len(real):
            raise LayoutError(f"row {b}: padding inside the sequence (real tokens must be contiguous)")
        try:
            layouts.append(
                parse_layout(row[first : last + 1], special, allow_unfinished=allow_unfinished, offset=first)
            )
        except LayoutError as e:
            raise LayoutError(f"row {b}, {e}") from None
    return layouts
