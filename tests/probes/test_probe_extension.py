"""A grid's edge never caps the probe strength silently (kvprobe.probes.selection, issue 26).

Where a group's best inner-split value is on an edge of the grid, that group is fitted a decade
further until its best is interior or a bound of `L2_BOUNDS` stops it; a choice left on a bound
is flagged on the selection, on every row and in the report. Problems with a known optimum
(class means: an interior strength; a noiseless difference: no regularisation at all), the
same choice with and without the extension where the full grid is given, batching that does not
change any group's choice, and a solver tolerance that lets a weak-strength path move.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvprobe.analysis import ProbeConfig, load_grid, probe_store, save_grid
from kvprobe.probes import L2_BOUNDS, LinearConfig, MLPConfig, fit_probes, select_strength
from kvprobe.probes import selection
from kvprobe.probes.trainer import linear_in_raw_units
from kvprobe.reporting.summary import render_summary
from tests.helpers.probe_problems import FakeStore, class_means, correlated_noise

CONFIG = LinearConfig(tol=1e-4)
FULL = (1e-3, 1e-2, 1e-1, 1.0)


@pytest.fixture(scope="module")
def interior():
    """Class means with an inner-split optimum at 1e-2 (0.763, against 0.761 at 1e-1 and 0.737 at 1e-3)."""
    return class_means(3000, seed=0)


def test_extends_down_until_the_best_is_interior(interior):
    xt, yt = interior
    sel = select_strength(xt, yt, (1e-1, 1.0), config=CONFIG)
    assert sel.tried(0).tolist() == [1e-3, 1e-2, 1e-1, 1.0] and sel.chosen[0] == 1e-2 and not sel.at_bound[0]
    full = select_strength(xt, yt, FULL, config=CONFIG, extend=False)  # the same values, asked for
    assert full.chosen[0] == sel.chosen[0]
    np.testing.assert_allclose(sel.inner_accuracy, full.inner_accuracy, atol=0.003)
    fixed = select_strength(xt, yt, (1e-1, 1.0), config=CONFIG, extend=False)
    assert fixed.chosen[0] == 1e-1 and fixed.at_bound[0]  # without the extension the edge binds, flagged


def test_extends_up_until_the_best_is_interior():
    xt, yt = class_means(600, seed=0)  # few samples for 120 features: strong L2 wins
    sel = select_strength(xt, yt, (1e-4, 1e-3), config=CONFIG)
    assert sel.chosen[0] == 1e-1 and sel.tried(0).max() == 1.0 and not sel.at_bound[0]


def test_a_choice_on_a_hard_bound_is_flagged():
    xt, yt = correlated_noise(600, seed=0)  # the code is an exact difference of features: no L2 is best
    sel = select_strength(xt, yt, (1e-2, 1e-1), config=CONFIG)
    assert sel.chosen[0] == L2_BOUNDS[0] and sel.at_bound[0]
    assert sel.tried(0).min() == L2_BOUNDS[0] and np.nanargmax(sel.inner_accuracy[0]) == 0


def test_bounds_are_the_documented_constant(monkeypatch):
    monkeypatch.setattr(selection, "L2_BOUNDS", (1e-3, 1e-1))
    xt, yt = correlated_noise(600, seed=0)
    sel = select_strength(xt, yt, (1e-2, 1e-1), config=CONFIG)
    assert sel.tried(0).tolist() == [1e-3, 1e-2, 1e-1] and sel.chosen[0] == 1e-3 and sel.at_bound[0]


def test_each_group_extends_alone_as_it_would_unbatched(interior):
    """A cell's choice does not depend on the cells fitted beside it (memory grouping is arbitrary)."""
    xa, y = interior
    xb, _ = class_means(3000, seed=0, scale=6.0)  # a stronger signal: a weaker optimum
    both = select_strength(np.concatenate([xa, xb]), y, (1e-1, 1.0), config=CONFIG)
    for g, x in enumerate((xa, xb)):
        alone = select_strength(x, y, (1e-1, 1.0), config=CONFIG)
        assert both.tried(g).tolist() == alone.tried(0).tolist() and both.chosen[g] == alone.chosen[0]
        np.testing.assert_allclose(both.inner_accuracy[g][~np.isnan(both.inner_accuracy[g])],
                                   alone.inner_accuracy[0][~np.isnan(alone.inner_accuracy[0])], atol=0.003)
    assert both.tried(0).tolist() != both.tried(1).tolist()  # they went to different depths


def test_warm_start_is_the_chosen_probe(interior):
    xt, yt = interior
    sel = select_strength(xt, yt, (1e-1, 1.0), config=CONFIG)
    mask = selection.inner_split(yt)
    at = fit_probes(xt[:, ~mask], yt[~mask], xt[:, mask], yt[mask], l2=float(sel.chosen[0]), config=CONFIG)
    raw = linear_in_raw_units(at.probe, at.standardizer)
    scores = [(p.weight.detach()[0] * xt[0, :5, :, None, None]).sum(1).argmax(-1) for p in (raw, sel.warm_start)]
    assert (scores[0] == scores[1]).float().mean() > 0.9  # the same function, within the solver's tolerance


def test_mlp_strength_is_extended_too():
    xt, yt = class_means(600, seed=0, d=30)
    cfg = MLPConfig(hidden=(16,), max_epochs=4, patience=2)
    sel = select_strength(xt, yt, (1e-5, 1e-4), kind="mlp", config=cfg)
    edge = sel.chosen[0] in (sel.tried(0).min(), sel.tried(0).max())
    assert len(sel.tried(0)) > 2 or not edge  # it either extended or was interior from the start
    assert not edge or sel.at_bound[0]


def test_tolerance_follows_the_strength():
    """A warm start from 1e-5 at 1e-6: with tol fixed at 1e-3 the path does not move (the probe is
    regularised by the tolerance); with the tolerance following l2 it does."""
    xt, yt = correlated_noise(600, seed=0)
    fixed = LinearConfig(tol=1e-3, tol_follows_l2=False)
    start = fit_probes(xt, yt, xt, yt, l2=1e-5, config=fixed)
    init = linear_in_raw_units(start.probe, start.standardizer)
    frozen = fit_probes(xt, yt, xt, yt, l2=1e-6, init=init, config=fixed)
    moving = fit_probes(xt, yt, xt, yt, l2=1e-6, init=init, config=LinearConfig(tol=1e-3))
    assert frozen.n_steps.min() == 0 and moving.n_steps.min() > 0  # a digit "converged" where it started
    assert moving.train_accuracy[0] > frozen.train_accuracy[0]


def test_rows_and_report_carry_the_flag(tmp_path, monkeypatch):
    store = FakeStore()
    settings = ProbeConfig(families=("linear",), pooling="mean", n_boot=200, shuffled_control=False,
                             linear=LinearConfig(tol=1e-3), linear_l2_grid=(1e-1, 1.0), offsets=(-1, 0))
    monkeypatch.setattr(selection, "L2_BOUNDS", (1e-2, 1.0))
    grid = probe_store(store, "memento", settings, progress=False)
    for r in grid.rows:
        assert len(r.l2_grid) == len(r.l2_inner_accuracy) and r.l2 in r.l2_grid
        assert r.l2_at_bound == (r.l2 in (1e-2, 1.0) and r.l2 in (min(r.l2_grid), max(r.l2_grid)))
    assert any(r.l2_at_bound for r in grid.rows) and any(len(r.l2_grid) > 2 for r in grid.rows)
    save_grid(grid, tmp_path / "g")
    assert [r.l2_at_bound for r in load_grid(tmp_path / "g").rows] == [r.l2_at_bound for r in grid.rows]
    text = render_summary(grid.rows)
    weak = sum(r.l2_at_bound and r.l2 == 1e-2 for r in grid.rows)
    strong = sum(r.l2_at_bound and r.l2 == 1.0 for r in grid.rows)
    assert (f"FLAGGED: {weak} of {len(grid.rows)} cells" in text) == bool(weak)
    assert (f"{strong} cells chose the strongest value" in text) == bool(strong)
    assert "fitted a decade further" in text and "a value whose inner score ties it" in text
    fixed = probe_store(store, "memento", ProbeConfig(**{**settings.__dict__, "extend_grid": False}), progress=False)
    assert all(len(r.l2_grid) == 2 for r in fixed.rows)


def test_the_printed_table_flags_a_weak_bound_choice():
    """`kvprobe probe/run/demo` print `leakage_table`: a cell left on the weak bound is named under it."""
    from dataclasses import replace

    from kvprobe.analysis import GridResult
    from kvprobe.experiment import leakage_table

    store = FakeStore()
    settings = ProbeConfig(families=("linear",), pooling="mean", n_boot=200, shuffled_control=False,
                             linear=LinearConfig(tol=1e-3), offsets=(0,))
    rows = probe_store(store, "memento", settings, progress=False).rows
    assert "FLAGGED" not in leakage_table({"memento": GridResult("memento", rows, np.arange(3))})
    bound = [replace(r, l2=min(r.l2_grid), l2_at_bound=True) if r.layer == 1 else r for r in rows]
    table = leakage_table({"memento": GridResult("memento", bound, np.arange(3))})
    assert f"FLAGGED: the probe chose the weakest strength it could try ({min(bound[-1].l2_grid):g}) at layer 1 +0" \
        in table


def _faint_means(n: int, seed: int, d: int = 20, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Class means too faint for any weight to reach 1: a fit at 1e-4 warm-started from 1e-3 already meets
    its tolerance (10 l2) where it starts, so the two values are the same probe (the same inner accuracy)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, (n, 5))
    means = np.random.default_rng(99).normal(size=(5, 10, d)) * scale / np.sqrt(d)
    return (means[np.arange(5), y].sum(axis=1) + rng.normal(size=(n, d)))[None].astype(np.float32), y


def test_a_weak_edge_that_ties_the_best_is_extended():
    """The stalled fit at 1e-4 ties 1e-3 on inner accuracy; its inner loss differs from 1e-3's only by float
    rounding. Before, the rounding decided whether 1e-5 was ever tried; now the tie itself extends the grid,
    until the weak edge reads less than the choice or the bound is reached."""
    x, y = _faint_means(2000, seed=0)
    old = select_strength(x, y, (1e-4, 1e-3), config=LinearConfig(tol=1e-3), extend_ties=False)
    assert old.inner_accuracy[0, 0] == old.inner_accuracy[0, 1] and old.chosen[0] == 1e-3  # the stall, unseen
    assert old.tried(0).min() == 1e-4  # ... so the weaker values were never tried
    new = select_strength(x, y, (1e-4, 1e-3), config=LinearConfig(tol=1e-3))
    weakest = new.tried(0).min()
    best = new.inner_accuracy[0, np.searchsorted(new.grid, new.chosen[0])]
    assert weakest < 1e-4
    assert weakest == L2_BOUNDS[0] or new.inner_accuracy[0, np.searchsorted(new.grid, weakest)] < best


def test_the_tie_rule_can_change_the_choice():
    """Where the values past the stalled tie read more, the tie rule finds them: the choice moves from 1e-2
    to a weaker value with a higher inner accuracy (on this problem, without the rule 1e-5 is never tried)."""
    x, y = _faint_means(6000, seed=0, scale=0.5)
    old = select_strength(x, y, (1e-4, 1e-3), config=LinearConfig(tol=1e-3), extend_ties=False)
    new = select_strength(x, y, (1e-4, 1e-3), config=LinearConfig(tol=1e-3))
    assert old.tried(0).min() == 1e-4 and new.chosen[0] < 1e-4
    best = lambda s: s.inner_accuracy[0, np.searchsorted(s.grid, s.chosen[0])]  # noqa: E731
    assert best(new) > best(old)


def test_ties_best_reads_the_criterion():
    accuracy = np.array([[0.5, 0.5, 0.4], [0.3, 0.5, 0.4]])
    loss = np.array([[2.0, 2.0000001, 2.1], [2.0, 2.0 + 1e-3, 2.1]])
    best, low = np.array([1, 1]), np.array([0, 0])
    assert selection._ties_best(accuracy, loss, best, low).tolist() == [True, False]
    assert selection._ties_best(accuracy, loss, best, low, "loss").tolist() == [True, False]
