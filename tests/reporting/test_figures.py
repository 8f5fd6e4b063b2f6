"""What the report's figures show and how they are saved: TrueType fonts in every PDF, a heatmap and a
distance figure for every condition, lines that break over layers not measured, one linear colour scale,
"not measured" only when a cell is, and the layer-0 note beside a starred layer-0 cell.

On the synthetic grid of tests/helpers/grids.py (fixtures `grid`, `diffs`: tests/reporting/conftest.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from matplotlib.colors import Normalize

from kvprobe.reporting import render_summary, write_report
from kvprobe.reporting.figures import accuracy_by_layer, accuracy_heatmap, condition_comparison, save_all
from tests.helpers.grids import make_diffs, make_grid


def test_every_saved_pdf_has_truetype_fonts_not_type3(tmp_path, grid, diffs):
    paths = save_all(grid, diffs, None, tmp_path, formats=("pdf",))
    assert paths
    for path in paths:
        data = path.read_bytes()
        assert b"/Type3" not in data, path.name
        assert b"/FontFile2" in data and b"/CIDFontType2" in data, path.name  # embedded TrueType (Type 42)


def test_every_condition_gets_a_heatmap_and_a_distance_figure(tmp_path):
    rows = make_grid(conditions=("memento", "restart"), block_end=False)
    paths = write_report(rows, make_diffs(rows), tmp_path)
    for stem in ("accuracy_heatmap", "accuracy_by_distance", "accuracy_heatmap_restart",
                 "accuracy_by_distance_restart"):
        for fmt in ("png", "pdf"):
            assert paths[f"figures/{stem}.{fmt}"].stat().st_size > 5_000, stem
    summary = paths["summary.md"].read_text()
    assert "![accuracy_heatmap_restart](figures/accuracy_heatmap_restart.png)" in summary
    assert "![accuracy_by_distance_restart](figures/accuracy_by_distance_restart.png)" in summary
    assert "condition restart," in accuracy_heatmap(rows, condition="restart")._suptitle.get_text()

    headline_restart = save_all(rows, None, None, tmp_path / "r", condition="restart", formats=("png",))
    names = {p.name for p in headline_restart}
    assert {"accuracy_heatmap.png", "accuracy_heatmap_memento.png", "accuracy_by_distance_memento.png"} <= names


def test_a_condition_name_cannot_leave_the_figures_folder(tmp_path):
    rows = [dataclasses.replace(r, condition="../x y") if r.condition == "restart" else r
            for r in make_grid(conditions=("memento", "restart"), block_end=False, probes=("linear",))]
    paths = save_all(rows, None, None, tmp_path / "figures", formats=("png",))
    assert {p.parent for p in paths} == {tmp_path / "figures"}
    assert "accuracy_heatmap____x_y.png" in {p.name for p in paths}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(p.name for p in paths)


def _segments(ax) -> list[tuple[float, float]]:
    """The x extents of the segments drawn between data points (lines with a style, both ends finite)."""
    spans = []
    for line in ax.get_lines():
        if line.get_linestyle() in ("None", "none", "") or line.get_transform() != ax.transData:
            continue
        x = np.asarray(line.get_xdata(), dtype=float)
        y = np.asarray(line.get_ydata(), dtype=float)
        for i in range(len(x) - 1):
            if np.isfinite([x[i], x[i + 1], y[i], y[i + 1]]).all():
                spans.append((x[i], x[i + 1]))
    return spans


def test_lines_break_over_layers_not_measured():
    rows = make_grid(conditions=("memento", "restart"), layers=(0, 1, 3), block_end=False)
    for fig in (condition_comparison(rows, make_diffs(rows)), accuracy_by_layer(rows)):
        axes = [ax for ax in fig.axes if ax.get_lines()]
        spans = [s for ax in axes for s in _segments(ax)]
        assert spans, "no line drawn at all"
        assert all(abs(b - a) < 1.5 for a, b in spans), spans  # 0 -> 1 joined (with its dodge), 1 -> 3 not
        points = [x for ax in axes for line in ax.get_lines() if line.get_transform() == ax.transData
                  for x in line.get_xdata() if np.isfinite(x)]
        assert any(abs(x - 3) < 0.5 for x in points)  # layer 3 is still drawn, as a point


def test_heatmap_uses_one_linear_colour_scale(grid):
    fig = accuracy_heatmap(grid)
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 2 and len({im.cmap.name for im in images}) == 1
    norm = images[0].norm
    assert type(norm) is Normalize and norm.vmin == 0.0
    assert np.isclose(norm(norm.vmax / 2), 0.5) and np.isclose(norm(10.0), 10.0 / norm.vmax)
    colours = images[0].cmap(np.linspace(0, 1, 256))[:, :3]
    luminance = colours @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > 0)  # one sequential palette: lighter all the way up, no switch
    bar = fig.axes[-1]
    assert "10 chance" in [t.get_text() for t in bar.get_yticklabels()]


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_not_measured_only_when_a_cell_is_missing(grid):
    full = accuracy_heatmap(grid)
    assert not any("not measured" in t for t in _legend_texts(full))
    assert "—" not in [t.get_text() for ax in full.axes for t in ax.texts]
    gap = [r for r in grid if not (r.condition == "memento" and r.site == "memento" and r.probe == "mlp"
                                   and r.layer == 2 and r.offset == 5)]
    holed = accuracy_heatmap(gap)
    assert any("not measured" in t for t in _legend_texts(holed))
    assert [t.get_text() for ax in holed.axes for t in ax.texts].count("—") == 1


def test_layer0_note_stands_under_the_table_that_stars_it(grid):
    headline = render_summary(grid).split("## Headline")[1].split("\n## ")[0]
    linear = headline.split("### linear probe")[1].split("### mlp probe")[0]
    table_end = linear.rindex("| 3 |")
    note = linear.index("Layer 0, starred at masked +1: not a leak through the KV cache.")
    assert note > table_end and "memento's own text" in linear
    assert "| 0 | 10.0% [8.0, 12.0] | 70.0% [68.0, 72.0]* | 12.6% [10.6, 14.6]* |" in linear

    unstarred = [dataclasses.replace(r, significant=False) if r.layer == 0 and r.offset > 0 else r for r in grid]
    assert "Layer 0, starred" not in render_summary(unstarred)
