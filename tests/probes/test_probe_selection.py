"""Probe strength chosen on an inner split of the training passcodes (kvprobe.probes.selection).

Constructed problems with a known answer (strong regularisation clearly wins / clearly loses),
the outer validation split never used for the choice, a one-value grid equal to the fixed
fit, per-group strengths and warm starts equal to separate cold fits, the store-level wiring
(rows carry the chosen value), the sensitivity curve and its figure, and the config field.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kvprobe.analysis import ProbeConfig, load_grid, probe_store, save_grid, sensitivity_curves
from kvprobe.config import ConfigError, parse_config
from kvprobe.reporting.figures import l2_selection, l2_sensitivity
from kvprobe.data.passcodes import label_unique_split
from kvprobe.probes import (
    DEFAULT_LINEAR_L2_GRID,
    LinearConfig,
    MLPConfig,
    fit_at_strengths,
    fit_probes,
    fit_selected,
    inner_split,
    normalise_grid,
    select_strength,
)
from kvprobe.probes.linear import fit_linear_probes
from kvprobe.probes.trainer import linear_in_raw_units
from kvprobe.grid import Cell
from tests.helpers.probe_problems import FakeStore, class_means, correlated_noise

GRID = (1e-4, 1e-2, 1e-1)
FAST = LinearConfig(tol=1e-4)


def test_normalise_grid():
    assert normalise_grid([1e-2, 1e-4, 1e-2]) == (1e-4, 1e-2)
    assert normalise_grid(1e-3) == (1e-3,)
    for bad in ([], [-1.0], [float("nan")]):
        with pytest.raises(ValueError):
            normalise_grid(bad)


def test_inner_split_is_label_unique():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (600, 2))  # 9 passcodes, each repeated many times
    held = inner_split(y, 0.3, seed=1)
    codes = [tuple(r) for r in y]
    inside = {c for c, h in zip(codes, held) if h}
    outside = {c for c, h in zip(codes, held) if not h}
    assert inside and outside and not inside & outside


@pytest.mark.parametrize("problem, n, expected", [(correlated_noise, 1500, 1e-4), (class_means, 600, 1e-1)])
def test_selection_finds_the_known_answer(problem, n, expected):
    xt, yt = problem(n, seed=0)
    xv, yv = problem(2000, seed=1)
    fit, sel = fit_selected(xt, yt, xv, yv, GRID, config=FAST, seed=3, extend=False)
    assert sel.chosen[0] == expected
    fixed = {v: fit_probes(xt, yt, xv, yv, l2=v, config=FAST).accuracy[0] for v in GRID}
    assert fixed[expected] == max(fixed.values())  # the choice is also the best on fresh data
    assert fixed[expected] > min(fixed.values()) + 0.05  # by a clear margin
    assert abs(fit.accuracy[0] - fixed[expected]) < 0.01  # the refit is the fit at the chosen value


def test_choice_is_the_best_inner_validation_value():
    """The chosen value maximises inner-validation accuracy, recomputed here by plain cold fits."""
    xt, yt = class_means(400, seed=2)
    noisier = xt[:, :, ::-1] + np.random.default_rng(0).normal(scale=2.0, size=xt.shape).astype(np.float32)
    xt = np.concatenate([xt, noisier], axis=0)  # two groups
    mask = inner_split(yt, 0.25, seed=5)
    tight = LinearConfig(tol=1e-6, max_iter=3000)  # warm and cold starts then reach the same optimum
    sel = select_strength(xt, yt, GRID, inner_val=mask, config=tight, extend=False)
    inner = np.stack([fit_probes(xt[:, ~mask], yt[~mask], xt[:, mask], yt[mask], l2=v, config=tight).accuracy
                      for v in GRID], axis=1)  # (G, R)
    np.testing.assert_allclose(sel.inner_accuracy, inner, atol=0.005)
    for g in range(2):
        assert sel.inner_accuracy[g, list(GRID).index(sel.chosen[g])] == sel.inner_accuracy[g].max()
    assert sel.n_inner_val == mask.sum() and sel.n_inner_train == (~mask).sum()


def test_outer_validation_is_never_used_for_the_choice():
    xt, yt = class_means(300, seed=4, d=80)
    xv, yv = class_means(500, seed=5, d=80)
    _, a = fit_selected(xt, yt, xv, yv, GRID, config=FAST)
    rng = np.random.default_rng(0)
    _, b = fit_selected(xt, yt, rng.normal(size=xv.shape), rng.permutation(yv), GRID, config=FAST)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.inner_accuracy, b.inner_accuracy)


def test_single_value_grid_is_exactly_the_fixed_fit():
    xt, yt = class_means(300, seed=6, d=40)
    xv, yv = class_means(200, seed=7, d=40)
    fit, sel = fit_selected(xt, yt, xv, yv, (1e-3,), config=FAST)
    old = fit_probes(xt, yt, xv, yv, l2=1e-3, config=FAST)
    assert sel.fixed and sel.chosen.tolist() == [1e-3] and np.isnan(sel.inner_accuracy).all()
    np.testing.assert_array_equal(fit.log_probs, old.log_probs)


def test_per_group_strengths_and_warm_starts_equal_separate_cold_fits():
    xt, yt = correlated_noise(600, seed=8)
    xv, yv = correlated_noise(300, seed=9)
    x2 = np.concatenate([xt, xt[:, :, ::-1]])
    v2 = np.concatenate([xv, xv[:, :, ::-1]])
    tight = LinearConfig(tol=1e-6, max_iter=2000)
    both = fit_probes(x2, yt, v2, yv, l2=np.array([1e-1, 1e-3]), config=tight)
    for g, v in enumerate((1e-1, 1e-3)):
        alone = fit_probes(x2[g:g + 1], yt, v2[g:g + 1], yv, l2=v, config=tight)
        np.testing.assert_allclose(both.log_probs[g], alone.log_probs[0], atol=2e-3)
    raw = linear_in_raw_units(both.probe, both.standardizer)  # the same function on unscaled features
    np.testing.assert_allclose(raw(torch.as_tensor(v2)).log_softmax(-1).detach().numpy(), both.log_probs, atol=1e-4)
    warm = fit_probes(x2, yt, v2, yv, l2=1e-3, config=tight, init=raw)
    cold = fit_probes(x2, yt, v2, yv, l2=1e-3, config=tight)
    np.testing.assert_allclose(warm.log_probs, cold.log_probs, atol=2e-3)
    assert warm.n_steps[1].max() <= 2  # group 1 started at its optimum


def test_warm_start_shape_is_checked():
    x = torch.randn(2, 50, 3)
    y = torch.randint(0, 10, (2, 50, 1))
    probes, _ = fit_linear_probes(x, y, 10, LinearConfig())
    with pytest.raises(ValueError, match="init probes have shape"):
        fit_linear_probes(x[:1], y[:1], 10, LinearConfig(), init=probes)
    with pytest.raises(ValueError, match="one l2 per group"):
        fit_probes(x, y, x, y, "mlp", l2=[1e-3, 1e-2])


def test_mlp_strength_selection_and_reassembly():
    xt, yt = class_means(300, seed=10, d=30)
    xv, yv = class_means(200, seed=11, d=30)
    x2, v2 = np.concatenate([xt, -xt]), np.concatenate([xv, -xv])
    cfg = MLPConfig(hidden=(16,), max_epochs=5, patience=2)
    fit, sel = fit_selected(x2, yt, v2, yv, (1e-4, 1.0), kind="mlp", config=cfg, seed=0, extend=False)
    assert sel.inner_accuracy.shape == (2, 2) and set(sel.chosen) <= {1e-4, 1.0}
    split = fit_at_strengths(x2, yt, v2, yv, [1e-4, 1.0], kind="mlp", config=cfg, seed=0)
    np.testing.assert_allclose(split.predict_log_proba(v2), split.log_probs, atol=1e-5)  # groups routed back
    for g, v in enumerate((1e-4, 1.0)):
        alone = fit_probes(x2[g:g + 1], yt, v2[g:g + 1], yv, "mlp", l2=v, config=cfg, seed=0)
        np.testing.assert_allclose(split.log_probs[g], alone.log_probs[0], atol=1e-5)
    assert split.l2.tolist() == [1e-4, 1.0]


# ----------------------------------------------------------------- store level


SETTINGS = ProbeConfig(families=("linear",), pooling="mean", n_boot=200, linear=LinearConfig(tol=1e-3),
                         linear_l2_grid=GRID, extend_grid=False)


@pytest.fixture(scope="module")
def store():
    return FakeStore()


def test_probe_store_reports_the_chosen_strength(store, tmp_path):
    grid = probe_store(store, "memento", SETTINGS, progress=False)
    for r in grid.rows:
        assert r.l2 in GRID and r.l2_grid == list(GRID) and len(r.l2_inner_accuracy) == len(GRID)
        assert r.l2_inner_accuracy[GRID.index(r.l2)] == max(r.l2_inner_accuracy)
    save_grid(grid, tmp_path / "g")
    back = load_grid(tmp_path / "g").rows
    assert [(r.l2, r.l2_grid, r.l2_inner_accuracy) for r in back] == [
        (r.l2, r.l2_grid, r.l2_inner_accuracy) for r in grid.rows]


def test_probe_store_choice_ignores_validation_labels(store):
    """Scramble every validation sample's features: the chosen strengths do not move."""
    is_val = label_unique_split(store.passcodes, SETTINGS.val_fraction, SETTINGS.split_seed)
    scrambled = FakeStore()
    for key, x in scrambled._x.items():
        x[is_val] = np.random.default_rng(3).normal(size=(int(is_val.sum()), x.shape[1]))
    a = probe_store(store, "memento", SETTINGS, progress=False)
    b = probe_store(scrambled, "memento", SETTINGS, progress=False)
    assert [(r.l2, r.l2_inner_accuracy) for r in a.rows] == [(r.l2, r.l2_inner_accuracy) for r in b.rows]
    assert [r.accuracy for r in a.rows] != [r.accuracy for r in b.rows]


def test_probe_store_one_value_grid_is_the_old_fixed_fit(store):
    old_settings = ProbeConfig(families=("linear",), pooling="mean", n_boot=200, shuffled_control=False,
                                 linear=LinearConfig(l2=1e-3, tol=1e-3), linear_l2_grid=None)
    fixed = probe_store(store, "memento", old_settings, progress=False)
    is_val = label_unique_split(store.passcodes, 0.2, 0)
    for r in fixed.rows:
        assert r.l2 == 1e-3 and r.l2_grid == [1e-3] and r.l2_inner_accuracy is None
        x = store.features(r.layer, r.offset)[None]
        plain = fit_probes(x[:, ~is_val], store.labels[~is_val], x[:, is_val], store.labels[is_val], l2=1e-3,
                           config=LinearConfig(tol=1e-3))
        assert r.accuracy == float(plain.accuracy[0])


def test_probe_store_chooses_the_mlp_weight_decay(store):
    settings = ProbeConfig(families=("mlp",), seeds=2, pooling="mean", n_boot=100, shuffled_control=False,
                             offsets=(0,), mlp=MLPConfig(hidden=(8,), max_epochs=3, patience=2),
                             mlp_l2_grid=(1e-4, 1e-1), extend_grid=False)
    rows = probe_store(store, "memento", settings, progress=False).rows
    assert len(rows) == 2 and all(len(r.accuracy_seeds) == 2 for r in rows)
    for r in rows:
        assert r.l2 in (1e-4, 1e-1) and r.l2_grid == [1e-4, 1e-1] and len(r.l2_inner_accuracy) == 2
    fixed = probe_store(store, "memento", replace(settings, mlp_l2_grid=None), progress=False).rows
    assert all(r.l2 == MLPConfig().l2 and r.l2_inner_accuracy is None for r in fixed)


def test_sensitivity_curves_and_figures(store, tmp_path):
    grid = probe_store(store, "memento", SETTINGS, progress=False)
    curves = sensitivity_curves(store, "memento", SETTINGS, cells=[Cell("memento", 0, 1, SETTINGS.pooling), Cell("memento", 1, 1, SETTINGS.pooling)])
    assert [(c.offset, c.layer) for c in curves] == [(0, 1), (1, 1)]
    for c in curves:
        row = grid.cell(Cell("memento", c.offset, c.layer, c.pooling), "linear")
        assert c.l2 == list(GRID) and c.chosen == row.l2
        np.testing.assert_allclose(c.inner_accuracy, row.l2_inner_accuracy, atol=1e-9)
        assert row.accuracy == pytest.approx(c.accuracy[GRID.index(row.l2)], abs=0.01)
        assert all(lo <= a <= hi for a, lo, hi in zip(c.accuracy, c.ci_low, c.ci_high))
    with pytest.raises(ValueError, match="not in store"):
        sensitivity_curves(store, "memento", SETTINGS, cells=[Cell("memento", 5, 0, SETTINGS.pooling)])
    for fig in (l2_sensitivity(curves), l2_selection(grid.rows)):
        assert fig is not None and fig._suptitle.get_text()
        assert any(ax.get_xscale() == "log" for ax in fig.axes)
    assert l2_sensitivity([]) is None


# ----------------------------------------------------------------- config


def test_config_grid_defaults_and_fixed_strength():
    probe = parse_config({}).probe
    assert probe.linear_l2_grid == DEFAULT_LINEAR_L2_GRID == ProbeConfig().linear_l2_grid
    assert probe.inner_fraction == ProbeConfig().inner_fraction and probe.mlp_l2_grid is None
    assert parse_config({"probe": {"linear": {"l2": 0.01}}}).probe.linear_l2_grid == (0.01,)
    assert parse_config({"probe": {"linear_l2_grid": [0.1, 0.001]}}).probe.linear_l2_grid == (0.1, 0.001)
    both = parse_config({"probe": {"linear": {"l2": 0.01}, "linear_l2_grid": [0.1, 1.0]}})
    assert both.probe.linear_l2_grid == (0.1, 1.0)  # the grid rules
    resolved = parse_config({"probe": {"linear": {"l2": 0.01}}})
    assert parse_config(resolved.to_dict()) == resolved  # a resolved config.json reads back the same
    for bad, field in (({"linear_l2_grid": []}, "probe.linear_l2_grid"),
                       ({"linear_l2_grid": [0.0]}, "probe.linear_l2_grid.0"),
                       ({"inner_fraction": 1.0}, "probe.inner_fraction")):
        with pytest.raises(ConfigError, match=field):
            parse_config({"probe": bad})
