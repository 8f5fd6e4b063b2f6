"""The condition-comparison section: paired differences between mask conditions and what each isolates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    from ..analysis import CellResult, DiffResult
from ..grid import BLOCK_END, MEMENTO
from .words import (
    DIFFERENCE_MEANINGS,
    _common_chance,
    _index,
    _pp,
    _table,
    comparison_series,
    condition_order,
    fmt_accuracy,
    fmt_difference,
    interval_verdict,
    offset_label,
    probe_order,
    verdict_counts,
)


def _meaning(a: str, b: str, site: str) -> str:
    """What a - b isolates, for the masks (MaskConfig.name) a and b."""
    if site != MEMENTO:
        return (f"the difference between the two modes in the `{site}` token's own KV "
                "(probes there read the delimiter channel directly)")
    if (a, b) in DIFFERENCE_MEANINGS:
        return DIFFERENCE_MEANINGS[(a, b)]
    if (b, a) in DIFFERENCE_MEANINGS:
        return "the negative of " + DIFFERENCE_MEANINGS[(b, a)]
    return "a paired difference with no predefined interpretation"


def _comparison_accuracy_table(rows: Sequence[CellResult], offset: int) -> str:
    cells = [r for r in rows if r.offset == offset]
    idx = _index(cells)
    series = comparison_series(cells)
    header = ["probe", "layer", *(c if s == MEMENTO else f"{s} site ({c})" for c, s in series)]
    body = []
    for probe in probe_order(cells):
        for layer in sorted({r.layer for r in cells if r.probe == probe}):
            line = [probe, str(layer)]
            for c, s in series:
                r = idx.get((c, s, offset, layer, probe))
                line.append(fmt_accuracy(r) if r else "—")
            body.append(line)
    return _table(header, body)


def _conditions(rows: Sequence[CellResult], diffs: Sequence[DiffResult]) -> str:
    out = ["## Condition comparison", ""]
    conditions = condition_order(rows)
    sites = sorted({r.site for r in rows})
    if len(conditions) < 2 and sites == [MEMENTO] and not diffs:
        out.append(f"Only one condition (`{conditions[0] if conditions else '—'}`) and one site in this report: "
                   "nothing to compare. Capture restart and restart-delims-visible stores to separate the channels.")
        return "\n".join(out)
    masked_offsets = sorted({r.offset for r in rows if r.offset > 0} | {d.offset for d in diffs if d.offset > 0})
    offset = masked_offsets[0] if masked_offsets else 0
    present = {_masks(d) for d in diffs} or {(a, b) for a in conditions for b in conditions}
    meanings = [f"- {a} − {b}: {DIFFERENCE_MEANINGS[(a, b)]}." for a, b in DIFFERENCE_MEANINGS if (a, b) in present]
    if BLOCK_END in sites:
        meanings.append("- `block_end` site: probes at the <|block_end|> token read that delimiter channel directly.")
    holm_note = ""
    if diffs and any(d.p_holm == d.p_holm for d in diffs):  # corrected (not NaN)
        holm_note = (f" The last column corrects for multiple comparisons: a two-sided paired t-test per cell, "
                     f"Holm-corrected over all {len(diffs)} paired differences of this report (the 95% intervals "
                     "are per cell, uncorrected).")
    out += [
        "What each paired difference (same validation passcodes, paired bootstrap 95%) isolates:",
        "",
        *meanings,
        "",
        "No direction is assumed: each interval is reported as above 0, below 0, or containing 0." + holm_note,
        "",
        "Layer 0 reads the same in every condition, to the last digit: its keys and values are projections of "
        "the token and position embeddings alone, before any attention has mixed other positions in, so no mask "
        "can change them. What layer 0 reads at a masked offset is the memento's own text.",
        "",
        f"### Accuracy at {offset_label(offset)}",
        "",
        _comparison_accuracy_table(rows, offset),
    ]
    out += _block_end_sentences(rows, offset)
    if not diffs:
        out += ["", "No paired differences were computed (`compare`); the intervals above are unpaired."]
        return "\n".join(out)
    shown = sorted((d for d in diffs if d.offset == offset),
                   key=lambda d: (d.site != MEMENTO, _pair_rank(d), d.site, d.probe, d.layer))
    if shown:
        body = [[f"{d.a} − {d.b}", d.site, d.probe, str(d.layer), fmt_difference(d),
                 interval_verdict(d.ci_low, d.ci_high), _holm_verdict(d)] for d in shown]
        out += ["", f"### Paired differences at {offset_label(offset)}", "",
                _table(["difference", "site", "probe", "layer", "a − b [95%]", "interval", "Holm-corrected test"],
                       body)]
    out += ["", "### What the differences show", ""]
    pairs = {(d.a, d.b, d.site): _masks(d) for d in diffs}
    for (a, b, site) in sorted(pairs, key=lambda k: (k[2] != MEMENTO, _pair_rank_ab(*pairs[k]), k)):
        out.append(_pair_sentence(a, b, site, [d for d in diffs if (d.a, d.b, d.site) == (a, b, site)], offset,
                                  pairs[(a, b, site)]))
    return "\n".join(out)


def _holm_verdict(d: DiffResult) -> str:
    """'differs (p 0.001)' / 'no difference shown (p 0.4)' after Holm; '—' where not corrected."""
    if d.p_holm != d.p_holm:
        return "—"
    p = f"p {d.p_holm:.2g}" if d.p_holm >= 1e-4 else "p < 1e-4"
    return f"differs ({p})" if d.significant else f"no difference shown ({p})"


def _pair_rank_ab(a: str, b: str) -> int:
    order = [*DIFFERENCE_MEANINGS, *((y, x) for x, y in DIFFERENCE_MEANINGS)]
    return order.index((a, b)) if (a, b) in order else len(order)


def _masks(d: DiffResult) -> tuple[str, str]:
    """The two masks a difference compares (the condition names for results saved before masks were recorded)."""
    return d.a_mask or d.a, d.b_mask or d.b


def _pair_rank(d: DiffResult) -> int:
    return _pair_rank_ab(*_masks(d))


def _pair_sentence(a: str, b: str, site: str, diffs: Sequence[DiffResult], offset: int,
                   masks: tuple[str, str]) -> str:
    """One bullet: what a - b isolates and where its intervals lie, at `offset` and over all offsets."""
    at = sorted((d for d in diffs if d.offset == offset), key=lambda d: (d.probe, d.layer))
    parts = []
    if at:
        values = [d.difference for d in at]
        items = [(f"{d.probe} layer {d.layer}", d.ci_low, d.ci_high) for d in at]
        parts.append(f"at {offset_label(offset)} the difference runs from {_pp(min(values))} to {_pp(max(values))} pp, "
                     f"its interval {verdict_counts(items)}")
    items = [(f"{d.probe} {offset_label(d.offset)} layer {d.layer}", d.ci_low, d.ci_high) for d in diffs]
    parts.append(f"over all offsets: {verdict_counts(items)}")
    what = "" if masks == (a, b) else f" (masks {masks[0]} − {masks[1]})"
    return f"- **{a} − {b}**{what} (site `{site}`) isolates {_meaning(*masks, site)}: " + "; ".join(parts) + "."


def _block_end_sentences(rows: Sequence[CellResult], offset: int) -> list[str]:
    """Where the block_end-site intervals lie relative to chance, per condition."""
    cells = [r for r in rows if r.site == BLOCK_END and r.offset == offset]
    if not cells:
        return []
    per = []
    for condition in condition_order(cells):
        mine = sorted((r for r in cells if r.condition == condition), key=lambda r: (r.probe, r.layer))
        items = [(f"{r.probe} layer {r.layer}", r.ci_low, r.ci_high) for r in mine]
        per.append(f"`{condition}`: {verdict_counts(items, _common_chance(mine), 'chance')}")
    return ["", f"Delimiter channel read directly (`block_end` site, {offset_label(offset)}); where the 95% "
                "intervals lie: " + "; ".join(per) + "."]
