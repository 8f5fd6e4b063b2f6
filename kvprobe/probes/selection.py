"""Probe strength chosen on held-out training passcodes, not fixed.

A leakage number read off a probe depends on the probe's regularisation: on one toy
the masked +1 accuracy of the linear probe moved from about 19% to 35% as its L2
strength went from 1e-2 to 1e-4, on the same data and split. So the strength is
chosen per cell (per group) from a small grid, on an inner label-unique split of
the *training* passcodes, then the probe is refitted on the whole training split
at the chosen value and scored on the outer validation split, which the choice
never sees:

    fit, sel = fit_selected(X_train, y_train, X_val, y_val, grid=(1e-4, 1e-3, 1e-2, 1e-1))
    sel.chosen            # (G,) the chosen L2 per group
    sel.inner_accuracy    # (G, R) inner-validation accuracy at each grid value
    fit.accuracy          # (G,) outer validation accuracy of the refitted probes

Linear probes walk the grid from the strongest to the weakest value, each fit
warm-started from the previous one (a regularisation path), with all groups and
digits batched in one L-BFGS solve per value; the refit starts from the inner
solution at the chosen value. The MLP's L2 (weight decay) can be chosen the same
way, one batched fit per grid value; its epochs are already chosen by early stopping
on a label-unique holdout. A one-value grid is a fixed strength: `fit_selected`
then makes exactly the plain `fit_probes` call.

The criterion is inner-validation accuracy (mean over digits), ties broken by the
lower inner cross-entropy, then by the stronger regularisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .linear import LinearConfig, LinearProbes
from .mlp import MLPConfig, label_unique_holdout
from .trainer import (
    FeatureMoments,
    ProbeFit,
    Standardizer,
    check_probe_inputs,
    fit_probes,
    linear_in_raw_units,
)

__all__ = [
    "DEFAULT_INNER_FRACTION",
    "DEFAULT_LINEAR_L2_GRID",
    "StrengthSelection",
    "fit_at_strengths",
    "fit_selected",
    "inner_split",
    "normalise_grid",
    "select_strength",
    "shared_moments",
    "strength_path",
]

DEFAULT_LINEAR_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
"""The linear probe's L2 grid (mean-loss scale; scikit-learn C = 1 / (l2 N))."""

DEFAULT_INNER_FRACTION = 0.2
"""Share of the training passcodes held out to choose the strength."""


@dataclass
class StrengthSelection:
    """The choice of strength for G groups.

    grid: values tried, ascending (R,). inner_accuracy, inner_loss: inner-validation
    accuracy and cross-entropy (nats per digit) at each value (G, R); NaN for a
    fixed one-value grid, where nothing is fitted. chosen: the chosen value (G,).
    warm_start: linear probes at the chosen values, on the raw features (the refit's
    starting point: `fit_probes(..., init=warm_start)`).
    """

    grid: np.ndarray
    inner_accuracy: np.ndarray
    inner_loss: np.ndarray
    chosen: np.ndarray
    n_inner_train: int = 0
    n_inner_val: int = 0
    warm_start: LinearProbes | None = None

    @property
    def fixed(self) -> bool:
        return len(self.grid) == 1

    @property
    def chosen_index(self) -> np.ndarray:
        return np.searchsorted(self.grid, self.chosen)


def normalise_grid(grid: Sequence[float] | float) -> tuple[float, ...]:
    """Distinct values, ascending; each must be a finite number >= 0."""
    values = [float(v) for v in np.atleast_1d(np.asarray(grid, dtype=np.float64))]
    if not values:
        raise ValueError("the strength grid is empty")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"strength grid values must be finite and >= 0, got {values}")
    return tuple(sorted(set(values)))


def inner_split(y_train: Any, fraction: float = DEFAULT_INNER_FRACTION, seed: int = 0) -> np.ndarray:
    """Boolean (N,), True for inner validation: about `fraction` of the distinct passcodes, label-unique.

    y_train: labels (N, K), or (G, N, K) when every group has the same labels.
    Callers that hold the passcode strings can use `kvprobe.data.passcodes.label_unique_split` instead.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"inner fraction must be in (0, 1), got {fraction!r}")
    y = torch.as_tensor(np.asarray(y_train))
    if y.dim() == 3:
        if not bool((y == y[:1]).all()):
            raise ValueError("groups have different labels: pass inner_val (one label-unique mask for all groups)")
        y = y[0]
    held = label_unique_holdout(y[None].long(), fraction, torch.Generator().manual_seed(seed))[0].numpy()
    if held.all() or not held.any():
        raise ValueError(f"too few distinct training passcodes ({len(y)} samples) for an inner split of {fraction}")
    return held


def strength_path(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, grid: Sequence[float], *,
    config: LinearConfig | None = None, n_classes: int = 10, device: str | torch.device | None = None,
    moments: FeatureMoments | None = None, on_fit: Callable[[str], None] | None = None,
) -> list[ProbeFit]:
    """Linear probes at every grid value (ascending order out), fitted strongest first, each warm-started
    from the previous solution; every fit is one batched solve over all groups and digits, all sharing
    one preconditioner (`moments`, estimated from X_train if None). on_fit(label) is called after each
    value's fit (progress reporting)."""
    config = config or LinearConfig()
    values = normalise_grid(grid)
    xt, yt, xv, yv = check_probe_inputs(X_train, y_train, X_val, y_val, n_classes, device)  # converted once
    if moments is None and config.precondition:
        moments = FeatureMoments.of(xt, config.gram_rows)
    fits: dict[float, ProbeFit] = {}
    previous: LinearProbes | None = None
    for value in reversed(values):
        fit = fit_probes(xt, yt, xv, yv, "linear", l2=value, config=config, n_classes=n_classes, device=device,
                         init=previous, moments=moments)
        fits[value], previous = fit, linear_in_raw_units(fit.probe, fit.standardizer)
        if on_fit is not None:
            on_fit(f"l2 {value:g}")
    return [fits[v] for v in values]


def _mean_ce(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy (G,) in nats per digit: log_probs (G, M, K, C), y (G, M, K)."""
    picked = np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    return -picked.mean(axis=(1, 2))


def _choose(grid: np.ndarray, accuracy: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Per group: highest accuracy, then lowest loss, then the largest (strongest) value. Returns indices (G,)."""
    out = np.empty(accuracy.shape[0], dtype=np.int64)
    for g in range(accuracy.shape[0]):
        order = sorted(range(len(grid)), key=lambda r: (-accuracy[g, r], loss[g, r], -grid[r]))
        out[g] = order[0]
    return out


def select_strength(
    X_train: Any, y_train: Any, grid: Sequence[float], *, kind: str = "linear",
    inner_val: np.ndarray | None = None, inner_fraction: float = DEFAULT_INNER_FRACTION, seed: int = 0,
    config: LinearConfig | MLPConfig | None = None, n_classes: int = 10, device: str | torch.device | None = None,
    moments: FeatureMoments | None = None, on_fit: Callable[[str], None] | None = None,
) -> StrengthSelection:
    """Choose each group's L2 strength from `grid` on an inner label-unique split of the training data.

    Only X_train / y_train are read: the outer validation split cannot influence the choice.
    inner_val: boolean (N,) mask of the inner validation samples (label-unique); None draws one
    with `inner_split(y_train, inner_fraction, seed)`. seed also seeds the MLP's inner fits.
    moments: the linear solver's preconditioner, shared with the refit (estimated here if None).
    on_fit(label): called after each grid value's inner fit (progress reporting).
    """
    values = np.asarray(normalise_grid(grid))
    xt = torch.as_tensor(X_train) if isinstance(X_train, torch.Tensor) else np.asarray(X_train)
    G = xt.shape[0]
    if len(values) == 1:
        nan = np.full((G, 1), np.nan)
        return StrengthSelection(values, nan, nan.copy(), np.full(G, values[0]))
    mask = inner_split(y_train, inner_fraction, seed) if inner_val is None else np.asarray(inner_val, dtype=bool)
    if mask.shape != (xt.shape[1],) or mask.all() or not mask.any():
        raise ValueError(f"inner_val must be a boolean mask of shape ({xt.shape[1]},) with both sides non-empty")
    tr, va = np.flatnonzero(~mask), np.flatnonzero(mask)
    y = np.asarray(y_train)
    y_tr, y_va = (y[tr], y[va]) if y.ndim == 2 else (y[:, tr], y[:, va])
    x_tr, x_va = xt[:, tr], xt[:, va]
    if kind == "linear":
        fits = strength_path(x_tr, y_tr, x_va, y_va, values, config=config, n_classes=n_classes, device=device,
                             moments=moments, on_fit=on_fit)
    elif kind == "mlp":
        fits = []
        for v in values:
            fits.append(fit_probes(x_tr, y_tr, x_va, y_va, "mlp", l2=float(v), seed=seed, config=config,
                                   n_classes=n_classes, device=device))
            if on_fit is not None:
                on_fit(f"l2 {v:g}")
    else:
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    accuracy = np.stack([f.accuracy for f in fits], axis=1)  # (G, R)
    loss = np.stack([_mean_ce(f.log_probs, f.y_val) for f in fits], axis=1)
    best = _choose(values, accuracy, loss)
    warm = None
    if kind == "linear":
        pick = torch.as_tensor(best)
        weight = torch.stack([f.probe.weight.detach() for f in fits])[pick, torch.arange(G)]
        bias = torch.stack([f.probe.bias.detach() for f in fits])[pick, torch.arange(G)]
        warm = linear_in_raw_units(LinearProbes(weight, bias), fits[0].standardizer)
    return StrengthSelection(values, accuracy, loss, values[best], len(tr), len(va), warm)


class _Routed(nn.Module):
    """Probes fitted on subsets of the groups, answering for all groups in their original order."""

    def __init__(self, parts: Sequence[nn.Module], index: Sequence[np.ndarray]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.index = [torch.as_tensor(i) for i in index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [p(x[i.to(x.device)]) for p, i in zip(self.parts, self.index)]
        out = outs[0].new_empty((x.shape[0], *outs[0].shape[1:]))
        for o, i in zip(outs, self.index):
            out[i.to(x.device)] = o
        return out


def fit_at_strengths(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, l2: Sequence[float], *, kind: str = "linear",
    seed: int = 0, config: LinearConfig | MLPConfig | None = None, n_classes: int = 10,
    device: str | torch.device | None = None, init: LinearProbes | None = None,
    moments: FeatureMoments | None = None,
) -> ProbeFit:
    """Fit each group at its own strength l2 (G,). Linear: one batched solve (optionally warm-started,
    preconditioned from shared `moments`).
    MLP: one batched fit per distinct value over the groups that chose it, reassembled in group order."""
    l2 = np.asarray(l2, dtype=np.float64)
    if kind == "linear":
        return fit_probes(X_train, y_train, X_val, y_val, "linear", l2=l2, seed=seed, config=config,
                          n_classes=n_classes, device=device, init=init, moments=moments)
    values = np.unique(l2)
    if len(values) == 1:
        return fit_probes(X_train, y_train, X_val, y_val, kind, l2=float(values[0]), seed=seed, config=config,
                          n_classes=n_classes, device=device)

    def part(a: Any, idx: np.ndarray) -> Any:
        a = a if isinstance(a, torch.Tensor) else np.asarray(a)
        return a[idx] if a.ndim == 3 else a

    index = [np.flatnonzero(l2 == v) for v in values]
    fits = [fit_probes(part(X_train, i), part(y_train, i), part(X_val, i), part(y_val, i), kind, l2=float(v),
                       seed=seed, config=config, n_classes=n_classes, device=device) for v, i in zip(values, index)]
    order = np.argsort(np.concatenate(index))

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(f, name) for f in fits])[order]

    scaler = Standardizer(mean=torch.cat([f.standardizer.mean for f in fits])[torch.as_tensor(order)],
                          std=torch.cat([f.standardizer.std for f in fits])[torch.as_tensor(order)])
    return ProbeFit(kind=kind, log_probs=cat("log_probs"), y_val=cat("y_val"), digit_accuracy=cat("digit_accuracy"),
                    accuracy=cat("accuracy"), train_accuracy=cat("train_accuracy"), n_steps=cat("n_steps"),
                    converged=cat("converged"), seed=seed, config=fits[0].config,
                    probe=_Routed([f.probe for f in fits], index), standardizer=scaler, l2=l2)


def shared_moments(X_train: Any, kind: str, config: LinearConfig | MLPConfig | None) -> FeatureMoments | None:
    """The preconditioner's moments, estimated once for every linear fit on X_train (None: not needed)."""
    config = config if isinstance(config, LinearConfig) else LinearConfig()
    if kind != "linear" or not config.precondition:
        return None
    return FeatureMoments.of(X_train, config.gram_rows)


def fit_selected(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, grid: Sequence[float] = DEFAULT_LINEAR_L2_GRID, *,
    kind: str = "linear", inner_val: np.ndarray | None = None, inner_fraction: float = DEFAULT_INNER_FRACTION,
    seed: int = 0, config: LinearConfig | MLPConfig | None = None, n_classes: int = 10,
    device: str | torch.device | None = None,
) -> tuple[ProbeFit, StrengthSelection]:
    """Choose the strength per group on an inner split of the training data, refit on the whole
    training split at the chosen value, and score on (X_val, y_val). A one-value grid is exactly
    `fit_probes(..., l2=value)`."""
    values = normalise_grid(grid)
    if len(values) == 1:
        fit = fit_probes(X_train, y_train, X_val, y_val, kind, l2=values[0], seed=seed, config=config,
                         n_classes=n_classes, device=device)
        return fit, select_strength(X_train, y_train, values)
    moments = shared_moments(X_train, kind, config)
    sel = select_strength(X_train, y_train, values, kind=kind, inner_val=inner_val, inner_fraction=inner_fraction,
                          seed=seed, config=config, n_classes=n_classes, device=device, moments=moments)
    fit = fit_at_strengths(X_train, y_train, X_val, y_val, sel.chosen, kind=kind, seed=seed, config=config,
                           n_classes=n_classes, device=device, init=sel.warm_start, moments=moments)
    return fit, sel
