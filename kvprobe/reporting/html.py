"""report/index.html: the report as one self-contained page that works offline.

    write_html_report(rows, diffs, "runs/toy/report", sweep=sweep, metadata=meta, files=["results.csv", ...])

The page holds the figures of `webfigures` (per condition the layer x offset heatmaps with hover,
the distance and depth curves, the condition differences, the sweep), the run's metadata and
relative links to the data files beside it. Everything is inline: plotly.js once (about 4.8 MB),
then the figures as JSON; nothing is fetched, so the file can be mailed or opened from a USB stick.

Why plotly: the Python package `plotly` ships the complete plotly.js bundle (MIT licence), so the
JavaScript comes and is upgraded through an ordinary dependency instead of a file vendored and
updated by hand, and its heatmaps take per-cell hover templates as they are. Vega-Lite would be
smaller (~0.8 MB) but needs three JavaScript files (vega, vega-lite, vega-embed) vendored into the
repository and kept in step. The bundle leaves about 0.2 MB of the issue's 5 MB for the figures.

The same results give the same bytes: the figure ids are numbered, nothing is timestamped beyond
what the run's own metadata holds, and the bundle is the installed plotly's.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..files import write_text
from .sweep import Sweep
from .webfigures import web_figures
from .words import chance_text, condition_masks, condition_order, eviction_timing, offset_label, probe_order

if TYPE_CHECKING:
    from ..analysis import CellResult, DiffResult
    from ..causal import CausalResult

__all__ = ["HTML_NAME", "LINKED_FILES", "render_html", "write_html_report"]

HTML_NAME = "index.html"
LINKED_FILES = ("summary.md", "results.csv", "results.json", "diffs.csv", "sweep.csv", "causal.csv")
"""The report's files the page links to (relative links), in this order, where they were written."""

SECTIONS = (("heatmaps", "Accuracy by layer and offset"), ("causal", "The causal map beside the probe map"),
            ("curves", "Distance and depth"), ("differences", "Condition differences"), ("sweep", "Across training"))
BESIDE = {"causal"}  # sections whose figures sit side by side

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:85%}.figure{min-height:200px}
details{margin:.3em 0}summary{cursor:pointer}
.beside{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}"""

PLOT = """const figures = JSON.parse(document.getElementById("figures").textContent);
for (const f of figures) Plotly.newPlot(f.id, f.data, f.layout, {displaylogo: false, responsive: true});"""


def _script_json(value: Any) -> str:
    """JSON that can sit inside a <script> element: '<', '>' and '&' escaped (they only occur in strings)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """An HTML table, every value escaped; no header row when `header` is empty."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line) + "</tr>" for line in body)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{lines}</table>"


def _pretty(value: Any) -> str:
    return html.escape(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _conditions_table(rows: Sequence[CellResult]) -> str:
    """Per condition: its mask and when that mask evicts, sites, probe kinds, layers, offsets, cells."""
    masks = condition_masks(rows)
    body = []
    for condition in condition_order(rows):
        mine = [r for r in rows if r.condition == condition]
        offsets = sorted({r.offset for r in mine})
        body.append([condition, masks[condition], eviction_timing(masks[condition]),
                     ", ".join(sorted({r.site for r in mine})), ", ".join(probe_order(mine)),
                     len({r.layer for r in mine}), f"{offset_label(offsets[0])} … {offset_label(offsets[-1])}",
                     len(mine)])
    return _table(["condition", "mask", "eviction", "sites", "probes", "layers", "offsets", "cells"], body)


def _run_facts(rows: Sequence[CellResult], metadata: Mapping[str, Any]) -> list[list[Any]]:
    """The headline facts of the run: its scalar metadata, model, seeds, chance and what made the page."""
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    facts = [[k, v] for k, v in metadata.items() if v is None or isinstance(v, (str, int, float, bool))]
    if isinstance(config.get("model"), Mapping):
        facts.append(["model (config)", json.dumps(config["model"], default=str)])
    if isinstance(metadata.get("model identity"), Mapping):
        facts.append(["model identity", ", ".join(f"{k} {v}" for k, v in metadata["model identity"].items())])
    if "seed" in config:
        facts.append(["seed", config["seed"]])
    if isinstance(config.get("probe"), Mapping) and "seeds" in config["probe"]:
        facts.append(["probe seeds (fits per cell)", config["probe"]["seeds"]])
    facts.append(["chance", chance_text(rows)])
    facts.append(["p after Holm", f"over all {len(rows)} cells of the report"])
    facts.append(["page made by", f"kvprobe {__version__}, plotly.js {_plotly_version()}"])
    return facts


def _metadata_section(rows: Sequence[CellResult], metadata: Mapping[str, Any]) -> str:
    """Run facts, conditions and masks, timings, versions, then every other metadata entry folded."""
    parts = ["<h2 id='metadata'>The run</h2>", _table([], _run_facts(rows, metadata)),
             "<h3>Conditions</h3>", _conditions_table(rows)]
    timings = metadata.get("timings")
    if isinstance(timings, Mapping) and timings:
        parts += ["<h3>Timings</h3>", _table(["stage", "seconds"], [[k, v] for k, v in timings.items()])]
    versions = metadata.get("versions")
    if isinstance(versions, Mapping) and versions:
        parts += ["<h3>Versions</h3>", _table(["package", "version"], [[k, v] for k, v in versions.items()])]
    folded = [(k, v) for k, v in metadata.items() if isinstance(v, (Mapping, list, tuple))
              and k not in ("timings", "versions", "model identity")]
    for key, value in folded:
        parts.append(f"<details><summary>{html.escape(str(key))}</summary><pre>{_pretty(value)}</pre></details>")
    return "\n".join(parts)


def _plotly_version() -> str:
    from plotly.offline import get_plotlyjs_version

    return get_plotlyjs_version()


def _plotly_bundle() -> str:
    """The installed plotly's plotly.min.js; it never holds '</script' (checked: that would end the element)."""
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    return bundle.replace("</script", "<\\/script")


def render_html(rows: Sequence[CellResult], diffs: Sequence[DiffResult], *, sweep: Sweep | None = None,
                metadata: Mapping[str, Any] | None = None, files: Sequence[str] = (),
                causal: tuple[CausalResult, str] | None = None) -> str:
    """The whole page as text: links, figures by section, metadata, and plotly.js inline once.
    `causal`: a causal map and the condition it was run on, drawn beside that condition's probe map."""
    metadata = metadata or {}
    figures = web_figures(rows, diffs, sweep, causal)
    title = html.escape(str(metadata.get("name") or "kvprobe report"))
    links = [f"<a href='{html.escape(name)}'>{html.escape(name)}</a>" for name in LINKED_FILES if name in files]
    body = [f"<h1>{title}</h1>",
            "<p>How well probes read the passcode from the KV cache, per condition, site, layer and offset. "
            "Hover a cell for its 95% interval, chosen L2 strength, n, chance and p after Holm. "
            "This page works offline.</p>",
            "<p>Data: " + (" · ".join(links) or "none written beside this page") + " · <a href='#metadata'>the run</a></p>"]
    specs = []
    for key, heading in SECTIONS:
        mine = [(t, spec) for section, t, spec in figures if section == key]
        if mine:
            body.append(f"<h2>{heading}</h2>" + ("<div class='beside'>" if key in BESIDE else ""))
        for t, spec in mine:
            fid = f"fig-{len(specs)}"
            body.append(f"<div><h3>{html.escape(t)}</h3><div id='{fid}' class='figure'></div></div>")
            specs.append({"id": fid, **spec})
        if mine and key in BESIDE:
            body.append("</div>")
    body.append(_metadata_section(rows, metadata))
    return "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>{STYLE}</style>",
        f"<script>/* plotly.js {_plotly_version()} (MIT licence), from the Python package plotly */\n"
        f"{_plotly_bundle()}</script></head><body>",
        *body,
        f"<script type='application/json' id='figures'>{_script_json(specs)}</script>",
        f"<script>{PLOT}</script>", "</body></html>", ""])


def write_html_report(rows: Sequence[CellResult], diffs: Sequence[DiffResult], out_dir: str | Path, *,
                      sweep: Sweep | None = None, metadata: Mapping[str, Any] | None = None,
                      files: Sequence[str] = (), causal: tuple[CausalResult, str] | None = None) -> Path:
    """Write out_dir/index.html atomically (inside `together()`, with the report's other files);
    `files`: the names of the report's files written beside it, which the page links to."""
    path = Path(out_dir) / HTML_NAME
    write_text(path, render_html(rows, diffs, sweep=sweep, metadata=metadata, files=files, causal=causal))
    return path
