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

Seeding: a group's initial weights and its holdout come from a generator of its own,
seeded by the run's seed and a checksum of the group's features (`group_generators`), and
the minibatch order from the seed alone (every group of a replica walks its samples in the
same order). So a group's probe is the same whichever other groups share the run, and in
whatever position: a cell fitted alone, in a sweep, or beside other cells reads the same
(to float rounding), and the same cell under another seed draws afresh.

Replicas: several seeds (and label sets, e.g. the shuffled-label control) train in the
same run, as more groups of the same batched matrix products. Replica r draws exactly as
a run with that seed alone would, so it is that run (to float rounding); only the matrix
products are shared, which on 2 CPU cores makes the paper's 3 seeds and a control about 1.4x
faster than 4 runs, and far more on a GPU, where one group of 256 samples leaves most of
it idle.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .config import MLPConfig  # the options, torch-free; re-exported here

__all__ = ["MLPConfig", "MLPProbes", "MLPInfo", "fit_mlp_probes", "flush_denormals", "group_generators",
           "label_unique_holdout"]

EpochCallback = Callable[[int, int], None]


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

    @classmethod
    def _of(cls, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], n_digits: int,
            n_classes: int) -> "MLPProbes":
        """A module holding the given weights (G, in, out) and biases (G, 1, out) as its parameters."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.n_digits, out.n_classes = n_digits, n_classes
        out.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
        out.biases = nn.ParameterList([nn.Parameter(b) for b in biases])
        return out

    @classmethod
    def stacked(cls, parts: Sequence["MLPProbes"]) -> "MLPProbes":
        """One module holding the groups of `parts` one after another (parts[0]'s groups first)."""
        return cls._of([torch.cat(ws) for ws in zip(*[p.weights for p in parts])],
                       [torch.cat(bs) for bs in zip(*[p.biases for p in parts])], parts[0].n_digits, parts[0].n_classes)

    @torch.no_grad()
    def select(self, groups: slice) -> "MLPProbes":
        """A copy holding only `groups` (a slice of the group axis)."""
        return MLPProbes._of([w[groups].clone() for w in self.weights], [b[groups].clone() for b in self.biases],
                             self.n_digits, self.n_classes)

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


def group_generators(x: torch.Tensor, seeds: Sequence[int]) -> list[list[torch.Generator]]:
    """One generator per (replica, group), gens[r][g], for group g's initial weights and holdout.

    x: the groups' standardised training features (G, N, D). Each generator is seeded by a hash
    of seeds[r] and the CRC32 of x[g]'s bytes: it depends on the group's own data and the seed,
    never on how many other groups share the run or where g sits among them.
    """
    digests = [zlib.crc32(x[g].detach().cpu().contiguous().numpy().tobytes()) for g in range(x.shape[0])]
    return [[torch.Generator().manual_seed(_mix(seed, digest)) for digest in digests] for seed in seeds]


def _mix(seed: int, digest: int) -> int:
    """A 63-bit seed from a run's seed and a group's checksum (blake2b: nearby inputs give unrelated seeds)."""
    h = hashlib.blake2b(f"{seed}:{digest}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def flushing_denormals() -> bool:
    """Whether the CPU now treats subnormal floats as zero (torch has a setter, no getter: this asks the CPU)."""
    return bool((torch.tensor([1e-39]) * 1.0 == 0).item())  # 1e-39 is subnormal in float32


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU inside the block, then put the previous setting back.

    Why: a probe that fits its training set (the shuffled-label control above all) drives softmax
    probabilities below 1e-38, and CPU arithmetic on such subnormal numbers is ~100x slower: the
    50K reproduction's MLP epochs grew from 19 s to 8 minutes. Flushed, they stay flat, and the
    fitted probe is bit-identical (a subnormal's effect on a weight is far below float32 rounding;
    tests/probes/test_mlp.py checks it). No effect on GPUs.
    """
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy averaged over digits: logits (G, B, K, C), y (G, B, K) -> (G, B)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=-1)


@torch.no_grad()
def _holdout_loss(model: MLPProbes, x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy (R*G,) over each group's holdout samples: x (G, N, D), y (R*G, N, K)."""
    R = y.shape[0] // x.shape[0]
    chunk = max(1, chunk // R)  # the same memory as one replica's chunk
    total = torch.zeros(y.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        part = slice(start, start + chunk)
        ce = _cross_entropy(model(x[:, part].repeat(R, 1, 1)), y[:, part])  # (R*G, b)
        total += (ce * held[:, part]).sum(dim=1).double()
    return (total / held.sum(dim=1).clamp_min(1)).float()


def _replica_labels(y: torch.Tensor, R: int, G: int, N: int) -> torch.Tensor:
    """The label set of each replica (R, G, N, K), from y (G, N, K) shared by all or (R, G, N, K)."""
    labels = y if y.dim() == 4 else y.unsqueeze(0).expand(R, -1, -1, -1)
    if labels.shape[0] != R or labels.shape[1:3] != (G, N):
        raise ValueError(f"y has shape {tuple(y.shape)}, expected ({G}, {N}, K) or ({R}, {G}, {N}, K)")
    return labels


def _holdout_mask(labels: torch.Tensor, config: MLPConfig, gens: Sequence[Sequence[torch.Generator]],
                  device: torch.device) -> torch.Tensor:
    """Each group's label-unique holdout (R*G, N), replica-major, drawn from gens[r][g]; all False
    without early stopping."""
    R, G, N, _ = labels.shape
    if config.holdout_fraction > 0:
        held = torch.cat([label_unique_holdout(labels[r, g:g + 1], config.holdout_fraction, gen)
                          for r in range(R) for g, gen in enumerate(gens[r])])
        if bool((held.sum(dim=1) == 0).any() or (held.sum(dim=1) == N).any()):
            raise ValueError(f"too few training passcodes ({N} samples) for a holdout of {config.holdout_fraction}")
        return held
    return torch.zeros(R * G, N, dtype=torch.bool, device=device)


def _train_epoch(model: MLPProbes, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 fit_weight: torch.Tensor, gens: Sequence[torch.Generator], batch_size: int) -> None:
    """One pass over x (G, N, D), each replica in its own random order, one Adam step per minibatch.

    y: labels (R*G, N, K); fit_weight: (R*G, N), 1 for samples the probe trains on."""
    G, N, _ = x.shape
    R = len(gens)
    rows = torch.arange(R * G, device=x.device)[:, None]  # (R*G, 1)
    order = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(x.device)  # (R, N)
    for start in range(0, N, batch_size):
        idx = order[:, start:start + batch_size]  # (R, B)
        xb = torch.cat([x[:, i] for i in idx]) if R > 1 else x[:, idx[0]]  # (R*G, B, D)
        at = idx.repeat_interleave(G, dim=0)  # (R*G, B): each group's own samples
        w = fit_weight[rows, at]  # (R*G, B)
        ce = _cross_entropy(model(xb), y[rows, at])  # (R*G, B)
        loss = ((ce * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)).sum()  # groups are independent terms
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


@dataclass
class _EarlyStopping:
    """Per group (each (R*G,)): the best holdout loss so far, its epoch and weights, and who has stopped."""

    best_loss: torch.Tensor
    best_epoch: torch.Tensor
    since_best: torch.Tensor
    stopped: torch.Tensor
    best_state: list[torch.Tensor]  # a copy of each model parameter

    @classmethod
    def start(cls, model: MLPProbes, n: int, max_epochs: int, device: torch.device) -> "_EarlyStopping":
        """No epoch measured yet: every group's best epoch is the last."""
        return cls(best_loss=torch.full((n,), math.inf, device=device),
                   best_epoch=torch.full((n,), max_epochs, dtype=torch.long, device=device),
                   since_best=torch.zeros(n, dtype=torch.long, device=device),
                   stopped=torch.zeros(n, dtype=torch.bool, device=device),
                   best_state=[p.detach().clone() for p in model.parameters()])

    def update(self, epoch: int, hold: torch.Tensor, model: MLPProbes, patience: int) -> bool:
        """Keep the weights of the groups whose holdout loss `hold` (R*G,) improved; True once every group stopped."""
        improved = (hold < self.best_loss) & ~self.stopped
        self.best_loss = torch.where(improved, hold, self.best_loss)
        self.best_epoch = torch.where(improved, torch.full_like(self.best_epoch, epoch), self.best_epoch)
        self.since_best = torch.where(improved, torch.zeros_like(self.since_best), self.since_best + 1)
        for kept, p in zip(self.best_state, model.parameters()):
            kept.copy_(torch.where(improved.view(-1, *[1] * (p.dim() - 1)), p.detach(), kept))
        self.stopped |= self.since_best >= patience
        return bool(self.stopped.all())

    @torch.no_grad()
    def restore(self, model: MLPProbes) -> None:
        """Put every group's best-epoch weights back into the model."""
        for kept, p in zip(self.best_state, model.parameters()):
            p.copy_(kept)


def fit_mlp_probes(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, config: MLPConfig, seed: int | Sequence[int],
    on_epoch: EpochCallback | None = None,
) -> tuple[MLPProbes, MLPInfo]:
    """Train G MLP probes (one per group, K digit heads each) with Adam, for one or several replicas.

    x: standardised training features (G, N, D), float32.
    y: integer labels (G, N, K) in [0, n_classes), or (R, G, N, K): one label set per replica.
    seed: fixes initialisation, the holdout split and minibatch order (with each group's own
        features, see `group_generators`); a sequence of R seeds trains R replicas in one batched
        run (see the module docstring), replica r with y[r] (or y for all) and seed[r].
    on_epoch(epoch, max_epochs): called after each epoch (progress reporting).
    Returns the trained probes, R*G groups replica by replica (replica r is groups
    r*G .. r*G+G-1, the best-epoch weights of each), and training info (R*G,).
    """
    G, N, D = x.shape
    seeds = [seed] if isinstance(seed, int) else [int(s) for s in seed]
    R = len(seeds)
    labels = _replica_labels(y, R, G, N)  # (R, G, N, K)
    K = labels.shape[3]
    per_group = group_generators(x, seeds)  # [r][g]: initial weights, then holdout
    model = MLPProbes.stacked([MLPProbes(1, D, K, n_classes, config.hidden, gen)
                               for gens_r in per_group for gen in gens_r]).to(x.device)  # R*G groups
    y = labels.reshape(R * G, N, K)  # replica-major, as the model's groups
    early_stopping = config.holdout_fraction > 0
    held = _holdout_mask(labels, config, per_group, x.device)  # (R*G, N)
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # each replica's minibatch order
    fit_weight = (~held).float()  # (R*G, N): 1 for samples the probe trains on
    optimiser = torch.optim.Adam([
        {"params": list(model.weights), "weight_decay": config.l2},  # coupled L2: grad of l2/2 ||W||^2
        {"params": list(model.biases), "weight_decay": 0.0},
    ], lr=config.lr)
    best = _EarlyStopping.start(model, R * G, config.max_epochs, x.device)

    with flush_denormals():  # subnormal probabilities would slow a memorising probe ~100x (see there)
        for epoch in range(1, config.max_epochs + 1):
            _train_epoch(model, optimiser, x, y, fit_weight, gens, config.batch_size)
            if on_epoch is not None:
                on_epoch(epoch, config.max_epochs)
            if early_stopping and best.update(epoch, _holdout_loss(model, x, y, held, config.eval_batch), model,
                                              config.patience):
                break

    if early_stopping:
        best.restore(model)
    else:
        best.best_loss = torch.full((R * G,), math.nan, device=x.device)
    return model, MLPInfo(best_epoch=best.best_epoch, stopped_early=best.stopped, holdout_loss=best.best_loss)
