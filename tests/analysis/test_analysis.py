"""Leakage analysis (kvprobe.analysis) on a tiny synthetic store written in-process: one row per cell
and probe, the passcodes' own chance, intervals inside [0, 1], saved grids that read back the same,
merged grids, and one Holm correction that stars the same cells as the report and the printed table.

The store (tests.helpers.stores.write_synthetic_store): 600 passcodes, layers 0 and 1, offsets -1
(no signal), 0 (strong) and +1 (weak). Probe-strength selection on constructed problems:
tests/probes/; the same on real runs: tests/cli/test_cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from kvprobe.analysis import ProbeConfig, apply_holm, load_grid, merge_grids, probe_store, save_grid
from kvprobe.data.passcodes import PasscodeConfig
from kvprobe.experiment import holm_corrected, leakage_table
from kvprobe.grid import Cell
from kvprobe.memento.masks import MaskConfig
from kvprobe.reporting import write_tables
from kvprobe.stats import holm
from kvprobe.store import KVStore
from tests.helpers.stores import write_synthetic_store

N = 600
# one fixed strength (no inner split) and few bootstraps: a few seconds per grid
SETTINGS = ProbeConfig(families=("linear",), pooling="mean", n_boot=200, linear_l2_grid=(1e-3,))
CELLS = {(offset, layer) for offset in (-1, 0, 1) for layer in (0, 1)}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("analysis") / "store", n=N)


@pytest.fixture(scope="module")
def grid(store_path):
    with KVStore(store_path) as store:
        return probe_store(store, "memento", SETTINGS, progress=False)


def _json(rows) -> list[str]:
    return [json.dumps(r.to_dict(), sort_keys=True) for r in rows]  # NaN-safe equality of whole rows


def test_one_row_per_cell_with_its_chance_and_intervals_inside_0_1(grid):
    rows = grid.rows
    assert len(rows) == len(CELLS) and {(r.offset, r.layer) for r in rows} == CELLS
    assert [(r.probe, r.site, r.offset, r.layer) for r in rows] == sorted((r.probe, r.site, r.offset, r.layer)
                                                                        for r in rows)
    assert len(grid.val_index) == rows[0].n_val and rows[0].n_train + rows[0].n_val == N
    assert set(grid.val_index) <= set(range(N))
    for r in rows:
        assert (r.condition, r.site, r.probe, r.pooling) == ("memento", "memento", "linear", "mean")
        assert r.chance == 0.1 and r.mask == MaskConfig().name and r.l2 == 1e-3 and r.l2_grid == [1e-3]
        assert 0.0 <= r.ci_low <= r.accuracy <= r.ci_high <= 1.0, r
        assert 0.0 <= r.wilson_low <= r.accuracy <= r.wilson_high <= 1.0, r
        assert 0.0 <= r.p_value <= 1.0 and math.isnan(r.p_holm) and not r.significant  # Holm: the report's job
        assert r.bits_low <= r.bits <= r.bits_high and len(r.digit_accuracy) == 5
        assert r.shuffled_accuracy is not None and r.selectivity == pytest.approx(r.accuracy - r.shuffled_accuracy)
        scores = grid.per_sample[(r.cell, "linear")]
        assert scores.shape == (r.n_val,) and scores.mean() == pytest.approx(r.accuracy, abs=1e-6)
    by = {(r.offset, r.layer): r for r in rows}
    assert all(abs(by[-1, layer].accuracy - 0.1) < 0.06 for layer in (0, 1))  # the control reads nothing
    assert all(by[0, layer].accuracy > 0.6 and by[0, layer].p_value < 1e-10 for layer in (0, 1))
    assert 0.1 < by[1, 1].accuracy < by[0, 1].accuracy  # the weak leak, above chance, below direct


def test_constrained_passcodes_are_judged_against_their_own_chance(tmp_path):
    """Passcodes whose digits sum to 22: the majority baseline, not 1/10, is each row's chance."""
    path = write_synthetic_store(tmp_path / "sum22", n=400, offsets=(-1,), n_layers=1, digit_sum=22)
    with KVStore(path) as store:
        rows = probe_store(store, "fixed-sum", dataclasses.replace(SETTINGS, shuffled_control=False),
                           progress=False).rows
    chance = PasscodeConfig(digit_sum=22).chance()
    assert chance > 0.11 and [r.chance for r in rows] == [chance]
    assert rows[0].p_value > 0.01  # a control at its own baseline is no leak


def test_a_saved_grid_reads_back_the_same(grid, tmp_path):
    save_grid(grid, tmp_path / "probes" / "memento")
    assert sorted(p.name for p in (tmp_path / "probes").iterdir()) == ["memento.json", "memento.npz"]
    back = load_grid(tmp_path / "probes" / "memento")
    assert back.condition == grid.condition and _json(back.rows) == _json(grid.rows)
    assert np.array_equal(back.val_index, grid.val_index)
    assert back.per_sample.keys() == grid.per_sample.keys()
    assert all(np.array_equal(back.per_sample[k], v) for k, v in grid.per_sample.items())
    assert back.cell(Cell("memento", 0, 1, "mean"), "linear").accuracy == grid.cell(Cell("memento", 0, 1, "mean"),
                                                                                    "linear").accuracy


def test_grids_probed_apart_merge_into_one(store_path, grid):
    with KVStore(store_path) as store:
        parts = [probe_store(store, "memento", dataclasses.replace(SETTINGS, offsets=offsets), progress=False)
                 for offsets in ((1,), (-1, 0))]
    merged = merge_grids(parts)
    assert merged.condition == "memento" and np.array_equal(merged.val_index, grid.val_index)
    assert [(r.offset, r.layer) for r in merged.rows] == [(r.offset, r.layer) for r in grid.rows]  # sorted as one
    assert merged.per_sample.keys() == grid.per_sample.keys()
    assert _json(merged.rows) == _json(parts[1].rows + parts[0].rows)  # rows kept as each part fitted them
    with pytest.raises(ValueError, match="one condition scored on one validation split"):
        merge_grids([parts[0], dataclasses.replace(parts[1], condition="restart")])
    with pytest.raises(ValueError, match="one condition scored on one validation split"):
        merge_grids([parts[0], dataclasses.replace(parts[1], val_index=parts[1].val_index[1:])])


def _summary_stars(summary: str) -> set[tuple[int, int]]:
    """(layer, offset) of the starred cells of summary.md's headline table (offsets -1, 0, +1)."""
    headline = summary.split("### linear probe")[1].split("\n\n")[1]
    return {(int(line.split("|")[1]), offset) for line in headline.splitlines()[2:]
            for offset, cell in zip((-1, 0, 1), line.split("|")[2:-1]) if cell.strip().endswith("*")}


def _table_stars(table: str) -> set[tuple[int, int]]:
    """(layer, offset) of the starred cells of `leakage_table`'s text."""
    lines = table.splitlines()
    offsets = [int(o) for o in lines[1].split()[1:]]
    return {(int(line[:5]), o) for line in lines[2:] if line.strip() and line[:5].strip().isdigit()
            for i, o in enumerate(offsets) if line[6 + 8 * i: 14 + 8 * i].endswith("*")}


def test_apply_holm_stars_the_cells_the_report_and_the_table_star(grid, tmp_path):
    rows = [dataclasses.replace(r) for r in grid.rows]
    apply_holm(rows)
    expected = {(r.layer, r.offset) for r, p in zip(rows, holm([r.p_value for r in rows])) if p <= 0.05}
    assert {(r.layer, r.offset) for r in rows if r.significant} == expected
    assert all(r.p_holm >= r.p_value for r in rows)
    assert (1, 0) in expected and not any(offset < 0 for _, offset in expected)  # direct yes, control never
    assert len(expected) < len(rows)  # some cells are not starred: the check below can tell them apart

    paths = write_tables(rows, [], tmp_path)
    written = json.loads(paths["results.json"].read_text())["rows"]
    assert {(r["layer"], r["offset"]) for r in written if r["significant"]} == expected
    assert [r["p_holm"] for r in written] == [r.p_holm for r in rows]
    assert _summary_stars(paths["summary.md"].read_text()) == expected
    corrected = holm_corrected({"memento": grid})  # what `kvprobe probe` and `run` print
    assert [r.significant for r in corrected["memento"].rows] == [r.significant for r in rows]
    assert _table_stars(leakage_table({"memento": grid})) == expected
    assert all(math.isnan(r.p_holm) for r in grid.rows)  # the grid itself was left uncorrected
