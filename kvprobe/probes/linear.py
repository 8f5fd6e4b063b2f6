"""Linear probes: many multinomial logistic regressions fitted at once.

One probe is one softmax classifier for one digit of one group (a layer x site x
offset x pooling cell). With G groups and K digits there are G*K independent
problems; this file solves all of them in a single batched computation.

Each problem minimises the same objective as scikit-learn's
`LogisticRegression(C=1 / (l2 * N))` with the lbfgs solver:

    mean_n CE(softmax(x_n W + b), y_n) + l2 / 2 * ||W||^2      (b is not penalised)

The solver is L-BFGS run per problem, batched: every problem keeps its own
curvature history, step length and stopping state, and all problems share one
`torch.bmm` per objective evaluation (groups whose problems have all finished
drop out of it). Converged problems stop moving, so each one stops where a solo
L-BFGS would, at max |gradient| <= tol, the test scikit-learn passes to scipy as
`gtol`. The optimum is unique for l2 > 0, so the result needs no seed. Work is
in float32: gradients stay accurate to about 1e-6, so tol much below that only
runs into max_iter (reported as not converged).

Preconditioning (the default). KV features are strongly correlated (a memento's
tokens, their mean, keys and values of the same heads), which makes plain L-BFGS
take hundreds of passes over the data. The softmax cross-entropy's Hessian is
bounded by Boehning's matrix 1/2 (I - 11'/C) (x) E[x1 x1'] (x1 = [x, 1]), so the
solver starts every L-BFGS two-loop from

    H0 = gamma * (1/2 E[x1 x1'] + l2 * I_weights)^-1

instead of gamma * I: one Cholesky factor per group, shared by its K digits and C
classes, applied as one batched matrix product per iteration. At zero weights the
first step is then the ridge regression of the one-hot labels on the features, and
the iteration count no longer depends on how the features are correlated. The
Gram matrix is a function of the features only, so fits on the same features (a
regularisation path, the refit, the shuffled-label control) share it, and each strength's
factor (`h0=`, from `preconditioner`).
The optimum, and the stopping test, are those of the unpreconditioned problem.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import LinearConfig  # the options, torch-free; re-exported here

__all__ = ["LinearConfig", "LinearProbes", "LBFGSInfo", "feature_gram", "fit_linear_probes", "gram_rows",
           "preconditioner"]


TOL_FLOOR = 1e-6
"""The tightest gradient tolerance `tol_follows_l2` asks for: float32 gradients are accurate to about this."""


def _tolerance(config: LinearConfig, strengths: Any) -> Any:
    """The stopping tolerance: config.tol, or per problem min(tol, max(10 l2, TOL_FLOOR)) (G, K)."""
    if not config.tol_follows_l2:
        return config.tol
    if isinstance(strengths, torch.Tensor):
        return (10 * strengths).clamp(min=TOL_FLOOR, max=config.tol)
    return min(config.tol, max(10 * float(strengths), TOL_FLOOR))


class LinearProbes(nn.Module):
    """G x K softmax classifiers: logits[g, n, k] = x[g, n] @ weight[g, :, k] + bias[g, k]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (G, D, K, C)
        self.bias = nn.Parameter(bias)  # (G, K, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (G, B, K, C) for features x (G, B, D)."""
        G, D, K, C = self.weight.shape
        logits = torch.bmm(x, self.weight.reshape(G, D, K * C))  # (G, B, K*C)
        return logits.view(G, -1, K, C) + self.bias[:, None]


@dataclass
class LBFGSInfo:
    """Per-problem outcome of the batched solve, each (G, K)."""

    n_iter: torch.Tensor  # iterations taken
    converged: torch.Tensor  # max |gradient| <= tol reached
    loss: torch.Tensor  # final objective value


def _runs(groups: torch.Tensor) -> list[slice]:
    """Ascending group indices (g,) as slices of consecutive indices, e.g. [0, 1, 2, 5, 6] -> [0:3, 5:7];
    no indices (every group finished) -> no slices."""
    idx = groups.tolist()
    if not idx:
        return []
    cuts = [0] + [i for i in range(1, len(idx)) if idx[i] != idx[i - 1] + 1] + [len(idx)]
    return [slice(idx[a], idx[b - 1] + 1) for a, b in zip(cuts, cuts[1:])]


class _Objective:
    """Mean cross-entropy + L2 for all G x K problems, with its analytic gradient.

    Parameters are one tensor theta (G, D+1, C, K): the weights with the bias as
    the last row, multiplying a column of ones appended to x. Classes sit before
    digits so the softmax runs over a non-innermost axis, which torch's CPU
    kernels vectorise far better than a 10-wide innermost one.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, l2: float | torch.Tensor):
        G, N, D = x.shape
        ones = torch.ones(G, N, 1, dtype=x.dtype, device=x.device)
        self.x1 = torch.cat([x, ones], dim=2)  # (G, N, D+1)
        self.y = y.unsqueeze(2)  # (G, N, 1, K)
        self.l2 = l2  # a float, or one strength per problem (G, K)
        self.penalised = torch.ones(1, D + 1, 1, 1, dtype=x.dtype, device=x.device)
        self.penalised[:, D] = 0.0  # the bias row is not penalised

    def __call__(self, theta: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (g, K) and gradient (g, D+1, C, K) at theta (g, D+1, C, K) for `groups` (all if None).

        The groups still being optimised are read as contiguous runs of views: no copy of the
        features is made when some groups have finished."""
        G = self.x1.shape[0]
        if groups is None or len(groups) == G:
            return self._evaluate(theta, slice(None))
        parts, lo = [], 0
        for run in _runs(groups):
            hi = lo + run.stop - run.start
            parts.append(self._evaluate(theta[lo:hi], run))
            lo = hi
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _evaluate(self, theta: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective and gradient for the consecutive groups `rows` at theta (g, D+1, C, K)."""
        x1, y = self.x1[rows], self.y[rows]
        l2 = self.l2[rows] if isinstance(self.l2, torch.Tensor) else self.l2
        G, D1, C, K = theta.shape
        N = x1.shape[1]
        logits = torch.bmm(x1, theta.reshape(G, D1, C * K)).view(G, N, C, K)
        logp = torch.log_softmax(logits, dim=2)  # (G, N, C, K)
        ce = -logp.gather(2, y).squeeze(2).mean(dim=1)  # (G, K)
        w = theta * self.penalised
        loss = ce + 0.5 * l2 * (w * w).sum(dim=(1, 2))
        minus_one = torch.full(y.shape, -1.0, dtype=logp.dtype, device=logp.device)
        dlogits = logp.exp_().scatter_add_(2, y, minus_one).div_(N)  # d mean CE / d logits
        decay = l2 * w if not isinstance(l2, torch.Tensor) else _per_problem(l2) * w
        grad = torch.bmm(x1.transpose(1, 2), dlogits.view(G, N, C * K)).view(G, D1, C, K) + decay
        return loss, grad


_ARMIJO = 1e-4  # sufficient-decrease constant (scipy's ftol in the line search)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product of two (G, D+1, C, K) tensors -> (G, K)."""
    return (a * b).sum(dim=(1, 2))


def _per_problem(v: torch.Tensor) -> torch.Tensor:
    """Broadcast a (G, K) per-problem scalar against (G, D+1, C, K)."""
    return v[:, None, None, :]


def _per_problem_l2(l2: Any, G: int, K: int, like: torch.Tensor) -> torch.Tensor:
    """L2 strengths as a (G, K) tensor from a (G,) per-group or (G, K) per-problem array."""
    t = torch.as_tensor(l2, dtype=like.dtype).to(like.device)
    if t.dim() == 1 and t.shape[0] == G:
        t = t[:, None].expand(G, K)
    if tuple(t.shape) != (G, K):
        raise ValueError(f"per-problem l2 must have shape ({G},) or ({G}, {K}), got {tuple(t.shape)}")
    if not bool((t >= 0).all()):
        raise ValueError("l2 must be >= 0")
    return t.contiguous()


def gram_rows(n: int, max_rows: int = LinearConfig.gram_rows) -> np.ndarray | slice:
    """The training rows a Gram matrix is estimated from: all of n, or `max_rows` evenly spaced ones
    (an index that numpy arrays and torch tensors both take)."""
    return slice(None) if n <= max_rows else np.linspace(0, n - 1, max_rows).astype(np.int64)


def feature_gram(x: torch.Tensor, max_rows: int = LinearConfig.gram_rows) -> torch.Tensor:
    """Second moment E[x1 x1'] (G, D+1, D+1) of features x (G, N, D) with a column of ones appended,
    over at most `max_rows` evenly spaced rows (a preconditioner needs an estimate, not every row)."""
    G, N, D = x.shape
    rows = x[:, gram_rows(N, max_rows)]
    n = rows.shape[1]
    gram = torch.empty(G, D + 1, D + 1, dtype=x.dtype, device=x.device)
    gram[:, :D, :D] = torch.bmm(rows.transpose(1, 2), rows) / n
    mean = rows.mean(dim=1)  # (G, D)
    gram[:, :D, D], gram[:, D, :D], gram[:, D, D] = mean, mean, 1.0
    return gram


def _factor(gram: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Cholesky factors (G, D+1, D+1) of 1/2 gram + l2 on the weight rows, one strength per group (G,)."""
    G, D1, _ = gram.shape
    diag = l2[:, None].expand(G, D1).clone()
    diag[:, D1 - 1] = 0.0  # the bias is not penalised (its diagonal is 1/2 already)
    jitter = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True)  # constant features, l2 = 0
    a = 0.5 * gram + torch.diag_embed(diag + jitter)
    factor, info = torch.linalg.cholesky_ex(a)
    bad = info != 0  # numerically indefinite in float32: those matrices (only) get more jitter
    if bool(bad.any()):
        more = 1e-3 * a[bad].diagonal(dim1=1, dim2=2).abs().amax(1, keepdim=True)  # (b, 1)
        factor[bad] = torch.linalg.cholesky(a[bad] + torch.diag_embed(more.expand(-1, D1)))
    return factor


def preconditioner(gram: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """H0 = (1/2 gram + l2 on the weight rows)^-1 (G, D+1, D+1), the solver's starting inverse Hessian,
    from E[x1 x1'] (G, D+1, D+1) (`feature_gram`) and one strength per group l2 (G,).

    LAPACK's multi-threaded Cholesky and inverse round differently with each thread count (from
    D ~ 160 on), and the probes must not depend on it (`tests/cli/test_recovery.py`). So on the CPU each
    matrix is factored on its own, on one LAPACK thread (a batched inverse rounds differently from
    one matrix's), and torch's threads share out the matrices instead."""
    if gram.device.type != "cpu":
        return torch.cholesky_inverse(_factor(gram, l2))
    threads = torch.get_num_threads()

    def one(g: int) -> torch.Tensor:
        return torch.cholesky_inverse(_factor(gram[g:g + 1], l2[g:g + 1]))[0]

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(gram))) as pool:  # torch releases the GIL inside LAPACK
            parts = list(pool.map(one, range(len(gram))))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(parts)


def _h0_of(x: torch.Tensor, strengths: Any, config: LinearConfig, h0: torch.Tensor | None) -> torch.Tensor:
    """The preconditioner (G, D+1, D+1) on x's device and dtype: `h0` checked, or computed from x (G, N, D)."""
    G, N, D = x.shape
    if h0 is None:
        group_l2 = (strengths.mean(dim=1) if isinstance(strengths, torch.Tensor)
                    else torch.full((G,), float(strengths), dtype=x.dtype, device=x.device))
        h0 = preconditioner(feature_gram(x, config.gram_rows), group_l2)
    elif tuple(h0.shape) != (G, D + 1, D + 1):
        raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected {(G, D + 1, D + 1)}")
    return h0.to(device=x.device, dtype=x.dtype)  # (G, D+1, D+1)


def _start(x: torch.Tensor, n_classes: int, K: int, init: LinearProbes | None) -> torch.Tensor:
    """The starting parameters theta (G, D+1, C, K): zeros, or the probes `init` with the bias as the last row."""
    G, N, D = x.shape
    if init is None:
        return torch.zeros(G, D + 1, n_classes, K, dtype=x.dtype, device=x.device)
    if tuple(init.weight.shape) != (G, D, K, n_classes):
        raise ValueError(f"init probes have shape {tuple(init.weight.shape)}, expected {(G, D, K, n_classes)}")
    w0 = init.weight.detach().to(device=x.device, dtype=x.dtype).permute(0, 1, 3, 2)  # (G, D, C, K)
    b0 = init.bias.detach().to(device=x.device, dtype=x.dtype).transpose(1, 2)[:, None]  # (G, 1, C, K)
    return torch.cat([w0, b0], dim=1).contiguous()


def _apply_h0(precond: torch.Tensor | None, q: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """The initial inverse-Hessian applied to q (G, D+1, C, K); groups whose problems are all `done` (G, K)
    are left as they are."""
    if precond is None:
        return q
    G, D1, C, K = q.shape
    rows = (~done).any(dim=1).nonzero().squeeze(1)  # (g,)
    if len(rows) == G:
        return torch.bmm(precond, q.reshape(G, D1, -1)).view_as(q)
    if len(rows) == 0:  # every problem has converged (a warm start at its optimum): nothing moves again
        return q
    out = q.clone()
    for run in _runs(rows):  # views of consecutive groups: no copy of the factors
        out[run] = torch.bmm(precond[run], q[run].reshape(-1, D1, C * K)).view_as(q[run])
    return out


@dataclass
class _LBFGSState:
    """Where the batched L-BFGS stands: the iterate, its objective and gradient, and each problem's curvature
    history, first-step scale and stopping state. Tensors (G, D+1, C, K) unless marked (G, K)."""

    f: _Objective
    precond: torch.Tensor | None  # (G, D+1, D+1), or None for plain L-BFGS
    tol: Any  # a float, or (G, K)
    theta: torch.Tensor
    loss: torch.Tensor  # (G, K)
    grad: torch.Tensor
    hgrad: torch.Tensor  # H0 grad
    gamma: torch.Tensor  # (G, K) scale of H0
    done: torch.Tensor  # (G, K)
    n_iter: torch.Tensor  # (G, K)
    # (s, y, rho, H0 y): H0 is linear, so H0 of the two-loop's q is H0 grad - sum a_i H0 y_i, and each
    # iteration needs one product with the preconditioner (for the new gradient), not two
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def start(cls, f: _Objective, theta: torch.Tensor, precond: torch.Tensor | None, tol: Any) -> "_LBFGSState":
        """The state at theta (G, D+1, C, K), before the first step."""
        G, _, _, K = theta.shape
        loss, grad = f(theta)
        if precond is None:
            gamma = 1.0 / grad.pow(2).sum(dim=(1, 2)).sqrt().clamp_min(1e-12)  # (G, K) first step: unit length
        else:
            gamma = torch.ones(G, K, dtype=theta.dtype, device=theta.device)  # first step: the bound's Newton step
        done = grad.abs().amax(dim=(1, 2)) <= tol  # (G, K)
        n_iter = torch.zeros(G, K, dtype=torch.long, device=theta.device)
        hgrad = _apply_h0(precond, grad, done)
        return cls(f, precond, tol, theta, loss, grad, hgrad, gamma, done, n_iter, [])

    def direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The search direction -H grad (G, D+1, C, K), H from each problem's own history, and its slope (G, K);
        finished problems get a zero direction."""
        grad, done = self.grad, self.done
        # two-loop recursion: direction = -H grad, H from each problem's own history
        q, hq = grad.clone(), self.hgrad.clone()
        alphas = []
        for s, yv, rho, hy in reversed(self.history):
            a = rho * _dot(s, q)
            q -= _per_problem(a) * yv
            if hy is not yv:
                hq -= _per_problem(a) * hy
            alphas.append(a)
        r = _per_problem(self.gamma) * (hq if self.precond is not None else q)
        for (s, yv, rho, _), a in zip(self.history, reversed(alphas)):
            b = rho * _dot(yv, r)
            r += _per_problem(a - b) * s
        direction = -r
        slope = _dot(grad, direction)  # (G, K)
        not_descent = slope >= 0  # numerical trouble: fall back to steepest descent
        direction = torch.where(_per_problem(not_descent), -grad, direction)
        slope = torch.where(not_descent, -grad.pow(2).sum(dim=(1, 2)), slope)
        direction = direction * _per_problem(~done)  # finished problems stay put
        return direction, slope

    def line_search(self, direction: torch.Tensor, slope: torch.Tensor, max_halvings: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The accepted step's (theta, loss, grad) and which problems found no acceptable step (G, K)."""
        # backtracking line search, each problem with its own step length; only
        # groups with a problem still searching are evaluated. A step is accepted
        # on Armijo's sufficient decrease, or on its derivative form (Hager & Zhang's
        # approximate Wolfe test), which stays exact where float32 loss values
        # can no longer resolve the decrease near the optimum.
        theta, loss, grad = self.theta, self.loss, self.grad
        step = torch.ones(*self.done.shape, dtype=theta.dtype, device=theta.device)  # (G, K)
        pending = ~self.done
        new_theta, new_loss, new_grad = theta.clone(), loss.clone(), grad.clone()
        for _ in range(max_halvings):
            rows = pending.any(dim=1).nonzero().squeeze(1)  # (g,)
            trial = theta[rows] + _per_problem(step[rows]) * direction[rows]
            trial_loss, trial_grad = self.f(trial, rows)
            f0, d0 = loss[rows], slope[rows]
            armijo = trial_loss <= f0 + _ARMIJO * step[rows] * d0
            trial_slope = _dot(trial_grad, direction[rows])
            approx = (trial_loss <= f0 + 1e-6 * f0.abs()) & (trial_slope <= (2 * _ARMIJO - 1) * d0)
            accept = pending[rows] & (armijo | approx)
            new_theta[rows] = torch.where(_per_problem(accept), trial, new_theta[rows])
            new_loss[rows] = torch.where(accept, trial_loss, new_loss[rows])
            new_grad[rows] = torch.where(_per_problem(accept), trial_grad, new_grad[rows])
            pending[rows] &= ~accept
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 0.5, step)
        return new_theta, new_loss, new_grad, pending

    def advance(self, new_theta: torch.Tensor, new_loss: torch.Tensor, new_grad: torch.Tensor,
                stalled: torch.Tensor, history: int) -> None:
        """Move to the new iterate, add its curvature pair to the history, and update the stopping state."""
        done, tol = self.done, self.tol
        moved = ~done & ~stalled
        s = new_theta - self.theta
        yv = new_grad - self.grad
        sy = _dot(s, yv)
        valid = moved & (sy > 1e-10)
        rho = torch.where(valid, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))  # rho = 0: pair is a no-op
        new_hgrad = _apply_h0(self.precond, new_grad, done)
        hy = new_hgrad - self.hgrad if self.precond is not None else yv
        self.gamma = torch.where(valid, sy / _dot(yv, hy).clamp_min(1e-30), self.gamma)
        self.history.append((s, yv, rho, hy))
        if len(self.history) > history:
            self.history.pop(0)

        self.theta, self.loss, self.grad, self.hgrad = new_theta, new_loss, new_grad, new_hgrad
        self.n_iter += moved.long()
        stuck = moved & (_dot(s, s) == 0)  # the step vanished in float precision
        self.done = done | stalled | stuck | (self.grad.abs().amax(dim=(1, 2)) <= tol)


def fit_linear_probes(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, config: LinearConfig, *,
    l2: Any = None, init: LinearProbes | None = None, h0: torch.Tensor | None = None,
) -> tuple[LinearProbes, LBFGSInfo]:
    """Fit G x K multinomial logistic regressions by batched L-BFGS.

    x: standardised training features (G, N, D), float.
    y: integer labels (G, N, K) in [0, n_classes).
    l2: None for config.l2 everywhere, or one strength per group (G,) or per problem (G, K).
    init: probes to start from (a warm start, e.g. the solution at a neighbouring l2);
        None starts from zero weights, so the result depends on no seed. The optimum
        is unique, so a warm start changes the answer only within the tolerance.
    h0: the preconditioner (G, D+1, D+1) (`preconditioner`), shared between fits on the same
        features; None computes it from x when config.precondition is set.
    Returns the fitted probes and per-problem solver info.
    """
    G, N, D = x.shape
    K = y.shape[2]
    strengths = config.l2 if l2 is None else _per_problem_l2(l2, G, K, x)
    f = _Objective(x, y, strengths)
    precond = _h0_of(x, strengths, config, h0) if config.precondition else None
    state = _LBFGSState.start(f, _start(x, n_classes, K, init), precond, _tolerance(config, strengths))
    for _ in range(config.max_iter):
        if bool(state.done.all()):
            break
        direction, slope = state.direction()
        new_theta, new_loss, new_grad, stalled = state.line_search(direction, slope, config.max_halvings)
        # stalled: no acceptable step, float precision exhausted; stop like scipy does
        state.advance(new_theta, new_loss, new_grad, stalled, config.history)

    converged = state.grad.abs().amax(dim=(1, 2)) <= state.tol
    weight = state.theta[:, :D].permute(0, 1, 3, 2).contiguous()  # (G, D, K, C)
    bias = state.theta[:, D].transpose(1, 2).contiguous()  # (G, K, C)
    probes = LinearProbes(weight, bias)
    return probes, LBFGSInfo(n_iter=state.n_iter, converged=converged, loss=state.loss)
