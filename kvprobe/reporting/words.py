"""The report's shared words: chance, condition and probe order, offset roles, number formats, verdicts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..grid import FAMILIES, MEMENTO, offset_role
from ..stats import wilson_interval

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    from ..analysis import CellResult, DiffResult


CHANCE = 0.1
"""Chance accuracy for one decimal digit."""


CONDITION_ORDER = ("memento", "restart-delims-visible", "restart")
"""Masks (MaskConfig.name) in the order the report lists their conditions; others follow alphabetically."""


# What the paired difference a - b isolates, for probes at the memento site (SPEC section 5).
DIFFERENCE_MEANINGS: dict[tuple[str, str], str] = {
    ("memento", "restart"): "the implicit KV channels in total (memento KV + <|block_end|> delimiter KV)",
    ("memento", "restart-delims-visible"): "the memento-KV channel alone (the <|block_end|> channel stays open in both)",
    ("restart-delims-visible", "restart"): "the <|block_end|> delimiter channel",
}


_Key = tuple[str, str, int, int, str]  # (condition, site, offset, layer, probe)


def eviction_timing(mask: str) -> str:
    """When a mask (MaskConfig.name) hides a block, in words: which timing a condition used (SPEC section 2)."""
    if mask == "causal" or "-keepall" in mask:
        return "nothing is evicted"
    if "-keeps-last-block" in mask:
        return ("a block is hidden from the next <|block_start|> on and the last one never "
                "(the fork's keep_last_block_for_answer)")
    if mask.startswith("restart"):
        kept = " while its kept blocks stay visible (the fork's)" if "-sees-kept" in mask else ""
        return (f"a block is hidden after its <|summary_end|>; each memento, <|summary_end|> included, "
                f"is recomputed without its block{kept}")
    if mask.startswith("memento") and "-evict-at-se" in mask:
        return "a block is hidden from its own <|summary_end|> on (the fork's served timing)"
    if mask.startswith("memento"):
        return "a block is hidden after its <|summary_end|>, whose KV still saw it (kvprobe's base rule)"
    return "unknown (a condition name, not a mask name)"


def mask_of(row: CellResult) -> str:
    """What a row's condition is: its store's mask name, or (results saved before masks were
    recorded) the condition's own name."""
    return row.mask or row.condition


def condition_masks(rows: Iterable[CellResult]) -> dict[str, str]:
    """Condition name -> canonical mask name (MaskConfig.name), for the conditions of `rows`."""
    masks: dict[str, str] = {}
    for r in rows:
        masks.setdefault(r.condition, mask_of(r))
    return masks


def condition_order(rows: Iterable[CellResult]) -> list[str]:
    """Distinct conditions of `rows`, ordered by what their masks are: memento,
    restart-delims-visible, restart first (whatever the conditions are called), then the rest
    alphabetically."""
    masks = condition_masks(rows)

    def rank(c: str) -> tuple[int, str]:
        m = masks[c]
        return (CONDITION_ORDER.index(m) if m in CONDITION_ORDER else len(CONDITION_ORDER), c)

    return sorted(masks, key=rank)


def comparison_series(cells: Sequence[CellResult]) -> list[tuple[str, str]]:
    """The (condition, site) series a comparison shows: every condition at the memento site, in
    `condition_order`, then each other site's conditions (sites alphabetically)."""
    conditions = condition_order(cells)
    sites = [MEMENTO] + sorted({r.site for r in cells} - {MEMENTO})
    return [(c, s) for s in sites for c in conditions if any(r.condition == c and r.site == s for r in cells)]


def primary_condition(rows: Sequence[CellResult]) -> str | None:
    """The condition the headline is about: the memento-mask one when present, else the first listed."""
    order = condition_order(rows)
    return order[0] if order else None


def primary_site(rows: Sequence[CellResult], condition: str | None) -> str | None:
    """The memento site when the condition has it, else its first site alphabetically."""
    sites = sorted({r.site for r in rows if r.condition == condition})
    return MEMENTO if MEMENTO in sites else (sites[0] if sites else None)


def probe_order(rows: Iterable[CellResult]) -> list[str]:
    """Probe kinds, linear before mlp, others alphabetically after."""
    kinds = {r.probe for r in rows}
    known = [k for k in FAMILIES if k in kinds]
    return known + sorted(kinds - set(known))


def offset_label(offset: int) -> str:
    """`offset_role` with the offset: 'causal control (−1)', 'direct (0)', 'masked +2'."""
    role = offset_role(offset)
    if offset < 0:
        return f"{role} (−{-offset})"
    return f"{role} (0)" if offset == 0 else f"{role} +{offset}"


def interval_verdict(low: float, high: float, reference: float = 0.0, name: str = "0") -> str:
    """Where an interval lies relative to a reference value: 'above 0', 'below 0' or 'contains 0'."""
    if low > reference:
        return f"above {name}"
    if high < reference:
        return f"below {name}"
    return f"contains {name}"


def chance_verdict(low: float, high: float, chance: float = CHANCE) -> str:
    return interval_verdict(low, high, chance, "chance")


def chance_text(rows: Sequence[CellResult]) -> str:
    """'10%', or each distinct chance level of `rows` (constrained passcodes have their own baseline)."""
    levels = sorted({round(r.chance, 6) for r in rows}) or [CHANCE]
    if levels == [CHANCE]:
        return "10%"
    parts = [f"{_pct(c)} ({', '.join(sorted({r.condition for r in rows if round(r.chance, 6) == c}))})"
             for c in levels]
    return "per condition: " + "; ".join(parts)


def _common_chance(rows: Sequence[CellResult]) -> float:
    """The chance level shared by `rows` (CHANCE if they differ or there are none)."""
    levels = {round(r.chance, 6) for r in rows}
    return rows[0].chance if len(levels) == 1 else CHANCE


def verdict_counts(items: Sequence[tuple[str, float, float]], reference: float = 0.0, name: str = "0") -> str:
    """'above 0 in 6 of 8 cells; contains 0 in 2 of 8 cells (linear layer 0, mlp layer 0)' for (label, low, high).

    The cells of a verdict are named when they are at most half of the items (and at most 8).
    """
    n = len(items)
    parts = []
    for where in ("above", "below", "contains"):
        verdict = f"{where} {name}"
        labels = [label for label, lo, hi in items if interval_verdict(lo, hi, reference, name) == verdict]
        if labels:
            named = f" ({', '.join(labels)})" if len(labels) <= n / 2 and len(labels) <= 8 else ""
            parts.append(f"{verdict} in {len(labels)} of {n} cells{named}")
    return "; ".join(parts)


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or _isnan(x) else f"{100 * x:.{digits}f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or _isnan(x) else f"{100 * x:.{digits}f}"


def _pp(x: float | None) -> str:
    return "—" if x is None or _isnan(x) else f"{100 * x:+.1f}"


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def fmt_accuracy(row: CellResult, marker: bool = True) -> str:
    """'26.2% [24.0, 28.4]' plus '*' when the cell is Holm-significant against chance."""
    star = "*" if marker and row.significant else ""
    return f"{100 * row.accuracy:.1f}% [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]{star}"


def fmt_difference(d: DiffResult) -> str:
    """'+16.1 pp [+14.0, +18.3]'."""
    return f"{_pp(d.difference)} pp [{_pp(d.ci_low)}, {_pp(d.ci_high)}]"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in body)])


def _index(rows: Iterable[CellResult]) -> dict[_Key, CellResult]:
    return {(r.condition, r.site, r.offset, r.layer, r.probe): r for r in rows}


def fmt_l2(value: float | None) -> str:
    """'1e-03' style for an L2 strength; '—' when unknown."""
    return "—" if value is None or _isnan(value) else f"{value:.0e}"


def _fmt_p(p: float) -> str:
    if _isnan(p):
        return "—"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion p on n units (`kvprobe.stats.wilson_interval`)."""
    ci = wilson_interval(p, n)
    return float(ci.low), float(ci.high)


def epoch_limit_flag(rows: Iterable["CellResult"]) -> str | None:
    """One FLAGGED sentence naming the MLP cells whose fit was still improving at its epoch limit (any
    condition or site), each with its kept epoch; None when no cell was."""
    capped = sorted((r for r in rows if r.epochs_at_cap), key=lambda r: (r.condition, r.site, r.layer, r.offset))
    if not capped:
        return None
    where = ", ".join(f"{r.condition} {r.site} layer {r.layer} {r.offset:+d} (kept epoch {r.epochs})" for r in capped)
    return (f"FLAGGED: the MLP was still improving at its epoch limit in {len(capped)} "
            f"cell{'s' if len(capped) > 1 else ''}: {where}. A longer fit might read more (`probe.mlp.max_epochs`).")
