"""Traces to training rows: tokenise once, cut to `max_length`, record the layout.

`TraceEncoder` renders a `Trace` in the Memento token format (`kvprobe.data.traces.render`,
the prompt optionally wrapped in a template), tokenises it, appends EOS and parses the
Memento structure. A row longer than `max_length` tokens is truncated, as the paper does
("Sequences are tokenized to a maximum length of 32,768 tokens"), or dropped
(``overlength="drop"``). A truncated row may end inside a block or a memento: its layout is
parsed with ``allow_unfinished=True``, so the unfinished block stays visible to every later
query (it was never completed) and the mask stays the memento rule of SPEC section 2.
The truncated row's mask is then the full trace's mask restricted to the kept tokens, for
every training mask (tested). One inference-only variant differs: restart mode with
`keep_last_block_for_answer`, cut between a memento and the next <|block_start|>, where the
full trace re-prefills that memento at the block the cut removed.

`EncodedTrace` is one row: the token ids, its `Layout`, where the loss starts, and whether
it was cut. `record()` flattens it to plain columns (ints and int lists) for an HF
`datasets` table, `from_record` rebuilds it in O(blocks) without re-parsing the ids, which
keeps the stage-2 collator at milliseconds per 32K-token row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping, Sequence

from ..data.traces import Trace, TraceError, parse_trace_ids, render
from ..memento.layout import Block, Layout, SpecialTokens, parse_layout
from ..errors import KVProbeError

__all__ = [
    "IGNORE_INDEX",
    "EncodedTrace",
    "Overlength",
    "OverlengthError",
    "TraceEncoder",
    "layout_from_record",
    "layout_record",
]

IGNORE_INDEX = -100
Overlength = Literal["truncate", "drop"]
_NONE = -1  # a position that does not exist (an unfinished block's end, a trace without </think>)


class OverlengthError(KVProbeError, ValueError):
    """A trace that cannot be trained on within `max_length` tokens (too long to keep, or no
    target token left after truncation)."""


def layout_record(layout: Layout) -> dict[str, Any]:
    """The columns that rebuild an offset-0 `Layout` (`layout_from_record`): the prompt's end,
    </think>'s position (-1: none) and per block [start, end, summary_start, summary_end, stop]
    (-1 where the block has not produced that marker)."""
    if layout.offset != 0:
        raise ValueError(f"layout_record takes an unpadded layout (offset 0), got offset {layout.offset}")

    def pos(p: int | None) -> int:
        return _NONE if p is None else p

    return {
        "prompt_stop": layout.prompt.stop,
        "think_end": pos(layout.think_end),
        "blocks": [[b.start, pos(b.end), pos(b.summary_start), pos(b.summary_end), b.stop] for b in layout.blocks],
    }


def layout_from_record(n_tokens: int, record: Mapping[str, Any]) -> Layout:
    """The `Layout` of an `n_tokens`-long row from its `layout_record` columns (O(blocks))."""

    def pos(p: Any) -> int | None:
        return None if int(p) == _NONE else int(p)

    blocks = tuple(Block(i, int(s), pos(e), pos(ss), pos(se), int(stop))
                   for i, (s, e, ss, se, stop) in enumerate(record["blocks"]))
    think_end = pos(record["think_end"])
    answer = range(think_end + 1, n_tokens) if think_end is not None else range(n_tokens, n_tokens)
    return Layout(0, n_tokens, range(0, int(record["prompt_stop"])), blocks, think_end, answer)


@dataclass(frozen=True)
class EncodedTrace:
    """One training row.

    ids:        (T,) token ids, EOS appended, cut to max_length when `truncated` (a list; a
                numpy array for rows read from a tokenised table)
    layout:     the Memento structure of `ids` (offset 0; the last block may be unfinished
                when truncated)
    loss_start: first position whose token is a target (labels are -100 before it)
    n_tokens:   tokens before truncation (len(ids) unless truncated)
    """

    trace_id: str
    ids: Sequence[int]
    layout: Layout
    loss_start: int
    n_tokens: int
    truncated: bool

    def labels(self) -> list[int]:
        """Targets of the unpadded row: the ids, -100 before `loss_start`."""
        return [IGNORE_INDEX] * self.loss_start + [int(i) for i in self.ids[self.loss_start:]]

    def record(self) -> dict[str, Any]:
        """Plain columns for a `datasets` table (`from_record` reads them back)."""
        return {"trace_id": self.trace_id, "input_ids": list(self.ids), "loss_start": self.loss_start,
                "n_tokens": self.n_tokens, "truncated": self.truncated, **layout_record(self.layout)}

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> "EncodedTrace":
        ids = row["input_ids"]
        ids = ids if hasattr(ids, "dtype") else list(ids)  # a table's numpy column stays an array
        return cls(str(row["trace_id"]), ids, layout_from_record(len(ids), row), int(row["loss_start"]),
                   int(row["n_tokens"]), bool(row["truncated"]))


@dataclass
class TraceEncoder:
    """How traces become training rows (see the module docstring).

    tokenizer:       a tokenizer holding the six Memento markers
    prompt_template: a format string with ``{prompt}`` wrapped around each trace's prompt
    append_eos:      end each row with the tokenizer's EOS token (learn to stop)
    max_length:      longest row in tokens (None: no limit)
    overlength:      "truncate" (the paper's) cuts a longer row to max_length tokens,
                     "drop" leaves it out (OverlengthError)
    loss_on_think:   targets start at <think>, the assistant turn's first token (the paper's;
                     False: at the first <|block_start|>)
    loss_on_prompt:  every token is a target
    """

    tokenizer: Any
    prompt_template: str | None = None
    append_eos: bool = True
    max_length: int | None = None
    overlength: Overlength = "truncate"
    loss_on_think: bool = True
    loss_on_prompt: bool = False

    def __post_init__(self) -> None:
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        if self.overlength not in ("truncate", "drop"):
            raise ValueError(f"overlength must be 'truncate' or 'drop', got {self.overlength!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if self.append_eos and eos is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        self.eos_id: int | None = eos if self.append_eos else None

    def options(self) -> dict[str, Any]:
        """Everything besides the tokenizer that decides the rows (the tokenised cache's key)."""
        return {"prompt_template": self.prompt_template, "eos": self.eos_id, "max_length": self.max_length,
                "overlength": self.overlength, "loss_on_think": self.loss_on_think,
                "loss_on_prompt": self.loss_on_prompt}

    def prepare(self, trace: Trace) -> Trace:
        """The trace as it is rendered for training (prompt wrapped in the template, if any)."""
        if self.prompt_template is None:
            return trace
        return replace(trace, prompt=self.prompt_template.format(prompt=trace.prompt), token_ids=None)

    def encode(self, trace: Trace) -> EncodedTrace:
        """One trace's row. TraceError if its tokens are not valid Memento structure,
        OverlengthError if it cannot be trained on within max_length."""
        return self.encode_batch([trace])[0]

    def encode_batch(self, traces: Sequence[Trace]) -> list[EncodedTrace]:
        """Rows of several traces, tokenised in one call (the tokenizer's own threads)."""
        return [self._row(t, ids) for t, ids in zip(traces, self._token_ids(traces))]

    def encode_or_reason(self, traces: Sequence[Trace]) -> list[EncodedTrace | str]:
        """`encode_batch`, with the one-line reason in place of each row that is left out."""
        out: list[EncodedTrace | str] = []
        for t, ids in zip(traces, self._token_ids(traces)):
            try:
                out.append(self._row(t, ids))
            except (TraceError, OverlengthError) as e:
                out.append(str(e).splitlines()[0])
        return out

    def _token_ids(self, traces: Sequence[Trace]) -> list[list[int]]:
        """Token ids of each rendered trace, with the tokenizer's special-token convention
        (`kvprobe.data.traces.encode_text`: Qwen3 adds no BOS, tokenizers that need one add it)."""
        texts = [render(self.prepare(t)) for t in traces]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _row(self, trace: Trace, ids: list[int]) -> EncodedTrace:
        layout = parse_trace_ids(ids, self.special, trace, "rendered tokens")  # TraceError if malformed
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        n_tokens = len(ids)
        truncated = self.max_length is not None and n_tokens > self.max_length
        if truncated:
            if self.overlength == "drop":
                raise OverlengthError(f"trace {trace.trace_id!r} has {n_tokens} tokens, more than max_length="
                                      f"{self.max_length} (overlength='drop')")
            ids = ids[: self.max_length]
        if truncated or self.eos_id is not None:
            # a cut may leave the last block (or its memento) unfinished: it stays visible
            layout = parse_layout(ids, self.special, allow_unfinished=truncated)
        loss_start = self._loss_start(ids, layout)
        if max(loss_start, 1) >= len(ids):  # the first token is never a target (nothing predicts it)
            raise OverlengthError(f"trace {trace.trace_id!r}: no target token within max_length={self.max_length} "
                                  f"(its prompt takes {loss_start} of its {n_tokens} tokens)")
        return EncodedTrace(trace.trace_id, ids, layout, loss_start, n_tokens, truncated)

    def _loss_start(self, ids: list[int], layout: Layout) -> int:
        if self.loss_on_prompt:
            return 0
        if self.loss_on_think:
            thinks = [p for p in layout.prompt if ids[p] == self.special.think]
            if thinks:
                return thinks[-1]
        return layout.prompt.stop
