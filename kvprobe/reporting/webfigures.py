"""The interactive report's figures as plain plotly.js specs ({"data": [...], "layout": {...}}).

    specs = web_figures(rows, diffs, sweep)     # [(section, title, spec), ...] in page order

Per condition and site, one layer x offset heatmap per probe kind whose hover gives a cell's
accuracy, 95% interval, chosen L2 strength (and whether it sits at the grid's edge), n, chance
and p after Holm; the distance and depth curves; the condition differences with their intervals;
the sweep across training, when there is one. Numbers are only selected and formatted here, with
the same formats as summary.md. The specs are JSON-able dicts with no plotly Python objects, so
the page carries no template (a few kB per figure) and the same run gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..grid import LINEAR
from .sweep import Sweep, sweep_points
from .words import CHANCE, _pct, _pp, _fmt_p, comparison_series, fmt_l2, offset_label, probe_order

if TYPE_CHECKING:
    from ..analysis import CellResult, DiffResult
    from ..causal import CausalResult, CausalRow

__all__ = ["EDGE", "EPOCH_LIMIT", "web_figures"]

EDGE = " (at the grid's edge)"
"""Appended to a cell's strength when the chosen L2 is on an edge of its grid the extension could not pass."""
EPOCH_LIMIT = " (MLP still improving at its epoch limit)"
"""Appended to a cell's strength when an MLP fit of it reached its epoch limit still improving (`epochs_at_cap`)."""

HOVER_FIELDS = ("95% interval", "strength (L2)", "n", "chance", "p (Holm)")
"""What a heatmap cell's hover shows below its accuracy, in the order of `_cell_hover`."""
POINT_HOVER = "%{fullData.name}<br>%{x}: %{customdata}<extra></extra>"
MOST_LABELLED_CELLS = 300  # above this many cells a heatmap shows its numbers on hover only


def _number(x: float | None, digits: int = 2) -> float | None:
    """A percentage rounded for the page (fewer bytes, stable text); None where unknown."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100 * x, digits)


def _interval(low: float | None, high: float | None) -> str:
    return f"{_pct(low)[:-1]}–{_pct(high)}" if low is not None and high is not None else "—"


def _cell_hover(r: CellResult) -> list[Any]:
    """What a heatmap cell's hover shows beyond its accuracy: interval, strength (with its flags: the L2 grid's
    edge, the MLP's epoch limit), n, chance, Holm p."""
    strength = fmt_l2(r.l2) + (EDGE if r.l2_at_bound else "") + (EPOCH_LIMIT if r.epochs_at_cap else "")
    return [_interval(r.ci_low, r.ci_high), strength, r.n_val, _pct(r.chance), _fmt_p(r.p_holm)]


def _hover(cells: Sequence[CellResult]) -> tuple[str, list[int]]:
    """The hover template of a heatmap and which `_cell_hover` fields go per cell: a field every
    cell shares (n, chance, often) is written into the template once instead (the page stays small)."""
    values = [_cell_hover(r) for r in cells]
    shared = {i: values[0][i] for i in range(len(HOVER_FIELDS)) if len({str(v[i]) for v in values}) == 1}
    per_cell = [i for i in range(len(HOVER_FIELDS)) if i not in shared]
    lines = [f"{name} {shared[i] if i in shared else '%{customdata[' + str(per_cell.index(i)) + ']}'}"
             for i, name in enumerate(HOVER_FIELDS)]
    return "<b>%{y}, %{x}</b><br>accuracy %{z:.1f}%<br>" + "<br>".join(lines) + "<extra></extra>", per_cell


def _on_grid(items: Sequence[Any]) -> tuple[list[int], list[int], list[list[Any]]]:
    """The layers, the offsets, and items (anything with .layer and .offset) placed on that grid
    (rows: layers, columns: offsets; None where no item is)."""
    layers, offsets = sorted({r.layer for r in items}), sorted({r.offset for r in items})
    index = {(r.layer, r.offset): r for r in items}
    return layers, offsets, [[index.get((layer, offset)) for offset in offsets] for layer in layers]


def heatmap(cells: Sequence[CellResult], title: str) -> dict[str, Any]:
    """One condition, site and probe kind: accuracy (%) by layer (rows) and offset (columns)."""
    layers, offsets, cell = _on_grid(cells)
    top = max([100 * r.accuracy for r in cells if not math.isnan(r.accuracy)] + [0.0])
    template, per_cell = _hover(cells)
    trace = {
        "type": "heatmap", "x": [offset_label(o) for o in offsets], "y": [f"layer {layer}" for layer in layers],
        "z": [[None if r is None else _number(r.accuracy) for r in line] for line in cell],
        "customdata": [[None if r is None else [_cell_hover(r)[i] for i in per_cell] for r in line] for line in cell],
        "hovertemplate": template, "hoverongaps": False, "colorscale": "Viridis", "zmin": 0,
        "zmax": max(20.0, math.ceil(top / 10) * 10), "colorbar": {"title": {"text": "accuracy %"}},
    }
    if len(layers) * len(offsets) <= MOST_LABELLED_CELLS:
        trace["texttemplate"] = "%{z:.0f}"
    return {"data": [trace], "layout": _grid_layout(title, len(layers))}


def _grid_layout(title: str, n_layers: int) -> dict[str, Any]:
    """The layout of a layer (rows) x offset (columns) heatmap."""
    return {"title": {"text": title}, "height": 160 + 26 * n_layers,
            "xaxis": {"type": "category", "title": {"text": "offset (blocks after the passcode's block)"}},
            "yaxis": {"type": "category", "title": {"text": "layer"}}, "margin": {"t": 50, "b": 60}}


def _series(name: str, x: Sequence[Any], items: Sequence[Any], value: str = "accuracy") -> dict[str, Any]:
    """One line with asymmetric 95% error bars, in % (rows: accuracy; diffs: difference)."""
    y = [_number(getattr(i, value)) for i in items]
    high = [_number(i.ci_high) for i in items]
    low = [_number(i.ci_low) for i in items]
    text = [f"{_pp(getattr(i, value))} pp [{_pp(i.ci_low)}, {_pp(i.ci_high)}]" if value == "difference"
            else f"{_pct(getattr(i, value))} [{_interval(i.ci_low, i.ci_high)}]" for i in items]
    return {"type": "scatter", "mode": "lines+markers", "name": name, "x": list(x), "y": y, "customdata": text,
            "hovertemplate": POINT_HOVER,
            "error_y": {"type": "data", "symmetric": False,
                        "array": [None if h is None or v is None else round(h - v, 2) for h, v in zip(high, y)],
                        "arrayminus": [None if lo is None or v is None else round(v - lo, 2) for lo, v in zip(low, y)]}}


def _curves(title: str, traces: list[dict[str, Any]], x_title: str, y_title: str, level: float | None,
            whole_x: bool = True) -> dict[str, Any]:
    """A line figure; `level` (%, e.g. chance or 0) drawn as a dashed horizontal line; `whole_x`:
    x is layers or offsets (a tick at each whole number)."""
    shapes = [] if level is None else [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": level, "y1": level,
                                        "line": {"dash": "dash", "color": "grey", "width": 1}}]
    x_axis = {"title": {"text": x_title}, **({"dtick": 1} if whole_x else {})}
    return {"data": traces, "layout": {"title": {"text": title}, "height": 420, "shapes": shapes,
                                       "margin": {"t": 30 if not title else 60}, "xaxis": x_axis,
                                       "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
                                       "legend": {"orientation": "h", "y": -0.25}}}


def _first_masked(items: Sequence[Any]) -> int | None:
    masked = sorted({i.offset for i in items if i.offset > 0})
    return masked[0] if masked else None


def _chance_level(rows: Sequence[CellResult]) -> float:
    levels = {round(r.chance, 6) for r in rows}
    return 100 * (levels.pop() if len(levels) == 1 else CHANCE)


def curve_figures(rows: Sequence[CellResult], probe: str) -> list[tuple[str, dict[str, Any]]]:
    """Distance (masked offsets at the deepest layer) and depth (layers at the first masked offset)
    curves of one probe kind, one line per condition and site."""
    cells = [r for r in rows if r.probe == probe]
    masked, chance = _first_masked(cells), _chance_level(cells)
    if masked is None:
        return []
    distance, depth = [], []
    for condition, site in comparison_series(cells):
        mine = [r for r in cells if r.condition == condition and r.site == site]
        last = max(r.layer for r in mine)
        far = sorted((r for r in mine if r.layer == last and r.offset > 0), key=lambda r: r.offset)
        deep = sorted((r for r in mine if r.offset == masked), key=lambda r: r.layer)
        distance.append(_series(f"{condition} · {site} (layer {last})", [r.offset for r in far], far))
        depth.append(_series(f"{condition} · {site}", [r.layer for r in deep], deep))
    return [
        (f"Accuracy by distance ({probe} probe, deepest layer)",
         _curves("", distance, "blocks after the passcode's block", "accuracy %", chance)),
        (f"Accuracy by depth ({probe} probe, {offset_label(masked)})",
         _curves("", depth, "layer", "accuracy %", chance)),
    ]


def difference_figure(diffs: Sequence[DiffResult], probe: str) -> tuple[str, dict[str, Any]] | None:
    """Paired differences a − b by layer at the first masked offset, with their 95% intervals."""
    mine = [d for d in diffs if d.probe == probe]
    masked = _first_masked(mine)
    if masked is None:
        return None
    traces = []
    for a, b, site in sorted({(d.a, d.b, d.site) for d in mine}, key=lambda k: (k[2], k[0], k[1])):
        pairs = sorted((d for d in mine if (d.a, d.b, d.site, d.offset) == (a, b, site, masked)), key=lambda d: d.layer)
        traces.append(_series(f"{a} − {b} · {site}", [d.layer for d in pairs], pairs, value="difference"))
    return (f"Condition differences ({probe} probe, {offset_label(masked)})",
            _curves("", traces, "layer", "difference (percentage points)", 0.0))


def sweep_figure(sweep: Sweep) -> tuple[str, dict[str, Any]] | None:
    """Masked probe accuracy (with its interval) and task accuracy across training checkpoints."""
    points = sweep_points(sweep)
    if not points:
        return None
    by_step = all(p.step is not None for p in points)
    x = [p.step if by_step else p.checkpoint for p in points]
    cells = [SimpleNamespace(accuracy=p.masked_accuracy, ci_low=p.masked_ci_low, ci_high=p.masked_ci_high)
             for p in points]  # each point's masked cell, read like a row by `_series`
    masked = _series("masked probe accuracy", x, cells)
    task = {"type": "scatter", "mode": "lines+markers", "name": "task accuracy", "x": x,
            "y": [_number(p.task_accuracy) for p in points]}
    return ("Leakage across training", _curves("", [masked, task], "step" if by_step else "checkpoint",
                                               "accuracy %", 100 * CHANCE, whole_x=False))


CAUSAL_HOVER = ("<b>%{y}, %{x}</b><br>change of the later mementos' loss %{z:.3f} nats<br>95% interval %{customdata[0]}"
                "<br>n %{customdata[1]}<br>%{customdata[2]}<extra></extra>")


def _causal_hover(r: CausalRow) -> list[Any]:
    """[interval, n, what the digits did] of one causal cell, for `CAUSAL_HOVER`."""
    share = r.follow_donor if r.intervention == "interchange" else r.flip_memento
    what = "digits following the donor" if r.intervention == "interchange" else "digits flipped"
    return [f"{r.delta_loss_memento_low:+.3f} to {r.delta_loss_memento_high:+.3f}", r.n,
            f"{what} {_pct(share)}" if share is not None else ""]


def causal_figures(result: CausalResult, rows: Sequence[CellResult],
                   condition: str) -> list[tuple[str, dict[str, Any]]]:
    """The causal map beside the probe map: per site, the linear probe's heatmap of `condition`, then one
    heatmap per intervention of the change in later mementos' loss (nats), with its interval on hover."""
    out = []
    for site in sorted({r.site for r in result.rows}):
        probed = [r for r in rows if (r.condition, r.site, r.probe) == (condition, site, LINEAR)]
        if probed:
            out.append((f"{condition} · {site} · what the linear probe reads",
                        heatmap(probed, f"{condition} · {site} · linear probe")))
        for intervention in sorted({r.intervention for r in result.rows if r.site == site}):
            mine = [r for r in result.rows if (r.site, r.intervention) == (site, intervention)]
            layers, offsets, cell = _on_grid(mine)
            trace = {"type": "heatmap", "x": [offset_label(o) for o in offsets], "y": [f"layer {v}" for v in layers],
                     "z": [[None if r is None else r.delta_loss_memento for r in line] for line in cell],
                     "customdata": [[None if r is None else _causal_hover(r) for r in line] for line in cell],
                     "hovertemplate": CAUSAL_HOVER, "hoverongaps": False, "colorscale": "RdBu", "reversescale": True,
                     "zmid": 0, "texttemplate": "%{z:.2f}", "colorbar": {"title": {"text": "Δ loss (nats)"}}}
            title = f"{site} · {intervention}: what it costs the later mementos"
            out.append((title, {"data": [trace], "layout": _grid_layout(title, len(layers))}))
    return out


def web_figures(rows: Sequence[CellResult], diffs: Sequence[DiffResult], sweep: Sweep | None = None,
                causal: tuple[CausalResult, str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """Every figure the results allow, as (section, title, spec) in page order."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    probes = probe_order(rows)
    for condition, site in comparison_series(rows):
        for probe in probes:
            cells = [r for r in rows if (r.condition, r.site, r.probe) == (condition, site, probe)]
            if cells:
                title = f"{condition} · {site} · {probe} probe"
                out.append(("heatmaps", title, heatmap(cells, title)))
    headline = probes[0] if probes else None
    if headline is not None:
        out += [("curves", title, spec) for title, spec in curve_figures(rows, headline)]
        difference = difference_figure(diffs, headline)
        if difference is not None:
            out.append(("differences", *difference))
    if causal is not None:  # (result, the condition it was run on)
        out += [("causal", title, spec) for title, spec in causal_figures(causal[0], rows, causal[1])]
    swept = sweep_figure(sweep) if sweep else None
    if swept is not None:
        out.append(("sweep", *swept))
    return out
