"""MLP probes (the paper's probe), one network per group, all groups trained at once.

Architecture (SPEC section 3): D -> 512 -> 256 -> 128 (bottleneck) -> K heads of
C classes, ReLU between layers. The trunk is shared by the K digits of a group,
as in a multi-output probe: the bottleneck must hold every digit at once, and
each digit still has its own softmax. Groups never share anything: every weight
tensor carries a leading group axis and the forward pass is a chain of `bmm`s.

Training (our choices; the paper does not state them): Adam, minibatches of
256, L2 on the weights (not biases) at `l2`, added to the mean cross-entropy as
in the linear probe. Early stopping per group on a label-unique holdout of the
training split (10% of its passcodes, so no passcode is in both parts): after
each epoch the holdout cross-entropy is measured, each group keeps the weights
of its best epoch, and a group stops improving after `patience` epochs without
gain; training ends when every group has stopped or at `max_epochs`. With
`holdout_fraction = 0` the probe instead trains for exactly `max_epochs`.
Summed over groups, the loss gives each group exactly its own gradient, and Adam
is per-coordinate, so batching changes nothing about any single probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLPConfig", "MLPProbes", "MLPInfo", "fit_mlp_probes", "label_unique_holdout"]


@dataclass(frozen=True)
class MLPConfig:
    """How to build and train MLP probes.

    hidden: trunk widths; the last is the bottleneck (paper: 512, 256, 128).
    l2: L2 strength on the weights of the mean-loss objective.
    lr, batch_size: Adam learning rate and minibatch size.
    max_epochs: epoch limit (the exact count when holdout_fraction == 0).
    patience: epochs without holdout improvement before a group stops.
    holdout_fraction: share of training passcodes held out for early stopping.
    eval_batch: samples per chunk when evaluating (memory only).
    """

    hidden: tuple[int, ...] = (512, 256, 128)
    l2: float = 1e-4
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    holdout_fraction: float = 0.1
    eval_batch: int = 2048

    def __post_init__(self) -> None:
        if len(self.hidden) == 0 or min(self.hidden) < 1:
            raise ValueError(f"hidden must be a non-empty tuple of positive widths, got {self.hidden!r}")
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1 or self.eval_batch < 1:
            raise ValueError("batch_size, max_epochs, patience and eval_batch must be >= 1")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")


class MLPProbes(nn.Module):
    """G independent MLPs, D -> hidden... -> K x C logits, evaluated with batched matmuls."""

    def __init__(self, n_groups: int, n_features: int, n_digits: int, n_classes: int, hidden: tuple[int, ...],
                 generator: torch.Generator):
        super().__init__()
        self.n_digits, self.n_classes = n_digits, n_classes
        widths = (n_features, *hidden, n_digits * n_classes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init
            w = (torch.rand(n_groups, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(n_groups, 1, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))  # (G, in, out)
            self.biases.append(nn.Parameter(b))  # (G, 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (G, B, K, C) for features x (G, B, D)."""
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)  # (G, B, out)
            if i < last:
                h = torch.relu(h)
        return h.view(h.shape[0], h.shape[1], self.n_digits, self.n_classes)


@dataclass
class MLPInfo:
    """Per-group outcome of training, each (G,)."""

    best_epoch: torch.Tensor  # epoch whose weights were kept (1-based; max_epochs without early stopping)
    stopped_early: torch.Tensor  # patience ran out before max_epochs
    holdout_loss: torch.Tensor  # best holdout cross-entropy (nan without a holdout)


def label_unique_holdout(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Holdout mask (G, N) that puts whole passcodes aside: no passcode is on both sides.

    y: labels (G, N, K). About `fraction` of each group's distinct passcodes are held out.
    """
    G, N, K = y.shape
    mask = torch.zeros(G, N, dtype=torch.bool, device=y.device)
    for g in range(G):
        codes, inverse = torch.unique(y[g], dim=0, return_inverse=True)  # distinct passcodes
        n_held = int(round(fraction * len(codes)))
        held = torch.zeros(len(codes), dtype=torch.bool)
        held[torch.randperm(len(codes), generator=generator)[:n_held]] = True
        mask[g] = held.to(y.device)[inverse]
    return mask


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy averaged over digits: logits (G, B, K, C), y (G, B, K) -> (G, B)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=-1)


@torch.no_grad()
def _holdout_loss(model: MLPProbes, x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy (G,) over each group's holdout samples."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        part = slice(start, start + chunk)
        ce = _cross_entropy(model(x[:, part]), y[:, part])  # (G, b)
        total += (ce * held[:, part]).sum(dim=1).double()
    return (total / held.sum(dim=1).clamp_min(1)).float()


def fit_mlp_probes(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, config: MLPConfig, seed: int
) -> tuple[MLPProbes, MLPInfo]:
    """Train G MLP probes (one per group, K digit heads each) with Adam.

    x: standardised training features (G, N, D), float32.
    y: integer labels (G, N, K) in [0, n_classes).
    seed: fixes initialisation, the holdout split and minibatch order.
    Returns the trained probes (best-epoch weights per group) and training info.
    """
    G, N, D = x.shape
    K = y.shape[2]
    gen = torch.Generator().manual_seed(seed)
    model = MLPProbes(G, D, K, n_classes, config.hidden, gen).to(x.device)

    early_stopping = config.holdout_fraction > 0
    held = label_unique_holdout(y, config.holdout_fraction, gen) if early_stopping else torch.zeros(
        G, N, dtype=torch.bool, device=x.device)
    if early_stopping and bool((held.sum(dim=1) == 0).any() or (held.sum(dim=1) == N).any()):
        raise ValueError(f"too few training passcodes ({N} samples) for a holdout of {config.holdout_fraction}")
    fit_weight = (~held).float()  # (G, N): 1 for samples the probe trains on

    optimiser = torch.optim.Adam([
        {"params": list(model.weights), "weight_decay": config.l2},  # coupled L2: grad of l2/2 ||W||^2
        {"params": list(model.biases), "weight_decay": 0.0},
    ], lr=config.lr)

    best_loss = torch.full((G,), math.inf, device=x.device)
    best_epoch = torch.full((G,), config.max_epochs, dtype=torch.long, device=x.device)
    since_best = torch.zeros(G, dtype=torch.long, device=x.device)
    stopped = torch.zeros(G, dtype=torch.bool, device=x.device)
    best_state = [p.detach().clone() for p in model.parameters()]

    for epoch in range(1, config.max_epochs + 1):
        order = torch.randperm(N, generator=gen).to(x.device)
        for start in range(0, N, config.batch_size):
            idx = order[start:start + config.batch_size]
            w = fit_weight[:, idx]  # (G, B)
            ce = _cross_entropy(model(x[:, idx]), y[:, idx])  # (G, B)
            loss = ((ce * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)).sum()  # groups are independent terms
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if not early_stopping:
            continue
        hold = _holdout_loss(model, x, y, held, config.eval_batch)  # (G,)
        improved = (hold < best_loss) & ~stopped
        best_loss = torch.where(improved, hold, best_loss)
        best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
        since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
        for kept, p in zip(best_state, model.parameters()):
            kept.copy_(torch.where(improved.view(-1, *[1] * (p.dim() - 1)), p.detach(), kept))
        stopped |= since_best >= config.patience
        if bool(stopped.all()):
            break

    if early_stopping:
        with torch.no_grad():
            for kept, p in zip(best_state, model.parameters()):
                p.copy_(kept)
    else:
        best_loss = torch.full((G,), math.nan, device=x.device)
    return model, MLPInfo(best_epoch=best_epoch, stopped_early=stopped, holdout_loss=best_loss)
