"""The causal map beside the probe map: a figure, a table and a plain-language section.

    write_causal(result, rows, "runs/x/report", condition="memento")

Panels, layer (rows) x offset (columns), one row of panels per site: what the linear
probe reads (accuracy %), what removing the implicit channel costs downstream (ablation:
change of the loss on later memento tokens, nats), and what swapping in a donor's KV
does (interchange: the same loss change, and the share of a later memento's decoded
digits that follow the donor). Numbers come from `kvprobe.causal` rows; nothing here
is computed beyond selecting and formatting them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..files import replacing, together, write_text
from ..grid import LINEAR, Cell
from .figures import save_figure

if TYPE_CHECKING:
    from ..analysis import CellResult
    from ..causal import CausalResult, CausalRow

__all__ = ["causal_figure", "causal_finding", "causal_section", "write_causal"]


def _grid(cells: dict[tuple[int, int], float], layers: list[int], offsets: list[int]) -> np.ndarray:
    grid = np.full((len(layers), len(offsets)), np.nan)
    for (layer, offset), value in cells.items():
        if layer in layers and offset in offsets:
            grid[layers.index(layer), offsets.index(offset)] = value
    return grid


def _panel(ax, grid: np.ndarray, layers: list[int], offsets: list[int], title: str, fmt: str, cmap: str,
           norm=None) -> None:
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps[cmap].with_extremes(bad="#dddddd"), norm=norm,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        r, g, b, _ = image.cmap(image.norm(value)) if not np.isnan(value) else (1, 1, 1, 1)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on a dark cell
        ax.text(j, i, "—" if np.isnan(value) else format(value, fmt), ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
    ax.set_xticks(range(len(offsets)), [f"{o:+d}" for o in offsets])
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    ax.set_xlabel("offset (block distance from target)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.85)


def causal_figure(result: CausalResult, rows: Sequence[CellResult], condition: str) -> Figure | None:
    """Probe accuracy, ablation and interchange effects side by side, per site."""
    sites = sorted({r.site for r in result.rows})
    if not sites:
        return None
    layers = sorted({r.layer for r in result.rows})
    offsets = sorted({r.offset for r in result.rows})
    fig = Figure(figsize=(4.4 * 4, 0.45 * len(layers) * len(sites) + 2.6 * len(sites)), layout="constrained")
    axes = fig.subplots(len(sites), 4, squeeze=False)
    for row_axes, site in zip(axes, sites):
        probe = {(r.layer, r.offset): 100 * r.accuracy for r in rows
                 if r.condition == condition and r.site == site and r.probe == LINEAR}
        ablation = {(r.layer, r.offset): r.delta_loss_memento for r in result.rows
                    if r.intervention == "ablation" and r.site == site}
        swap = {(r.layer, r.offset): r.delta_loss_memento for r in result.rows
                if r.intervention == "interchange" and r.site == site}
        follow = {(r.layer, r.offset): 100 * r.follow_donor for r in result.rows
                  if r.intervention == "interchange" and r.site == site and r.follow_donor is not None}
        spread = max([abs(v) for v in (*ablation.values(), *swap.values()) if not math.isnan(v)] + [1e-6])
        effect_norm = TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread)
        _panel(row_axes[0], _grid(probe, layers, offsets), layers, offsets,
               f"probe map: linear probe accuracy (%)\n{site}, {condition}", ".1f", "viridis")
        _panel(row_axes[1], _grid(ablation, layers, offsets), layers, offsets,
               "ablation (channel removed):\nΔ loss on later memento tokens (nats)", "+.3f", "RdBu_r", effect_norm)
        _panel(row_axes[2], _grid(swap, layers, offsets), layers, offsets,
               "interchange (donor's K/V):\nΔ loss on later memento tokens (nats)", "+.3f", "RdBu_r", effect_norm)
        where = ""
        if result.reader:
            read = Cell.parse(result.reader)
            where = f" at {read.offset:+d}, layer {read.layer}"
        _panel(row_axes[3], _grid(follow, layers, offsets), layers, offsets,
               f"interchange: probe{where} decodes\nthe donor's digits (%; chance 10)", ".1f", "magma")
    fig.suptitle(f"Does the model use what leaks? Probe map and causal map ({result.spec.get('n_samples')} samples; "
                 f"ablation: K/V under {result.spec.get('ablate_with')})", fontsize=10)
    return fig


def _interval(r: CausalRow) -> str:
    return f"{r.delta_loss_memento:+.4f} [{r.delta_loss_memento_low:+.4f}, {r.delta_loss_memento_high:+.4f}]"


def _excludes_zero(r: CausalRow) -> bool:
    return r.delta_loss_memento_low > 0 or r.delta_loss_memento_high < 0


def causal_finding(result: CausalResult) -> str:
    """The plain-language finding: where removing or swapping the channel changes the
    model's later predictions, read from the intervals."""
    abl = [r for r in result.rows if r.intervention == "ablation" and not math.isnan(r.delta_loss_memento)]
    swp = [r for r in result.rows if r.intervention == "interchange" and not math.isnan(r.delta_loss_memento)]
    if not abl:
        return "No downstream tokens to measure: the causal map is empty."
    top = max(abl, key=lambda r: r.delta_loss_memento)
    hurt = [r for r in abl if r.delta_loss_memento_low > 0]
    parts = [f"Removing the implicit channel (the memento's K/V replaced by its {result.spec.get('ablate_with')} K/V, "
             f"text kept) raises the loss on later memento tokens in {len(hurt)} of {len(abl)} cells; most at "
             f"{top.cell.label} ({_interval(top)} nats, greedy predictions changed on "
             f"{100 * (top.flip_memento or 0):.1f}% of those tokens)."]
    if swp:
        big = max(swp, key=lambda r: abs(r.delta_loss_memento))
        moved = [r for r in swp if _excludes_zero(r)]
        identical = swp[0].text_identical
        chan = (" Base and donor memento texts are identical here, so this is the implicit channel alone."
                if identical == 1.0 else f" ({100 * identical:.0f}% of pairs have identical memento texts.)")
        parts.append(f"Swapping in a donor's K/V moves that loss in {len(moved)} of {len(swp)} cells, at most "
                     f"{_interval(big)} nats at {big.cell.label}.{chan}")
        follows = [r for r in swp if r.follow_donor is not None]
        if follows:
            f = max(follows, key=lambda r: r.follow_donor)
            parts.append(f"A probe at {result.reader} then decodes the donor's digits {100 * f.follow_donor:.1f}% of "
                         f"the time at most ({f.cell.label}; the base's: {100 * f.follow_base:.1f}%; chance 10%).")
    return " ".join(parts)


def causal_section(result: CausalResult, figure: str | None = None) -> str:
    """The Markdown section: the finding, then one table row per intervention and cell."""
    answers = any(r.delta_loss_answer is not None for r in result.rows)
    lines = ["## Causal use: interventions on memento KV", "", causal_finding(result), "",
             "Δ loss: mean next-token loss after the intervention minus before, nats per token, on the text of "
             "every later memento (the toy's task tokens) and on every later token" + (", and on the answer "
             "(after `</think>`)" if answers else "") + "; flips: greedy predictions of later memento tokens "
             "that changed; follows donor / base: digits a probe at " + str(result.reader) + " decodes after an "
             "interchange equal to the donor's / the base's passcode (chance 10%).", "",
             "| intervention | cell | Δ loss later mementos (nats) [95% CI] | Δ loss all later tokens | "
             + ("Δ loss answer | " if answers else "") + "flips | follows donor | follows base |",
             "|---|---|---|---|" + ("---|" if answers else "") + "---|---|---|"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in result.rows:
        answer = ("—" if r.delta_loss_answer is None else f"{r.delta_loss_answer:+.4f}") + " | " if answers else ""
        lines.append(f"| {r.intervention} | {r.cell.label} | {_interval(r)} | {r.delta_loss_all:+.4f} | {answer}"
                     f"{pct(r.flip_memento)} | {pct(r.follow_donor)} | {pct(r.follow_base)} |")
    if figure:
        lines += ["", f"![probe map and causal map]({figure})"]
    return "\n".join(lines) + "\n"


def write_causal(result: CausalResult, rows: Sequence[CellResult], out_dir: str | Path, *,
                 condition: str) -> list[Path]:
    """causal.csv, figures/causal_map.png|pdf, and the section appended to summary.md: all of them, or none."""
    out = Path(out_dir)
    paths = [out / "causal.csv"]
    dicts = [asdict(r) for r in result.rows]
    summary = out / "summary.md"
    text = summary.read_text(encoding="utf-8") if summary.is_file() else ""
    fig = causal_figure(result, rows, condition)
    figure = None if fig is None else "figures/causal_map.png"
    with together():
        with replacing(paths[0], newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else ["intervention"])
            writer.writeheader()
            writer.writerows(dicts)
        if fig is not None:
            paths += save_figure(fig, out / "figures" / "causal_map")
        write_text(summary, text.rstrip("\n") + "\n\n" + causal_section(result, figure))
    paths.append(summary)
    return paths
