"""Statistics for probe results (SPEC section 5), from validation log-probs and labels.

Arrays in, arrays out. Shapes: log_probs (..., M, K, C) and labels (M, K) or
(..., M, K), where M is the number of validation samples (passcodes), K digits
per passcode, C classes, and `...` any grid of groups (layers x offsets x ...).

The unit of resampling is the validation sample, never the digit: the K digits
of a passcode are predicted from one shared feature vector, so their errors are
correlated. Every interval here is therefore computed from per-sample scores
(the fraction of a sample's digits that are right, or its mean information),
resampled over samples.

- accuracy: per digit and mean over digits; chance is 1 / C.
- information: log2(C) - cross-entropy in bits, per digit (0 for a uniform
  predictor, log2(C) for a perfect one, negative for a confidently wrong one).
- intervals: percentile bootstrap over samples, and a Wilson interval with
  n = M on the per-sample mean as a cross-check.
- significance: exact one-sided binomial test of the pooled correct-digit count
  against chance, then Holm's correction across the grid.
- paired differences (memento minus restart, say) on the same validation samples.
- controls: shuffled training labels (selectivity) and summaries over probe seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.special import logsumexp

__all__ = [
    "Interval",
    "ProbeStats",
    "SeedSummary",
    "binomial_pvalue",
    "constrained_pvalue",
    "bootstrap_ci",
    "digit_accuracy",
    "holm",
    "information_bits",
    "mean_accuracy",
    "paired_bootstrap_ci",
    "paired_pvalue",
    "per_sample_accuracy",
    "per_sample_bits",
    "seed_summary",
    "selectivity",
    "shuffle_labels",
    "summarize",
    "wilson_interval",
]


@dataclass
class Interval:
    """A point estimate with a two-sided interval; each field has the grid's shape."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float


# ----------------------------------------------------------------- checking input

def _check(log_probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate log_probs (..., M, K, C) and labels broadcastable to (..., M, K)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(y)
    if lp.ndim < 3:
        raise ValueError(f"log_probs must have shape (..., M, K, C), got {lp.shape}")
    if np.isnan(lp).any():
        raise ValueError("log_probs contains NaN")
    if not np.allclose(logsumexp(lp, axis=-1), 0.0, atol=1e-3):
        raise ValueError("log_probs do not normalise over classes (pass log-probabilities, not logits)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.ndim < 2 or y.shape[-2:] != lp.shape[-3:-1]:
        expected = f"(..., {lp.shape[-3]}, {lp.shape[-2]})"
        raise ValueError(f"labels have shape {y.shape}, expected {expected} to match log_probs {lp.shape}")
    if y.min() < 0 or y.max() >= lp.shape[-1]:
        raise ValueError(f"labels outside 0..{lp.shape[-1] - 1}")
    try:
        y = np.broadcast_to(y, lp.shape[:-1])
    except ValueError:
        raise ValueError(f"labels of shape {y.shape} do not broadcast against log_probs {lp.shape}") from None
    return lp, y


def _correct(lp: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean (..., M, K) from checked arrays: is the arg-max class the label?"""
    return lp.argmax(axis=-1) == y


def _label_log2_prob(lp: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log2 p(label) (..., M, K) from checked arrays; p = 0 counts as float64's tiny (about -1022 bits)."""
    ln_p = np.take_along_axis(lp, y[..., None], axis=-1)[..., 0]
    return np.maximum(ln_p, np.log(np.finfo(np.float64).tiny)) / np.log(2)


# ----------------------------------------------------------------- point metrics

def per_sample_accuracy(log_probs: Any, y: Any) -> np.ndarray:
    """Fraction of each sample's K digits predicted right, (..., M): the resampling unit."""
    return _correct(*_check(log_probs, y)).mean(axis=-1)


def per_sample_bits(log_probs: Any, y: Any) -> np.ndarray:
    """Information per digit for each sample, log2(C) + mean_k log2 p(y_k), (..., M)."""
    lp, y = _check(log_probs, y)
    return np.log2(lp.shape[-1]) + _label_log2_prob(lp, y).mean(axis=-1)


def digit_accuracy(log_probs: Any, y: Any) -> np.ndarray:
    """Validation accuracy of each digit, (..., K)."""
    return _correct(*_check(log_probs, y)).mean(axis=-2)


def mean_accuracy(log_probs: Any, y: Any) -> np.ndarray:
    """Validation accuracy averaged over digits (the paper's number), (...)."""
    return _correct(*_check(log_probs, y)).mean(axis=(-2, -1))


def information_bits(log_probs: Any, y: Any, per_digit: bool = False) -> np.ndarray:
    """log2(C) minus the validation cross-entropy in bits: (...) averaged over digits, or (..., K).

    0 for a uniform predictor, log2(C) for a perfect one. Unlike accuracy, it
    moves when the right class gains probability without becoming the arg-max,
    so it stays informative near chance.
    """
    lp, y = _check(log_probs, y)
    bits = np.log2(lp.shape[-1]) + _label_log2_prob(lp, y).mean(axis=-2)  # (..., K)
    return bits if per_digit else bits.mean(axis=-1)


# ----------------------------------------------------------------- intervals

def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def bootstrap_ci(per_sample: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean over samples (last axis), (...).

    per_sample: scores (..., M), e.g. `per_sample_accuracy` or `per_sample_bits`.
    Each replicate draws M samples with replacement; drawing them as multinomial
    counts lets one (n_boot, M) matrix product resample every grid cell at once,
    with the same resamples for all cells.
    """
    _check_level(level)
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    x = np.asarray(per_sample, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"per_sample must have shape (..., M) with M >= 2, got {x.shape}")
    if np.isnan(x).any():
        raise ValueError("per_sample contains NaN")
    M = x.shape[-1]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(M, np.full(M, 1.0 / M), size=n_boot)  # (B, M)
    means = x @ counts.T / M  # (..., B)
    alpha = 1 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=-1)
    return Interval(estimate=x.mean(axis=-1), low=low, high=high, level=level)


def paired_bootstrap_ci(a: Any, b: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Bootstrap interval of mean(a) - mean(b) for two conditions scored on the same samples.

    a, b: per-sample scores (..., M) of the same validation samples in the same
    order (e.g. memento mode and restart mode). Resampling the per-sample
    differences keeps the pairing, which removes the between-sample variance
    the two conditions share.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n_boot=n_boot, level=level, seed=seed)


def paired_pvalue(a: Any, b: Any) -> float:
    """Two-sided p-value of mean(a - b) = 0 for per-sample scores (M,) of the same samples: a paired
    t-test (the differences of per-passcode accuracies are bounded, so with hundreds of passcodes the
    t approximation is sound). Identical scores give 1."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired scores must be two (M,) arrays with M >= 2, got shape {d.shape}")
    if not d.any():
        return 1.0
    if np.all(d == d[0]):  # a constant non-zero difference: no variance, certainly not zero
        return 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def wilson_interval(p: Any, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a proportion p (any shape) measured on n independent units.

    Used with p = mean per-sample accuracy and n = M samples. A per-sample
    score in [0, 1] has variance at most p(1 - p), so treating it as one
    Bernoulli per sample is conservative: wider than the bootstrap when digits
    err independently, equal when they err together.
    """
    _check_level(level)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = np.asarray(p, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must lie in [0, 1]")
    z = sps.norm.ppf(1 - (1 - level) / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(estimate=p, low=centre - half, high=centre + half, level=level)


# ----------------------------------------------------------------- significance

def binomial_pvalue(log_probs: Any, y: Any) -> np.ndarray:
    """Exact one-sided p-value that accuracy exceeds chance (1 / C), pooled over digits, (...).

    Counts correct digits k out of n = M * K and returns P(Binomial(n, 1/C) >= k).
    Pooling digits of one sample is valid under the null, even though they share
    a feature vector: the null says features carry nothing about labels, so each
    prediction is a function of data independent of the validation labels, and
    the labels are uniform and mutually independent (digits of a uniform random
    passcode). Whatever the predictions are, each is then right with probability
    exactly 1/C, independently, so k ~ Binomial(n, 1/C). (The label-unique split
    makes validation passcodes avoid training ones, a negligible dependence for
    a 10^5 code space.) Under the alternative the digits' errors correlate,
    which is why intervals resample samples instead.
    """
    lp, y = _check(log_probs, y)
    correct = _correct(lp, y)
    n_classes = lp.shape[-1]
    k = correct.sum(axis=(-2, -1))
    n = correct.shape[-2] * correct.shape[-1]
    return sps.binom.sf(k - 1, n, 1.0 / n_classes)


def constrained_pvalue(log_probs: Any, y: Any, codes: Any) -> np.ndarray:
    """Exact one-sided p-value that accuracy exceeds what passcodes drawn uniformly from
    `codes` allow without features, (...). codes: (C, K) class indices of the allowed codes.

    Under the null each validation label row is an independent uniform draw from `codes`,
    independent of the predictions. Given sample m's predicted row, its number of
    correct digits then has the exact distribution of matches against every allowed
    code; the total over samples is the convolution of these M distributions, and the
    p-value is its upper tail at the observed total. With `codes` = every code this is
    `binomial_pvalue`; with a digit-sum constraint (digits dependent, chance above 1/C)
    it is the test against the constrained baseline.
    """
    lp, y = _check(log_probs, y)
    codes = np.asarray(codes)
    pred = lp.argmax(axis=-1)  # (..., M, K)
    observed = _correct(lp, y).sum(axis=(-2, -1))  # (...)
    K = pred.shape[-1]
    flat_pred = pred.reshape(-1, *pred.shape[-2:])  # (G, M, K)
    out = np.empty(len(flat_pred))
    for g, rows in enumerate(flat_pred):
        total = np.ones(1)
        for row in rows:  # matches of this prediction against every allowed code: (C,)
            hist = np.bincount((codes == row).sum(axis=1), minlength=K + 1) / len(codes)
            total = np.convolve(total, hist)
        out[g] = total[int(observed.reshape(-1)[g]):].sum()
    return np.minimum(out, 1.0).reshape(observed.shape)


def holm(p_values: Any) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values over all entries of the grid, same shape.

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)).
    Reject where adjusted <= alpha: controls the family-wise error rate.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    flat = p.ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
    out = np.empty_like(flat)
    out[order] = adjusted
    return out.reshape(p.shape)


# ----------------------------------------------------------------- controls

def shuffle_labels(y: Any, seed: int) -> np.ndarray:
    """Training labels with whole passcodes permuted across samples; features stay put.

    y: (N, K) or (G, N, K); the same permutation applies to every group, so the
    control keeps each group's label distribution and digit co-occurrence while
    breaking any link between features and labels (Hewitt & Liang 2019).
    """
    y = np.asarray(y)
    if y.ndim not in (2, 3):
        raise ValueError(f"labels must have shape (N, K) or (G, N, K), got {y.shape}")
    perm = np.random.default_rng(seed).permutation(y.shape[-2])
    return np.take(y, perm, axis=-2)


def selectivity(accuracy: Any, shuffled_accuracy: Any) -> np.ndarray:
    """Accuracy minus the same probe's accuracy after training on shuffled labels."""
    return np.asarray(accuracy, dtype=np.float64) - np.asarray(shuffled_accuracy, dtype=np.float64)


@dataclass
class SeedSummary:
    """Spread of a metric over probe seeds; each field has the grid's shape."""

    mean: np.ndarray
    std: np.ndarray  # sample std (ddof 1); 0 for a single seed
    min: np.ndarray
    max: np.ndarray
    n_seeds: int


def seed_summary(values: Any, axis: int = 0) -> SeedSummary:
    """Mean, std, min and max of a metric across seeds stacked along `axis`."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[axis] < 1:
        raise ValueError(f"values need a non-empty seed axis {axis}, got shape {v.shape}")
    n = v.shape[axis]
    std = v.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(v.mean(axis=axis))
    return SeedSummary(mean=v.mean(axis=axis), std=std, min=v.min(axis=axis), max=v.max(axis=axis), n_seeds=n)


# ----------------------------------------------------------------- one-call summary

@dataclass
class ProbeStats:
    """Everything a leakage table reports for a grid of probes; fields have the grid's shape (...)."""

    accuracy: np.ndarray
    digit_accuracy: np.ndarray  # (..., K)
    accuracy_ci: Interval  # bootstrap over samples
    accuracy_wilson: Interval  # cross-check, n = samples
    bits: np.ndarray  # information per digit
    bits_ci: Interval
    p_value: np.ndarray  # one-sided binomial vs chance
    p_holm: np.ndarray  # Holm-adjusted across the whole grid
    significant: np.ndarray  # p_holm <= alpha
    chance: float
    n_samples: int


def summarize(
    log_probs: Any, y: Any, *, n_boot: int = 2000, level: float = 0.95, alpha: float = 0.05, seed: int = 0
) -> ProbeStats:
    """All the section-5 numbers for a grid: log_probs (..., M, K, C), labels (M, K) or (..., M, K).

    Holm's correction runs over every cell of the grid passed in, so pass the
    whole layer x offset grid of one report at once.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lp, y = _check(log_probs, y)
    correct = _correct(lp, y)  # (..., M, K)
    acc_s = correct.mean(axis=-1)  # (..., M)
    bits_s = np.log2(lp.shape[-1]) + _label_log2_prob(lp, y).mean(axis=-1)  # (..., M)
    p = binomial_pvalue(lp, y)
    p_holm = holm(p)
    M = lp.shape[-3]
    return ProbeStats(
        accuracy=acc_s.mean(axis=-1),
        digit_accuracy=correct.mean(axis=-2),
        accuracy_ci=bootstrap_ci(acc_s, n_boot=n_boot, level=level, seed=seed),
        accuracy_wilson=wilson_interval(acc_s.mean(axis=-1), M, level),
        bits=bits_s.mean(axis=-1),
        bits_ci=bootstrap_ci(bits_s, n_boot=n_boot, level=level, seed=seed),
        p_value=p,
        p_holm=p_holm,
        significant=p_holm <= alpha,
        chance=1.0 / lp.shape[-1],
        n_samples=M,
    )
