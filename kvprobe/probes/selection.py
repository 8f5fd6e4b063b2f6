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

A grid's edge never caps the choice silently: where a group's best value is the weakest
(or strongest) it tried, or scores the same as it (a tie the inner split cannot break),
that group alone is fitted one decade further in that direction, warm-started from its
edge solution, until its best is interior and beats both edges, or a hard bound of
`L2_BOUNDS` is reached. The values each group tried are on its row of `inner_accuracy`
(NaN where it did not try one), and `at_bound` flags a choice that still sits on an edge
it could not pass (a hard bound, or `extend=False`). Without the extension the shipped
toy's masked +1 read 27.6% at the old grid's floor of 1e-4; the inner split preferred
weaker values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..grid import LINEAR, MLP
from .config import DEFAULT_INNER_FRACTION, DEFAULT_LINEAR_L2_GRID, normalise_grid  # torch-free, re-exported
from .linear import LinearConfig, LinearProbes
from .mlp import MLPConfig, label_unique_holdout
from .trainer import (
    FeatureMoments,
    ProbeFit,
    Standardizer,
    check_probe_inputs,
    fit_probes,
    linear_in_raw_units,
    still_improving_at_limit,
)

__all__ = [
    "DEFAULT_INNER_FRACTION",
    "DEFAULT_LINEAR_L2_GRID",
    "L2_BOUNDS",
    "StrengthSelection",
    "fit_at_strengths",
    "fit_selected",
    "inner_split",
    "normalise_grid",
    "select_strength",
    "shared_moments",
    "strength_path",
]

L2_BOUNDS: tuple[float, float] = (1e-6, 10.0)
"""How far a grid is extended, by decades, when a group's best strength is on its edge. At 1e-6 a probe
is unregularised by any usual standard (scikit-learn's C = 1 / (l2 N) >= 100 for N <= 10,000) and each
further decade costs more L-BFGS iterations than every strength above it together (the solver's
tolerance follows l2: `LinearConfig.tol_follows_l2`); at 10 the weights are negligible against the
bias (a constant predictor). A choice at either bound is flagged (`at_bound`)."""


@dataclass
class StrengthSelection:
    """The choice of strength for G groups.

    grid: every value some group tried, ascending (R,): the requested grid plus its extensions.
    inner_accuracy, inner_loss: inner-validation accuracy and cross-entropy (nats per digit)
    at each value (G, R); NaN where a group did not try a value, and everywhere for a fixed
    one-value grid, where nothing is fitted. chosen: the chosen value (G,). at_bound: (G,)
    True where the chosen value is on an edge of the values its group tried that the
    extension could not pass. warm_start: linear probes at the chosen values, on the raw
    features (the refit's starting point: `fit_probes(..., init=warm_start)`). inner_at_cap: (G,)
    True where an MLP inner fit of the group, at any value it tried, reached `max_epochs` with its
    early stopping's patience not run out (a comparison of strengths whose fits were cut short).
    """

    grid: np.ndarray
    inner_accuracy: np.ndarray
    inner_loss: np.ndarray
    chosen: np.ndarray
    n_inner_train: int = 0
    n_inner_val: int = 0
    warm_start: LinearProbes | None = None
    at_bound: np.ndarray | None = None
    inner_at_cap: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.at_bound is None:
            self.at_bound = np.zeros(len(self.chosen), dtype=bool)
        if self.inner_at_cap is None:
            self.inner_at_cap = np.zeros(len(self.chosen), dtype=bool)

    @property
    def fixed(self) -> bool:
        return len(self.grid) == 1

    @property
    def chosen_index(self) -> np.ndarray:
        return np.searchsorted(self.grid, self.chosen)

    def tried(self, g: int) -> np.ndarray:
        """The values group g tried (ascending); its inner accuracies are `inner_accuracy[g, tried]`."""
        return self.grid if self.fixed else self.grid[~np.isnan(self.inner_accuracy[g])]


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
        fit = fit_probes(xt, yt, xv, yv, LINEAR, l2=value, config=config, n_classes=n_classes, device=device,
                         init=previous, moments=moments)
        fits[value], previous = fit, linear_in_raw_units(fit.probe, fit.standardizer)
        if on_fit is not None:
            on_fit(f"l2 {value:g}")
    return [fits[v] for v in values]


def _mean_ce(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy (G,) in nats per digit: log_probs (G, M, K, C), y (G, M, K)."""
    picked = np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    return -picked.mean(axis=(1, 2))


CRITERIA = ("accuracy", "loss")


def _choose(grid: np.ndarray, accuracy: np.ndarray, loss: np.ndarray, criterion: str = "accuracy") -> np.ndarray:
    """Per group, among the values it tried (accuracy not NaN): highest accuracy, then lowest loss, then
    the largest (strongest) value; with criterion "loss", lowest loss, then the strongest. Returns indices (G,)."""
    out = np.empty(accuracy.shape[0], dtype=np.int64)
    for g in range(accuracy.shape[0]):
        tried = [r for r in range(len(grid)) if not np.isnan(accuracy[g, r])]
        if criterion == "loss":
            out[g] = min(tried, key=lambda r: (loss[g, r], -grid[r]))
        else:
            out[g] = min(tried, key=lambda r: (-accuracy[g, r], loss[g, r], -grid[r]))
    return out


LOSS_TIE_RTOL = 1e-6
"""Inner losses this close (relative) are one value to criterion "loss": float32 rounding of the same probe."""


def _ties_best(accuracy: np.ndarray, loss: np.ndarray, best: np.ndarray, edge: np.ndarray,
               criterion: str = "accuracy") -> np.ndarray:
    """(G,) True where the value at column `edge` scores the same as the chosen column `best` (G,) on the
    criterion: the same inner accuracy, or with "loss" an inner loss within LOSS_TIE_RTOL. The inner split
    cannot tell the two apart, so the grid's edge has not been shown to lie past the best value.

    The case this catches: a weak value's warm-started linear fit that stopped where it started (its
    gradient tolerance, 10 l2, already met by the stronger value's solution where every weight is
    small) is the stronger value's probe again; its tie with that value was broken by float rounding
    of the inner loss, so whether weaker values were ever tried depended on rounding, not on data."""
    g = np.arange(len(best))
    if criterion == "loss":
        return np.abs(loss[g, edge] - loss[g, best]) <= LOSS_TIE_RTOL * np.abs(loss[g, best])
    return accuracy[g, edge] == accuracy[g, best]


def _decade(value: float, direction: int) -> float:
    """One decade weaker (direction -1) or stronger (+1), rounded so repeated steps stay on 1e-k."""
    return float(f"{value * 10.0 ** direction:.12g}")


class _InnerPath:
    """Inner-split fits at any value for any subset of the groups, kept as full (G,) columns.

    accuracy[v], loss[v]: (G,), NaN for groups not fitted at v. raw[v]: linear probes at v on the
    raw features (G, ...), zero for groups not fitted (a linear path's warm starts and the refit's).
    """

    def __init__(self, kind: str, x_tr: Any, y_tr: np.ndarray, x_va: Any, y_va: np.ndarray, *, config: Any,
                 n_classes: int, device: Any, moments: FeatureMoments | None, seed: int,
                 on_fit: Callable[..., None] | None, criterion: str = "accuracy"):
        self.kind, self.x_tr, self.y_tr, self.x_va, self.y_va = kind, x_tr, y_tr, x_va, y_va
        self.config, self.n_classes, self.device, self.moments, self.seed = config, n_classes, device, moments, seed
        self.on_fit, self.G, self.criterion = on_fit, x_tr.shape[0], criterion
        self.accuracy: dict[float, np.ndarray] = {}
        self.loss: dict[float, np.ndarray] = {}
        self.raw: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # weight (G, D, K, C), bias (G, K, C)
        self.at_cap = np.zeros(self.G, dtype=bool)  # an MLP fit still improving at its epoch limit

    def _store(self, value: float, groups: np.ndarray, fit: ProbeFit) -> None:
        acc = self.accuracy.setdefault(value, np.full(self.G, np.nan))
        loss = self.loss.setdefault(value, np.full(self.G, np.nan))
        acc[groups], loss[groups] = fit.accuracy, _mean_ce(fit.log_probs, fit.y_val)
        self.at_cap[groups] |= still_improving_at_limit(fit)
        if self.kind == LINEAR:
            probe = linear_in_raw_units(fit.probe, fit.standardizer)
            w, b = probe.weight.detach(), probe.bias.detach()
            if value not in self.raw:
                self.raw[value] = (w.new_zeros((self.G, *w.shape[1:])), b.new_zeros((self.G, *b.shape[1:])))
            index = torch.as_tensor(groups, device=w.device)
            self.raw[value][0][index], self.raw[value][1][index] = w, b

    def base(self, values: Sequence[float]) -> None:
        """Every group at every value of the requested grid (a linear path: one warm-started solve per value)."""
        every = np.arange(self.G)
        if self.kind == LINEAR:
            path = strength_path(self.x_tr, self.y_tr, self.x_va, self.y_va, values, config=self.config,
                                 n_classes=self.n_classes, device=self.device, moments=self.moments,
                                 on_fit=self.on_fit)
            for value, fit in zip(values, path):
                self._store(value, every, fit)
        else:
            for value in values:
                self.extend(value, every, None, base=True)

    def extend(self, value: float, groups: np.ndarray, start: float | None, base: bool = False) -> None:
        """Fit `groups` at `value`; a linear fit is warm-started from their probes at `start`. on_fit is
        told how many groups an extension (not `base`) fitted beyond the requested grid."""
        def part(a: Any) -> Any:
            return a[groups] if a.ndim == 3 else a

        init, moments = None, None
        if self.kind == LINEAR:
            index = torch.as_tensor(groups)
            init = LinearProbes(*(t[index.to(t.device)] for t in self.raw[start])) if start is not None else None
            if self.moments is not None:
                moments = FeatureMoments(mean=self.moments.mean[index], cov=self.moments.cov[index])
        fit = fit_probes(part(self.x_tr), part(self.y_tr), part(self.x_va), part(self.y_va), self.kind, l2=value,
                         seed=self.seed, config=self.config, n_classes=self.n_classes, device=self.device,
                         init=init, moments=moments)
        self._store(value, groups, fit)
        if self.on_fit is not None:
            self.on_fit(f"l2 {value:g}") if base else self.on_fit(f"l2 {value:g}", len(groups))

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """grid (R,), accuracy (G, R), loss (G, R): every value tried, NaN where a group did not."""
        grid = np.array(sorted(self.accuracy))
        return (grid, np.stack([self.accuracy[v] for v in grid], axis=1),
                np.stack([self.loss[v] for v in grid], axis=1))

    def widen(self, bounds: tuple[float, float] | None, ties: bool = True) -> np.ndarray:
        """Extend each group whose best value is on an edge of what it tried, one decade at a time, until
        its best is interior or `bounds` stop it; with `ties`, an edge that scores the same as the best
        (`_ties_best`) is extended as if it were the best. Returns at_bound (G,)."""
        while True:
            grid, accuracy, loss = self.table()
            best = _choose(grid, accuracy, loss, self.criterion)
            tried = ~np.isnan(accuracy)
            low, high = tried.argmax(axis=1), len(grid) - 1 - tried[:, ::-1].argmax(axis=1)
            moved = False
            for direction, edge in ((-1, low), (+1, high)):
                on_edge = (best == edge) | (ties & _ties_best(accuracy, loss, best, edge, self.criterion))
                for start in np.unique(grid[edge[on_edge]]) if bounds is not None else ():
                    value = _decade(float(start), direction)
                    if bounds[0] * (1 - 1e-9) <= value <= bounds[1] * (1 + 1e-9):
                        self.extend(value, np.flatnonzero(on_edge & (grid[edge] == start)), float(start))
                        moved = True
            if not moved:  # an unregularised choice (l2 = 0) is no bound
                return ((best == low) & (grid[best] > 0)) | (best == high)


def select_strength(
    X_train: Any, y_train: Any, grid: Sequence[float], *, kind: str = LINEAR,
    inner_val: np.ndarray | None = None, inner_fraction: float = DEFAULT_INNER_FRACTION, seed: int = 0,
    config: LinearConfig | MLPConfig | None = None, n_classes: int = 10, device: str | torch.device | None = None,
    moments: FeatureMoments | None = None, on_fit: Callable[..., None] | None = None, extend: bool = True,
    criterion: str = "accuracy", extend_ties: bool = True,
) -> StrengthSelection:
    """Choose each group's L2 strength from `grid` on an inner label-unique split of the training data.

    X_train (G, N, D), y_train (N, K) | (G, N, K). Only these are read: the outer validation
    split cannot influence the choice.
    inner_val: boolean (N,) mask of the inner validation samples (label-unique); None draws one
    with `inner_split(y_train, inner_fraction, seed)`. seed also seeds the MLP's inner fits.
    moments: the linear solver's preconditioner, shared with the refit (estimated here if None).
    on_fit(label): called after each grid value's inner fit (progress reporting); a fit past the grid's
    edge calls on_fit(label, n_groups) with the number of groups it fitted.
    extend: where a group's best value is on an edge of the grid, fit it a decade further, until
    interior or at a bound of `L2_BOUNDS` (False: the grid as given; an edge choice is flagged).
    extend_ties: an edge that ties the best (the same inner accuracy; with "loss", the same loss to
    float rounding) is extended too, so a tie broken by rounding cannot decide whether weaker values are
    tried (False: the rule before 2026-12-07, an edge is extended only when it is the choice itself).
    criterion: "accuracy" (the module docstring's rule) or "loss": the lowest inner cross-entropy, for
    a probe whose log-probabilities are the measurement (bits), which an overfitted strength would
    make worse than no features at all.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    values = np.asarray(normalise_grid(grid))
    xt = torch.as_tensor(X_train) if isinstance(X_train, torch.Tensor) else np.asarray(X_train)
    G = xt.shape[0]
    if len(values) == 1:
        nan = np.full((G, 1), np.nan)
        return StrengthSelection(values, nan, nan.copy(), np.full(G, values[0]))
    if kind not in (LINEAR, MLP):
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    mask = inner_split(y_train, inner_fraction, seed) if inner_val is None else np.asarray(inner_val, dtype=bool)
    if mask.shape != (xt.shape[1],) or mask.all() or not mask.any():
        raise ValueError(f"inner_val must be a boolean mask of shape ({xt.shape[1]},) with both sides non-empty")
    tr, va = np.flatnonzero(~mask), np.flatnonzero(mask)
    y = np.asarray(y_train)
    y_tr, y_va = (y[tr], y[va]) if y.ndim == 2 else (y[:, tr], y[:, va])
    if kind == LINEAR and moments is None and (config or LinearConfig()).precondition:
        moments = FeatureMoments.of(xt[:, tr], (config or LinearConfig()).gram_rows)
    path = _InnerPath(kind, xt[:, tr], y_tr, xt[:, va], y_va, config=config, n_classes=n_classes, device=device,
                      moments=moments, seed=seed, on_fit=on_fit, criterion=criterion)
    path.base([float(v) for v in values])
    at_bound = path.widen(L2_BOUNDS if extend else None, extend_ties)
    tried, accuracy, loss = path.table()
    best = _choose(tried, accuracy, loss, criterion)
    warm = None
    if kind == LINEAR:
        pick = [torch.stack([path.raw[float(v)][i] for v in tried]) for i in (0, 1)]  # (R, G, ...)
        groups, best_t = torch.arange(G, device=pick[0].device), torch.as_tensor(best, device=pick[0].device)
        warm = LinearProbes(pick[0][best_t, groups], pick[1][best_t, groups])
    return StrengthSelection(tried, accuracy, loss, tried[best], len(tr), len(va), warm, at_bound, path.at_cap)


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
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, l2: Sequence[float], *, kind: str = LINEAR,
    seed: int = 0, config: LinearConfig | MLPConfig | None = None, n_classes: int = 10,
    device: str | torch.device | None = None, init: LinearProbes | None = None,
    moments: FeatureMoments | None = None,
) -> ProbeFit:
    """Fit each group at its own strength l2 (G,). Linear: one batched solve (optionally warm-started,
    preconditioned from shared `moments`).
    MLP: one batched fit per distinct value over the groups that chose it, reassembled in group order."""
    l2 = np.asarray(l2, dtype=np.float64)
    if kind == LINEAR:
        return fit_probes(X_train, y_train, X_val, y_val, LINEAR, l2=l2, seed=seed, config=config,
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
    if kind != LINEAR or not config.precondition:
        return None
    return FeatureMoments.of(X_train, config.gram_rows)


def fit_selected(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, grid: Sequence[float] = DEFAULT_LINEAR_L2_GRID, *,
    kind: str = LINEAR, inner_val: np.ndarray | None = None, inner_fraction: float = DEFAULT_INNER_FRACTION,
    seed: int = 0, config: LinearConfig | MLPConfig | None = None, n_classes: int = 10,
    device: str | torch.device | None = None, extend: bool = True, criterion: str = "accuracy",
    extend_ties: bool = True,
) -> tuple[ProbeFit, StrengthSelection]:
    """Choose the strength per group on an inner split of the training data (extending the grid past an
    edge the choice lands on, see `select_strength`), refit on the whole training split at the chosen
    value, and score on (X_val, y_val). A one-value grid is exactly `fit_probes(..., l2=value)`."""
    values = normalise_grid(grid)
    if len(values) == 1:
        fit = fit_probes(X_train, y_train, X_val, y_val, kind, l2=values[0], seed=seed, config=config,
                         n_classes=n_classes, device=device)
        return fit, select_strength(X_train, y_train, values)
    moments = shared_moments(X_train, kind, config)
    sel = select_strength(X_train, y_train, values, kind=kind, inner_val=inner_val, inner_fraction=inner_fraction,
                          seed=seed, config=config, n_classes=n_classes, device=device, moments=moments,
                          extend=extend, criterion=criterion, extend_ties=extend_ties)
    fit = fit_at_strengths(X_train, y_train, X_val, y_val, sel.chosen, kind=kind, seed=seed, config=config,
                           n_classes=n_classes, device=device, init=sel.warm_start, moments=moments)
    return fit, sel
