"""Leakage reports: tables (JSON, CSV) and a Markdown summary a reviewer can read.

    rows = grid.rows + restart_grid.rows + hidden_grid.rows
    apply_holm(rows)                                   # one correction over the whole report
    diffs = compare(grid, restart_grid) + compare(grid, hidden_grid) + compare(restart_grid, hidden_grid)
    write_tables(rows, diffs, "runs/toy/report", sweep=sweep, paper=PAPER_TOY)
    write_report(rows, diffs, "runs/toy/report", sweep=sweep, paper=PAPER_TOY)  # tables + figures

Accuracies are fractions in every data file and percentages in the Markdown. Chance is
10% (one digit of ten). Offsets: -1 causal control, 0 direct, +1, +2, ... masked.
Nothing here is fitted or resampled: every number comes from the `CellResult`s and
`DiffResult`s of `kvprobe.analysis`, and verdicts are computed from their intervals.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report reads results; it needs neither torch nor the probes
    from .analysis import CellResult, DiffResult

__all__ = [
    "CHANCE",
    "PAPER_QWEN3_8B",
    "PAPER_QWEN3_32B",
    "PAPER_TOY",
    "condition_order",
    "interval_verdict",
    "offset_label",
    "primary_condition",
    "render_summary",
    "sweep_points",
    "sweep_sentence",
    "write_report",
    "write_tables",
]

CHANCE = 0.1
"""Chance accuracy for one decimal digit."""

REPORT_FORMAT = 1
"""Version of the layout of results.json."""

CONDITION_ORDER = ("memento", "restart", "restart-hidden")
"""Conditions in the order the report lists them; others follow alphabetically."""

# What the paired difference a - b isolates, for probes at the memento site (SPEC section 5).
DIFFERENCE_MEANINGS: dict[tuple[str, str], str] = {
    ("memento", "restart-hidden"): "the implicit KV channels in total (memento KV + <|block_end|> delimiter KV)",
    ("memento", "restart"): "the memento-KV channel alone (the <|block_end|> channel stays open in both)",
    ("restart", "restart-hidden"): "the <|block_end|> delimiter channel",
}

# Paper numbers (SPEC sections 3 and 4). Layers are "first", "last" or a 0-based index;
# accuracy None means the paper gives no number ("—"); `text` overrides the display.
PAPER_TOY: dict[str, Any] = {
    "source": "Memento paper, appendix A.4.2 (toy transformer, 4 layers)",
    "probe": "mlp",
    "cells": [
        {"quantity": "direct, first layer", "offset": 0, "layer": "first", "accuracy": None},
        {"quantity": "direct, last layer", "offset": 0, "layer": "last", "accuracy": None},
        {"quantity": "masked +1, first layer", "offset": 1, "layer": "first", "accuracy": 0.131},
        {"quantity": "masked +1, last layer", "offset": 1, "layer": "last", "accuracy": 0.262,
         "note": "24.9% in the main text"},
        {"quantity": "masked +2, last layer", "offset": 2, "layer": "last", "accuracy": 0.214},
        {"quantity": "masked +7, last layer", "offset": 7, "layer": "last", "accuracy": 0.13,
         "text": "≈13 (1.3× chance)"},
    ],
    "sweep": "masked leakage stays roughly constant (17–19%) while task accuracy climbs from 77% to 95%",
}


def _paper_qwen(name: str, direct: tuple[float, float], masked: tuple[float, float]) -> dict[str, Any]:
    return {
        "source": f"Memento paper, section 6.2.2 ({name}; masked = M_3, compared with offset +1)",
        "probe": "mlp",
        "cells": [
            {"quantity": "causal control, 4th layer", "offset": -1, "layer": 3, "accuracy": CHANCE,
             "text": "chance"},
            {"quantity": "causal control, last layer", "offset": -1, "layer": "last", "accuracy": CHANCE,
             "text": "chance"},
            {"quantity": "direct, 4th layer", "offset": 0, "layer": 3, "accuracy": direct[0]},
            {"quantity": "direct, last layer", "offset": 0, "layer": "last", "accuracy": direct[1]},
            {"quantity": "masked +1, 4th layer", "offset": 1, "layer": 3, "accuracy": masked[0]},
            {"quantity": "masked +1, last layer", "offset": 1, "layer": "last", "accuracy": masked[1]},
        ],
    }


PAPER_QWEN3_8B = _paper_qwen("Qwen3-8B", (0.516, 0.649), (0.108, 0.265))
PAPER_QWEN3_32B = _paper_qwen("Qwen3-32B", (0.538, 0.687), (0.128, 0.224))

_Key = tuple[str, str, int, int, str]  # (condition, site, offset, layer, probe)


# ----------------------------------------------------------------- small helpers

def condition_order(conditions: Iterable[str]) -> list[str]:
    """Distinct conditions: memento, restart, restart-hidden first, then the rest alphabetically."""
    distinct = set(conditions)
    known = [c for c in CONDITION_ORDER if c in distinct]
    return known + sorted(distinct - set(known))


def primary_condition(rows: Sequence[CellResult]) -> str | None:
    """The condition the headline is about: "memento" when present, else the first listed."""
    order = condition_order(r.condition for r in rows)
    return order[0] if order else None


def primary_site(rows: Sequence[CellResult], condition: str | None) -> str | None:
    """The memento site when the condition has it, else its first site alphabetically."""
    sites = sorted({r.site for r in rows if r.condition == condition})
    return "memento" if "memento" in sites else (sites[0] if sites else None)


def probe_order(rows: Iterable[CellResult]) -> list[str]:
    """Probe kinds, linear before mlp, others alphabetically after."""
    kinds = {r.probe for r in rows}
    known = [k for k in ("linear", "mlp") if k in kinds]
    return known + sorted(kinds - set(known))


def offset_label(offset: int) -> str:
    """SPEC section 3's name for an offset, with the offset: 'causal control (−1)', 'direct (0)', 'masked +2'."""
    if offset < 0:
        return f"causal control (−{-offset})"
    return "direct (0)" if offset == 0 else f"masked +{offset}"


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


def _resolve_layer(layer: int | str, layers: Sequence[int]) -> int | None:
    if not layers:
        return None
    if layer == "first":
        return min(layers)
    if layer == "last":
        return max(layers)
    return int(layer)


# ----------------------------------------------------------------- sections

def _header(rows: Sequence[CellResult], diffs: Sequence[DiffResult], metadata: Mapping[str, Any] | None) -> str:
    lines = ["# kvprobe leakage report", ""]
    for key, value in (metadata or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            lines.append(f"- {key}: {value}")
    conditions = condition_order(r.condition for r in rows)
    lines += [
        f"- conditions: {', '.join(conditions) or '—'}; sites: {', '.join(sorted({r.site for r in rows})) or '—'}; "
        f"probes: {', '.join(probe_order(rows)) or '—'}",
        f"- layers: {', '.join(str(v) for v in sorted({r.layer for r in rows})) or '—'}; "
        f"offsets: {', '.join(f'{o:+d}' if o else '0' for o in sorted({r.offset for r in rows})) or '—'}",
        f"- validation passcodes (n_val): {', '.join(str(v) for v in sorted({r.n_val for r in rows})) or '—'}; "
        f"training samples (n_train): {', '.join(str(v) for v in sorted({r.n_train for r in rows})) or '—'}",
        f"- cells: {len(rows)}; paired differences: {len(diffs)}",
        "",
        "Accuracy is the mean over the five passcode digits on label-unique validation passcodes; "
        f"chance is {chance_text(rows)}. Brackets hold the 95% bootstrap interval over validation passcodes.",
    ]
    return "\n".join(lines)


def _holm_note(rows: Sequence[CellResult]) -> str:
    if rows and all(_isnan(r.p_holm) for r in rows):
        return "Holm correction was not applied to these rows (`apply_holm`), so no cell is marked significant."
    return (f"`*`: Holm-corrected one-sided binomial p ≤ 0.05 against chance, corrected over all "
            f"{len(rows)} cells of this report.")


def _headline(rows: Sequence[CellResult], condition: str, site: str) -> str:
    cells = [r for r in rows if r.condition == condition and r.site == site]
    idx = _index(cells)
    offsets = sorted({r.offset for r in cells})
    layers = sorted({r.layer for r in cells})
    out = [
        "## Headline: probe accuracy by layer and offset",
        "",
        f"Condition `{condition}`, site `{site}`. {_holm_note(rows)}",
    ]
    for probe in probe_order(cells):
        body = []
        for layer in layers:
            line = [str(layer)]
            for o in offsets:
                r = idx.get((condition, site, o, layer, probe))
                line.append(fmt_accuracy(r) if r else "—")
            body.append(line)
        out += ["", f"### {probe} probe", "", _table(["layer", *(offset_label(o) for o in offsets)], body)]
        out += _strength_lines([r for r in cells if r.probe == probe], idx, layers, offsets)
    gap = _probe_gap_sentence(idx, condition, site, layers)
    if gap:
        out += ["", gap]
    return "\n".join(out)


def fmt_l2(value: float | None) -> str:
    """'1e-03' style for an L2 strength; '—' when unknown."""
    return "—" if value is None or _isnan(value) else f"{value:.0e}"


def _strength_lines(cells: Sequence[CellResult], idx: Mapping[_Key, CellResult], layers: Sequence[int],
                    offsets: Sequence[int]) -> list[str]:
    """How one probe's L2 strength was set: fixed (one sentence) or chosen per cell (a layer x offset table)."""
    known = [r for r in cells if r.l2 is not None]
    if not known:
        return []
    grids = {tuple(r.l2_grid or [r.l2]) for r in known}
    if all(len(g) == 1 for g in grids):
        return ["", f"L2 strength fixed at {', '.join(sorted({fmt_l2(r.l2) for r in known}))} (not chosen)."]
    grid = sorted({v for g in grids for v in g})
    edge = [r for r in known if r.l2_grid and len(r.l2_grid) > 1 and r.l2 == min(r.l2_grid)]
    c, site, probe = known[0].condition, known[0].site, known[0].probe
    cell = {(o, layer): idx.get((c, site, o, layer, probe)) for o in offsets for layer in layers}
    body = [[str(layer), *(fmt_l2(cell[o, layer].l2) if cell[o, layer] else "—" for o in offsets)]
            for layer in layers]
    text = (f"L2 strength chosen per cell from {{{', '.join(fmt_l2(v) for v in grid)}}} on an inner label-unique split "
            "of the training passcodes, then refitted on the whole training split; the validation passcodes above "
            "played no part in the choice.")
    if edge:
        text += (f" {len(edge)} of {len(known)} cells chose the weakest value: a weaker one might score higher "
                 "(extend the grid).")
    return ["", text, "", _table(["layer (chosen L2)", *(offset_label(o) for o in offsets)], body)]


def _probe_gap_sentence(idx: Mapping[_Key, CellResult], condition: str, site: str, layers: Sequence[int]) -> str:
    """MLP minus linear accuracy at masked +1 (or the smallest masked offset), per layer."""
    offsets = sorted({k[2] for k in idx if k[2] > 0})
    if not offsets:
        return ""
    o = offsets[0]
    gaps = []
    for layer in layers:
        lin, mlp = idx.get((condition, site, o, layer, "linear")), idx.get((condition, site, o, layer, "mlp"))
        if lin and mlp:
            gaps.append(f"layer {layer}: {_pp(mlp.accuracy - lin.accuracy)} pp")
    if not gaps:
        return ""
    return (f"MLP minus linear probe accuracy at {offset_label(o)} ({'; '.join(gaps)}). "
            "A positive gap says part of the information is encoded non-linearly "
            "(unpaired: compare the two intervals above).")


def _paper_section(rows: Sequence[CellResult], paper: Mapping[str, Any], condition: str, site: str) -> str:
    cells = [r for r in rows if r.condition == condition and r.site == site]
    idx = _index(cells)
    layers = sorted({r.layer for r in cells})
    probes = probe_order(cells)
    paper_probe = paper.get("probe", "mlp")
    check_probe = paper_probe if paper_probe in probes else (probes[-1] if probes else None)
    header = ["quantity", "layer", "paper", *(f"ours ({p})" for p in probes)]
    if check_probe:
        header.append(f"paper value in our interval ({check_probe})")
    body = []
    for item in paper.get("cells", []):
        layer = _resolve_layer(item["layer"], layers)
        value = item.get("accuracy")
        paper_text = item.get("text") or (_num(value) + "%" if value is not None else "—")
        if item.get("note"):
            paper_text += f" ({item['note']})"
        line = [item["quantity"], "—" if layer is None else str(layer), paper_text]
        for p in probes:
            r = idx.get((condition, site, item["offset"], layer, p)) if layer is not None else None
            line.append(fmt_accuracy(r) if r else "not measured")
        if check_probe:
            r = idx.get((condition, site, item["offset"], layer, check_probe)) if layer is not None else None
            line.append("—" if r is None or value is None else ("yes" if r.ci_low <= value <= r.ci_high else "no"))
        body.append(line)
    out = [
        "## Comparison with the paper",
        "",
        f"Paper: {paper.get('source', 'unnamed source')}; paper probe: {paper_probe}. "
        f"Ours: condition `{condition}`, site `{site}`; \"first\" and \"last\" are the first and last captured layers. "
        "Paper values are percentages; \"—\" where the paper gives no number.",
        "",
        _table(header, body),
    ]
    return "\n".join(out)


def _causal_control(rows: Sequence[CellResult], condition: str, site: str) -> str:
    controls = [r for r in rows if r.offset < 0]
    out = ["### Causal control (offset −1: the memento before the target block)", ""]
    if not controls:
        out.append("No causal-control cells in this report: the leakage numbers lack their sanity check "
                   "(capture offset −1 to add it).")
        return "\n".join(out)
    inside = [r for r in controls if r.ci_low <= r.chance <= r.ci_high]
    outside = [r for r in controls if not (r.ci_low <= r.chance <= r.ci_high)]
    sentence = (f"The 95% interval contains chance ({chance_text(controls)}) in {len(inside)} of {len(controls)} causal-control cells "
                f"(all conditions, sites and probes).")
    if outside:
        listed = [f"{r.condition}/{r.site}/{r.probe} layer {r.layer}: {fmt_accuracy(r)}, "
                  f"{chance_verdict(r.ci_low, r.ci_high, r.chance)}" for r in outside]
        sentence += (" It excludes chance in " + "; ".join(listed) +
                     ". A causal control away from chance means the probe or the split leaks labels: "
                     "check these before reading the masked cells.")
    else:
        sentence += " As required: the memento before the target cannot see it."
    bits_above = [r for r in controls if r.bits_low > 0]
    warning = " (a sensitive sign of label leakage or overfitting)." if bits_above else "."
    sentence += (f" The information interval lies above 0 bits in {len(bits_above)} of {len(controls)} "
                 f"causal-control cells{warning}")
    out.append(sentence)
    shown = sorted((r for r in controls if r.condition == condition and r.site == site),
                   key=lambda r: (probe_order(controls).index(r.probe), r.offset, r.layer))
    if shown:
        body = [[r.probe, str(r.layer), fmt_accuracy(r), f"[{_num(r.wilson_low)}, {_num(r.wilson_high)}]",
                 "yes" if r.ci_low <= r.chance <= r.ci_high else "no", _fmt_p(r.p_holm)] for r in shown]
        out += ["", f"Condition `{condition}`, site `{site}`:", "",
                _table(["probe", "layer", "accuracy [95% bootstrap]", "Wilson 95%", "interval contains chance",
                        "Holm p"], body)]
    return "\n".join(out)


def _fmt_p(p: float) -> str:
    if _isnan(p):
        return "—"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval (the same formula as `kvprobe.stats.wilson_interval`, kept light here)."""
    z = 1.959963984540054
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _controls_table(rows: Sequence[CellResult], condition: str, site: str) -> str:
    cells = [r for r in rows if r.condition == condition and r.site == site]
    out = []
    for probe in probe_order(cells):
        mine = sorted((r for r in cells if r.probe == probe), key=lambda r: (r.offset, r.layer))
        body = [[offset_label(r.offset), str(r.layer), fmt_accuracy(r), fmt_l2(r.l2), _num(r.accuracy_std),
                 _pct(r.shuffled_accuracy), _pp(r.selectivity),
                 f"{r.bits:.3f} [{r.bits_low:.3f}, {r.bits_high:.3f}]", _pct(r.train_accuracy)] for r in mine]
        out += ["", f"{probe} probe, condition `{condition}`, site `{site}`:", "",
                _table(["offset", "layer", "accuracy [95%]", "L2", "seed sd (pp)", "shuffled-label accuracy",
                        "selectivity (pp)", "bits/digit [95%]", "train accuracy"], body)]
    return "\n".join(out)


def _controls(rows: Sequence[CellResult], condition: str, site: str) -> str:
    out = ["## Controls", "", _causal_control(rows, condition, site), "",
           "### Shuffled labels, selectivity, information", ""]
    shuffled = [r for r in rows if r.shuffled_accuracy is not None]
    if shuffled:
        beating = [r for r in shuffled if _wilson(r.shuffled_accuracy, max(r.n_val, 1))[0] > r.chance]
        worst = max(shuffled, key=lambda r: r.shuffled_accuracy)
        sentence = (f"Probes refitted on shuffled training labels: the Wilson 95% interval of shuffled-label accuracy "
                    f"contains or lies below chance in {len(shuffled) - len(beating)} of {len(shuffled)} cells; "
                    f"the highest is {_pct(worst.shuffled_accuracy)} ({worst.condition}/{worst.site}/{worst.probe}, "
                    f"{offset_label(worst.offset)}, layer {worst.layer}).")
        if beating:
            sentence += (f" {len(beating)} cell(s) beat chance on shuffled labels: those probes memorise, "
                         "so read their accuracy through selectivity (accuracy minus shuffled-label accuracy).")
        else:
            sentence += " No probe beats chance on shuffled labels, so accuracy above chance is not memorisation."
        out.append(sentence)
    else:
        out.append("No shuffled-label control in these results (selectivity unavailable).")
    masked = [r for r in rows if r.offset > 0]
    if masked:
        bits_pos = [r for r in masked if r.bits_low > 0]
        hidden = [r for r in bits_pos if r.ci_low <= r.chance]
        out += ["", f"Information (log2 10 minus validation cross-entropy, bits per digit): the interval lies above "
                    f"0 bits in {len(bits_pos)} of {len(masked)} masked cells; in {len(hidden)} of those the "
                    "accuracy interval still contains chance (information that accuracy misses)."]
    gaps = [(r.train_accuracy - r.accuracy, r) for r in rows]
    if gaps:
        gap, r = max(gaps, key=lambda g: g[0])
        out += ["", f"Largest train − validation accuracy gap: {_pp(gap)} pp ({r.condition}/{r.site}/{r.probe}, "
                    f"{offset_label(r.offset)}, layer {r.layer})."]
    out += ["", "Per-cell controls (shuffled labels, selectivity, bits, seed spread, train accuracy) are in the "
                "appendix at the end."]
    return "\n".join(out)


def _meaning(a: str, b: str, site: str) -> str:
    if site != "memento":
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
    conditions = condition_order(r.condition for r in cells)
    series = [(c, "memento") for c in conditions if any(r.condition == c and r.site == "memento" for r in cells)]
    other_sites = sorted({r.site for r in cells} - {"memento"})
    series += [(c, s) for s in other_sites for c in conditions if any(r.condition == c and r.site == s for r in cells)]
    header = ["probe", "layer", *(c if s == "memento" else f"{s} site ({c})" for c, s in series)]
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
    conditions = condition_order(r.condition for r in rows)
    sites = sorted({r.site for r in rows})
    if len(conditions) < 2 and sites == ["memento"] and not diffs:
        out.append(f"Only one condition (`{conditions[0] if conditions else '—'}`) and one site in this report: "
                   "nothing to compare. Capture restart and restart-hidden stores to separate the channels.")
        return "\n".join(out)
    masked_offsets = sorted({r.offset for r in rows if r.offset > 0} | {d.offset for d in diffs if d.offset > 0})
    offset = masked_offsets[0] if masked_offsets else 0
    out += [
        "What each paired difference (same validation passcodes, paired bootstrap 95%) isolates:",
        "",
        f"- memento − restart-hidden: {DIFFERENCE_MEANINGS[('memento', 'restart-hidden')]}.",
        f"- memento − restart: {DIFFERENCE_MEANINGS[('memento', 'restart')]}.",
        f"- restart − restart-hidden: {DIFFERENCE_MEANINGS[('restart', 'restart-hidden')]}.",
        "- `block_end` site: probes at the <|block_end|> token read that delimiter channel directly.",
        "",
        "No direction is assumed: each interval is reported as above 0, below 0, or containing 0.",
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
                   key=lambda d: (d.site != "memento", _pair_rank(d), d.site, d.probe, d.layer))
    if shown:
        body = [[f"{d.a} − {d.b}", d.site, d.probe, str(d.layer), fmt_difference(d),
                 interval_verdict(d.ci_low, d.ci_high)] for d in shown]
        out += ["", f"### Paired differences at {offset_label(offset)}", "",
                _table(["difference", "site", "probe", "layer", "a − b [95%]", "interval"], body)]
    out += ["", "### What the differences show", ""]
    pairs = sorted({(d.a, d.b, d.site) for d in diffs}, key=lambda k: (k[2] != "memento", _pair_rank_ab(k[0], k[1]), k))
    for (a, b, site) in pairs:
        out.append(_pair_sentence(a, b, site, [d for d in diffs if (d.a, d.b, d.site) == (a, b, site)], offset))
    return "\n".join(out)


def _pair_rank_ab(a: str, b: str) -> int:
    order = [*DIFFERENCE_MEANINGS, *((y, x) for x, y in DIFFERENCE_MEANINGS)]
    return order.index((a, b)) if (a, b) in order else len(order)


def _pair_rank(d: DiffResult) -> int:
    return _pair_rank_ab(d.a, d.b)


def _pair_sentence(a: str, b: str, site: str, diffs: Sequence[DiffResult], offset: int) -> str:
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
    return f"- **{a} − {b}** (site `{site}`) isolates {_meaning(a, b, site)}: " + "; ".join(parts) + "."


def _block_end_sentences(rows: Sequence[CellResult], offset: int) -> list[str]:
    """Where the block_end-site intervals lie relative to chance, per condition."""
    cells = [r for r in rows if r.site == "block_end" and r.offset == offset]
    if not cells:
        return []
    per = []
    for condition in condition_order(r.condition for r in cells):
        mine = sorted((r for r in cells if r.condition == condition), key=lambda r: (r.probe, r.layer))
        items = [(f"{r.probe} layer {r.layer}", r.ci_low, r.ci_high) for r in mine]
        per.append(f"`{condition}`: {verdict_counts(items, _common_chance(mine), 'chance')}")
    return ["", f"Delimiter channel read directly (`block_end` site, {offset_label(offset)}); where the 95% "
                "intervals lie: " + "; ".join(per) + "."]


def sweep_points(sweep: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Checkpoints in training order: sorted by step when every point has one, else as given."""
    if all(p.get("step") is not None for p in sweep):
        return sorted(sweep, key=lambda p: float(p["step"]))
    return list(sweep)


def _where(point: Mapping[str, Any]) -> str:
    step = point.get("step")
    return f"step {step}" if step is not None else f"checkpoint {point.get('checkpoint', '?')}"


def sweep_sentence(sweep: Sequence[Mapping[str, Any]]) -> str:
    """Plain words, computed from the data: does masked leakage stay constant while task accuracy changes?"""
    points = sweep_points(sweep)
    if not points:
        return "No checkpoints in the sweep."
    if len(points) == 1:
        p = points[0]
        return (f"Only one checkpoint ({_where(p)}): masked accuracy {_pct(p['masked_accuracy'])}, "
                f"task accuracy {_pct(p['task_accuracy'])}; no trend can be judged.")
    acc = [float(p["masked_accuracy"]) for p in points]
    lo_i, hi_i = min(range(len(acc)), key=acc.__getitem__), max(range(len(acc)), key=acc.__getitem__)
    text = (f"Across {len(points)} checkpoints ({_where(points[0])} to {_where(points[-1])}), "
            f"masked probe accuracy ranges from {_pct(acc[lo_i])} ({_where(points[lo_i])}) "
            f"to {_pct(acc[hi_i])} ({_where(points[hi_i])}), a spread of {100 * (acc[hi_i] - acc[lo_i]):.1f} pp, "
            f"and moves {_pp(acc[-1] - acc[0])} pp from the first to the last checkpoint.")
    task0, task1 = float(points[0]["task_accuracy"]), float(points[-1]["task_accuracy"])
    if task1 == task0:
        task_text = f"task accuracy stays at {_pct(task0)}"
    else:
        task_text = f"task accuracy {'rises' if task1 > task0 else 'falls'} from {_pct(task0)} to {_pct(task1)}"
    has_ci = all(p.get("masked_ci_low") is not None and p.get("masked_ci_high") is not None for p in points)
    if not has_ci:
        return text + f" Meanwhile {task_text}. Without intervals, whether leakage is constant cannot be judged."
    lows = [float(p["masked_ci_low"]) for p in points]
    highs = [float(p["masked_ci_high"]) for p in points]
    common_low, common_high = max(lows), min(highs)
    above = sum(lo > CHANCE for lo in lows)
    if common_low <= common_high:
        text += (f" All {len(points)} intervals (95%) overlap (each contains {_pct(common_low)}–{_pct(common_high)}), "
                 f"so within the resolution of these intervals masked leakage stays roughly constant across "
                 f"training while {task_text}.")
    else:
        a = points[lows.index(common_low)]
        b = points[highs.index(common_high)]
        direction = "rises" if acc[-1] > acc[0] else "falls" if acc[-1] < acc[0] else "varies"
        text += (f" Not all 95% intervals overlap: {_where(a)} "
                 f"({_pct(a['masked_accuracy'])} [{_num(a['masked_ci_low'])}, {_num(a['masked_ci_high'])}]) and "
                 f"{_where(b)} ({_pct(b['masked_accuracy'])} [{_num(b['masked_ci_low'])}, "
                 f"{_num(b['masked_ci_high'])}]) are disjoint, so masked leakage changes across training "
                 f"(it {direction} from first to last checkpoint) while {task_text}.")
    text += f" The masked interval lies above chance at {above} of {len(points)} checkpoints."
    return text


def _sweep_section(sweep: Sequence[Mapping[str, Any]], paper: Mapping[str, Any] | None) -> str:
    points = sweep_points(sweep)
    has_direct = any(p.get("direct_accuracy") is not None for p in points)
    header = ["checkpoint", "step", "task accuracy", "masked accuracy [95%]"]
    header += ["direct accuracy"] if has_direct else []
    body = []
    for p in points:
        lo, hi = p.get("masked_ci_low"), p.get("masked_ci_high")
        masked = _pct(p["masked_accuracy"])
        if lo is not None and hi is not None:
            masked += f" [{_num(lo)}, {_num(hi)}]"
        step = p.get("step")
        line = [str(p.get("checkpoint", "—")), "—" if step is None else str(step), _pct(p["task_accuracy"]), masked]
        if has_direct:
            line.append(_pct(p.get("direct_accuracy")))
        body.append(line)
    layers = {p.get("layer") for p in points}
    where = f" Accuracies are at layer {layers.pop()}." if len(layers) == 1 and None not in layers else ""
    masked_offsets = {p.get("masked_offset", 1) for p in points}  # sweeps written before it was recorded: +1
    which = "masked " + ", ".join(f"{o:+d}" for o in sorted(masked_offsets))
    out = ["## Leakage across training checkpoints", "",
           f"One line per checkpoint; masked accuracy is the {which} probe with its 95% interval.{where}", "",
           _table(header, body), "", sweep_sentence(points)]
    if paper and paper.get("sweep"):
        out += ["", f"Paper: {paper['sweep']}."]
    return "\n".join(out)


def render_summary(
    rows: Sequence[CellResult],
    diffs: Sequence[DiffResult] = (),
    *,
    sweep: Sequence[Mapping[str, Any]] | None = None,
    paper: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    figures: Sequence[str] = (),
    condition: str | None = None,
) -> str:
    """The Markdown summary: headline, paper comparison, controls, condition comparison, sweep.

    `condition` picks the headline condition (default: memento when present); `figures` are
    paths relative to the summary, embedded at the end.
    """
    condition = condition or primary_condition(rows)
    site = primary_site(rows, condition)
    sections = [_header(rows, diffs, metadata)]
    if condition is None or site is None:
        sections.append("No probe results to report.")
    else:
        sections.append(_headline(rows, condition, site))
        if paper:
            sections.append(_paper_section(rows, paper, condition, site))
        sections.append(_controls(rows, condition, site))
        sections.append(_conditions(rows, diffs))
    if sweep:
        sections.append(_sweep_section(sweep, paper))
    if condition is not None and site is not None:
        sections.append("## Appendix: per-cell controls\n" + _controls_table(rows, condition, site))
    if figures:
        sections.append("\n".join(["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures)]))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------- data files

_LIST_PREFIX = {"digit_accuracy": "digit", "accuracy_seeds": "seed_accuracy"}


def _row_columns(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flat column names in field order; list fields expand to prefix_0 .. prefix_{n-1} (longest list)."""
    columns: list[str] = []
    for d in dicts:
        for key, value in d.items():
            names = ([f"{_LIST_PREFIX.get(key, key)}_{i}" for i in range(len(value))]
                     if isinstance(value, list) else [key])
            columns += [n for n in names if n not in columns]
    return columns


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, list):
            flat.update({f"{_LIST_PREFIX.get(key, key)}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _write_csv(path: Path, dicts: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: _csv_value(d.get(k)) for k in columns})


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null (strict JSON); numpy scalars, arrays and paths become plain values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _diff_dict(d: DiffResult) -> dict[str, Any]:
    out = d.to_dict()
    out["role"] = "causal control" if d.offset < 0 else "direct" if d.offset == 0 else "masked"
    out["interval"] = interval_verdict(d.ci_low, d.ci_high)
    return out


def write_tables(
    rows: list[CellResult],
    diffs: list[DiffResult],
    out_dir: str | Path,
    *,
    sweep: list[dict] | None = None,
    paper: dict | None = None,
    metadata: dict | None = None,
    figures: Sequence[str] = (),
    condition: str | None = None,
) -> dict[str, Path]:
    """Write results.json, results.csv, diffs.csv, sweep.csv (when a sweep is given) and summary.md.

    Returns {file name: path}. Accuracies are fractions in the data files; `metadata` (any
    JSON-able dict: model, store paths, settings) is stored in results.json and its scalar
    entries head summary.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row_dicts = [r.to_dict() for r in rows]
    diff_dicts = [_diff_dict(d) for d in diffs]
    paths = {name: out / name for name in ("results.json", "results.csv", "diffs.csv", "summary.md")}
    document = {
        "format": "kvprobe.report",
        "format_version": REPORT_FORMAT,
        "chance": CHANCE,
        "metadata": metadata or {},
        "paper": paper,
        "rows": row_dicts,
        "diffs": diff_dicts,
        "sweep": sweep,
    }
    paths["results.json"].write_text(json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    flat = [_flatten(d) for d in row_dicts]
    _write_csv(paths["results.csv"], flat, _row_columns(row_dicts))
    diff_columns = ["a", "b", "site", "offset", "role", "layer", "probe", "difference", "ci_low", "ci_high", "interval"]
    _write_csv(paths["diffs.csv"], diff_dicts, diff_columns)
    if sweep is not None:
        paths["sweep.csv"] = out / "sweep.csv"
        _write_csv(paths["sweep.csv"], [_flatten(s) for s in sweep], _row_columns(sweep))
    paths["summary.md"].write_text(
        render_summary(rows, diffs, sweep=sweep, paper=paper, metadata=metadata, figures=figures, condition=condition),
        encoding="utf-8",
    )
    return paths


def write_report(
    rows: list[CellResult],
    diffs: list[DiffResult],
    out_dir: str | Path,
    *,
    sweep: list[dict] | None = None,
    paper: dict | None = None,
    metadata: dict | None = None,
    condition: str | None = None,
) -> dict[str, Path]:
    """Tables plus figures (under out_dir/figures), with the PNGs embedded in summary.md."""
    from .figures import save_all

    out = Path(out_dir)
    figure_paths = save_all(rows, diffs, sweep, out / "figures", condition=condition)
    pngs = [p.relative_to(out).as_posix() for p in figure_paths if p.suffix == ".png"]
    paths = write_tables(rows, diffs, out, sweep=sweep, paper=paper, metadata=metadata, figures=pngs,
                         condition=condition)
    paths.update({p.relative_to(out).as_posix(): p for p in figure_paths})
    return paths
