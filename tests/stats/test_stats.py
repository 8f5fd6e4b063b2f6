"""Statistics on probe outputs: metrics, intervals (coverage), binomial test, Holm, controls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from kvprobe.stats import (
    binomial_pvalue,
    bootstrap_ci,
    digit_accuracy,
    holm,
    information_bits,
    mean_accuracy,
    paired_bootstrap_ci,
    per_sample_accuracy,
    per_sample_bits,
    seed_summary,
    selectivity,
    shuffle_labels,
    summarize,
    wilson_interval,
)

C = 10


def log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def predictions(y: np.ndarray, correct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Log-probs (..., M, K, C) whose arg-max is the label exactly where `correct` is True."""
    wrong = (y + rng.integers(1, C, y.shape)) % C
    top = np.where(correct, y, wrong)
    logits = rng.normal(size=y.shape + (C,))
    np.put_along_axis(logits, top[..., None], 10.0, axis=-1)
    return log_softmax(logits)


def test_accuracy_on_a_hand_example():
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, (4, 5))
    correct = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=bool)
    lp = predictions(y, correct, rng)
    np.testing.assert_allclose(per_sample_accuracy(lp, y), [1.0, 0.0, 0.4, 0.4])
    np.testing.assert_allclose(digit_accuracy(lp, y), [0.75, 0.5, 0.5, 0.25, 0.25])
    assert mean_accuracy(lp, y) == pytest.approx(0.45)


def test_bits_are_zero_for_uniform_and_log2c_for_perfect():
    y = np.random.default_rng(1).integers(0, C, (50, 5))
    uniform = np.full((50, 5, C), -np.log(C))
    perfect = np.where(np.arange(C) == y[..., None], 0.0, -np.inf)
    assert information_bits(uniform, y) == pytest.approx(0.0, abs=1e-12)
    assert information_bits(perfect, y) == pytest.approx(np.log2(C))
    np.testing.assert_allclose(information_bits(perfect, y, per_digit=True), np.full(5, np.log2(C)))
    np.testing.assert_allclose(per_sample_bits(uniform, y), 0.0, atol=1e-12)
    # a confident wrong answer costs information: negative bits
    wrong = np.where(np.arange(C) == (y[..., None] + 1) % C, np.log(0.9), np.log(0.1 / 9))
    assert information_bits(wrong, y) < 0


def test_grids_broadcast_labels_over_groups():
    rng = np.random.default_rng(2)
    y = rng.integers(0, C, (30, 5))
    lp = np.stack([predictions(y, rng.random((30, 5)) < p, rng) for p in (0.1, 0.5, 0.9)])  # (3, 30, 5, C)
    assert mean_accuracy(lp, y).shape == (3,)
    assert digit_accuracy(lp, np.broadcast_to(y, (3, 30, 5))).shape == (3, 5)
    s = summarize(lp, y, n_boot=200)
    assert s.accuracy_ci.low.shape == s.bits_ci.high.shape == s.p_holm.shape == (3,)
    assert s.significant.tolist() == [False, True, True]
    assert s.n_samples == 30 and s.chance == 0.1


def test_wilson_matches_scipy_for_integer_counts():
    for k, n in [(0, 20), (3, 20), (37, 100), (100, 100)]:
        ours = wilson_interval(k / n, n)
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert ours.low == pytest.approx(ref.low, abs=1e-12) and ours.high == pytest.approx(ref.high, abs=1e-12)


def test_bootstrap_agrees_with_scipy_percentile_bootstrap():
    x = np.random.default_rng(3).random(300)
    ours = bootstrap_ci(x, n_boot=4000, seed=1)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=1).confidence_interval
    assert ours.estimate == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.005) and ours.high == pytest.approx(ref.high, abs=0.005)


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    # per sample, the 5 digits are right together with a sample-level propensity: correlated digits
    rng = np.random.default_rng(4)
    truth, reps, M = 0.3, 400, 150
    propensity = rng.beta(0.6, 1.4, (reps, M))  # mean 0.3
    per_sample = (rng.random((reps, M, 5)) < propensity[..., None]).mean(axis=-1)  # (reps, M)
    boot = bootstrap_ci(per_sample, n_boot=1000, seed=5)
    wil = wilson_interval(per_sample.mean(axis=-1), M)
    boot_cover = np.mean((boot.low <= truth) & (truth <= boot.high))
    wil_cover = np.mean((wil.low <= truth) & (truth <= wil.high))
    assert 0.90 <= boot_cover <= 0.99
    assert 0.92 <= wil_cover <= 1.0


def test_binomial_pvalue_is_exact_and_valid_under_the_null():
    rng = np.random.default_rng(6)
    y = rng.integers(0, C, (40, 5))
    correct = np.zeros((40, 5), dtype=bool)
    correct.flat[:31] = True  # 31 of 200 digits right
    p = binomial_pvalue(predictions(y, correct, rng), y)
    assert p == pytest.approx(sps.binomtest(31, 200, 0.1, alternative="greater").pvalue, rel=1e-9)
    # null: predictions independent of uniform labels; the test must not reject more than alpha
    reps = 500
    y = rng.integers(0, C, (reps, 60, 5))
    lp = log_softmax(rng.normal(size=(reps, 60, 5, C)))
    assert np.mean(binomial_pvalue(lp, y) <= 0.05) <= 0.07


def test_holm_matches_a_hand_computed_example():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max -> 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm(p.reshape(2, 2)), [[0.03, 0.06], [0.06, 0.02]])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])


def test_paired_interval_uses_the_pairing():
    rng = np.random.default_rng(7)
    shared = rng.random(400)  # sample difficulty both conditions see
    a = shared + 0.05 + 0.02 * rng.normal(size=400)
    b = shared + 0.02 * rng.normal(size=400)
    paired = paired_bootstrap_ci(a, b, seed=0)
    ua, ub = bootstrap_ci(a, seed=1), bootstrap_ci(b, seed=2)
    assert paired.low <= 0.05 <= paired.high
    assert paired.low > 0  # the shared difficulty cancels: the difference is resolved
    assert (paired.high - paired.low) < 0.2 * ((ua.high - ua.low) + (ub.high - ub.low))
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_ci(a, b[:-1])


def test_shuffle_labels_permutes_whole_passcodes_deterministically():
    codes = np.random.default_rng(8).permutation(10**5)[:300].reshape(3, 100)  # distinct passcodes
    y = codes[..., None] // 10 ** np.arange(4, -1, -1) % 10  # (3, 100, 5)
    s1, s2 = shuffle_labels(y, seed=0), shuffle_labels(y, seed=0)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, shuffle_labels(y, seed=1))
    assert not np.array_equal(s1, y)
    # same permutation in every group, rows kept whole
    perm = [int(np.flatnonzero((y[0] == row).all(axis=1))[0]) for row in s1[0]]
    np.testing.assert_array_equal(s1, y[:, perm])
    assert selectivity(0.5, 0.1) == pytest.approx(0.4)


def test_seed_summary():
    s = seed_summary([[0.2, 0.5], [0.4, 0.5], [0.3, 0.5]])
    np.testing.assert_allclose(s.mean, [0.3, 0.5])
    np.testing.assert_allclose(s.std, [0.1, 0.0])
    np.testing.assert_allclose(s.min, [0.2, 0.5])
    np.testing.assert_allclose(s.max, [0.4, 0.5])
    assert s.n_seeds == 3
    assert seed_summary([0.7]).std == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lp, y: mean_accuracy(lp + 1.0, y), "do not normalise"),
        (lambda lp, y: mean_accuracy(lp, y[:, :4]), "labels have shape"),
        (lambda lp, y: mean_accuracy(lp, y + 10), "labels outside 0..9"),
        (lambda lp, y: mean_accuracy(lp, y.astype(float)), "labels must be integers"),
        (lambda lp, y: mean_accuracy(np.where(lp < -3, np.nan, lp), y), "log_probs contains NaN"),
        (lambda lp, y: mean_accuracy(lp[0], y), r"\(\.\.\., M, K, C\)"),
        (lambda lp, y: holm([0.1, 1.5]), "p-values must lie in"),
        (lambda lp, y: wilson_interval(0.5, 10, level=1.0), "level must be in"),
        (lambda lp, y: bootstrap_ci([0.1, np.nan, 0.2]), "per_sample contains NaN"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    rng = np.random.default_rng(9)
    y = rng.integers(0, C, (20, 5))
    lp = log_softmax(rng.normal(size=(20, 5, C)))
    with pytest.raises(ValueError, match=message):
        call(lp, y)
