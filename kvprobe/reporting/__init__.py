"""Leakage reports: data files, a Markdown summary a reviewer can read, and figures.

    rows = grid.rows + restart_grid.rows + visible_grid.rows    # memento, restart, restart-delims-visible
    apply_holm(rows)                                   # one correction over the whole report
    diffs = compare(grid, restart_grid) + compare(grid, visible_grid) + compare(visible_grid, restart_grid)
    write_tables(rows, diffs, "runs/toy/report", sweep=sweep, paper=PAPER_TOY)
    write_report(rows, diffs, "runs/toy/report", sweep=sweep, paper=PAPER_TOY)  # tables + figures

Accuracies are fractions in every data file and percentages in the Markdown. Chance is
10% (one digit of ten), or a constrained store's own baseline. Offsets: -1 causal
control, 0 direct, +1, +2, ... masked. Nothing here is fitted or resampled: every number
comes from the `CellResult`s and `DiffResult`s of `kvprobe.analysis`, and verdicts are
computed from their intervals.

The rooms, data flowing one way: `words` (the shared vocabulary and number formats) ->
`paper`, `comparisons`, `sweep` (sections) -> `summary` (the Markdown) -> `tables` (the
data files); `plotting` -> `heatmaps` -> `figures`; `webfigures` -> `html` (index.html); `write_report` here joins
tables and figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import lazy_exports

if TYPE_CHECKING:
    from ..analysis import CellResult, DiffResult
    from ..causal import CausalResult
    from .sweep import Sweep

__all__ = [
    "CHANCE",
    "PAPER_QWEN3_8B",
    "PAPER_QWEN3_32B",
    "PAPER_TOY",
    "SweepPoint",
    "condition_order",
    "interval_verdict",
    "offset_label",
    "primary_condition",
    "render_summary",
    "save_all",
    "sweep_points",
    "sweep_sentence",
    "write_report",
    "write_tables",
]


def write_report(
    rows: list[CellResult],
    diffs: list[DiffResult],
    out_dir: str | Path,
    *,
    sweep: Sweep | None = None,
    paper: dict | None = None,
    metadata: dict | None = None,
    condition: str | None = None,
    causal: tuple[CausalResult, str] | None = None,
) -> dict[str, Path]:
    """Tables plus figures (under out_dir/figures), with the PNGs embedded in summary.md, and
    index.html: the same results as one interactive page that works offline (`reporting.html`)."""
    from ..files import together
    from .figures import save_all
    from .html import HTML_NAME, write_html_report
    from .tables import write_tables

    out = Path(out_dir)
    with together():  # every file of the report, or (on a failure) none
        figure_paths = save_all(rows, diffs, sweep, out / "figures", condition=condition)
        pngs = [p.relative_to(out).as_posix() for p in figure_paths if p.suffix == ".png"]
        paths = write_tables(rows, diffs, out, sweep=sweep, paper=paper, metadata=metadata, figures=pngs,
                             condition=condition)
        paths[HTML_NAME] = write_html_report(rows, diffs, out, sweep=sweep, metadata=metadata, causal=causal,
                                             files=list(paths) + (["causal.csv"] if causal else []))
    paths.update({p.relative_to(out).as_posix(): p for p in figure_paths})
    return paths


__getattr__, __dir__ = lazy_exports(__name__, {
    ".figures": ("save_all",),
    ".paper": ("PAPER_QWEN3_8B", "PAPER_QWEN3_32B", "PAPER_TOY"),
    ".summary": ("render_summary",),
    ".sweep": ("Sweep", "SweepPoint", "sweep_points", "sweep_sentence"),
    ".tables": ("write_tables",),
    ".words": ("CHANCE", "condition_order", "interval_verdict", "offset_label", "primary_condition"),
})
