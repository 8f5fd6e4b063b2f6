"""What survives an erased block, in the report: a figure, a table and a section of summary.md.

    write_reconstruction(data, "runs/x/report")      # data: RUN/reconstruction/results.json

Panels: bits per token by memento offset, one line per layer, for each compared pair (the first
condition solid, the second dashed: their gap is the implicit channel), or for each condition when
none is compared; and token accuracy by position within the block at the last layer (which parts
survive). Numbers come from `kvprobe.reconstruction` rows; nothing here computes beyond selecting and
formatting them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..files import together, write_text
from ..grid import LINEAR, MEMENTO
from ..probes.config import BAG, ENDS, POSITIONS
from .figures import save_figure

__all__ = ["reconstruction_figure", "reconstruction_section", "write_reconstruction"]


def _rows(data: dict[str, Any], condition: str, probe: str = LINEAR) -> dict[tuple[int, int], dict]:
    """(layer, offset) -> row of one condition's memento-site cells."""
    return {(r["layer"], r["offset"]): r for r in data["rows"]
            if r["condition"] == condition and r["probe"] == probe and r["site"] == MEMENTO}


def _axes(data: dict[str, Any]) -> tuple[list[int], list[int]]:
    layers = sorted({r["layer"] for r in data["rows"]})
    offsets = sorted({r["offset"] for r in data["rows"]})
    return layers, offsets


def reconstruction_figure(data: dict[str, Any], probe: str = LINEAR) -> Figure:
    """Bits per token by offset per layer (per pair, or per condition), and token accuracy by position."""
    layers, offsets = _axes(data)
    panels = [tuple(p) for p in data.get("pairs") or []] or [(c,) for c in data["conditions"]]
    fig = Figure(figsize=(5 * (len(panels) + 1), 4.2))
    axes = fig.subplots(1, len(panels) + 1)
    shades = [f"C{i}" for i in range(len(layers))]
    for ax, panel in zip(axes, panels):
        for layer, colour in zip(layers, shades):
            for cond, style in zip(panel, ("-", "--")):
                cells = _rows(data, cond, probe)
                xs = [o for o in offsets if (layer, o) in cells]
                rows = [cells[(layer, o)] for o in xs]
                ax.errorbar(xs, [r["bits"] for r in rows], fmt=style + "o", ms=3, color=colour, lw=1,
                            yerr=[[r["bits"] - r["bits_low"] for r in rows], [r["bits_high"] - r["bits"] for r in rows]],
                            label=f"layer {layer}, {cond}")
        ax.axhline(0, color="k", lw=0.5)
        title = f"{panel[0]} (solid) vs {panel[1]} (dashed)" if len(panel) == 2 else panel[0]
        ax.set(title=title, xlabel="memento offset from the erased block", ylabel="bits per token over the unigram",
               xticks=offsets)
        ax.set_yscale("symlog", linthresh=0.05)  # linear near 0, where a weak channel sits; log above
        ax.legend(fontsize=6, ncol=2)
    ax, first = axes[-1], data["conditions"][0]
    cells = _rows(data, first, probe)
    if not cells:
        ax.set_axis_off()
        fig.tight_layout()
        return fig
    for offset in offsets:
        if (layers[-1], offset) in cells:
            ax.plot(data["positions"], [100 * a for a in cells[(layers[-1], offset)]["position_accuracy"]], "o-",
                    ms=3, label=f"{offset:+d}")
    base = next(iter(cells.values()))["baseline_accuracy"]
    ax.axhline(100 * base, color="k", lw=0.5, ls=":", label="unigram")
    ax.set(title=f"token accuracy by position, layer {layers[-1]}, {first}", xlabel="position in the block",
           ylabel="%")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=7, title="offset")
    fig.tight_layout()
    return fig


def _bits(r: dict) -> str:
    return f"{r['bits']:.3f} [{r['bits_low']:.3f}, {r['bits_high']:.3f}]"


def reconstruction_section(data: dict[str, Any], figure: str | None = None, probe: str = LINEAR) -> str:
    """summary.md's section: bits per token by layer and offset per condition, and the pairs' differences."""
    layers, offsets = _axes(data)
    c = data["config"]
    target = {POSITIONS: f"its first {len(data['positions'])} tokens by position",
              ENDS: f"its first and last {c['k']} tokens",
              BAG: f"its token set: which of {len(data['positions'])} frequent tokens it holds"}[c["target"]]
    if c["target"] != BAG:
        target += f"; {c['vocab']} most frequent training tokens as classes"
    lines = ["## What survives an erased block (reconstruction, bits per token)", "",
             f"The target block's text ({target}) read back "
             f"from the memento span's K/V by a {probe} probe. Bits per token: the validation cross-entropy's gain "
             "over each position's training frequencies (0: nothing read), 95% bootstrap interval over held-out "
             "blocks.", ""]
    if figure:
        lines += [f"![reconstruction]({figure})", ""]
    for cond in data["conditions"]:
        cells = _rows(data, cond, probe)
        lines += [f"**{cond}**", "", "| layer | " + " | ".join(f"{o:+d}" for o in offsets) + " |",
                  "|---|" + "---|" * len(offsets)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(_bits(cells[(layer, o)]) if (layer, o) in cells else ""
                                                     for o in offsets) + " |")
        lines.append("")
    for a, b in data.get("pairs") or []:
        diffs = {(d["layer"], d["offset"]): d for d in data["diffs"] if (d["a"], d["b"], d["probe"]) == (a, b, probe)}
        lines += [f"**{a} − {b}** (bits per token, paired over the same blocks)", "",
                  "| layer | " + " | ".join(f"{o:+d}" for o in offsets) + " |", "|---|" + "---|" * len(offsets)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(
                f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if (d := diffs.get((layer, o)))
                else ""
                for o in offsets) + " |")
        lines.append("")
    return "\n".join(lines)


def write_reconstruction(data: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """figures/reconstruction.png|pdf and the section appended to summary.md: both, or neither."""
    out = Path(out_dir)
    summary = out / "summary.md"
    text = summary.read_text(encoding="utf-8") if summary.is_file() else ""
    family = data["config"]["families"][0]  # the first family fitted: linear unless only the MLP was
    with together():
        paths = save_figure(reconstruction_figure(data, family), out / "figures" / "reconstruction")
        write_text(summary, text.rstrip("\n") + "\n\n" + reconstruction_section(data, "figures/reconstruction.png",
                                                                                family))
    return [*paths, summary]
