"""The Markdown summary a reviewer reads: header, headline table, probe strength, paper, controls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    from ..analysis import CellResult, DiffResult
from ..grid import LINEAR, MLP
from .comparisons import _conditions
from .paper import _paper_section
from .sweep import Sweep, _sweep_section
from .words import (
    _fmt_p,
    _index,
    _isnan,
    _Key,
    _num,
    _pct,
    _pp,
    _table,
    _wilson,
    chance_text,
    chance_verdict,
    condition_masks,
    condition_order,
    epoch_limit_flag,
    eviction_timing,
    fmt_accuracy,
    fmt_l2,
    offset_label,
    primary_condition,
    primary_site,
    probe_order,
)


def _header(rows: Sequence[CellResult], diffs: Sequence[DiffResult], metadata: Mapping[str, Any] | None) -> str:
    lines = ["# kvprobe leakage report", ""]
    for key, value in (metadata or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            lines.append(f"- {key}: {value}")
    conditions = condition_order(rows)
    lines += [
        f"- conditions: {', '.join(conditions) or '—'}; sites: {', '.join(sorted({r.site for r in rows})) or '—'}; "
        f"probes: {', '.join(probe_order(rows)) or '—'}",
        f"- layers: {', '.join(str(v) for v in sorted({r.layer for r in rows})) or '—'}; "
        f"offsets: {', '.join(f'{o:+d}' if o else '0' for o in sorted({r.offset for r in rows})) or '—'}",
        f"- validation passcodes (n_val): {', '.join(str(v) for v in sorted({r.n_val for r in rows})) or '—'}; "
        f"training samples (n_train): {', '.join(str(v) for v in sorted({r.n_train for r in rows})) or '—'}",
        f"- cells: {len(rows)}; paired differences: {len(diffs)}",
    ]
    masks = condition_masks(rows)
    lines += [f"- `{c}`: mask `{masks[c]}`; {eviction_timing(masks[c])}" for c in conditions]
    lines += [
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
        out += _layer0_note([r for r in cells if r.probe == probe])
        out += _strength_lines([r for r in cells if r.probe == probe], idx, layers, offsets)
        flag = epoch_limit_flag(r for r in rows if r.probe == probe)  # every condition and site
        out += ["", flag] if flag else []
    gap = _probe_gap_sentence(idx, condition, site, layers)
    if gap:
        out += ["", gap]
    return "\n".join(out)


def _layer0_note(cells: Sequence[CellResult]) -> list[str]:
    """Why a starred masked cell at layer 0 is no leak through the KV cache, under the table that stars it."""
    starred = sorted(r.offset for r in cells if r.layer == 0 and r.offset > 0 and r.significant)
    if not starred:
        return []
    return ["", f"Layer 0, starred at {', '.join(offset_label(o) for o in starred)}: not a leak through the KV "
                "cache. Layer-0 keys and values are projections of the memento's own token and position "
                "embeddings, before any attention has mixed other positions in, so what a probe finds there is "
                "carried by the memento's own text, the same under every mask."]


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
    bound = [r for r in known if r.l2_at_bound]
    c, site, probe = known[0].condition, known[0].site, known[0].probe
    cell = {(o, layer): idx.get((c, site, o, layer, probe)) for o in offsets for layer in layers}
    body = [[str(layer), *(fmt_l2(cell[o, layer].l2) if cell[o, layer] else "—" for o in offsets)]
            for layer in layers]
    text = (f"L2 strength chosen per cell from {{{', '.join(fmt_l2(v) for v in grid)}}} on an inner label-unique split "
            "of the training passcodes, then refitted on the whole training split; the validation passcodes above "
            "played no part in the choice.")
    text += (" A cell whose best value, or a value whose inner score ties it, is on an edge of the grid is fitted a "
             "decade further, until that edge scores less than the best (unless `probe.extend_grid` is false; "
             "with `probe.extend_ties` false a tie on the edge is not extended).")
    weak = [r for r in bound if r.l2_at_weak_bound]
    if weak:
        text += (f" FLAGGED: {len(weak)} of {len(known)} cells chose the weakest value they could try "
                 f"({fmt_l2(min(r.l2 for r in weak))}); a weaker one might score higher.")
    if len(bound) > len(weak):
        text += (f" {len(bound) - len(weak)} cells chose the strongest value they could try: "
                 "their probe found nothing to fit beyond the bias.")
    return ["", text, "", _table(["layer (chosen L2)", *(offset_label(o) for o in offsets)], body)]


def _probe_gap_sentence(idx: Mapping[_Key, CellResult], condition: str, site: str, layers: Sequence[int]) -> str:
    """MLP minus linear accuracy at masked +1 (or the smallest masked offset), per layer."""
    offsets = sorted({k[2] for k in idx if k[2] > 0})
    if not offsets:
        return ""
    o = offsets[0]
    gaps = []
    for layer in layers:
        lin, mlp = idx.get((condition, site, o, layer, LINEAR)), idx.get((condition, site, o, layer, MLP))
        if lin and mlp:
            gaps.append(f"layer {layer}: {_pp(mlp.accuracy - lin.accuracy)} pp")
    if not gaps:
        return ""
    return (f"MLP minus linear probe accuracy at {offset_label(o)} ({'; '.join(gaps)}). "
            "A positive gap says part of the information is encoded non-linearly "
            "(unpaired: compare the two intervals above).")


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
                    "accuracy interval still contains chance (information that accuracy misses). Negative bits "
                    "are not negative information: the probe's validation cross-entropy is above log2 10, i.e. it "
                    "is more confident than the features justify (an L2-regularised probe overfits a little on a "
                    "cell with little or no signal). Accuracy and its interval are the measure to read there."]
    gaps = [(r.train_accuracy - r.accuracy, r) for r in rows]
    if gaps:
        gap, r = max(gaps, key=lambda g: g[0])
        out += ["", f"Largest train − validation accuracy gap: {_pp(gap)} pp ({r.condition}/{r.site}/{r.probe}, "
                    f"{offset_label(r.offset)}, layer {r.layer})."]
    out += ["", "Per-cell controls (shuffled labels, selectivity, bits, seed spread, train accuracy) are in the "
                "appendix at the end."]
    return "\n".join(out)


def render_summary(
    rows: Sequence[CellResult],
    diffs: Sequence[DiffResult] = (),
    *,
    sweep: Sweep | None = None,
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
