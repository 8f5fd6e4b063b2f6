"""Fit a grid of probes in one call: every group x digit, batched in PyTorch.

A "group" is one cell of the capture grid (layer x position site x offset x
pooling); all groups hold features of the same samples. Inputs are arrays only:

    X_train (G, N, D), X_val (G, M, D)   float features (numpy or torch)
    y_train (N, K) or (G, N, K)          integer labels in [0, n_classes)
    y_val   (M, K) or (G, M, K)

Features are standardised per group and feature with the training split's mean
and standard deviation only; the validation split never informs the probe.
`fit_sklearn` fits the same linear probes one at a time with scikit-learn's
`LogisticRegression`, as the reference the batched solver is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..grid import FAMILIES, LINEAR, MLP
from .linear import LinearConfig, LinearProbes, fit_linear_probes, gram_rows, preconditioner
from .mlp import EpochCallback, MLPConfig, fit_mlp_probes

__all__ = ["FeatureMoments", "ProbeFit", "Standardizer", "check_probe_inputs", "fit_mlp_replicas", "fit_probes",
           "fit_sklearn", "linear_in_raw_units", "still_improving_at_limit"]


@dataclass
class Standardizer:
    """Per-group, per-feature z-scoring with training statistics: mean, std (G, 1, D)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Standardizer":
        """Statistics of training features x (G, N, D); constant features get std 1."""
        std, mean = torch.std_mean(x, dim=1, keepdim=True, correction=0)
        std = torch.where(std > 1e-6 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
        return cls(mean=mean, std=std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised copy of x (G, B, D)."""
        return (x - self.mean) / self.std


@dataclass
class FeatureMoments:
    """Mean (G, D) and covariance (G, D, D) of raw training features, estimated once and shared by
    every linear fit on the same features (a strength path, the refit at the chosen strength, the
    shuffled-label control): the linear solver's preconditioner is built from them."""

    mean: torch.Tensor
    cov: torch.Tensor
    _basis: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # the scaler of _gram
    _gram: torch.Tensor | None = field(default=None, repr=False)
    _h0: dict[tuple[float, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, x: Any, max_rows: int = LinearConfig.gram_rows) -> "FeatureMoments":
        """Moments of features x (G, N, D), numpy or torch, over at most `max_rows` evenly spaced rows."""
        sub = torch.as_tensor(x[:, gram_rows(x.shape[1], max_rows)]).to(torch.float32)  # (G, n, D)
        mean = sub.mean(dim=1)
        centred = sub - mean[:, None]
        return cls(mean=mean, cov=torch.bmm(centred.transpose(1, 2), centred) / sub.shape[1])

    def gram(self, scaler: "Standardizer") -> torch.Tensor:
        """E[z1 z1'] (G, D+1, D+1) of z1 = [scaler(x), 1]: what `preconditioner` takes."""
        mean, std = scaler.mean[:, 0].to(self.mean.device), scaler.std[:, 0].to(self.mean.device)  # (G, D)
        e = (self.mean - mean) / std  # E[z]
        G, D = e.shape
        out = torch.empty(G, D + 1, D + 1, dtype=self.cov.dtype, device=self.cov.device)
        out[:, :D, :D] = self.cov / (std[:, :, None] * std[:, None, :]) + e[:, :, None] * e[:, None, :]
        out[:, :D, D], out[:, D, :D], out[:, D, D] = e, e, 1.0
        return out.to(scaler.mean.device)

    def h0(self, scaler: "Standardizer", l2: Any) -> torch.Tensor:
        """The solver's preconditioner (G, D+1, D+1) for strengths l2 (G,), one per group.

        Each set of strengths is factored once per standardisation and kept: the fits of a strength path
        (one inner-split standardisation) share them, and so do the refit at the chosen values and
        the shuffled-label control (the whole training split's). A factor built for another
        standardisation can steer the solver badly (one cell took 171 iterations instead of 11),
        so a new standardisation starts afresh."""
        if self._basis is None or not (torch.equal(self._basis[0], scaler.mean) and
                                       torch.equal(self._basis[1], scaler.std)):
            self._basis, self._gram, self._h0 = (scaler.mean, scaler.std), self.gram(scaler), {}
        values = tuple(float(v) for v in np.asarray(l2, dtype=np.float64).reshape(-1))  # (G,)
        if values not in self._h0:
            self._h0[values] = preconditioner(self._gram, torch.tensor(values, dtype=self._gram.dtype,
                                                                       device=self._gram.device))
        return self._h0[values]


def linear_in_raw_units(probe: LinearProbes, scaler: Standardizer) -> LinearProbes:
    """The same linear probes expressed on unstandardised features: x W_r + b_r = scaler(x) W + b."""
    inv = 1.0 / scaler.std[:, 0]  # (G, D)
    weight = probe.weight.detach() * inv[:, :, None, None]
    bias = probe.bias.detach() - torch.einsum("gd,gdkc->gkc", scaler.mean[:, 0] * inv, probe.weight.detach())
    return LinearProbes(weight, bias)


def _linear_in_scaled_units(probe: LinearProbes, scaler: Standardizer) -> LinearProbes:
    """Inverse of `linear_in_raw_units`: raw-feature probes expressed on scaler(x)."""
    w = probe.weight.detach().to(scaler.std)
    weight = w * scaler.std[:, 0, :, None, None]
    bias = probe.bias.detach().to(scaler.std) + torch.einsum("gd,gdkc->gkc", scaler.mean[:, 0], w)
    return LinearProbes(weight, bias)


@dataclass
class ProbeFit:
    """Probes fitted on one grid, with their validation predictions.

    log_probs: validation log-probabilities (G, M, K, C), float32.
    y_val: validation labels (G, M, K), int64 (broadcast over groups if given as (M, K)).
    digit_accuracy: validation accuracy per group and digit (G, K).
    accuracy: validation accuracy per group, mean over digits (G,).
    train_accuracy: same on the training split (G,), to see overfitting.
    n_steps: L-BFGS iterations (linear) or best epoch (mlp), per problem (G, K).
    converged: gradient tolerance reached (linear) or early stopping triggered (mlp), (G, K).
    probe, standardizer: the fitted module and its input scaling, for `predict_log_proba`.
    l2: the L2 strength each group was fitted with (G,).
    """

    kind: str
    log_probs: np.ndarray
    y_val: np.ndarray
    digit_accuracy: np.ndarray
    accuracy: np.ndarray
    train_accuracy: np.ndarray
    n_steps: np.ndarray
    converged: np.ndarray
    seed: int
    config: Any
    probe: nn.Module
    standardizer: Standardizer
    l2: np.ndarray | None = None

    @torch.no_grad()
    def predict_log_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Log-probabilities (G, B, K, C) of these probes on new features x (G, B, D)."""
        ref = self.standardizer.mean
        x = _as_features(x, "x", ref.device)
        if x.shape[0] != ref.shape[0] or x.shape[2] != ref.shape[2]:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected ({ref.shape[0]}, B, {ref.shape[2]})")
        return torch.log_softmax(self.probe(self.standardizer(x)), dim=-1).cpu().numpy()


def still_improving_at_limit(fit: ProbeFit) -> np.ndarray:
    """(G,) True where an MLP fit with early stopping reached `max_epochs` before its patience ran out
    (more epochs might read more); False for linear probes and for an exact epoch count (no holdout)."""
    config = fit.config
    if not isinstance(config, MLPConfig) or config.holdout_fraction <= 0:
        return np.zeros(len(fit.converged), dtype=bool)
    return ~np.asarray(fit.converged).all(axis=1)  # converged (G, K): the patience ran out


def _as_features(x: Any, name: str, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (G, N, D), got {tuple(x.shape)}")
    # one sum is finite unless an element is NaN or infinite (or the sum overflows: then look closer)
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_labels(y: Any, name: str, n_groups: int, n_samples: int, n_classes: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got dtype {y.dtype}")
    if y.dim() == 2:
        y = y.unsqueeze(0).expand(n_groups, -1, -1)
    if y.dim() != 3 or y.shape[0] != n_groups or y.shape[1] != n_samples:
        expected = f"({n_samples}, K) or ({n_groups}, {n_samples}, K)"
        raise ValueError(f"{name} has shape {tuple(y.shape)}, expected {expected}")
    if y.shape[2] < 1:
        raise ValueError(f"{name} has no digits (K = 0)")
    if bool((y < 0).any() or (y >= n_classes).any()):
        raise ValueError(f"{name} has labels outside 0..{n_classes - 1}")
    return y.to(device=device, dtype=torch.long).contiguous()


def check_probe_inputs(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, n_classes: int = 10, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and convert a probe grid: returns X_train (G, N, D), y_train (G, N, K), X_val, y_val as tensors.

    Raises ValueError naming the first problem (shape mismatch, non-integer or
    out-of-range labels, NaN/inf features).
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    device = torch.device(device or "cpu")
    xt = _as_features(X_train, "X_train", device)
    xv = _as_features(X_val, "X_val", device)
    G, N, D = xt.shape
    if N < 2:
        raise ValueError(f"X_train needs at least 2 samples, got {N}")
    if xv.shape[0] != G or xv.shape[2] != D:
        raise ValueError(f"X_val has shape {tuple(xv.shape)}, expected ({G}, M, {D}) to match X_train")
    if xv.shape[1] < 1:
        raise ValueError("X_val has no samples")
    yt = _as_labels(y_train, "y_train", G, N, n_classes, device)
    yv = _as_labels(y_val, "y_val", G, xv.shape[1], n_classes, device)
    if yt.shape[2] != yv.shape[2]:
        raise ValueError(f"y_train has {yt.shape[2]} digits but y_val has {yv.shape[2]}")
    return xt, yt, xv, yv


def _accuracy(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy (G, K) of log-probs / logits (G, N, K, C) against labels (G, N, K)."""
    return (log_probs.argmax(dim=-1) == y).float().mean(dim=1)


@torch.no_grad()
def _predict(probe: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Log-probabilities (G, N, K, C) in sample chunks (bounds memory for wide MLPs)."""
    parts = [torch.log_softmax(probe(x[:, i:i + chunk]), dim=-1) for i in range(0, x.shape[1], chunk)]
    return torch.cat(parts, dim=1)


def fit_probes(
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    kind: str = LINEAR,
    *,
    l2: float | Any = None,
    seed: int = 0,
    config: LinearConfig | MLPConfig | None = None,
    n_classes: int = 10,
    device: str | torch.device | None = None,
    init: LinearProbes | None = None,
    moments: FeatureMoments | None = None,
) -> ProbeFit:
    """Fit one probe per group and digit, all in one batched computation, and score it on validation.

    X_train (G, N, D), X_val (G, M, D): features, numpy or torch, cast to float32.
    y_train (N, K) | (G, N, K), y_val (M, K) | (G, M, K): integer labels in [0, n_classes).
    kind: "linear" (multinomial logistic regression, L-BFGS, matches scikit-learn)
        or "mlp" (the paper's 512-256-128 MLP, Adam, early stopping).
    l2: L2 strength on weights in the mean-loss objective; overrides config.l2. The
        linear probe also takes one strength per group, an array (G,).
    seed: MLP initialisation, holdout and batch order (linear fits are seed-free).
    device: where to compute ("cpu", "cuda", ...); results come back as numpy.
    init: linear only, probes on the raw (unstandardised) features to warm-start the solver
        from, e.g. `linear_in_raw_units(fit.probe, fit.standardizer)` of an earlier fit; the
        function they compute is carried over exactly, whatever that fit's standardisation.
    moments: linear only, `FeatureMoments.of(X_train)` shared with other fits on the same features
        (the solver's preconditioner; None estimates it from X_train).
    """
    if kind not in FAMILIES:
        raise ValueError(f"kind must be one of {FAMILIES}, got {kind!r}")
    default = LinearConfig() if kind == LINEAR else MLPConfig()
    config = default if config is None else config
    if type(config) is not type(default):
        raise ValueError(f"kind {kind!r} takes a {type(default).__name__}, got {type(config).__name__}")
    per_group = None
    if l2 is not None and np.ndim(l2) > 0:
        if kind != LINEAR:
            raise ValueError("one l2 per group is supported for the linear probe only")
        per_group = np.asarray(l2, dtype=np.float64)
    elif l2 is not None:
        config = replace(config, l2=float(l2))
    if init is not None and kind != LINEAR:
        raise ValueError("init (a warm start) is supported for the linear probe only")
    if kind == MLP:  # one replica
        return fit_mlp_replicas(X_train, [y_train], X_val, y_val, [seed], config=config, n_classes=n_classes,
                                device=device)[0]
    xt, yt, xv, yv = check_probe_inputs(X_train, y_train, X_val, y_val, n_classes, device)
    if per_group is not None and per_group.shape != (xt.shape[0],):
        raise ValueError(f"l2 has shape {per_group.shape}, expected one value per group ({xt.shape[0]},)")
    scaler = Standardizer.fit(xt)
    xt, xv = scaler(xt), scaler(xv)

    l2s = per_group if per_group is not None else np.full(xt.shape[0], config.l2)
    start = None if init is None else _linear_in_scaled_units(init, scaler)
    h0 = moments.h0(scaler, l2s) if moments is not None and config.precondition else None
    probe, info = fit_linear_probes(xt, yt, n_classes, config, l2=per_group, init=start, h0=h0)
    return _scored(kind, probe, scaler, xt, yt, xv, yv, info.n_iter, info.converged, seed, config, l2s)


def _scored(kind: str, probe: nn.Module, scaler: Standardizer, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor,
            yv: torch.Tensor, n_steps: torch.Tensor, converged: torch.Tensor, seed: int, config: Any,
            l2: np.ndarray) -> ProbeFit:
    """A fitted probe scored on the standardised validation (and training) features: xt (G, N, D), yt (G, N, K),
    xv (G, M, D), yv (G, M, K); n_steps and converged (G, K)."""
    log_probs = _predict(probe, xv)  # (G, M, K, C)
    digit_acc = _accuracy(log_probs, yv)
    return ProbeFit(
        kind=kind,
        log_probs=log_probs.cpu().numpy(),
        y_val=yv.cpu().numpy(),
        digit_accuracy=digit_acc.cpu().numpy(),
        accuracy=digit_acc.mean(dim=1).cpu().numpy(),
        train_accuracy=_accuracy(_predict(probe, xt), yt).mean(dim=1).cpu().numpy(),
        n_steps=n_steps.cpu().numpy(),
        converged=converged.cpu().numpy(),
        seed=seed,
        config=config,
        probe=probe,
        standardizer=scaler,
        l2=l2,
    )


def fit_mlp_replicas(
    X_train: Any, y_trains: Sequence[Any], X_val: Any, y_val: Any, seeds: Sequence[int], *,
    l2: float | None = None, config: MLPConfig | None = None, n_classes: int = 10,
    device: str | torch.device | None = None, on_epoch: EpochCallback | None = None,
) -> list[ProbeFit]:
    """MLP probes for several (training labels, seed) replicas on the same features, trained in one
    batched run: replica r is what `fit_probes(X_train, y_trains[r], X_val, y_val, "mlp", seed=seeds[r])`
    gives, to float rounding (`fit_mlp_probes` explains why). Typical use: the seeds of a cell and its
    shuffled-label control, `fit_mlp_replicas(X, [y, y, y, shuffled], Xv, yv, [0, 1, 2, 0])`.

    X_train (G, N, D), X_val (G, M, D); each of y_trains (N, K) or (G, N, K); y_val (M, K) or (G, M, K).
    on_epoch(epoch, max_epochs): called after each epoch of the shared run.
    Returns one ProbeFit per replica, in order.
    """
    config = config or MLPConfig()
    if type(config) is not MLPConfig:
        raise ValueError(f"fit_mlp_replicas takes an MLPConfig, got {type(config).__name__}")
    if l2 is not None:
        config = replace(config, l2=float(l2))
    if len(y_trains) != len(seeds) or not seeds:
        raise ValueError(f"{len(y_trains)} label sets for {len(seeds)} seeds: give one seed per label set")
    xt, first, xv, yv = check_probe_inputs(X_train, y_trains[0], X_val, y_val, n_classes, device)
    G, N, _ = xt.shape
    label_sets = [first]
    for r, y in enumerate(y_trains[1:], start=1):
        label_sets.append(_as_labels(y, f"y_trains[{r}]", G, N, n_classes, xt.device))
        if label_sets[-1].shape[2] != yv.shape[2]:
            raise ValueError(f"y_trains[{r}] has {label_sets[-1].shape[2]} digits but y_val has {yv.shape[2]}")
    ys = torch.stack(label_sets)  # (R, G, N, K)
    scaler = Standardizer.fit(xt)
    xt, xv = scaler(xt), scaler(xv)
    probe, info = fit_mlp_probes(xt, ys, n_classes, config, list(seeds), on_epoch=on_epoch)
    K = ys.shape[3]
    fits = []
    for r, seed in enumerate(seeds):
        part = slice(r * G, (r + 1) * G)
        fits.append(_scored(MLP, probe.select(part), scaler, xt, ys[r], xv, yv,
                            info.best_epoch[part, None].expand(-1, K), info.stopped_early[part, None].expand(-1, K),
                            int(seed), config, np.full(G, config.l2)))
    return fits


def fit_sklearn(
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    *,
    l2: float = LinearConfig.l2,
    max_iter: int = 1000,
    tol: float = LinearConfig.tol,
    n_classes: int = 10,
) -> ProbeFit:
    """The reference: the same linear probe grid, one `sklearn.linear_model.LogisticRegression` at a time.

    Same inputs, standardisation and objective as `fit_probes(kind="linear")`;
    C = 1 / (l2 * N). Slow by design (G * K separate fits). Needs every class
    present in each digit's training labels (scikit-learn drops absent classes).
    """
    from sklearn.linear_model import LogisticRegression

    if not l2 > 0:
        raise ValueError(f"fit_sklearn needs l2 > 0, got {l2!r}")
    xt, yt, xv, yv = check_probe_inputs(X_train, y_train, X_val, y_val, n_classes)
    scaler = Standardizer.fit(xt)
    xt_np, xv_np = scaler(xt).numpy(), scaler(xv).numpy()
    yt_np, yv_np = yt.numpy(), yv.numpy()
    G, N, D = xt_np.shape
    K, M = yt_np.shape[2], xv_np.shape[1]

    log_probs = np.empty((G, M, K, n_classes), dtype=np.float32)
    train_pred = np.empty((G, N, K), dtype=np.int64)
    weight = np.empty((G, D, K, n_classes), dtype=np.float32)
    bias = np.empty((G, K, n_classes), dtype=np.float32)
    n_steps = np.empty((G, K), dtype=np.int64)
    for g in range(G):
        for k in range(K):
            present = np.unique(yt_np[g, :, k])
            if len(present) != n_classes:
                missing = sorted(set(range(n_classes)) - set(present.tolist()))
                raise ValueError(f"fit_sklearn: y_train digit {k} of group {g} has no samples of class {missing[0]}")
            clf = LogisticRegression(C=1.0 / (l2 * N), max_iter=max_iter, tol=tol)
            clf.fit(xt_np[g], yt_np[g, :, k])
            log_probs[g, :, k] = clf.predict_log_proba(xv_np[g])
            train_pred[g, :, k] = clf.predict(xt_np[g])
            weight[g, :, k] = clf.coef_.T
            bias[g, k] = clf.intercept_
            n_steps[g, k] = clf.n_iter_[0]

    digit_acc = (log_probs.argmax(axis=-1) == yv_np).mean(axis=1)
    return ProbeFit(
        kind="sklearn",
        log_probs=log_probs,
        y_val=yv_np,
        digit_accuracy=digit_acc,
        accuracy=digit_acc.mean(axis=1),
        train_accuracy=(train_pred == yt_np).mean(axis=(1, 2)),
        n_steps=n_steps,
        converged=n_steps < max_iter,
        seed=0,
        config=LinearConfig(l2=l2, max_iter=max_iter, tol=tol),
        probe=LinearProbes(torch.from_numpy(weight), torch.from_numpy(bias)),
        standardizer=scaler,
    )
