"""An MLP cell still improving at its epoch limit is flagged, never silent (kvprobe.analysis rows, the report).

The epoch limit is a hyperparameter's edge like the L2 grid's: on the toy at 50,000 passcodes the
last layer's masked +1 cell was still improving at 30 epochs. Rows record the epoch whose weights
were kept and whether a fit reached the limit with its patience not run out; the summary and the
printed table name those cells, in any condition and site. Where the MLP's L2 is chosen per cell, the
inner-split fits that chose it are checked as well.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from kvprobe.analysis import Cell, GridResult, ProbeConfig, _score, load_grid, probe_store, save_grid
from kvprobe.data.passcodes import PasscodeConfig
from kvprobe.experiment import leakage_table
from kvprobe.probes import MLPConfig
from kvprobe.probes.selection import select_strength
from kvprobe.reporting.summary import render_summary
from tests.helpers.probe_problems import FakeStore

SETTINGS = ProbeConfig(families=("mlp",), seeds=1, pooling="mean", shuffled_control=False, n_boot=100)


def _rows(max_epochs: int, patience: int, offsets: tuple[int, ...], **mlp) -> list:
    config = MLPConfig(hidden=(16,), max_epochs=max_epochs, patience=patience, **mlp)
    return probe_store(FakeStore(), "memento", replace(SETTINGS, offsets=offsets, mlp=config), progress=False).rows


def _grid(rows: list) -> dict[str, GridResult]:
    return {"memento": GridResult("memento", rows, np.arange(3))}


def test_a_fit_stopped_by_its_limit_is_flagged_with_its_epoch(tmp_path):
    rows = _rows(max_epochs=2, patience=5, offsets=(0,))  # a learnable signal, two epochs: still improving
    assert rows and all(r.epochs == 2 and r.epochs_at_cap for r in rows)
    flag = ("FLAGGED: the MLP was still improving at its epoch limit in 2 cells: memento memento layer 0 +0 "
            "(kept epoch 2), memento memento layer 1 +0 (kept epoch 2).")
    assert flag in render_summary(rows)
    assert flag in leakage_table(_grid(rows))  # the printed table shows the linear probe, and still flags the MLP
    save_grid(_grid(rows)["memento"], tmp_path / "g")
    assert [(r.epochs, r.epochs_at_cap) for r in load_grid(tmp_path / "g").rows] == [(2, True), (2, True)]


def test_a_fit_stopped_by_its_patience_is_not_flagged(tmp_path):
    rows = _rows(max_epochs=200, patience=2, offsets=(-1,))  # pure noise: the holdout loss stops falling at once
    assert rows and all(not r.epochs_at_cap and 1 <= r.epochs < 200 for r in rows)
    assert "epoch limit" not in render_summary(rows)
    assert "FLAGGED" not in leakage_table(_grid(rows))
    save_grid(_grid(rows)["memento"], tmp_path / "g")
    assert [(r.epochs, r.epochs_at_cap) for r in load_grid(tmp_path / "g").rows] == [(r.epochs, False) for r in rows]


def test_a_fixed_epoch_count_is_not_flagged():
    """holdout_fraction = 0 trains exactly max_epochs by request: no early stopping to run out, nothing to flag."""
    rows = _rows(max_epochs=3, patience=1, offsets=(0,), holdout_fraction=0.0)
    assert rows and all(r.epochs == 3 and not r.epochs_at_cap for r in rows)


def test_seeds_combine_to_the_latest_epoch_and_any_fit_at_the_limit():
    """Two seeds of two cells: a cell is flagged when either seed's fit was still improving, and its
    epoch is the later of the seeds' kept epochs (per digit, the latest of the five)."""
    rng = np.random.default_rng(0)
    y_va = rng.integers(0, 10, (40, 5))
    log_probs = np.log(np.full((2, 40, 5, 10), 0.1))  # (G, M, K, C)

    def fit(epochs: list[list[int]], stopped: list[list[bool]]):
        return SimpleNamespace(log_probs=log_probs, accuracy=np.full(2, 0.1), train_accuracy=np.full(2, 0.1),
                               n_steps=np.array(epochs), converged=np.array(stopped), config=MLPConfig())

    seed0 = fit([[5, 9, 5, 5, 5], [30, 30, 30, 30, 30]], [[True] * 5, [True] * 5])
    seed1 = fit([[7, 7, 7, 7, 7], [12, 12, 12, 12, 12]], [[True] * 5, [True, True, False, True, True]])
    sel = SimpleNamespace(chosen=np.full(2, 1e-4), tried=lambda g: np.array([1e-4]), at_bound=np.zeros(2, bool),
                          fixed=True, inner_accuracy=None, inner_at_cap=np.zeros(2, bool))
    cells = [Cell("memento", 1, layer, "mean") for layer in (0, 3)]
    _, rows = _score(cells, "mlp", sel, [seed0, seed1], None, y_va, PasscodeConfig(), 100,
                     condition="memento", chance=0.1, mask="memento", n_train=100, n_val=40)
    assert [(r.epochs, r.epochs_at_cap) for r in rows] == [(9, False), (30, True)]


def _one_cell_fits(stopped: bool):
    """A fake MLP fit of one cell (G = 1, five digits) whose early stopping did or did not run out."""
    return SimpleNamespace(log_probs=np.log(np.full((1, 40, 5, 10), 0.1)), accuracy=np.full(1, 0.1),
                           train_accuracy=np.full(1, 0.1), n_steps=np.full((1, 5), 8),
                           converged=np.full((1, 5), stopped), config=MLPConfig())


def test_an_inner_fit_at_the_limit_flags_its_cell():
    """Where the MLP's L2 is chosen per cell (mlp_l2_grid), the inner-split fits that chose it are checked too:
    a strength picked among fits cut short is flagged even when the refit stopped by itself."""
    y_va = np.random.default_rng(0).integers(0, 10, (40, 5))
    cell = [Cell("memento", 1, 3, "mean")]
    for inner, refit_stopped, flagged in ((True, True, True), (False, True, False), (False, False, True)):
        sel = SimpleNamespace(chosen=np.full(1, 1e-4), tried=lambda g: np.array([1e-4, 1e-2]),
                              at_bound=np.zeros(1, bool), fixed=False, inner_accuracy=np.full((1, 2), 0.1),
                              inner_at_cap=np.array([inner]))
        _, rows = _score(cell, "mlp", sel, [_one_cell_fits(refit_stopped)], None, y_va, PasscodeConfig(), 100,
                         condition="memento", chance=0.1, mask="memento", n_train=100, n_val=40)
        assert rows[0].epochs_at_cap is flagged, (inner, refit_stopped)


def test_strength_selection_records_inner_fits_at_their_limit():
    store = FakeStore()
    x = np.stack([store.features(0, 0), store.features(0, -1)]).astype(np.float32)  # (2, N, D): signal, noise
    grid = (1e-4, 1e-2)
    short = select_strength(x, store.labels, grid, kind="mlp", extend=False,
                            config=MLPConfig(hidden=(16,), max_epochs=2, patience=5))
    assert short.inner_at_cap.tolist() == [True, True]  # two epochs: neither has run out of patience
    free = select_strength(x, store.labels, grid, kind="mlp", extend=False,
                           config=MLPConfig(hidden=(16,), max_epochs=400, patience=2))
    assert free.inner_at_cap.tolist() == [False, False]
    fixed = select_strength(x, store.labels, grid, kind="mlp", extend=False,
                            config=MLPConfig(hidden=(16,), max_epochs=2, holdout_fraction=0.0))
    assert fixed.inner_at_cap.tolist() == [False, False]  # an exact epoch count by request
