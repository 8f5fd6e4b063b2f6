"""Reports and figures from synthetic probe results: files, numbers, statements, round trips.

On the synthetic grid of tests/helpers/grids.py (fixtures `grid`, `diffs`: tests/reporting/conftest.py);
each cell's strength, chance, mask and Holm family: test_report_cells.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

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
from tests.helpers.grids import LAYERS, OFFSETS, make_grid, make_sweep


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
