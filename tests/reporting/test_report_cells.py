"""What the report says of each cell beyond its accuracy: the probe strength it chose (and a choice on
the weakest value flagged), its own chance, its condition's mask, and the Holm family it belongs to
(cells and paired differences, printed and written alike); sweep points; legends that fit.

On the synthetic grid of tests/helpers/grids.py (fixtures `grid`, `diffs`: tests/reporting/conftest.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from kvprobe.analysis import CellResult, DiffResult, apply_holm
from kvprobe.reporting import render_summary, sweep_sentence, write_report
from kvprobe.stats import paired_pvalue
from tests.helpers.grids import LAYERS, OFFSETS, make_grid, make_sweep


def _with_strengths(rows: list[CellResult]) -> list[CellResult]:
    """Linear rows chose their L2 from a grid (the weakest at the last layer); MLP rows kept a fixed one."""
    grid = [1e-4, 1e-3, 1e-2, 1e-1]
    out = []
    for r in rows:
        if r.probe == "linear":
            chosen = 1e-4 if r.layer == 3 else 1e-2
            inner = [r.accuracy - 0.02 * abs(v - chosen) / 0.1 - (0.0 if v == chosen else 0.005) for v in grid]
            out.append(dataclasses.replace(r, l2=chosen, l2_grid=grid, l2_inner_accuracy=inner,
                                           l2_at_bound=chosen == min(grid)))
        else:
            out.append(dataclasses.replace(r, l2=1e-4, l2_grid=[1e-4]))
    return out


def test_chosen_strength_in_every_output(tmp_path):
    rows = _with_strengths(make_grid(conditions=("memento",), block_end=False))
    paths = write_report(rows, [], tmp_path)
    text = paths["summary.md"].read_text()
    headline = text.split("## Headline")[1].split("\n## ")[0]
    linear = headline.split("### linear probe")[1].split("### mlp probe")[0]
    assert "L2 strength chosen per cell from {1e-04, 1e-03, 1e-02, 1e-01} on an inner label-unique split" in linear
    assert "| layer (chosen L2) | causal control (−1) | direct (0) | masked +1 |" in linear
    assert "| 3 | 1e-04 | 1e-04 |" in linear and "| 0 | 1e-02 | 1e-02 |" in linear
    assert (f"FLAGGED: {len(LAYERS[-1:]) * len(OFFSETS)} of {len(LAYERS) * len(OFFSETS)} cells chose the weakest "
            "value they could try (1e-04)") in linear
    assert "L2 strength fixed at 1e-04 (not chosen)." in headline.split("### mlp probe")[1]
    appendix = text.split("## Appendix")[1]
    assert "| offset | layer | accuracy [95%] | L2 | seed sd (pp) |" in appendix
    assert "| masked +1 | 3 | 25.7% [23.7, 27.7]* | 1e-04 |" in appendix
    doc = json.loads(paths["results.json"].read_text())
    first = next(d for d in doc["rows"] if d["probe"] == "linear" and d["layer"] == 0)
    assert first["l2"] == 1e-2 and first["l2_grid"] == [1e-4, 1e-3, 1e-2, 1e-1] and len(first["l2_inner_accuracy"]) == 4
    with paths["results.csv"].open() as f:
        lines = list(csv.DictReader(f))
    assert {float(line["l2"]) for line in lines} == {1e-4, 1e-2}
    assert "l2_grid_3" in lines[0] and "l2_inner_accuracy_0" in lines[0]
    assert paths["figures/l2_selection.png"].stat().st_size > 10_000
    assert "![l2_selection](figures/l2_selection.png)" in text


def test_rows_without_strength_render_as_before(grid):
    text = render_summary(grid, [])
    assert "L2 strength" not in text.split("## Appendix")[0]
    assert "| masked +1 | 3 | 26.2% [24.2, 28.2]* | — |" in text.split("## Appendix")[1]


def test_constrained_chance_is_each_cells_own(grid, diffs):
    """Cells of a fixed-digit-sum store are judged against their own baseline, and the report says it."""
    chance = 0.1117
    rows = [dataclasses.replace(r, chance=chance, ci_low=0.104, ci_high=0.108) if r.offset < 0 else
            dataclasses.replace(r, chance=chance) for r in grid]
    text = render_summary(rows, diffs)
    assert "chance is per condition: 11.2% (memento" in text
    n_controls = sum(r.offset < 0 for r in grid)
    # [10.4, 10.8] contains 10% but lies below the constrained baseline: no control contains chance
    assert f"in 0 of {n_controls} causal-control cells" in text and "below chance" in text


def test_a_conditions_meaning_comes_from_its_mask_not_its_name(grid, diffs):
    """Conditions called 'paper' and 'text-only' are read as the memento and restart masks they are."""
    names = {"memento": "paper", "restart-delims-visible": "kv-open", "restart": "text-only"}
    rows = [dataclasses.replace(r, condition=names[r.condition], mask=r.condition) for r in grid]
    renamed = [dataclasses.replace(d, a=names[d.a], b=names[d.b], a_mask=d.a, b_mask=d.b) for d in diffs]
    text = render_summary(rows, renamed)
    assert "- conditions: paper, kv-open, text-only;" in text  # ordered by mask, not alphabetically
    assert "**paper − text-only** (masks memento − restart) (site `memento`) isolates the implicit KV " \
           "channels in total" in text
    assert "**kv-open − text-only** (masks restart-delims-visible − restart) (site `memento`) isolates the <|block_end|>" in text
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert "`paper`" in headline
    # the header says which mask, and so which eviction timing, each condition used
    assert "- `paper`: mask `memento`; a block is hidden after its <|summary_end|>, whose KV still saw it" in text
    assert "- `text-only`: mask `restart`; a block is hidden after its <|summary_end|>; each memento" in text
    # without masks (results saved before they were recorded) the names alone carry no meaning
    bare = [dataclasses.replace(r, condition=names[r.condition]) for r in grid]
    bare_diffs = [dataclasses.replace(d, a=names[d.a], b=names[d.b]) for d in diffs]
    assert "no predefined interpretation" in render_summary(bare, bare_diffs)


def test_sweep_points_are_typed_and_round_trip():
    from kvprobe.reporting import SweepPoint, sweep_points

    raw = make_sweep()[::-1]  # out of order: sorted by step
    points = sweep_points(raw)
    assert [p.step for p in points] == [1000, 2000, 3000, 4000, 5000]
    assert points[0].masked_offset == 1 and points[0].direct_accuracy == 0.9  # +1 when not recorded
    extra = dict(raw[0], **{"offset+2_accuracy": 0.15})
    assert SweepPoint.from_dict(extra).to_dict()["offset+2_accuracy"] == 0.15  # other cells kept
    with pytest.raises(ValueError, match="lacks \\['masked_accuracy'\\]"):
        SweepPoint.from_dict({"checkpoint": "c", "task_accuracy": 0.9})
    assert sweep_sentence(points) == sweep_sentence(raw)  # typed points and their JSON read the same


def test_leakage_table_states_each_grids_own_chance(grid):
    import numpy as np

    from kvprobe.analysis import GridResult
    from kvprobe.experiment import leakage_table

    plain = [r for r in grid if r.condition == "memento" and r.probe == "linear" and r.site == "memento"]
    fixed_sum = [dataclasses.replace(r, condition="text-controlled", chance=0.1117) for r in plain]
    table = leakage_table({"memento": GridResult("memento", plain, np.arange(3)),
                           "text-controlled": GridResult("text-controlled", fixed_sum, np.arange(3))})
    assert "memento: linear probe accuracy (%), chance 10; " in table
    assert "text-controlled: linear probe accuracy (%), chance 11.17; " in table


def test_leakage_table_corrects_its_grids_as_one_family_without_changing_them(grid):
    """Uncorrected grids print the stars of the whole family's correction (all conditions, sites and
    probes, not only the linear memento cells shown), and the caller's rows keep their NaN p_holm."""
    from kvprobe.analysis import GridResult
    from kvprobe.experiment import holm_corrected, leakage_table

    def grids_of(rows):
        return {c: GridResult(c, [r for r in rows if r.condition == c], np.arange(3))
                for c in ("memento", "restart-delims-visible", "restart")}

    raw = [dataclasses.replace(r, p_holm=float("nan"), significant=False) for r in grid]
    table = leakage_table(grids_of(raw))
    assert table == leakage_table(grids_of(grid))  # `grid` is corrected over all its cells (make_grid)
    shown = [r for r in grid if r.probe == "linear" and r.site == "memento"]
    stars = sum(line.count("*") for line in table.splitlines() if ":" not in line)  # not the legend lines
    assert stars == sum(r.significant for r in shown) > 0 and f"Holm over all {len(grid)} cells" in table
    assert all(r.p_holm != r.p_holm and not r.significant for r in raw)  # printing changed nothing
    corrected = holm_corrected(grids_of(raw))
    assert [r.p_holm for g in corrected.values() for r in g.rows] == [r.p_holm for r in grid]


def test_paired_differences_are_holm_corrected_as_a_family():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    same, shifted = base.copy(), np.clip(base + 0.2, 0, 1)
    assert paired_pvalue(same, base) == 1.0 and paired_pvalue(shifted, base) < 1e-10
    d = [DiffResult("memento", "restart", "memento", 1, layer, "linear", 0.0, -0.1, 0.1,
                    p_value=p) for layer, p in enumerate([paired_pvalue(shifted, base), 0.03, 0.5])]
    apply_holm(d)
    assert [x.significant for x in d] == [True, False, False]  # 0.03 alone would pass; x 2 tests left it fails
    assert d[1].p_holm == pytest.approx(0.06) and d[2].p_holm == pytest.approx(0.5)


def test_report_explains_layer_zero_negative_bits_and_its_correction(grid, diffs):
    corrected = [DiffResult(**{**d.to_dict(), "p_value": 1e-6}) for d in diffs]
    apply_holm(corrected)
    text = render_summary(grid, corrected)
    comparison = text.split("## Condition comparison")[1].split("\n## ")[0]
    assert "Layer 0 reads the same in every condition" in comparison
    assert f"Holm-corrected over all {len(corrected)} paired differences" in comparison
    assert "| Holm-corrected test |" in comparison and "differs (p " in comparison
    assert "Negative bits are not negative information" in text
    uncorrected = render_summary(grid, diffs).split("## Condition comparison")[1].split("\n## ")[0]
    assert "Holm-corrected over" not in uncorrected and "| — |" in uncorrected  # never claims a correction


def test_legends_fit_the_figure_width():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kvprobe.reporting.plotting import _bottom_legend

    labels = ["chance (10%)", "causal control (−1)", "direct (0)", "masked +1 (the passcode block hidden)"]
    for width in (5.8, 16):
        fig = Figure(figsize=(width, 5), layout="constrained")
        ax = fig.subplots()
        for i, label in enumerate(labels):
            ax.plot([0, 1], [i, i], label=label)
        _bottom_legend(fig, [ax], ncols=5, fontsize=9)
        FigureCanvasAgg(fig).draw()
        box, page = fig.legends[0].get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1, (width, box, page)  # nothing clipped at the sides
    assert fig.legends[0]._ncols == len(labels)  # a wide figure keeps one row
