"""Figures for a leakage report, drawn with matplotlib's object API (no pyplot global state).

    paths = save_all(rows, diffs, sweep, "runs/toy/report/figures")   # PNG + PDF of each figure

Each function takes the result lists (`CellResult`s, `DiffResult`s, sweep dicts) and returns
a `matplotlib.figure.Figure`, or None when the results hold nothing it can draw. Accuracy
is plotted in percent with 95% intervals and a dashed chance line at 10%.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..files import replacing, together
from ..grid import MEMENTO
from .plotting import (  # noqa: F401  (colours are part of this module's interface)
    CHANCE_LABEL,
    CONDITION_COLORS,
    MASKED_COLOR,
    PAIR_COLORS,
    ROLE_STYLE,
    SAVE_STYLE,
    TASK_COLOR,
    _accuracy_panel,
    _accuracy_ylim,
    _bottom_legend,
    _chance_line,
    _condition_color,
    _dodge,
    _fitting_columns,
    _integer_x,
    _interval_series,
    _layer_choice,
    _legend_handles,
    _new_figure,
    _percent,
    _resolve,
    _select,
)
from .heatmaps import accuracy_heatmap
from .sweep import Sweep, sweep_points
from .words import (
    comparison_series,
    condition_masks,
    condition_order,
    offset_label,
    primary_condition,
    probe_order,
)

if TYPE_CHECKING:
    from ..analysis import CellResult, DiffResult, SensitivityCurve

__all__ = [
    "accuracy_by_distance",
    "accuracy_by_layer",
    "accuracy_heatmap",
    "condition_comparison",
    "l2_selection",
    "l2_sensitivity",
    "leakage_vs_training",
    "save_all",
]

# PDF files carry a creation date unless told not to; without it the output is byte-stable.
_SAVE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


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
        _integer_x(ax)
        _accuracy_panel(ax, [r.ci_high for r in cells], f"{probe} probe", "layer")
    axes[0][0].set_ylabel("probe accuracy (%)")
    fig.suptitle(f"Probe accuracy by layer\ncondition {condition}, {site} site (95% intervals)")
    _bottom_legend(fig, axes[0])
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
        ax.set_xticks(offsets, [f"+{o}" for o in offsets])
        _accuracy_panel(ax, [r.ci_high for r in cells], f"{probe} probe", "block distance from target (offset)")
    axes[0][0].set_ylabel("masked probe accuracy (%)")
    fig.suptitle(f"Masked accuracy by distance\ncondition {condition}, {site} site (95% intervals)")
    _bottom_legend(fig, axes[0])
    return fig


def leakage_vs_training(sweep: Sweep | None) -> Figure | None:
    """Masked probe accuracy (with its 95% band) and task accuracy across training checkpoints.

    Direct accuracy, when the sweep has it, stays in the tables: on the same axis it would
    squeeze the masked curve against chance.
    """
    if not sweep:
        return None
    points = sweep_points(sweep)
    by_step = all(p.step is not None for p in points)
    steps = np.array([float(p.step) if by_step else float(i) for i, p in enumerate(points)])
    masked = np.array([100 * float(p.masked_accuracy) for p in points])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    highs = list(masked)
    if all(p.masked_ci_low is not None and p.masked_ci_high is not None for p in points):
        lo = np.array([100 * float(p.masked_ci_low) for p in points])
        hi = np.array([100 * float(p.masked_ci_high) for p in points])
        ax.fill_between(steps, lo, hi, color=MASKED_COLOR, alpha=0.2, linewidth=0, label="masked 95% interval")
        highs += list(hi)
    ax.plot(steps, masked, color=MASKED_COLOR, marker="o", label="masked probe accuracy")
    _chance_line(ax)
    ax.set_ylim(0, min(102.0, max(15.0, max(highs) * 1.1 + 2)))
    if by_step:
        ax.set_xlabel("training step")
    else:  # no steps recorded: checkpoints in the order given
        ax.set_xticks(steps, [str(p.checkpoint) for i, p in enumerate(points)])
        ax.set_xlabel("checkpoint (training order)")
    ax.set_ylabel("masked probe accuracy (%)", color=MASKED_COLOR)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [100 * float(p.task_accuracy) for p in points], color=TASK_COLOR, marker="s",
              linestyle="-.", label="task accuracy")
    twin.set_ylim(0, 102)
    twin.set_ylabel("task accuracy (%)", color=TASK_COLOR)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", fontsize=9,
               ncols=_fitting_columns(fig, [h.get_label() for h in handles], 3, 9))
    layers = {p.layer for p in points}
    at = f" (masked +1, layer {layers.pop()})" if len(layers) == 1 and None not in layers else ""
    fig.suptitle(f"Leakage and task accuracy across training checkpoints{at}")
    return fig


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
    series = comparison_series(cells)
    if len(series) < 2:
        return None
    pairs = [d for d in (diffs or []) if d.offset == offset]
    probes = probe_order(cells)
    nrows = 2 if pairs else 1
    fig, axes = _new_figure(len(probes), height=3.8, nrows=nrows)
    conditions = condition_order(cells)
    masks = condition_masks(cells)
    for ax, probe in zip(axes[0], probes):
        for i, (condition, site) in enumerate(series):
            mine = sorted((r for r in cells if (r.condition, r.site, r.probe) == (condition, site, probe)),
                          key=lambda r: r.layer)
            if not mine:
                continue
            hollow = site != MEMENTO
            _interval_series(ax, [r.layer for r in mine], mine, color=_condition_color(condition, conditions, masks),
                             marker="D" if hollow else "o", hollow=hollow, linestyle=":" if hollow else "-",
                             shift=_dodge(i, len(series)),
                             label=condition if site == MEMENTO else f"{condition}, {site} site")
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
    keys = sorted({(d.a, d.b, d.site) for d in pairs}, key=lambda k: (k[2] != MEMENTO, k))
    for ax, probe in zip(axes, probes):
        for i, key in enumerate(keys):
            mine = sorted((d for d in pairs if (d.a, d.b, d.site) == key and d.probe == probe), key=lambda d: d.layer)
            if not mine:
                continue
            a, b, site = key
            _interval_series(ax, [d.layer for d in mine], mine, color=PAIR_COLORS[i % len(PAIR_COLORS)],
                             shift=_dodge(i, len(keys)), linestyle="-" if site == MEMENTO else ":",
                             label=f"{a} − {b}" + ("" if site == MEMENTO else f" ({site} site)"))
        ax.axhline(0, color="black", linestyle="--", linewidth=1, label="no difference (0)")
        _integer_x(ax)
        ax.set_title(f"{probe} probe — paired differences")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy difference (pp)")
    axes[-1].legend(*_legend_handles(axes), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                    title="a − b")


# ----------------------------------------------------------------- probe strength

def _strength_panel(ax: Axes, series: Sequence[tuple[str, Any, Sequence[float], Sequence[float] | None,
                                                    Sequence[float] | None, float]]) -> list[float]:
    """Lines of accuracy against L2 (log x): (label, color, l2, outer (est, lo, hi) or None, inner, chosen).
    Outer validation solid with 95% bars, inner validation dashed; the chosen value circled. Returns the highs."""
    highs: list[float] = []
    for label, color, l2, outer, inner, chosen in series:
        x = np.asarray(l2, dtype=float)
        if outer is not None:
            est, lo, hi = (100 * np.asarray(v, dtype=float) for v in outer)
            ax.errorbar(x, est, yerr=np.clip(np.stack([est - lo, hi - est]), 0, None), color=color, marker="o",
                        capsize=3, linewidth=1.5, label=f"{label}, validation")
            highs += list(hi / 100)
            at = est[int(np.argmin(np.abs(x - chosen)))]
        if inner is not None:
            y = 100 * np.asarray(inner, dtype=float)
            ax.plot(x, y, color=color, marker="s", markersize=4, markerfacecolor="white", linestyle="--",
                    linewidth=1.2, label=f"{label}, inner split" if outer is not None else label)
            highs += list(y / 100)
            if outer is None:
                at = y[int(np.argmin(np.abs(x - chosen)))]
        ax.plot([chosen], [at], marker="o", markersize=13, markerfacecolor="none", markeredgecolor=color,
                markeredgewidth=1.5, linestyle="none")
    ax.plot([], [], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="black", linestyle="none",
            label="chosen (inner split)")
    ax.set_xscale("log")
    ax.set_xlabel("L2 strength (mean-loss scale)")
    ax.grid(alpha=0.3)
    _chance_line(ax)
    return highs


def l2_sensitivity(curves: Sequence[SensitivityCurve]) -> Figure | None:
    """Accuracy against the linear probe's L2 strength, one line per cell (`analysis.sensitivity_curves`):
    validation accuracy of the refitted probes with 95% intervals, the inner-split criterion dashed,
    and the value selection chose circled."""
    if not curves:
        return None
    fig, axes = _new_figure(1, width=6.0, height=4.5)
    ax = axes[0][0]
    sites = len({c.site for c in curves}) > 1
    series = [(f"{c.site + ' ' if sites else ''}{_role(c.offset)}, layer {c.layer}", PAIR_COLORS[i % len(PAIR_COLORS)],
               c.l2, (c.accuracy, c.ci_low, c.ci_high), c.inner_accuracy, c.chosen) for i, c in enumerate(curves)]
    _accuracy_ylim(ax, _strength_panel(ax, series))
    ax.set_ylabel("probe accuracy (%)")
    conditions = ", ".join(dict.fromkeys(c.condition for c in curves))
    site = "" if sites else f", {curves[0].site} site"
    fig.suptitle(f"Linear probe accuracy against L2 strength\ncondition {conditions}{site} (95% intervals)")
    _bottom_legend(fig, [ax], ncols=2, fontsize=8)
    return fig


def _role(offset: int) -> str:
    return "control −1" if offset < 0 else "direct" if offset == 0 else f"masked +{offset}"


def l2_selection(rows: Sequence[CellResult], *, condition: str | None = None, site: str | None = None) -> Figure | None:
    """Inner-split accuracy against L2 for the headline cells (last layer: causal control, direct, first
    masked offset), one panel per probe whose strength was chosen; read from the rows, nothing refitted.
    None when no row was chosen from a grid."""
    resolved = _resolve(rows, condition, site)
    if resolved is None:
        return None
    condition, site = resolved
    cells = [r for r in _select(rows, condition, site) if r.l2_inner_accuracy and r.l2_grid and r.l2 is not None]
    probes = probe_order(cells)
    if not probes:
        return None
    fig, axes = _new_figure(len(probes), width=5.0, height=4.0)
    highs: list[float] = []
    for ax, probe in zip(axes[0], probes):
        mine = [r for r in cells if r.probe == probe]
        last = max(r.layer for r in mine)
        masked = sorted(r.offset for r in mine if r.offset > 0)
        wanted = [o for o in (-1, 0, masked[0] if masked else None) if o is not None]
        shown = sorted((r for r in mine if r.layer == last and r.offset in wanted), key=lambda r: r.offset)
        series = [(f"{_role(r.offset)}, layer {r.layer}", ROLE_STYLE[min(max(r.offset, -1), 1)][0], r.l2_grid, None,
                   r.l2_inner_accuracy, r.l2) for r in shown]
        highs += _strength_panel(ax, series)
        ax.set_title(f"{probe} probe")
    for ax in axes[0]:
        _accuracy_ylim(ax, highs)
    axes[0][0].set_ylabel("inner-split accuracy (%)")
    fig.suptitle(f"Probe strength chosen on an inner split of the training passcodes\ncondition {condition}, "
                 f"{site} site")
    _bottom_legend(fig, list(axes[0]), ncols=3, fontsize=8)
    return fig


# ----------------------------------------------------------------- saving

def save_figure(fig: Figure, path_stem: Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Save one figure as path_stem.<format> for each format (byte-stable: no creation dates; TrueType
    fonts in PDF, `SAVE_STYLE`), all or none."""
    paths = []
    with together(), rc_context(SAVE_STYLE):
        for fmt in formats:
            path = path_stem.with_suffix(f".{fmt}")
            with replacing(path, "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi, metadata=_SAVE_METADATA.get(fmt))
            paths.append(path)
    return paths


def _file_part(condition: str) -> str:
    """A condition's name as it goes into a file name: letters, digits, '-' and '_' kept, anything else '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", condition)


def _condition_figures(rows: Sequence[CellResult], condition: str | None) -> dict[str, Figure | None]:
    """The distance figure and heatmap of every condition: the headline one's as accuracy_by_distance and
    accuracy_heatmap, each other's with its name after (accuracy_heatmap_restart)."""
    headline = condition or primary_condition(rows)
    figures: dict[str, Figure | None] = {}
    for c in condition_order(rows):
        suffix = "" if c == headline else f"_{_file_part(c)}"
        if f"accuracy_heatmap{suffix}" in figures:  # two names that differ only in unsafe characters
            suffix += f"_{condition_order(rows).index(c)}"
        figures[f"accuracy_by_distance{suffix}"] = accuracy_by_distance(rows, condition=c)
        figures[f"accuracy_heatmap{suffix}"] = accuracy_heatmap(rows, condition=c)
    return figures


def save_all(
    rows: Sequence[CellResult],
    diffs: Sequence[DiffResult] | None,
    sweep: Sweep | None,
    out_dir: str | Path,
    *,
    condition: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Draw every figure the results allow and save each as PNG and PDF; returns the paths written.

    Files: accuracy_by_layer, accuracy_by_distance, accuracy_heatmap (the headline condition's; each
    other condition's as accuracy_by_distance_CONDITION, accuracy_heatmap_CONDITION), condition_comparison,
    leakage_vs_training, l2_selection (each .png and .pdf). A figure with nothing to draw is skipped.
    The files are written together: all of them, or (on a failure) none.
    """
    out = Path(out_dir)
    figures = {
        "accuracy_by_layer": accuracy_by_layer(rows, condition=condition),
        **_condition_figures(rows, condition),
        "condition_comparison": condition_comparison(rows, diffs),
        "leakage_vs_training": leakage_vs_training(sweep),
        "l2_selection": l2_selection(rows, condition=condition),
    }
    paths: list[Path] = []
    with together():
        for name, fig in figures.items():
            if fig is not None:
                paths += save_figure(fig, out / name, formats, dpi)
    return paths
