"""Text-level passcode injection into a real trace (SPEC section 3, step 1).

A sentence carrying the passcode ("The secret passcode is 41077.") is inserted into the
content of the target block at a sentence boundary; nothing else in the trace changes.
`inject_and_tokenize` re-tokenizes and verifies what the experiment relies on:

- the passcode's tokens (found through the tokenizer's character offsets) all lie in the
  content of the target block, so masking hides them;
- every token before the target block's content, and every token from its
  <|block_end|> on (mementos included), is the same as in the un-injected trace. Tokens
  after the target block move by the change in its length; their ids do not change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..memento.layout import Layout, SpecialTokens
from .traces import Trace, TraceError, encode_text, parse_trace_ids, prompt_head, render_with_spans, tokenize_trace

__all__ = [
    "DEFAULT_TEMPLATE",
    "WHERE",
    "InjectedSample",
    "inject_and_tokenize",
    "inject_passcode",
    "sentence_boundaries",
]

DEFAULT_TEMPLATE = "The secret passcode is {passcode}."
WHERE = ("start", "middle", "end")  # or an int k: before sentence k (0 = start, n = end)
PLACEHOLDER = "{passcode}"

# a sentence ends at . ! ? (then closing quotes/brackets) followed by whitespace, or at a blank line
_BOUNDARY = re.compile(r"(?:[.!?][\"'\u2019\u201d)\]]*\s+|\n\s*\n\s*)(?=\S)")


@dataclass
class InjectedSample:
    """A trace with a passcode injected, tokenized and verified.

    input_ids (T,) int64; layout parses them; positions: the token positions that cover
    the passcode's characters (all inside ``layout.blocks[target_block].content``).
    """

    trace: Trace
    input_ids: torch.Tensor
    layout: Layout
    passcode: str
    target_block: int
    positions: tuple[int, ...]


def sentence_boundaries(text: str) -> list[int]:
    """Character positions where a sentence may be inserted: 0, each sentence start, len(text).

    A boundary follows '.', '!' or '?' (and closing quotes or brackets) plus whitespace, or a
    blank line. Abbreviations such as "e.g. x" also count; that only adds insertion points.
    """
    inner = [m.end() for m in _BOUNDARY.finditer(text) if 0 < m.end() < len(text)]
    return [0, *inner, len(text)]


def _check_target(trace: Trace, target_block: int) -> None:
    if type(target_block) is not int or not 0 <= target_block < trace.n_blocks:
        raise TraceError(f"trace {trace.trace_id!r} has {trace.n_blocks} blocks, no target block {target_block}")


def _split_template(template: str) -> tuple[str, str]:
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"template must contain {PLACEHOLDER} exactly once, got {template!r}")
    before, after = template.split(PLACEHOLDER)
    return before, after


def _inject(trace: Trace, target_block: int, passcode: str, template: str, where: str | int) -> tuple[Trace, int]:
    """The injected trace and the passcode's character offset in the target block's new content."""
    _check_target(trace, target_block)
    if not isinstance(passcode, str) or not passcode or passcode != passcode.strip():
        raise ValueError(f"passcode must be a non-empty string without surrounding whitespace, got {passcode!r}")
    before, after = _split_template(template)
    sentence = before + passcode + after
    content = trace.blocks[target_block]
    bounds = sentence_boundaries(content)
    n = len(bounds) - 1  # sentences in the block
    where_name = f"trace {trace.trace_id!r}, block {target_block}"
    if where == "start":
        k = 0
    elif where == "end":
        k = n
    elif where == "middle":
        if n < 2:
            raise ValueError(f"{where_name}: one sentence, so no middle boundary (use 'start' or 'end')")
        k = min(range(1, n), key=lambda j: abs(bounds[j] - len(content) / 2))
    elif type(where) is int:
        if not 0 <= where <= n:
            raise ValueError(f"{where_name}: where={where} but the block has {n} sentences (0..{n} allowed)")
        k = where
    else:
        raise ValueError(f"where must be one of {WHERE} or a sentence index, got {where!r}")
    at = bounds[k]
    if at == 0:
        new, offset = sentence + " " + content, 0
    elif at == len(content):
        sep = "" if content[-1].isspace() else " "
        new, offset = content + sep + sentence, len(content) + len(sep)
    else:
        new, offset = content[:at] + sentence + " " + content[at:], at
    blocks = list(trace.blocks)
    blocks[target_block] = new
    return replace(trace, blocks=blocks), offset + len(before)


def inject_passcode(
    trace: Trace,
    target_block: int,
    passcode: str,
    *,
    template: str = DEFAULT_TEMPLATE,
    where: str | int = "start",
) -> Trace:
    """A copy of `trace` whose block `target_block` (0-based) carries `template` with the passcode.

    where: 'start', 'end', 'middle' (the sentence boundary nearest the middle of the block's
    characters) or an int k (before sentence k). "{passcode}" in the template is replaced
    literally; other braces are kept.
    """
    return _inject(trace, target_block, passcode, template, where)[0]


def inject_and_tokenize(
    trace: Trace,
    target_block: int,
    passcode: str,
    tokenizer: Any,
    special: SpecialTokens | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    where: str | int = "start",
    base: tuple[torch.Tensor, Layout] | None = None,
    chat_template: str | None = None,
) -> InjectedSample:
    """Inject, tokenize (fast tokenizer: character offsets are needed) and verify; see the module docstring.

    base: `tokenize_trace(trace, tokenizer, special)` of the un-injected trace, if already
    computed (a sample source tokenizes each trace once). chat_template: Jinja text that wraps
    the prompt (`kvprobe.data.chat`), None for none. Raises ValueError on any failed check.
    """
    special = special or SpecialTokens.from_tokenizer(tokenizer)
    tid = trace.trace_id
    _check_target(trace, target_block)
    base_ids, base_lay = base if base is not None else tokenize_trace(trace, tokenizer, special,
                                                                      chat_template=chat_template)
    injected, char_offset = _inject(trace, target_block, passcode, template, where)
    text, spans = render_with_spans(injected, prompt_head(injected, tokenizer, chat_template))
    a = spans[target_block][0] + char_offset
    b = a + len(passcode)  # passcode characters text[a:b]
    ids, offsets = encode_text(text, tokenizer, offsets=True)
    assert offsets is not None
    layout = parse_trace_ids(ids, special, trace, "injected tokens")

    positions = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
    if not positions or offsets[positions[0]][0] > a or offsets[positions[-1]][1] < b:
        raise TraceError(f"trace {tid!r}: no tokens cover the passcode {passcode!r} (characters {a}..{b - 1})")
    content = layout.blocks[target_block].content
    outside = [p for p in positions if p not in content]
    if outside:
        raise TraceError(
            f"trace {tid!r}: passcode tokens at positions {outside} lie outside the content of block "
            f"{target_block} (positions {content.start}..{content.stop - 1}), e.g. straddling a marker"
        )
    for old, new in zip(base_lay.blocks, layout.blocks):
        if base_ids[list(old.memento_text)].tolist() != [ids[p] for p in new.memento_text]:
            raise TraceError(f"trace {tid!r}: the injection changed the memento text tokens of block {old.index}")
    head = base_lay.blocks[target_block].start + 1  # tokens up to the target's <|block_start|>
    if ids[:head] != base_ids[:head].tolist():
        raise TraceError(f"trace {tid!r}: the injection changed tokens before block {target_block}")
    old_end, new_end = base_lay.blocks[target_block].end, layout.blocks[target_block].end
    if ids[new_end:] != base_ids[old_end:].tolist():
        raise TraceError(f"trace {tid!r}: the injection changed tokens after the content of block {target_block}")
    input_ids = torch.tensor(ids, dtype=torch.long)  # (T,)
    return InjectedSample(injected, input_ids, layout, passcode, target_block, tuple(positions))
