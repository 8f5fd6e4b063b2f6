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
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import KVProbeError

if TYPE_CHECKING:
    import torch

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
_UNFINISHED = {_IN_BLOCK: "unclosed block", _AFTER_BLOCK: "block without memento", _IN_SUMMARY: "unclosed memento"}


class _LayoutParser:
    """The state machine of `parse_layout`: it reads one token at a time, positions relative to the sequence."""

    def __init__(self, special: SpecialTokens, offset: int) -> None:
        self.special = special
        self.offset = offset  # added to every position recorded or named
        self.state = _PROMPT
        self.blocks: list[Block] = []
        self.cur: dict[str, int | None] = {}  # the open block's fields, absolute positions
        self.first_block: int | None = None
        self.think_end: int | None = None
        self.seen_think = False

    def fail(self, pos: int, problem: str) -> LayoutError:
        """The error naming position `pos` (plus the offset) and the problem."""
        return LayoutError(f"position {pos + self.offset}: {problem}")

    def close_block(self, stop: int) -> None:
        """Record the open block, its structure reaching up to position `stop`."""
        self.blocks.append(Block(index=len(self.blocks), stop=stop + self.offset, **self.cur))  # type: ignore[arg-type]

    def read(self, pos: int, tok: int) -> None:
        """Advance over the token `tok` at `pos`; tokens that are not markers change nothing."""
        s = self.special
        name = s.name_of(tok)
        if name is None:
            return
        if self.state == _ANSWER:
            raise self.fail(pos, "second </think>" if tok == s.think_end else f"{name} after </think>")
        if tok == s.think:
            self.think(pos)
        elif tok == s.block_start:
            self.block_start(pos)
        elif tok == s.block_end:
            if self.state != _IN_BLOCK:
                raise self.fail(pos, "<|block_end|> with no open block")
            self.cur["end"] = pos + self.offset
            self.state = _AFTER_BLOCK
        elif tok == s.summary_start:
            self.summary_start(pos)
        elif tok == s.summary_end:
            if self.state != _IN_SUMMARY:
                raise self.fail(pos, "<|summary_end|> with no open <|summary_start|>")
            self.cur["summary_end"] = pos + self.offset
            self.close_block(pos + 1)
            self.state = _BETWEEN
        elif tok == s.think_end:
            if self.state in (_IN_BLOCK, _AFTER_BLOCK, _IN_SUMMARY):
                raise self.fail(pos, f"</think> while block {len(self.blocks)} (opened at position "
                                     f"{self.cur['start']}) is unfinished")
            self.think_end = pos + self.offset
            self.state = _ANSWER

    def think(self, pos: int) -> None:
        """<think>: only once, and only in the prompt."""
        if self.state != _PROMPT or self.first_block is not None:
            raise self.fail(pos, "<think> after the prompt")
        if self.seen_think:
            raise self.fail(pos, "second <think>")
        self.seen_think = True

    def block_start(self, pos: int) -> None:
        """<|block_start|>: opens a block, once the previous one has its memento."""
        if self.state == _IN_BLOCK:
            raise self.fail(pos, f"nested <|block_start|>: block opened at position {self.cur['start']} is not closed")
        if self.state in (_AFTER_BLOCK, _IN_SUMMARY):
            raise self.fail(pos, f"<|block_start|> before the memento of block {len(self.blocks)} is finished")
        if self.first_block is None:
            self.first_block = pos
        self.cur = {"start": pos + self.offset, "end": None, "summary_start": None, "summary_end": None}
        self.state = _IN_BLOCK

    def summary_start(self, pos: int) -> None:
        """<|summary_start|>: opens the memento of the block just closed."""
        if self.state == _IN_BLOCK:
            raise self.fail(pos, f"<|summary_start|> inside block opened at position {self.cur['start']} "
                                 "(no <|block_end|>)")
        if self.state != _AFTER_BLOCK:
            raise self.fail(pos, "summary with no block: <|summary_start|> not preceded by <|block_end|>")
        self.cur["summary_start"] = pos + self.offset
        self.state = _IN_SUMMARY

    def finish(self, T: int, allow_unfinished: bool) -> Layout:
        """The layout of the T tokens read, closing (or refusing) a trailing unfinished block."""
        offset, think_end = self.offset, self.think_end
        if self.state in _UNFINISHED:
            if not allow_unfinished:
                raise LayoutError(
                    f"position {self.cur['start']}: {_UNFINISHED[self.state]} at the end of the sequence "
                    "(pass allow_unfinished=True for a generation in progress)"
                )
            self.close_block(T)
        first_block = self.first_block
        prompt_stop = first_block if first_block is not None else (think_end - offset if think_end is not None else T)
        return Layout(
            offset=offset,
            length=T,
            prompt=range(offset, prompt_stop + offset),
            blocks=tuple(self.blocks),
            think_end=think_end,
            answer=range(think_end + 1, T + offset) if think_end is not None else range(T + offset, T + offset),
        )


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
    import torch  # here, not at the top: layouts and traces are read without torch (`kvprobe export-traces`)

    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise LayoutError(f"parse_layout takes one sequence of shape (T,), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    parser = _LayoutParser(special, offset)
    for pos, tok in enumerate(ids):
        parser.read(pos, tok)
    return parser.finish(len(ids), allow_unfinished)


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
