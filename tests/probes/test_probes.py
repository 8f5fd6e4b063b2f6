"""Batched probes: agreement with scikit-learn, linear/MLP gap, standardisation, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvprobe.probes import (
    LinearConfig,
    MLPConfig,
    MLPProbes,
    fit_mlp_probes,
    fit_mlp_replicas,
    fit_probes,
    fit_sklearn,
    group_generators,
    label_unique_holdout,
)
from kvprobe.stats import binomial_pvalue, shuffle_labels

SMALL_MLP = MLPConfig(hidden=(64, 64, 32), max_epochs=30, patience=10, lr=3e-3)


def linear_data(seed: int, strengths=(0.0, 0.3, 0.6, 1.2), n_train=1500, n_val=500, dim=16, n_digits=3):
    """Groups of features x = strength_g * sum_k E_k[y_k] + noise: linearly decodable, graded by group."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_digits, 10, dim)) * 3 / np.sqrt(dim)  # (K, C, D)
    s = np.asarray(strengths)[:, None, None]

    def draw(n):
        y = rng.integers(0, 10, (n, n_digits))  # (n, K)
        signal = emb[np.arange(n_digits), y].sum(axis=1)  # (n, D)
        x = s * signal[None] + rng.normal(size=(len(strengths), n, dim)) + 5.0  # (G, n, D), off-centre
        return x.astype(np.float32), y

    return (*draw(n_train), *draw(n_val))


def xor_data(seed: int, n_train=2000, n_val=600, n_digits=2):
    """Each digit's 4 bits are the signs of products of feature pairs: invisible to a linear probe.

    Every feature is a random sign times a magnitude, independent of the labels on
    its own; only the product of a pair's signs carries a bit of the digit. (A
    10-way linear softmax can still carve a convex cell out of one quadrant, so it
    gets slightly above chance, never close to the MLP.)
    """
    rng = np.random.default_rng(seed)
    bits = (np.arange(10)[:, None] >> np.arange(4)) & 1  # (C, 4): binary code of each class

    def draw(n):
        y = rng.integers(0, 10, (n, n_digits))  # (n, K)
        code = 2 * bits[y] - 1  # (n, K, 4) in {-1, +1}
        a = rng.choice([-1, 1], size=code.shape)
        pairs = np.stack([a, a * code], axis=-1)  # (n, K, 4, 2): product of the pair = code bit
        x = pairs * (1 + rng.random(pairs.shape)) + 0.1 * rng.normal(size=pairs.shape)
        return x.reshape(1, n, -1).astype(np.float32), y

    return (*draw(n_train), *draw(n_val))


def chance_bound(n_digits_scored: int) -> float:
    """Four binomial standard deviations of accuracy at chance."""
    return 4 * np.sqrt(0.1 * 0.9 / n_digits_scored)


def test_linear_matches_sklearn_within_one_point():
    xt, yt, xv, yv = linear_data(0)
    ours = fit_probes(xt, yt, xv, yv, "linear", l2=1e-3)
    ref = fit_sklearn(xt, yt, xv, yv, l2=1e-3)
    assert ours.log_probs.shape == ref.log_probs.shape == (4, 500, 3, 10)
    assert np.abs(ours.accuracy - ref.accuracy).max() <= 0.01
    assert np.abs(ours.digit_accuracy - ref.digit_accuracy).max() <= 0.01
    assert ours.converged.all()
    # graded signal: chance, then rising with strength, the strongest well above chance
    assert abs(ours.accuracy[0] - 0.1) < chance_bound(500 * 3)
    assert np.all(np.diff(ours.accuracy) > 0.05) and ours.accuracy[3] > 0.6


def test_linear_solution_matches_sklearn_weights_at_tight_tolerance():
    xt, yt, xv, yv = linear_data(1, strengths=(0.4, 1.0), n_train=800, dim=8, n_digits=2)
    ours = fit_probes(xt, yt, xv, yv, config=LinearConfig(l2=1e-2, tol=1e-6))
    ref = fit_sklearn(xt, yt, xv, yv, l2=1e-2, tol=1e-6)
    # |w - w*| <= |grad| / l2 for an l2-strongly convex objective: 1e-6 / 1e-2 per coordinate bound, loosely
    np.testing.assert_allclose(ours.probe.weight.detach().numpy(), ref.probe.weight.detach().numpy(), atol=2e-3)
    np.testing.assert_allclose(ours.log_probs, ref.log_probs, rtol=2e-3, atol=2e-3)


def test_linear_on_pure_noise_is_at_chance():
    xt, yt, xv, yv = linear_data(2, strengths=(0.0, 0.0), n_val=800)
    fit = fit_probes(xt, yt, xv, yv)
    assert np.all(np.abs(fit.accuracy - 0.1) < chance_bound(800 * 3))
    assert np.all(binomial_pvalue(fit.log_probs, fit.y_val) > 1e-3)


def test_groups_are_independent_problems():
    xt, yt, xv, yv = linear_data(3, strengths=(0.2, 1.0, 0.0))
    together = fit_probes(xt, yt, xv, yv)
    for g in range(3):
        alone = fit_probes(xt[g:g + 1], yt, xv[g:g + 1], yv)
        np.testing.assert_allclose(alone.log_probs[0], together.log_probs[g], atol=1e-4)


def test_per_group_labels_equal_shared_labels():
    xt, yt, xv, yv = linear_data(4, strengths=(0.5, 1.0))
    shared = fit_probes(xt, yt, xv, yv)
    stacked = fit_probes(xt, np.stack([yt, yt]), xv, np.stack([yv, yv]))
    np.testing.assert_array_equal(shared.log_probs, stacked.log_probs)
    np.testing.assert_array_equal(shared.predict_log_proba(xv), shared.log_probs)


def test_mlp_decodes_xor_signal_the_linear_probe_cannot():
    xt, yt, xv, yv = xor_data(0)
    linear = fit_probes(xt, yt, xv, yv, "linear")
    mlp = fit_probes(xt, yt, xv, yv, "mlp", config=SMALL_MLP, seed=0)
    assert linear.accuracy[0] < 0.2
    assert mlp.accuracy[0] > 0.8
    assert mlp.log_probs.shape == (1, 600, 2, 10)


def test_standardisation_uses_training_statistics_only():
    xt, yt, xv, yv = linear_data(5, strengths=(1.0,))
    fit = fit_probes(xt, yt, xv, yv)
    np.testing.assert_allclose(fit.standardizer.mean.numpy(), xt.mean(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(fit.standardizer.std.numpy(), xt.std(axis=1, keepdims=True), rtol=1e-4)
    # a validation split with a shifted mean stays shifted: were it z-scored with its own
    # statistics the shift would vanish and the predictions would not move
    shifted = fit_probes(xt, yt, xv + 2.0, yv)
    np.testing.assert_array_equal(shifted.standardizer.mean.numpy(), fit.standardizer.mean.numpy())
    assert np.abs(shifted.log_probs - fit.log_probs).max() > 0.5
    assert shifted.accuracy[0] < fit.accuracy[0] - 0.1


def test_mlp_is_deterministic_given_seed():
    xt, yt, xv, yv = linear_data(6, strengths=(0.5, 1.0), n_train=600, n_val=200)
    cfg = MLPConfig(hidden=(32, 16), max_epochs=4, patience=2)
    a = fit_probes(xt, yt, xv, yv, "mlp", config=cfg, seed=7)
    b = fit_probes(xt, yt, xv, yv, "mlp", config=cfg, seed=7)
    c = fit_probes(xt, yt, xv, yv, "mlp", config=cfg, seed=8)
    np.testing.assert_array_equal(a.log_probs, b.log_probs)
    assert not np.array_equal(a.log_probs, c.log_probs)
    lin_a, lin_b = fit_probes(xt, yt, xv, yv), fit_probes(xt, yt, xv, yv)
    np.testing.assert_array_equal(lin_a.log_probs, lin_b.log_probs)


def test_mlp_replicas_are_the_separate_runs():
    """Seeds and a shuffled-label control trained in one batched run give what each run alone gives:
    the same initialisation, holdout, minibatch order and early stopping, replica by replica."""
    xt, yt, xv, yv = linear_data(6, strengths=(0.5, 1.0), n_train=600, n_val=200)
    cfg = MLPConfig(hidden=(32, 16), max_epochs=6, patience=2)
    shuffled = shuffle_labels(yt, seed=3)
    label_sets, seeds = [yt, yt, shuffled], [7, 8, 7]
    epochs = []
    together = fit_mlp_replicas(xt, label_sets, xv, yv, seeds, config=cfg, on_epoch=lambda e, m: epochs.append((e, m)))
    assert epochs[0] == (1, 6) and len(epochs) >= 3
    for fit, y, seed in zip(together, label_sets, seeds):
        alone = fit_probes(xt, y, xv, yv, "mlp", config=cfg, seed=seed)
        np.testing.assert_allclose(fit.log_probs, alone.log_probs, atol=1e-4)
        np.testing.assert_array_equal(fit.n_steps, alone.n_steps)
        assert fit.seed == seed and fit.log_probs.shape == (2, 200, 3, 10)
    assert not np.allclose(together[0].log_probs, together[1].log_probs)  # seeds differ
    with pytest.raises(ValueError, match="one seed per label set"):
        fit_mlp_replicas(xt, [yt, yt], xv, yv, [0], config=cfg)
    with pytest.raises(ValueError, match="takes an MLPConfig, got LinearConfig"):
        fit_mlp_replicas(xt, [yt], xv, yv, [0], config=LinearConfig())
    with pytest.raises(ValueError, match=r"y_trains\[1\] has labels outside 0..9"):
        fit_mlp_replicas(xt, [yt, yt + 10], xv, yv, [0, 1], config=cfg)
    with pytest.raises(ValueError, match=r"y_trains\[1\] has 2 digits but y_val has 3"):
        fit_mlp_replicas(xt, [yt, yt[:, :2]], xv, yv, [0, 1], config=cfg)
    with pytest.raises(ValueError, match=r"y has shape \(2, 2, 600, 3\), expected \(2, 600, K\) or \(3, 2, 600, K\)"):
        fit_mlp_probes(torch.zeros(2, 600, 16), torch.zeros(2, 2, 600, 3, dtype=torch.long), 10, cfg, [0, 1, 2])


def test_mlp_fixed_epochs_without_holdout():
    xt, yt, xv, yv = linear_data(7, strengths=(1.0,), n_train=400, n_val=100)
    fit = fit_probes(xt, yt, xv, yv, "mlp", config=MLPConfig(hidden=(16,), max_epochs=3, holdout_fraction=0.0))
    assert (fit.n_steps == 3).all() and not fit.converged.any()


def test_batched_mlp_trains_as_plain_torch_nn_does():
    """Independent reference: each group of the batched MLP is an nn.Sequential of nn.Linear and ReLU
    trained with torch.optim.Adam (coupled L2 as weight_decay on the weights, none on the biases) on the
    same minibatches, with F.cross_entropy's mean over samples and digits as the loss."""
    xt, yt, xv, yv = linear_data(9, strengths=(0.4, 1.0), n_train=300, n_val=50)
    cfg = MLPConfig(hidden=(24, 16, 8), max_epochs=5, batch_size=64, lr=3e-3, l2=1e-2, holdout_fraction=0.0)
    x = ((torch.from_numpy(xt) - torch.from_numpy(xt).mean(1, keepdim=True))
         / torch.from_numpy(xt).std(1, keepdim=True, correction=0))  # (G, N, D), as fit_probes standardises
    y = torch.from_numpy(yt)  # (N, K)
    batched, _ = fit_mlp_probes(x, y.expand(2, -1, -1), 10, cfg, seed=4)
    # the batched run's draws: each group's initial weights from its own generator, each epoch's order from the seed
    start = MLPProbes.stacked([MLPProbes(1, 16, 3, 10, cfg.hidden, gen) for gen in group_generators(x, [4])[0]])
    gen = torch.Generator().manual_seed(4)
    orders = [torch.randperm(300, generator=gen) for _ in range(cfg.max_epochs)]
    for g in range(2):
        layers = []
        for w, b in zip(start.weights, start.biases):
            linear = torch.nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                linear.weight.copy_(w[g].T)  # nn.Linear stores (out, in)
                linear.bias.copy_(b[g, 0])
            layers += [linear, torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        adam = torch.optim.Adam([{"params": [m.weight for m in net if isinstance(m, torch.nn.Linear)],
                                  "weight_decay": cfg.l2},
                                 {"params": [m.bias for m in net if isinstance(m, torch.nn.Linear)]}], lr=cfg.lr)
        for order in orders:
            for i in range(0, 300, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(net(x[g, idx]).view(-1, 10), y[idx].reshape(-1))
                adam.zero_grad()
                loss.backward()
                adam.step()
        with torch.no_grad():
            ours = batched.select(slice(g, g + 1))(x[g:g + 1])[0]  # (N, K, C)
            torch.testing.assert_close(ours, net(x[g]).view(300, 3, 10), atol=2e-4, rtol=1e-4)


def test_a_groups_mlp_fit_does_not_depend_on_the_other_groups():
    """A cell's probe is the same alone, beside other cells, or in another position of the run:
    its initial weights and holdout come from its own features and the seed, not from its companions."""
    xt, yt, xv, yv = linear_data(11, strengths=(0.3, 0.6, 1.0), n_train=400, n_val=50)
    x = torch.from_numpy(xt)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, correction=0)  # (3, N, D)
    y = torch.from_numpy(yt).expand(3, -1, -1)  # (3, N, K)
    cfg = MLPConfig(hidden=(16, 8), max_epochs=6, patience=2, batch_size=64, holdout_fraction=0.2)
    alone, alone_info = fit_mlp_probes(x[1:2], y[1:2], 10, cfg, seed=3)
    for order in ([0, 1, 2], [2, 0, 1]):
        run, info = fit_mlp_probes(x[order], y[order], 10, cfg, seed=[3, 5])
        at = order.index(1)
        for w_alone, w_run in zip(alone.weights, run.weights):
            torch.testing.assert_close(w_run[at:at + 1], w_alone, atol=1e-5, rtol=1e-4)
        assert info.best_epoch[at] == alone_info.best_epoch[0]
        torch.testing.assert_close(info.holdout_loss[at:at + 1], alone_info.holdout_loss, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(run.weights[0][at], run.weights[0][3 + at])  # the second seed draws afresh
    other_seed, _ = fit_mlp_probes(x[1:2], y[1:2], 10, cfg, seed=4)
    assert not torch.allclose(other_seed.weights[0], alone.weights[0])
    gens = group_generators(x, [3])[0]
    assert torch.rand(1, generator=gens[0]) != torch.rand(1, generator=gens[1])  # groups differ from each other


def test_mlp_default_architecture_is_the_papers():
    model = MLPProbes(2, 40, 5, 10, MLPConfig().hidden, torch.Generator().manual_seed(0))
    assert [tuple(w.shape) for w in model.weights] == [(2, 40, 512), (2, 512, 256), (2, 256, 128), (2, 128, 50)]
    assert model(torch.zeros(2, 3, 40)).shape == (2, 3, 5, 10)


def test_early_stopping_holdout_is_label_unique():
    rng = np.random.default_rng(0)
    y = torch.as_tensor(rng.integers(0, 3, (2, 400, 2)))  # 9 passcodes, many repeats
    held = label_unique_holdout(y, 0.3, torch.Generator().manual_seed(0))
    for g in range(2):
        codes_held = {tuple(r) for r in y[g][held[g]].tolist()}
        codes_fit = {tuple(r) for r in y[g][~held[g]].tolist()}
        assert codes_held and codes_fit and not codes_held & codes_fit
        assert len(codes_held) == round(0.3 * 9)


def test_probe_on_shuffled_labels_is_at_chance():
    xt, yt, xv, yv = linear_data(8, strengths=(1.2,), n_val=800)
    real = fit_probes(xt, yt, xv, yv)
    control = fit_probes(xt, shuffle_labels(yt, seed=0), xv, yv)
    assert real.accuracy[0] > 0.6
    assert abs(control.accuracy[0] - 0.1) < chance_bound(800 * 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "X_val": a["X_val"][:, :, :-1]}, "X_val has shape"),
        (lambda a: {**a, "y_train": a["y_train"][:-1]}, "y_train has shape"),
        (lambda a: {**a, "y_val": a["y_val"][:, :1]}, "digits"),
        (lambda a: {**a, "X_train": a["X_train"][0]}, r"X_train must have shape \(G, N, D\)"),
        (lambda a: {**a, "y_train": np.where(a["y_train"] == 3, 10, a["y_train"])}, "y_train has labels outside 0..9"),
        (lambda a: {**a, "y_val": a["y_val"] - 1}, "y_val has labels outside"),
        (lambda a: {**a, "y_train": a["y_train"].astype(float)}, "integer labels"),
        (lambda a: {**a, "X_train": np.where(np.arange(16) == 2, np.nan, a["X_train"])}, "X_train contains NaN"),
        (lambda a: {**a, "X_val": np.full_like(a["X_val"], np.inf)}, "X_val contains NaN or infinite"),
        (lambda a: {**a, "kind": "svm"}, "kind must be one of"),
        (lambda a: {**a, "config": MLPConfig()}, "takes a LinearConfig"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(change, message):
    xt, yt, xv, yv = linear_data(9, strengths=(1.0,), n_train=50, n_val=20)
    args = change({"X_train": xt, "y_train": yt, "X_val": xv, "y_val": yv})
    with pytest.raises(ValueError, match=message):
        fit_probes(**args)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        LinearConfig(l2=-1.0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        MLPConfig(holdout_fraction=1.0)
    xt, yt, xv, yv = linear_data(10, strengths=(1.0,), n_train=30, n_val=10)
    yt[:, 0] = np.where(yt[:, 0] == 4, 5, yt[:, 0])
    with pytest.raises(ValueError, match="digit 0 of group 0 has no samples of class 4"):
        fit_sklearn(xt, yt, xv, yv)
