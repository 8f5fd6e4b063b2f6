"""Plotting primitives shared by kvprobe's figures: colours, interval series, chance lines, panels.

Private to the figure modules (`figures`); nothing here draws a whole figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .words import CHANCE, primary_condition, primary_site

if TYPE_CHECKING:
    from ..analysis import CellResult

ROLE_STYLE: dict[int, tuple[str, str]] = {-1: ("#7f7f7f", "s"), 0: ("#1f77b4", "o"), 1: ("#d62728", "^")}
CONDITION_COLORS = {  # by mask name (MaskConfig.name)
    "memento": "#d62728", "restart-delims-visible": "#ff7f0e", "restart": "#2ca02c"}
PAIR_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
TASK_COLOR = "#1f77b4"
MASKED_COLOR = "#d62728"
CHANCE_LABEL = f"chance ({100 * CHANCE:.0f}%)"
SAVE_STYLE = {"pdf.fonttype": 42, "ps.fonttype": 42}
"""matplotlib settings every saved figure is written under: TrueType (Type 42) fonts in PDF and PS,
not Type 3, which conference checks reject."""


# ----------------------------------------------------------------- helpers

def _select(rows: Sequence[CellResult], condition: str, site: str, probe: str | None = None) -> list[CellResult]:
    return [r for r in rows if r.condition == condition and r.site == site and (probe is None or r.probe == probe)]


def _resolve(rows: Sequence[CellResult], condition: str | None, site: str | None) -> tuple[str, str] | None:
    condition = condition or primary_condition(rows)
    site = site or primary_site(rows, condition)
    if condition is None or site is None or not _select(rows, condition, site):
        return None
    return condition, site


def _percent(items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate, low and high of the 95% interval in % (rows: accuracy; diffs: difference)."""
    est = np.array([100 * (r.accuracy if hasattr(r, "accuracy") else r.difference) for r in items])
    lo = np.array([100 * r.ci_low for r in items])
    hi = np.array([100 * r.ci_high for r in items])
    return est, lo, hi


DENSE_POINTS = 12
"""Above this many x positions a series draws its interval as a band instead of error bars."""


def _interval_series(ax: Axes, x: Sequence[float], items: Sequence[Any], *, label: str, color: Any,
                     marker: str = "o", linestyle: str = "-", hollow: bool = False, shift: float = 0.0) -> None:
    """One line with its 95% intervals: error bars (x shifted by `shift`) when sparse, a band when dense;
    the line breaks where x skips a position (`_broken_at_gaps`)."""
    dense = len(x) > DENSE_POINTS
    x, est, lo, hi = _broken_at_gaps(x, *_percent(items))
    face = "white" if hollow else color
    if dense:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.plot(x, est, color=color, marker=marker, markersize=3.5, markerfacecolor=face, linestyle=linestyle,
                label=label)
        return
    err = np.clip(np.stack([est - lo, hi - est]), 0, None)
    ax.errorbar(x + shift, est, yerr=err, color=color, marker=marker, markerfacecolor=face,
                linestyle=linestyle, capsize=3, linewidth=1.5, label=label)


def _broken_at_gaps(x: Sequence[float], *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """x and its series with a NaN put between neighbours more than 1 apart (layers or offsets not
    measured), so that a line breaks there instead of drawing through positions that have no value."""
    x = np.asarray(x, dtype=float)
    gaps = np.flatnonzero(np.diff(x) > 1) + 1
    return tuple(np.insert(np.asarray(v, dtype=float), gaps, np.nan) for v in (x, *ys))


def _chance_line(ax: Axes, label: bool = True) -> None:
    ax.axhline(100 * CHANCE, color="black", linestyle="--", linewidth=1, label=CHANCE_LABEL if label else None,
               zorder=1)


def _accuracy_ylim(ax: Axes, highs: Sequence[float]) -> None:
    top = max([100 * h for h in highs] + [100 * CHANCE])
    ax.set_ylim(0, min(102.0, max(15.0, top * 1.08 + 2)))


def _dodge(i: int, n: int, width: float = 0.3) -> float:
    """x shift of series i of n so that error bars side by side do not overlap."""
    return 0.0 if n <= 1 else (i - (n - 1) / 2) * width / (n - 1)


def _condition_color(condition: str, conditions: Sequence[str], masks: dict[str, str] | None = None) -> str:
    """A condition's colour by what its mask is (memento red, restart-delims-visible orange, restart green)."""
    mask = (masks or {}).get(condition, condition)
    if mask in CONDITION_COLORS:
        return CONDITION_COLORS[mask]
    extra = [c for c in conditions if (masks or {}).get(c, c) not in CONDITION_COLORS]
    return PAIR_COLORS[extra.index(condition) % len(PAIR_COLORS)]


def _new_figure(n_panels: int, *, width: float = 5.0, height: float = 4.0, nrows: int = 1,
                sharey: bool = True) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * n_panels + 0.8, height * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, n_panels, squeeze=False, sharey="row" if sharey else False)
    return fig, axes


def _legend_handles(axes: Sequence[Axes]) -> tuple[list[Any], list[str]]:
    """Legend entries of several panels, each label once, in first-seen order."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def _fitting_columns(fig: Figure, labels: Sequence[str], most: int, fontsize: Any) -> int:
    """The most legend columns (up to `most`) whose widest row still fits the figure's width."""
    size = fontsize if isinstance(fontsize, (int, float)) else 10.0  # points
    width_pt = fig.get_figwidth() * 72 - 20

    def row_width(n: int) -> float:  # columns are as wide as their widest entry: handle + gap + text
        cols = [max(len(l) for l in labels[c::n]) for c in range(n)]
        return sum(0.6 * size * w + 3.2 * size for w in cols)

    n = max(1, min(len(labels), most))
    while n > 1 and row_width(n) > width_pt:
        n -= 1
    return n


def _bottom_legend(fig: Figure, axes: Sequence[Axes], ncols: int = 5, **kw: Any) -> None:
    """One legend for several panels (`_legend_handles`), centred below them, in as many
    columns (up to `ncols`) as fit the figure's width: a long label never runs off the page."""
    handles, labels = _legend_handles(axes)
    n = _fitting_columns(fig, labels, ncols, kw.get("fontsize"))
    fig.legend(handles, labels, loc="outside lower center", ncols=n, **kw)


def _accuracy_panel(ax: Axes, highs: Sequence[float], title: str, xlabel: str) -> None:
    """Finish one accuracy panel: the chance line, a y range that fits `highs`, title, x label, grid."""
    _chance_line(ax)
    _accuracy_ylim(ax, highs)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _integer_x(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _layer_choice(layers: Sequence[int], limit: int = 6) -> list[int]:
    """All layers when few; otherwise the first, middle and last for contrast."""
    layers = sorted(layers)
    if len(layers) <= limit:
        return layers
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})
