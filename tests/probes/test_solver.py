"""The linear probe's solver: preconditioned L-BFGS against plain L-BFGS and scikit-learn.

KV features are strongly correlated; the test features here are too (a random mixing with
singular values 1..1000 of an otherwise easy problem), which is what makes plain L-BFGS slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvprobe.probes import (
    FeatureMoments,
    LinearConfig,
    Standardizer,
    fit_probes,
    fit_selected,
    fit_sklearn,
)
from kvprobe.probes.linear import LinearProbes, feature_gram, fit_linear_probes, preconditioner


def correlated_data(seed: int, n_train=2000, n_val=600, dim=48, n_digits=2, groups=(0.5, 1.5)):
    """Linearly decodable digits seen through an ill-conditioned mixing of the features."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_digits, 10, dim)) / np.sqrt(dim)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mix = (q * np.logspace(0, 3, dim)).T @ q.T  # singular values 1 .. 1000: condition ~1e6 for the Gram matrix

    def draw(n):
        y = rng.integers(0, 10, (n, n_digits))
        signal = emb[np.arange(n_digits), y].sum(axis=1)  # (n, D)
        x = np.stack([(s * 3 * signal + rng.normal(size=(n, dim))) @ mix + 2.0 for s in groups])
        return x.astype(np.float32), y

    return (*draw(n_train), *draw(n_val))


def test_preconditioned_solution_matches_plain_lbfgs_and_sklearn():
    xt, yt, xv, yv = correlated_data(0)
    tight = dict(l2=1e-3, tol=1e-5, max_iter=5000)
    pre = fit_probes(xt, yt, xv, yv, config=LinearConfig(**tight))
    plain = fit_probes(xt, yt, xv, yv, config=LinearConfig(**tight, precondition=False))
    ref = fit_sklearn(xt, yt, xv, yv, l2=1e-3, tol=1e-6, max_iter=5000)
    assert pre.converged.all() and plain.converged.all()
    # both within |grad| / l2 of the same optimum: log-probabilities agree to about 1%
    np.testing.assert_allclose(pre.log_probs, plain.log_probs, rtol=2e-2, atol=5e-3)
    np.testing.assert_allclose(pre.log_probs, ref.log_probs, rtol=2e-2, atol=5e-3)
    assert np.abs(pre.accuracy - ref.accuracy).max() <= 0.002


def test_preconditioning_cuts_the_iterations_on_correlated_features():
    xt, yt, xv, yv = correlated_data(1)
    config = LinearConfig(l2=1e-3, tol=1e-4, max_iter=3000)
    pre = fit_probes(xt, yt, xv, yv, config=config)
    plain = fit_probes(xt, yt, xv, yv, config=LinearConfig(l2=1e-3, tol=1e-4, max_iter=3000, precondition=False))
    assert pre.converged.all() and plain.converged.all()
    assert pre.n_steps.max() * 2 <= plain.n_steps.max(), (pre.n_steps, plain.n_steps)
    assert np.abs(pre.accuracy - plain.accuracy).max() <= 0.005


def test_moments_give_the_gram_matrix_of_the_standardised_features():
    xt, *_ = correlated_data(2, n_train=500)
    x = torch.from_numpy(xt)
    scaler = Standardizer.fit(x)
    direct = feature_gram(scaler(x))
    shared = FeatureMoments.of(xt).gram(scaler)
    np.testing.assert_allclose(shared.numpy(), direct.numpy(), atol=2e-4)
    assert direct.shape == (2, 49, 49) and torch.allclose(direct[:, -1, -1], torch.ones(2))


def test_a_subsampled_gram_still_converges_to_the_same_optimum():
    xt, yt, xv, yv = correlated_data(3)
    full = fit_probes(xt, yt, xv, yv, config=LinearConfig(tol=1e-5, max_iter=5000))
    sub = fit_probes(xt, yt, xv, yv, config=LinearConfig(tol=1e-5, max_iter=5000, gram_rows=200))
    assert full.converged.all() and sub.converged.all()
    np.testing.assert_allclose(full.log_probs, sub.log_probs, rtol=2e-2, atol=5e-3)


def test_shared_moments_do_not_change_a_selected_fit():
    xt, yt, xv, yv = correlated_data(4)
    config = LinearConfig(tol=1e-5, max_iter=5000)
    fit, sel = fit_selected(xt, yt, xv, yv, grid=(1e-3, 1e-2), config=config)
    alone = fit_probes(xt, yt, xv, yv, l2=sel.chosen, config=config)
    np.testing.assert_allclose(fit.log_probs, alone.log_probs, rtol=2e-2, atol=5e-3)


def test_a_preconditioner_of_the_wrong_shape_is_refused():
    xt, yt, *_ = correlated_data(5, n_train=100)
    x, y = torch.from_numpy(xt), torch.from_numpy(yt)[None].expand(2, -1, -1)
    with pytest.raises(ValueError, match="h0 has shape"):
        fit_linear_probes(x, y, 10, LinearConfig(), h0=torch.eye(5)[None])


def test_shared_factors_are_computed_once_per_strength():
    xt, yt, xv, yv = correlated_data(7, n_train=800)
    moments = FeatureMoments.of(xt)
    scaler = Standardizer.fit(torch.from_numpy(xt))
    a = moments.h0(scaler, [1e-3, 1e-3])
    assert moments.h0(scaler, [1e-3, 1e-3]) is a and len(moments._h0) == 1
    mixed = moments.h0(scaler, [1e-2, 1e-3])
    assert len(moments._h0) == 2 and torch.allclose(mixed[1], a[1], atol=1e-5)
    assert torch.allclose(mixed[0], moments.h0(scaler, [1e-2, 1e-2])[0], atol=1e-5)
    other = Standardizer.fit(torch.from_numpy(xt[:, :400]))  # another standardisation starts afresh
    moments.h0(other, [1e-3, 1e-3])
    assert len(moments._h0) == 1
    strong = moments.h0(scaler, [1.0, 1.0])  # well conditioned: check it is (1/2 gram + l2 I_weights)^-1
    a_matrix = 0.5 * moments.gram(scaler) + torch.diag_embed(torch.tensor([1.0] * 48 + [0.0]).expand(2, -1))
    torch.testing.assert_close(a_matrix @ strong, torch.eye(49).expand(2, -1, -1), atol=1e-3, rtol=0)


def test_constant_features_and_no_penalty_still_factor():
    xt, yt, xv, yv = correlated_data(6, n_train=600, groups=(1.0,))
    xt[:, :, :5], xv[:, :, :5] = 3.0, 3.0  # constant columns: singular Gram without jitter
    fit = fit_probes(xt, yt, xv, yv, config=LinearConfig(l2=0.0, max_iter=200))
    assert np.isfinite(fit.log_probs).all() and fit.accuracy[0] > 0.3


def test_the_preconditioner_does_not_depend_on_the_thread_count():
    """LAPACK's threaded Cholesky/inverse round differently per thread count from D ~ 160 on."""
    torch.manual_seed(0)
    x = torch.randn(5, 600, 300)
    gram = feature_gram(x)
    before = torch.get_num_threads()
    try:
        out = {}
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out[t] = preconditioner(gram, torch.full((5,), 1e-3))
            assert torch.get_num_threads() == t  # restored
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])


@pytest.mark.parametrize("precondition", [True, False])
def test_a_batch_that_starts_converged_returns_its_start(precondition):
    """Every problem already at its optimum (a warm start from its own solution) stops before the first
    step: the start comes back unchanged, with 0 iterations. A batch where only one group starts converged
    leaves that group exactly where it was while the other is solved."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2, 300, 2), generator=gen)  # (G, N, K)
    x = torch.randn(2, 300, 8, generator=gen)  # (G, N, D)
    x[..., :2] += (y - 4.5) / 3  # each digit readable from its own feature
    config = LinearConfig(l2=1e-2, tol=1e-4, max_iter=2000, precondition=precondition)
    solved, info = fit_linear_probes(x, y, 10, config)
    assert info.converged.all() and (info.n_iter > 0).all()

    again, again_info = fit_linear_probes(x, y, 10, config, init=solved)  # every problem converged at once
    assert torch.equal(again.weight, solved.weight) and torch.equal(again.bias, solved.bias)
    assert (again_info.n_iter == 0).all() and again_info.converged.all()
    torch.testing.assert_close(again_info.loss, info.loss, rtol=0, atol=0)

    half = LinearProbes(solved.weight.detach().clone(), solved.bias.detach().clone())
    with torch.no_grad():
        half.weight[1], half.bias[1] = 0.0, 0.0  # group 0 at its optimum, group 1 from zero
    mixed, mixed_info = fit_linear_probes(x, y, 10, config, init=half)
    assert torch.equal(mixed.weight[0], solved.weight[0]) and (mixed_info.n_iter[0] == 0).all()
    assert mixed_info.converged.all() and (mixed_info.n_iter[1] > 0).all()
