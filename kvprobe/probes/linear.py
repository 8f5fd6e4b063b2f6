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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LinearConfig", "LinearProbes", "LBFGSInfo", "fit_linear_probes"]


@dataclass(frozen=True)
class LinearConfig:
    """How to fit linear probes.

    l2: L2 strength on the weights of the mean-loss objective (sklearn C = 1 / (l2 * N)).
    max_iter: L-BFGS iterations per problem.
    tol: stop a problem when max |gradient| <= tol (sklearn's `tol`).
    history: L-BFGS memory (scipy's default is 10).
    max_halvings: backtracking steps before a problem's line search gives up.
    """

    l2: float = 1e-3
    max_iter: int = 500
    tol: float = 1e-4
    history: int = 10
    max_halvings: int = 30

    def __post_init__(self) -> None:
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if self.max_iter < 1 or self.history < 1 or self.max_halvings < 1:
            raise ValueError("max_iter, history and max_halvings must be >= 1")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")


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
        self._subset: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, Any] | None = None

    def _rows(self, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Features, labels and L2 of the groups still being optimised (one copy per change)."""
        if groups is None or len(groups) == self.x1.shape[0]:
            return self.x1, self.y, self.l2
        key = tuple(groups.tolist())
        if self._subset is None or self._subset[0] != key:
            l2 = self.l2[groups] if isinstance(self.l2, torch.Tensor) else self.l2
            self._subset = (key, self.x1[groups], self.y[groups], l2)
        return self._subset[1], self._subset[2], self._subset[3]

    def __call__(self, theta: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (g, K) and gradient (g, D+1, C, K) at theta (g, D+1, C, K) for `groups` (all if None)."""
        x1, y, l2 = self._rows(groups)
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


def fit_linear_probes(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, config: LinearConfig, *,
    l2: Any = None, init: LinearProbes | None = None,
) -> tuple[LinearProbes, LBFGSInfo]:
    """Fit G x K multinomial logistic regressions by batched L-BFGS.

    x: standardised training features (G, N, D), float.
    y: integer labels (G, N, K) in [0, n_classes).
    l2: None for config.l2 everywhere, or one strength per group (G,) or per problem (G, K).
    init: probes to start from (a warm start, e.g. the solution at a neighbouring l2);
        None starts from zero weights, so the result depends on no seed. The optimum
        is unique, so a warm start changes the answer only within the tolerance.
    Returns the fitted probes and per-problem solver info.
    """
    G, N, D = x.shape
    K = y.shape[2]
    f = _Objective(x, y, config.l2 if l2 is None else _per_problem_l2(l2, G, K, x))
    if init is None:
        theta = torch.zeros(G, D + 1, n_classes, K, dtype=x.dtype, device=x.device)
    else:
        if tuple(init.weight.shape) != (G, D, K, n_classes):
            raise ValueError(f"init probes have shape {tuple(init.weight.shape)}, expected {(G, D, K, n_classes)}")
        w0 = init.weight.detach().to(device=x.device, dtype=x.dtype).permute(0, 1, 3, 2)  # (G, D, C, K)
        b0 = init.bias.detach().to(device=x.device, dtype=x.dtype).transpose(1, 2)[:, None]  # (G, 1, C, K)
        theta = torch.cat([w0, b0], dim=1).contiguous()
    loss, grad = f(theta)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, rho)
    gamma = 1.0 / grad.pow(2).sum(dim=(1, 2)).sqrt().clamp_min(1e-12)  # (G, K) first step: unit length
    done = grad.abs().amax(dim=(1, 2)) <= config.tol  # (G, K)
    n_iter = torch.zeros(G, K, dtype=torch.long, device=x.device)

    for _ in range(config.max_iter):
        if bool(done.all()):
            break
        # two-loop recursion: direction = -H grad, H from each problem's own history
        q = grad.clone()
        alphas = []
        for s, yv, rho in reversed(history):
            a = rho * _dot(s, q)
            q -= _per_problem(a) * yv
            alphas.append(a)
        r = _per_problem(gamma) * q
        for (s, yv, rho), a in zip(history, reversed(alphas)):
            b = rho * _dot(yv, r)
            r += _per_problem(a - b) * s
        direction = -r
        slope = _dot(grad, direction)  # (G, K)
        not_descent = slope >= 0  # numerical trouble: fall back to steepest descent
        direction = torch.where(_per_problem(not_descent), -grad, direction)
        slope = torch.where(not_descent, -grad.pow(2).sum(dim=(1, 2)), slope)
        direction = direction * _per_problem(~done)  # finished problems stay put

        # backtracking line search, each problem with its own step length; only
        # groups with a problem still searching are evaluated. A step is accepted
        # on Armijo's sufficient decrease, or on its derivative form (Hager & Zhang's
        # approximate Wolfe test), which stays exact where float32 loss values
        # can no longer resolve the decrease near the optimum.
        step = torch.ones(G, K, dtype=x.dtype, device=x.device)
        pending = ~done
        new_theta, new_loss, new_grad = theta.clone(), loss.clone(), grad.clone()
        for _ in range(config.max_halvings):
            rows = pending.any(dim=1).nonzero().squeeze(1)  # (g,)
            trial = theta[rows] + _per_problem(step[rows]) * direction[rows]
            trial_loss, trial_grad = f(trial, rows)
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
        stalled = pending  # no acceptable step: float precision exhausted, stop like scipy does

        moved = ~done & ~stalled
        s = new_theta - theta
        yv = new_grad - grad
        sy = _dot(s, yv)
        valid = moved & (sy > 1e-10)
        rho = torch.where(valid, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))  # rho = 0: pair is a no-op
        gamma = torch.where(valid, sy / _dot(yv, yv).clamp_min(1e-30), gamma)
        history.append((s, yv, rho))
        if len(history) > config.history:
            history.pop(0)

        theta, loss, grad = new_theta, new_loss, new_grad
        n_iter += moved.long()
        stuck = moved & (_dot(s, s) == 0)  # the step vanished in float precision
        done = done | stalled | stuck | (grad.abs().amax(dim=(1, 2)) <= config.tol)

    converged = grad.abs().amax(dim=(1, 2)) <= config.tol
    weight = theta[:, :D].permute(0, 1, 3, 2).contiguous()  # (G, D, K, C)
    bias = theta[:, D].transpose(1, 2).contiguous()  # (G, K, C)
    probes = LinearProbes(weight, bias)
    return probes, LBFGSInfo(n_iter=n_iter, converged=converged, loss=loss)
