"""Figures for a leakage report, drawn with matplotlib's object API (no pyplot global state).

    paths = save_all(rows, diffs, sweep, "runs/toy/report/figures")   # PNG + PDF of each figure

Each function takes the result lists (`CellResult`s, `DiffResult`s, sweep dicts) and returns
a `matplotlib.figure.Figure`, or None when the results hold nothing it can draw. Accuracy
is plotted in percent with 95% intervals and a dashed chance line at 10%.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .report import (
    CHANCE,
    condition_order,
    offset_label,
    primary_condition,
    primary_site,
    probe_order,
    sweep_points,
)

if TYPE_CHECKING:
    from .analysis import CellResult, DiffResult

__all__ = [
    "accuracy_by_distance",
    "accuracy_by_layer",
    "accuracy_heatmap",
    "condition_comparison",
    "leakage_vs_training",
    "save_all",
]

ROLE_STYLE: dict[int, tuple[str, str]] = {-1: ("#7f7f7f", "s"), 0: ("#1f77b4", "o"), 1: ("#d62728", "^")}
CONDITION_COLORS = {"memento": "#d62728", "restart": "#ff7f0e", "restart-hidden": "#2ca02c"}
PAIR_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
TASK_COLOR = "#1f77b4"
MASKED_COLOR = "#d62728"
CHANCE_LABEL = f"chance ({100 * CHANCE:.0f}%)"

# PDF files carry a creation date unless told not to; without it the output is byte-stable.
_SAVE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


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
    """One line with its 95% intervals: error bars (x shifted by `shift`) when sparse, a band when dense."""
    est, lo, hi = _percent(items)
    face = "white" if hollow else color
    if len(x) > DENSE_POINTS:
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.plot(x, est, color=color, marker=marker, markersize=3.5, markerfacecolor=face, linestyle=linestyle,
                label=label)
        return
    err = np.clip(np.stack([est - lo, hi - est]), 0, None)
    ax.errorbar(np.asarray(x, dtype=float) + shift, est, yerr=err, color=color, marker=marker, markerfacecolor=face,
                linestyle=linestyle, capsize=3, linewidth=1.5, label=label)


def _chance_line(ax: Axes, label: bool = True) -> None:
    ax.axhline(100 * CHANCE, color="black", linestyle="--", linewidth=1, label=CHANCE_LABEL if label else None,
               zorder=1)


def _accuracy_ylim(ax: Axes, highs: Sequence[float]) -> None:
    top = max([100 * h for h in highs] + [100 * CHANCE])
    ax.set_ylim(0, min(102.0, max(15.0, top * 1.08 + 2)))


def _dodge(i: int, n: int, width: float = 0.3) -> float:
    """x shift of series i of n so that error bars side by side do not overlap."""
    return 0.0 if n <= 1 else (i - (n - 1) / 2) * width / (n - 1)


def _condition_color(condition: str, conditions: Sequence[str]) -> str:
    if condition in CONDITION_COLORS:
        return CONDITION_COLORS[condition]
    extra = [c for c in conditions if c not in CONDITION_COLORS]
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


def _integer_x(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _layer_choice(layers: Sequence[int], limit: int = 6) -> list[int]:
    """All layers when few; otherwise the first, middle and last for contrast."""
    layers = sorted(layers)
    if len(layers) <= limit:
        return layers
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


# ----------------------------------------------------------------- figures

def accuracy_by_layer(rows: Sequence[CellResult], *, condition: str | None = None,
                      site: str | None = None) -> Figure | None:
    """Accuracy by layer for the causal control (−1), direct (0) and masked +1 cells, one panel per probe."""
    chosen = _resolve(rows, condition, site)
    if chosen is None:
        return None
    condition, site = chosen
    cells = [r for r in _select(rows, condition, site) if r.offset in ROLE_STYLE]
    probes = probe_order(cells)
    if not probes:
        return None
    fig, axes = _new_figure(len(probes))
    for ax, probe in zip(axes[0], probes):
        for offset, (color, marker) in ROLE_STYLE.items():
            series = sorted((r for r in cells if r.probe == probe and r.offset == offset), key=lambda r: r.layer)
            if not series:
                continue
            _interval_series(ax, [r.layer for r in series], series, label=offset_label(offset), color=color,
                             marker=marker)
        _chance_line(ax)
        _accuracy_ylim(ax, [r.ci_high for r in cells])
        _integer_x(ax)
        ax.set_title(f"{probe} probe")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probe accuracy (%)")
    fig.suptitle(f"Probe accuracy by layer\ncondition {condition}, {site} site (95% intervals)")
    handles, labels = _legend_handles(axes[0])
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    return fig


def accuracy_by_distance(rows: Sequence[CellResult], *, condition: str | None = None, site: str | None = None,
                         layers: Sequence[int] | None = None) -> Figure | None:
    """Masked accuracy against block distance (+1 .. +k), one line per layer, one panel per probe."""
    chosen = _resolve(rows, condition, site)
    if chosen is None:
        return None
    condition, site = chosen
    cells = [r for r in _select(rows, condition, site) if r.offset > 0]
    probes = probe_order(cells)
    if not probes:
        return None
    shown = list(layers) if layers is not None else _layer_choice({r.layer for r in cells})
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, len(shown)))
    offsets = sorted({r.offset for r in cells})
    fig, axes = _new_figure(len(probes))
    for ax, probe in zip(axes[0], probes):
        for i, (layer, color) in enumerate(zip(shown, colors)):
            series = sorted((r for r in cells if r.probe == probe and r.layer == layer), key=lambda r: r.offset)
            if not series:
                continue
            _interval_series(ax, [r.offset for r in series], series, label=f"layer {layer}", color=color,
                             shift=_dodge(i, len(shown)))
        _chance_line(ax)
        _accuracy_ylim(ax, [r.ci_high for r in cells])
        ax.set_xticks(offsets, [f"+{o}" for o in offsets])
        ax.set_title(f"{probe} probe")
        ax.set_xlabel("block distance from target (offset)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("masked probe accuracy (%)")
    fig.suptitle(f"Masked accuracy by distance\ncondition {condition}, {site} site (95% intervals)")
    handles, labels = _legend_handles(axes[0])
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    return fig


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
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=vmax)  # spreads the colours near chance, where leakage lives
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    stacked = len(layers) <= 12  # few layers: panels one above the other; many: side by side
    cell_w, cell_h = 0.75, (0.5 if stacked else 0.32)
    panel_w, panel_h = cell_w * len(offsets) + 1.2, cell_h * len(layers) + 1.1
    shape = (len(probes), 1) if stacked else (1, len(probes))
    fig = Figure(figsize=(panel_w * shape[1] + 1.6, panel_h * shape[0] + 1.0), layout="constrained")
    axes = fig.subplots(*shape, squeeze=False).ravel()
    font = 8 if len(offsets) <= 10 and len(layers) <= 24 else 6
    image = None
    for ax, probe in zip(axes, probes):
        grid = np.full((len(layers), len(offsets)), np.nan)
        stars = np.zeros(grid.shape, dtype=bool)
        for r in cells:
            if r.probe == probe:
                grid[layers.index(r.layer), offsets.index(r.offset)] = 100 * r.accuracy
                stars[layers.index(r.layer), offsets.index(r.offset)] = r.significant
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
    bar = fig.colorbar(image, ax=axes.tolist(), label="probe accuracy (%), square-root colour scale",
                       shrink=0.9)
    bar.set_ticks([t for t in (0, 10, 20, 30, 40, 60, 80, 100) if t <= vmax])
    bar.ax.axhline(100 * CHANCE, color="white", linewidth=3)
    bar.ax.axhline(100 * CHANCE, color="black", linestyle="--", linewidth=1.5)
    handles = [Line2D([], [], color="black", linestyle="--", label=f"{CHANCE_LABEL} on the colour bar"),
               Line2D([], [], color="black", linestyle="none", marker="$*$", markersize=7,
                      label="Holm p ≤ 0.05 vs chance"),
               Line2D([], [], color="#dddddd", linestyle="none", marker="s", markersize=9, label="not measured")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Probe accuracy (%) by layer and offset\ncondition {condition}, {site} site")
    return fig


def _short_offset(offset: int) -> str:
    if offset < 0:
        return f"−{-offset}\ncausal"
    return "0\ndirect" if offset == 0 else f"+{offset}"


def leakage_vs_training(sweep: Sequence[Mapping[str, Any]] | None) -> Figure | None:
    """Masked probe accuracy (with its 95% band) and task accuracy across training checkpoints.

    Direct accuracy, when the sweep has it, stays in the tables: on the same axis it would
    squeeze the masked curve against chance.
    """
    if not sweep:
        return None
    points = sweep_points(sweep)
    by_step = all(p.get("step") is not None for p in points)
    steps = np.array([float(p["step"]) if by_step else float(i) for i, p in enumerate(points)])
    masked = np.array([100 * float(p["masked_accuracy"]) for p in points])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    highs = list(masked)
    if all(p.get("masked_ci_low") is not None and p.get("masked_ci_high") is not None for p in points):
        lo = np.array([100 * float(p["masked_ci_low"]) for p in points])
        hi = np.array([100 * float(p["masked_ci_high"]) for p in points])
        ax.fill_between(steps, lo, hi, color=MASKED_COLOR, alpha=0.2, linewidth=0, label="masked 95% interval")
        highs += list(hi)
    ax.plot(steps, masked, color=MASKED_COLOR, marker="o", label="masked probe accuracy")
    _chance_line(ax)
    ax.set_ylim(0, min(102.0, max(15.0, max(highs) * 1.1 + 2)))
    if by_step:
        ax.set_xlabel("training step")
    else:  # no steps recorded: checkpoints in the order given
        ax.set_xticks(steps, [str(p.get("checkpoint", i)) for i, p in enumerate(points)])
        ax.set_xlabel("checkpoint (training order)")
    ax.set_ylabel("masked probe accuracy (%)", color=MASKED_COLOR)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [100 * float(p["task_accuracy"]) for p in points], color=TASK_COLOR, marker="s",
              linestyle="-.", label="task accuracy")
    twin.set_ylim(0, 102)
    twin.set_ylabel("task accuracy (%)", color=TASK_COLOR)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=9)
    layers = {p.get("layer") for p in points}
    at = f" (masked +1, layer {layers.pop()})" if len(layers) == 1 and None not in layers else ""
    fig.suptitle(f"Leakage and task accuracy across training checkpoints{at}")
    return fig


def _comparison_series(cells: Sequence[CellResult]) -> list[tuple[str, str]]:
    conditions = condition_order(r.condition for r in cells)
    sites = ["memento"] + sorted({r.site for r in cells} - {"memento"})
    return [(c, s) for s in sites for c in conditions if any(r.condition == c and r.site == s for r in cells)]


def condition_comparison(rows: Sequence[CellResult], diffs: Sequence[DiffResult] | None = None, *,
                         offset: int | None = None) -> Figure | None:
    """Masked accuracy per layer for each condition and site (top), and paired differences (bottom).

    `offset` defaults to the smallest masked offset (+1).
    """
    if offset is None:
        masked = sorted({r.offset for r in rows if r.offset > 0})
        if not masked:
            return None
        offset = masked[0]
    cells = [r for r in rows if r.offset == offset]
    series = _comparison_series(cells)
    if len(series) < 2:
        return None
    pairs = [d for d in (diffs or []) if d.offset == offset]
    probes = probe_order(cells)
    nrows = 2 if pairs else 1
    fig, axes = _new_figure(len(probes), height=3.8, nrows=nrows)
    conditions = condition_order(r.condition for r in cells)
    for ax, probe in zip(axes[0], probes):
        for i, (condition, site) in enumerate(series):
            mine = sorted((r for r in cells if (r.condition, r.site, r.probe) == (condition, site, probe)),
                          key=lambda r: r.layer)
            if not mine:
                continue
            hollow = site != "memento"
            _interval_series(ax, [r.layer for r in mine], mine, color=_condition_color(condition, conditions),
                             marker="D" if hollow else "o", hollow=hollow, linestyle=":" if hollow else "-",
                             shift=_dodge(i, len(series)),
                             label=condition if site == "memento" else f"{condition}, {site} site")
        _chance_line(ax)
        _accuracy_ylim(ax, [r.ci_high for r in cells])
        _integer_x(ax)
        ax.set_title(f"{probe} probe — {offset_label(offset)}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probe accuracy (%)")
    axes[0][-1].legend(*_legend_handles(axes[0]), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                       title="condition")
    if pairs:
        _difference_row(axes[1], pairs, probes)
    for ax in axes.ravel():
        ax.set_xlabel("layer")
    fig.suptitle(f"Conditions compared at {offset_label(offset)} (95% intervals)")
    return fig


def _difference_row(axes: Sequence[Axes], pairs: Sequence[DiffResult], probes: Sequence[str]) -> None:
    keys = sorted({(d.a, d.b, d.site) for d in pairs}, key=lambda k: (k[2] != "memento", k))
    for ax, probe in zip(axes, probes):
        for i, key in enumerate(keys):
            mine = sorted((d for d in pairs if (d.a, d.b, d.site) == key and d.probe == probe), key=lambda d: d.layer)
            if not mine:
                continue
            a, b, site = key
            _interval_series(ax, [d.layer for d in mine], mine, color=PAIR_COLORS[i % len(PAIR_COLORS)],
                             shift=_dodge(i, len(keys)), linestyle="-" if site == "memento" else ":",
                             label=f"{a} − {b}" + ("" if site == "memento" else f" ({site} site)"))
        ax.axhline(0, color="black", linestyle="--", linewidth=1, label="no difference (0)")
        _integer_x(ax)
        ax.set_title(f"{probe} probe — paired differences")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy difference (pp)")
    axes[-1].legend(*_legend_handles(axes), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                    title="a − b")


# ----------------------------------------------------------------- saving

def save_figure(fig: Figure, path_stem: Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Save one figure as path_stem.<format> for each format (byte-stable: no creation dates)."""
    paths = []
    for fmt in formats:
        path = path_stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_SAVE_METADATA.get(fmt))
        paths.append(path)
    return paths


def save_all(
    rows: Sequence[CellResult],
    diffs: Sequence[DiffResult] | None,
    sweep: Sequence[Mapping[str, Any]] | None,
    out_dir: str | Path,
    *,
    condition: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Draw every figure the results allow and save each as PNG and PDF; returns the paths written.

    Files: accuracy_by_layer, accuracy_by_distance, accuracy_heatmap, condition_comparison,
    leakage_vs_training (each .png and .pdf). A figure with nothing to draw is skipped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy_by_layer": accuracy_by_layer(rows, condition=condition),
        "accuracy_by_distance": accuracy_by_distance(rows, condition=condition),
        "accuracy_heatmap": accuracy_heatmap(rows, condition=condition),
        "condition_comparison": condition_comparison(rows, diffs),
        "leakage_vs_training": leakage_vs_training(sweep),
    }
    paths: list[Path] = []
    for name, fig in figures.items():
        if fig is not None:
            paths += save_figure(fig, out / name, formats, dpi)
    return paths
