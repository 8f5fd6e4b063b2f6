"""Reports and figures from synthetic probe results: files, numbers, statements, round trips."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kvprobe.analysis import CellResult, DiffResult, apply_holm
from kvprobe.reporting import (
    PAPER_TOY,
    interval_verdict,
    render_summary,
    sweep_sentence,
    write_report,
    write_tables,
)
from kvprobe.reporting.figures import (
    accuracy_by_distance,
    accuracy_by_layer,
    accuracy_heatmap,
    condition_comparison,
    leakage_vs_training,
    save_all,
)
from kvprobe.stats import paired_pvalue

LAYERS = (0, 1, 2, 3)
OFFSETS = (-1, 0, 1, 2, 3, 4, 5, 6, 7)
HALF_WIDTH = 0.02  # synthetic 95% interval half-width
# masked +1 accuracy per layer (the paper's toy numbers at the first and last layer)
MASKED_PLUS_ONE = {0: 0.131, 1: 0.18, 2: 0.23, 3: 0.262}
CONDITION_DROP = {"memento": 0.0, "restart-delims-visible": 0.04, "restart": 0.08}


def _accuracy(condition: str, site: str, offset: int, layer: int, probe: str) -> float:
    """A plausible cell: chance at -1, high at 0, masked decaying with distance, smaller without channels."""
    if offset < 0:
        return 0.1 + 0.002 * (layer % 4)
    if offset == 0:
        return min(0.95, 0.70 + 0.05 * layer)
    base = MASKED_PLUS_ONE[layer] - (0.0 if offset == 1 else 0.048 + 0.005 * (offset - 2))
    value = base - CONDITION_DROP[condition] - (0.01 if site == "block_end" else 0.0)
    value -= 0.0 if probe == "mlp" else 0.005
    return max(0.1, round(value, 4))


def make_cell(condition: str, site: str, offset: int, layer: int, probe: str, **changes) -> CellResult:
    acc = _accuracy(condition, site, offset, layer, probe)
    cell = CellResult(
        condition=condition, site=site, offset=offset, layer=layer, probe=probe,
        accuracy=acc, accuracy_std=0.004 if probe == "mlp" else 0.0,
        accuracy_seeds=[acc - 0.003, acc, acc + 0.003] if probe == "mlp" else [acc],
        digit_accuracy=[acc + 0.001 * (k - 2) for k in range(5)],
        ci_low=acc - HALF_WIDTH, ci_high=acc + HALF_WIDTH,
        wilson_low=acc - HALF_WIDTH - 0.002, wilson_high=acc + HALF_WIDTH + 0.002,
        bits=max(0.0, (acc - 0.1) * 2), bits_low=max(0.0, (acc - 0.1) * 2) - 0.01, bits_high=(acc - 0.1) * 2 + 0.01,
        p_value=1e-8 if acc - HALF_WIDTH > 0.1 else 0.4,
        shuffled_accuracy=0.1, selectivity=acc - 0.1,
        train_accuracy=min(1.0, acc + 0.05), n_train=4000, n_val=1000,
    )
    return dataclasses.replace(cell, **changes)


def make_grid(conditions=("memento", "restart-delims-visible", "restart"), offsets=OFFSETS, layers=LAYERS,
              probes=("linear", "mlp"), block_end=True) -> list[CellResult]:
    rows = []
    for condition in conditions:
        sites = ("memento", "block_end") if block_end and condition != "restart" else ("memento",)
        for site in sites:
            for probe in probes:
                for offset in offsets:
                    for layer in layers:
                        rows.append(make_cell(condition, site, offset, layer, probe))
    apply_holm(rows)
    return rows


def make_diffs(rows: list[CellResult]) -> list[DiffResult]:
    index = {(r.condition, r.site, r.offset, r.layer, r.probe): r for r in rows}
    out = []
    for a, b in (("memento", "restart-delims-visible"), ("memento", "restart"), ("restart-delims-visible", "restart")):
        for (cond, site, offset, layer, probe), ra in index.items():
            rb = index.get((b, site, offset, layer, probe))
            if cond != a or rb is None:
                continue
            diff = ra.accuracy - rb.accuracy
            out.append(DiffResult(a, b, site, offset, layer, probe, diff, diff - 0.015, diff + 0.015))
    return out


def make_sweep(masked=(0.18, 0.175, 0.185, 0.18, 0.182), task=(0.77, 0.85, 0.9, 0.93, 0.95)) -> list[dict]:
    return [
        {"checkpoint": f"ckpt-{i}", "step": 1000 * (i + 1), "task_accuracy": t, "masked_accuracy": m,
         "masked_ci_low": m - 0.015, "masked_ci_high": m + 0.015, "direct_accuracy": 0.9}
        for i, (m, t) in enumerate(zip(masked, task))
    ]


@pytest.fixture(scope="module")
def grid() -> list[CellResult]:
    return make_grid()


@pytest.fixture(scope="module")
def diffs(grid) -> list[DiffResult]:
    return make_diffs(grid)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, grid, diffs) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report")
    return write_report(grid, diffs, out, sweep=make_sweep(), paper=PAPER_TOY,
                        metadata={"model": "toy", "note": "synthetic"})


# ----------------------------------------------------------------- files

def test_tables_and_figures_are_written(report_dir):
    for name in ("results.json", "results.csv", "diffs.csv", "sweep.csv", "summary.md"):
        assert report_dir[name].stat().st_size > 0, name
    figure_names = ("accuracy_by_layer", "accuracy_by_distance", "accuracy_heatmap", "condition_comparison",
                    "leakage_vs_training")
    for stem in figure_names:
        png, pdf = report_dir[f"figures/{stem}.png"], report_dir[f"figures/{stem}.pdf"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    summary = report_dir["summary.md"].read_text()
    assert "![accuracy_heatmap](figures/accuracy_heatmap.png)" in summary


def test_results_json_is_strict_and_complete(tmp_path, grid, diffs):
    rows = [dataclasses.replace(r, p_holm=float("nan")) if i == 0 else r for i, r in enumerate(grid)]
    paths = write_tables(rows, diffs, tmp_path, metadata={"model": "toy"})

    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    doc = json.loads(paths["results.json"].read_text(), parse_constant=reject)
    assert len(doc["rows"]) == len(grid) and len(doc["diffs"]) == len(diffs)
    assert doc["rows"][0]["p_holm"] is None  # NaN written as null
    assert doc["rows"][1]["role"] in {"causal control", "direct", "masked"}
    assert doc["metadata"] == {"model": "toy"} and doc["chance"] == 0.1 and doc["sweep"] is None
    assert "sweep.csv" not in paths and not (tmp_path / "sweep.csv").exists()


def test_csv_round_trip(report_dir, grid, diffs):
    with report_dir["results.csv"].open() as f:
        reader = csv.DictReader(f)
        lines = list(reader)
        columns = reader.fieldnames
    assert len(lines) == len(grid)
    assert [f"digit_{k}" for k in range(5)] == [c for c in columns if c.startswith("digit_")]
    assert {"seed_accuracy_0", "seed_accuracy_2", "role", "p_holm", "significant"} <= set(columns)
    for line, row in zip(lines, grid):
        assert float(line["accuracy"]) == row.accuracy
        assert float(line["digit_4"]) == row.digit_accuracy[4]
        assert int(line["offset"]) == row.offset and line["probe"] == row.probe
    linear = next(line for line in lines if line["probe"] == "linear")
    assert linear["seed_accuracy_1"] == ""  # the linear probe has one fit
    with report_dir["diffs.csv"].open() as f:
        diff_lines = list(csv.DictReader(f))
    assert len(diff_lines) == len(diffs)
    assert {line["interval"] for line in diff_lines} <= {"above 0", "below 0", "contains 0"}
    with report_dir["sweep.csv"].open() as f:
        sweep_lines = list(csv.DictReader(f))
    assert len(sweep_lines) == 5 and sweep_lines[-1]["task_accuracy"] == "0.95"


# ----------------------------------------------------------------- summary text

def test_headline_numbers_and_holm_marker(grid, diffs):
    text = render_summary(grid, diffs)
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert "### linear probe" in headline and "### mlp probe" in headline
    assert "| layer | causal control (−1) | direct (0) | masked +1 | masked +2 |" in headline
    assert "26.2% [24.2, 28.2]*" in headline  # mlp, masked +1, last layer: significant
    assert "13.1% [11.1, 15.1]*" in headline  # mlp, masked +1, first layer: interval above chance
    assert "| 0 | 10.0% [8.0, 12.0] | 70.0% [68.0, 72.0]* |" in headline  # causal control is not marked
    assert "Holm-corrected" in headline and f"over all {len(grid)} cells" in headline


def test_holm_not_applied_is_said(grid):
    rows = [dataclasses.replace(r, p_holm=float("nan"), significant=False) for r in grid]
    text = render_summary(rows, [])
    assert "Holm correction was not applied" in text
    assert "]*" not in text


def test_paper_comparison(grid, diffs):
    text = render_summary(grid, diffs, paper=PAPER_TOY)
    section = text.split("## Comparison with the paper")[1].split("\n## ")[0]
    assert "| masked +1, first layer | 0 | 13.1% |" in section
    assert "| masked +1, last layer | 3 | 26.2% (24.9% in the main text) |" in section
    assert "| direct, last layer | 3 | 98.5% (the microsoft/memento blog figure 'Probing KV States') |" in section
    assert "≈13 (1.3× chance)" in section
    assert section.count("| yes |") >= 3  # the synthetic grid reproduces the paper's masked numbers


def test_controls_statements(grid, diffs):
    text = render_summary(grid, diffs)
    n_controls = sum(r.offset < 0 for r in grid)
    assert f"contains chance (10%) in {n_controls} of {n_controls} causal-control cells" in text
    assert "No probe beats chance on shuffled labels" in text
    assert "selectivity (pp)" in text and "bits/digit [95%]" in text

    bad = [dataclasses.replace(r, accuracy=0.2, ci_low=0.17, ci_high=0.23)
           if (r.offset, r.layer, r.probe, r.condition, r.site) == (-1, 2, "mlp", "memento", "memento") else r
           for r in grid]
    text = render_summary(bad, diffs)
    assert f"in {n_controls - 1} of {n_controls} causal-control cells" in text
    assert "memento/memento/mlp layer 2: 20.0% [17.0, 23.0]" in text and "above chance" in text


def test_condition_comparison_statements(grid, diffs):
    text = render_summary(grid, diffs)
    section = text.split("## Condition comparison")[1].split("\n## ")[0]
    assert "memento − restart: the implicit KV channels in total" in section
    assert "memento − restart-delims-visible: the memento-KV channel alone" in section
    assert "restart-delims-visible − restart: the <|block_end|> delimiter channel" in section
    assert "block_end site (memento)" in section and "Delimiter channel read directly" in section
    # synthetic differences at +1 are +4 pp with +-1.5 pp intervals: above 0
    assert "| memento − restart-delims-visible | memento | mlp | 3 | +4.0 pp [+2.5, +5.5] | above 0 |" in section
    flipped = [dataclasses.replace(d, difference=-0.03, ci_low=-0.05, ci_high=-0.01) if d.a == "restart-delims-visible" else d
               for d in diffs]
    assert "| restart-delims-visible − restart | memento | mlp | 3 | −" not in section
    section = render_summary(grid, flipped).split("## Condition comparison")[1]
    assert "| restart-delims-visible − restart | memento | mlp | 3 | -3.0 pp [-5.0, -1.0] | below 0 |" in section


def test_interval_verdict():
    assert interval_verdict(0.01, 0.02) == "above 0"
    assert interval_verdict(-0.02, -0.01) == "below 0"
    assert interval_verdict(-0.01, 0.02) == "contains 0"
    assert interval_verdict(0.08, 0.12, 0.1, "chance") == "contains chance"


def test_sweep_sentence_follows_the_data():
    constant = sweep_sentence(make_sweep())
    assert "stays roughly constant" in constant and "task accuracy rises from 77.0% to 95.0%" in constant
    assert "a spread of 1.0 pp" in constant and "All 5 intervals (95%) overlap" in constant
    rising = sweep_sentence(make_sweep(masked=(0.12, 0.15, 0.19, 0.23, 0.26)))
    assert "stays roughly constant" not in rising
    assert "changes across training (it rises" in rising and "a spread of 14.0 pp" in rising
    assert "step 5000 (26.0% [24.5, 27.5])" in rising and "step 1000 (12.0% [10.5, 13.5])" in rising
    assert "lies above chance at 5 of 5 checkpoints" in rising
    falling_task = sweep_sentence(make_sweep(task=(0.9, 0.8, 0.7, 0.6, 0.5)))
    assert "task accuracy falls from 90.0% to 50.0%" in falling_task
    assert "no trend" in sweep_sentence(make_sweep()[:1])


def test_sweep_without_steps_keeps_given_order():
    sweep = [dict(p, step=None, layer=3) for p in make_sweep(masked=(0.12, 0.15, 0.19, 0.23, 0.26))]
    sentence = sweep_sentence(sweep)
    assert "(checkpoint ckpt-0 to checkpoint ckpt-4)" in sentence and "changes across training" in sentence
    fig = leakage_vs_training(sweep)
    assert fig.axes[0].get_xlabel() == "checkpoint (training order)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"ckpt-{i}" for i in range(5)]
    assert fig._suptitle.get_text().endswith("(masked +1, layer 3)")


def test_sweep_section_in_summary(grid):
    text = render_summary(grid, [], sweep=make_sweep(), paper=PAPER_TOY)
    section = text.split("## Leakage across training checkpoints")[1]
    assert "| ckpt-0 | 1000 | 77.0% | 18.0% [16.5, 19.5] | 90.0% |" in section
    assert "Accuracies are at layer" not in section
    with_layer = render_summary(grid, [], sweep=[dict(p, layer=3) for p in make_sweep()])
    assert "Accuracies are at layer 3." in with_layer
    assert "Paper: masked leakage stays roughly constant (17–19%)" in section


# ----------------------------------------------------------------- incomplete grids

def test_missing_roles_still_render(tmp_path):
    rows = make_grid(conditions=("memento",), offsets=(0, 1, 2), block_end=False)
    text = render_summary(rows, [], paper=PAPER_TOY)
    assert "No causal-control cells in this report" in text
    assert "nothing to compare" in text
    assert "| masked +2, last layer | 3 | 21.4% |" in text
    assert "| masked +7, last layer | 3 | ≈13 (1.3× chance) | not measured | not measured | — |" in text
    assert condition_comparison(rows) is None and leakage_vs_training(None) is None
    paths = save_all(rows, [], None, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"{stem}.{fmt}" for stem in ("accuracy_by_layer", "accuracy_by_distance", "accuracy_heatmap")
        for fmt in ("png", "pdf"))
    assert all(p.stat().st_size > 0 for p in paths)


def test_single_probe_no_masked(tmp_path):
    rows = make_grid(conditions=("restart-delims-visible",), offsets=(-1, 0), probes=("linear",), block_end=False)
    text = render_summary(rows, [])
    headline = text.split("## Headline")[1].split("## Controls")[0]
    assert "Condition `restart-delims-visible`, site `memento`" in headline and "masked" not in headline
    assert accuracy_by_layer(rows) is not None
    assert [p.name for p in save_all(rows, None, None, tmp_path, formats=("png",))] == [
        "accuracy_by_layer.png", "accuracy_heatmap.png"]


def test_empty_results(tmp_path):
    paths = write_tables([], [], tmp_path)
    assert "No probe results to report." in paths["summary.md"].read_text()
    assert save_all([], [], [], tmp_path / "fig") == []


def test_figures_are_byte_stable(tmp_path):
    rows = make_grid(conditions=("memento",), block_end=False, probes=("mlp",))
    a = save_all(rows, None, make_sweep(), tmp_path / "a", formats=("pdf",))
    b = save_all(rows, None, make_sweep(), tmp_path / "b", formats=("pdf",))
    assert len(a) == 4 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def _chance_lines(ax) -> list:
    return [line for line in ax.get_lines() if list(line.get_ydata()) == [10.0, 10.0] and line.get_linestyle() == "--"]


def test_figure_anatomy(grid, diffs):
    """Titles, labelled axes with units, a legend, and the dashed chance line where accuracy is plotted."""
    figures = {
        "layer": accuracy_by_layer(grid),
        "distance": accuracy_by_distance(grid),
        "comparison": condition_comparison(grid, diffs),
        "training": leakage_vs_training(make_sweep()),
    }
    for name, fig in figures.items():
        assert fig._suptitle is not None and fig._suptitle.get_text(), name
        assert fig.legends or any(ax.get_legend() for ax in fig.axes), name
        accuracy_axes = [ax for ax in fig.axes if "accuracy (%)" in ax.get_ylabel()]
        assert accuracy_axes, name
        plotted = fig.axes[:1] if name == "training" else fig.axes  # the twin y axis shares the step axis
        assert all(ax.get_xlabel() for ax in plotted), name
        assert _chance_lines(accuracy_axes[0]), name
    assert figures["distance"].axes[0].get_xlabel() == "block distance from target (offset)"
    assert [t.get_text() for t in figures["distance"].axes[0].get_xticklabels()] == [f"+{o}" for o in range(1, 8)]
    training = figures["training"]
    assert {ax.get_ylabel() for ax in training.axes} == {"masked probe accuracy (%)", "task accuracy (%)"}
    assert training.axes[0].get_xlabel() == "training step"
    comparison_labels = {t.get_text() for t in figures["comparison"].axes[1].get_legend().get_texts()}
    assert {"memento", "restart-delims-visible", "restart", "memento, block_end site", "chance (10%)"} <= comparison_labels
    heatmap = accuracy_heatmap(grid)
    cells = [t.get_text() for t in heatmap.axes[1].texts]
    assert "26.2*" in cells and "10.0" in cells and len(cells) == len(LAYERS) * len(OFFSETS)
    assert heatmap.axes[-1].get_ylabel().startswith("probe accuracy (%)")  # the colour bar


# ----------------------------------------------------------------- probe strength

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
