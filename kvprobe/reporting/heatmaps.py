"""The layer x offset heatmap of a report: one panel per probe kind, every cell's accuracy written in it.

    fig = accuracy_heatmap(rows, condition="restart")   # one condition's grid at its main site

One sequential colour scale (viridis, linear from 0% to the top of the range) for every cell; chance
is a marked tick on the colour bar, not a change of palette.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .plotting import _fitting_columns, _resolve, _select
from .words import CHANCE, probe_order

if TYPE_CHECKING:
    from ..analysis import CellResult

HEATMAP_CMAP = "viridis"
MISSING_COLOR = "#dddddd"


def _cell_grid(cells: Sequence[CellResult], probe: str, layers: Sequence[int],
               offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One probe's accuracy (%) as a layers x offsets array (NaN: not measured) and its Holm stars."""
    grid = np.full((len(layers), len(offsets)), np.nan)
    stars = np.zeros(grid.shape, dtype=bool)
    for r in cells:
        if r.probe == probe:
            grid[layers.index(r.layer), offsets.index(r.offset)] = 100 * r.accuracy
            stars[layers.index(r.layer), offsets.index(r.offset)] = r.significant
    return grid, stars


def accuracy_heatmap(rows: Sequence[CellResult], *, condition: str | None = None,
                     site: str | None = None) -> Figure | None:
    """Layer x offset grid of accuracy (%), cells annotated, '*' on Holm-significant cells."""
    chosen = _resolve(rows, condition, site)
    if chosen is None:
        return None
    condition, site = chosen
    cells = _select(rows, condition, site)
    probes = probe_order(cells)
    layers = sorted({r.layer for r in cells})
    offsets = sorted({r.offset for r in cells})
    vmax = max(20.0, float(np.ceil(max(100 * r.accuracy for r in cells) / 10) * 10))
    norm = Normalize(vmin=0.0, vmax=vmax)  # linear: equal steps of accuracy are equal steps of colour
    cmap = colormaps[HEATMAP_CMAP].with_extremes(bad=MISSING_COLOR)
    stacked = len(layers) <= 12  # few layers: panels one above the other; many: side by side
    cell_w, cell_h = 0.75, (0.5 if stacked else 0.32)
    panel_w, panel_h = cell_w * len(offsets) + 1.2, cell_h * len(layers) + 1.1
    shape = (len(probes), 1) if stacked else (1, len(probes))
    fig = Figure(figsize=(panel_w * shape[1] + 1.6, panel_h * shape[0] + 1.0), layout="constrained")
    axes = fig.subplots(*shape, squeeze=False).ravel()
    font = 8 if len(offsets) <= 10 and len(layers) <= 24 else 6
    image, missing = None, False
    for ax, probe in zip(axes, probes):
        grid, stars = _cell_grid(cells, probe, layers, offsets)
        missing = missing or bool(np.isnan(grid).any())
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            text = "—" if np.isnan(value) else f"{value:.1f}" + ("*" if stars[i, j] else "")
            dark = np.isnan(value) or norm(value) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=font, color="black" if dark else "white")
        ax.set_xticks(range(len(offsets)), [_short_offset(o) for o in offsets])
        ax.set_yticks(range(len(layers)), [str(v) for v in layers])
        ax.set_xlabel("offset (block distance from target)")
        ax.set_ylabel("layer")
        ax.set_title(f"{probe} probe")
    assert image is not None
    bar = fig.colorbar(image, ax=axes.tolist(), label="probe accuracy (%)", shrink=0.9)
    _mark_chance(bar, vmax)
    _heatmap_key(fig, missing)
    fig.suptitle(f"Probe accuracy (%) by layer and offset\ncondition {condition}, {site} site")
    return fig


def _mark_chance(bar, vmax: float) -> None:
    """Ticks every 10 or 20 points, chance among them labelled as such, and a dashed line across the bar there."""
    chance = 100 * CHANCE
    step = 10 if vmax <= 50 else 20
    ticks = sorted({*np.arange(0.0, vmax + 1e-9, step), chance})
    bar.set_ticks(ticks, labels=[f"{t:.0f} chance" if t == chance else f"{t:.0f}" for t in ticks])
    bar.ax.axhline(chance, color="white", linestyle="--", linewidth=1.5)


def _heatmap_key(fig: Figure, missing: bool) -> None:
    """The legend below the panels: the Holm star, and the grey of a cell not measured when some cell is."""
    handles = [Line2D([], [], color="black", linestyle="none", marker="$*$", markersize=7,
                      label="Holm p ≤ 0.05 vs chance")]
    if missing:
        handles.append(Line2D([], [], color=MISSING_COLOR, linestyle="none", marker="s", markersize=9,
                              label="— not measured"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8,
               ncols=_fitting_columns(fig, [h.get_label() for h in handles], 3, 8))


def _short_offset(offset: int) -> str:
    if offset < 0:
        return f"−{-offset}\ncausal"
    return "0\ndirect" if offset == 0 else f"+{offset}"
