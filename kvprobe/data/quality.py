"""Summary quality check: flag traces whose mementos carry nothing the leakage probe could measure.

The Memento pipeline's literal failure placeholders are refused where a record is read
(`kvprobe.data.traces.from_pipeline_record`). This module catches what passes that check
but is still no memento of its block:

- templated: the memento is near-identical to another memento of the same trace once
  numbers are removed ("Block 2: worked through steps 5-9 of the solution; key quantities
  kept for later" for every block), and generic: fewer than `GENERIC_SHARE` of its content
  words (below) occur in its own block. Near-identical: a `difflib` ratio of at least
  `TEMPLATE_RATIO` between the number-free forms (lower case, letters only), judged only for
  forms of at least `MIN_TEMPLATE_WORDS` words, so terse mementos ("m0", "done") are not.
  The generic condition keeps a case analysis ("Case n = 3: n^2 + 1 = 10, not divisible by
  7." for n = 3, 4, 5), whose mementos share a form but each speak of their own block;
- content-free: the memento shares no content word with its block. Content words are
  words of three or more letters that are not `STOPWORDS`, compared on their first five
  letters (a crude stem: "multiplying" meets "multiply"), and numbers of two or more digits.
  A memento without any content word ("r + s = 2l") is not judged;
- scored zero: the pipeline's own failure signal, a record's `avg_final_score` of 0.

A trace is flagged when more than half of its mementos are templated or content-free (one
paraphrased memento among many is not a broken trace), or when it scored zero.
`screen(flags, mode, where)` applies the data option `data.summary_check`:

    refuse   a TraceError naming the count and the first flagged ids (the default)
    drop     the flagged traces are left out, with a warning naming them
    keep     the flagged traces are kept, with a warning naming them
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Any, Sequence

__all__ = ["SUMMARY_CHECKS", "memento_flag", "record_flag", "screen"]

SUMMARY_CHECKS = ("refuse", "drop", "keep")
TEMPLATE_RATIO = 0.9
GENERIC_SHARE = 0.5  # a templated memento is generic when fewer than this share of its content words are its block's
MIN_TEMPLATE_WORDS = 3
STOPWORDS = frozenset("""
a about above after again against all also and any are because been before being below between both but can
could did does doing down during each few for from further had has have having her here hers him his how into
its itself just more most much must not now off once only other our ours out over own same she should some
such than that the their theirs them then there these they this those through too under until upon very was
were what when where which while who whom why will with would you your yours
""".split())
_WORD = re.compile(r"[a-z]+|\d+")


def _number_free(text: str) -> str:
    """Lower case, numbers removed, every run of non-letters one space."""
    return " ".join(re.sub(r"[^a-z]+", " ", re.sub(r"\d+", " ", text.lower())).split())


def _content_words(text: str) -> set[str]:
    """Content words of `text`: 5-letter stems of words (3+ letters, no stopword) and 2+ digit numbers."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if w.isdigit():
            if len(w) >= 2:
                out.add(w)
        elif len(w) >= 3 and w not in STOPWORDS:
            out.add(w[:5])
    return out


def memento_flag(blocks: Sequence[str], summaries: Sequence[str]) -> str | None:
    """Why the mementos of one trace (block i summarised by summaries[i]) are no mementos, or None.

    The reason is short, e.g. "templated mementos (blocks 0, 1, 2)"; see the module docstring."""
    forms = [_number_free(s) for s in summaries]
    similar = set()
    for i, a in enumerate(forms):
        if len(a.split()) < MIN_TEMPLATE_WORDS:
            continue
        for j in range(i + 1, len(forms)):
            if len(forms[j].split()) >= MIN_TEMPLATE_WORDS and \
                    difflib.SequenceMatcher(None, a, forms[j], autojunk=False).ratio() >= TEMPLATE_RATIO:
                similar |= {i, j}
    empty, generic = set(), set()
    for i, (block, summary) in enumerate(zip(blocks, summaries)):
        words = _content_words(summary)
        shared = words & _content_words(block)
        if words and not shared:
            empty.add(i)
        if len(shared) < GENERIC_SHARE * len(words):
            generic.add(i)
    templated = similar & generic
    if 2 * len(templated | empty) <= len(summaries):
        return None
    parts = []
    if templated:
        parts.append(f"templated mementos (blocks {', '.join(map(str, sorted(templated)))})")
    if empty:
        parts.append(f"mementos sharing no content word with their block (blocks {', '.join(map(str, sorted(empty)))})")
    return " and ".join(parts)


def record_flag(record: dict[str, Any], blocks: Sequence[str], summaries: Sequence[str]) -> str | None:
    """`memento_flag`, or "avg_final_score 0" when the pipeline scored the record's summaries zero."""
    score = record.get("avg_final_score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and score == 0:
        return "avg_final_score 0 (the pipeline's failure signal)"
    return memento_flag(blocks, summaries)


def screen(flags: dict[str, str], n: int, mode: str, where: str) -> set[str]:
    """Apply `mode` (SUMMARY_CHECKS) to `flags` (trace id -> reason) of `n` traces read from `where`.

    Returns the ids to leave out (empty unless mode is "drop"); raises a one-line ValueError
    naming the count and the first ids when mode is "refuse" and anything is flagged."""
    if mode not in SUMMARY_CHECKS:
        raise ValueError(f"summary check must be one of {SUMMARY_CHECKS}, got {mode!r}")
    if not flags:
        return set()
    first = "; ".join(f"{tid!r}: {why}" for tid, why in list(flags.items())[:3])
    what = f"{where}: {len(flags)} of {n} traces have no usable mementos (e.g. {first})"
    if mode == "refuse":
        raise ValueError(f"{what}; drop them or set data.summary_check to 'drop' or 'keep'")
    warnings.warn(f"{what}; {'left out' if mode == 'drop' else 'kept'} (data.summary_check: {mode})", stacklevel=3)
    return set(flags) if mode == "drop" else set()
