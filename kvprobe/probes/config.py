"""How to probe: `LinearConfig`, `MLPConfig` and `ProbeConfig` (with its two families' configs), the
default strength grid, `normalise_grid`, which reads a grid, and `ReconstructionConfig`, what the
reconstruction probes (`kvprobe.reconstruction`) read back of a block.

Plain data, no torch: the command line and the config read them without loading torch. The
modules that fit the probes re-export them (`kvprobe.probes.linear`, `.mlp`, `.selection`, and
`kvprobe.analysis`, which probes a store with a `ProbeConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import renamed_fields
from ..grid import CONTENT_TOKENS, DEFAULT_POOLING, FAMILIES, LINEAR, MLP

__all__ = ["BAG", "DECODER", "DEFAULT_INNER_FRACTION", "DEFAULT_LINEAR_L2_GRID", "ENDS", "POSITIONS", "TARGETS", "DecoderConfig",
           "LinearConfig", "MLPConfig", "ProbeConfig", "ReconstructionConfig", "normalise_grid"]

DEFAULT_LINEAR_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
"""The linear probe's L2 grid (mean-loss scale; scikit-learn C = 1 / (l2 N))."""

DEFAULT_INNER_FRACTION = 0.2
"""Share of the training passcodes held out to choose the strength."""


def normalise_grid(grid: Sequence[float] | float) -> tuple[float, ...]:
    """Distinct values, ascending; each must be a finite number >= 0."""
    import numpy as np  # here, not at the top: the config reads this module without numpy

    values = [float(v) for v in np.atleast_1d(np.asarray(grid, dtype=np.float64))]
    if not values:
        raise ValueError("the strength grid is empty")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"strength grid values must be finite and >= 0, got {values}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class LinearConfig:
    """How to fit linear probes.

    l2: L2 strength on the weights of the mean-loss objective (sklearn C = 1 / (l2 * N)).
    max_iter: L-BFGS iterations per problem.
    tol: stop a problem when max |gradient| <= tol (sklearn's `tol`).
    tol_follows_l2: stop at max |gradient| <= min(tol, max(10 l2, TOL_FLOOR)) instead. The solution at
        l2 is pinned down only to |dW| ~ |gradient| / l2, so with a fixed tol a path of weaker and weaker
        strengths stops moving (a warm start from the previous decade is already "converged"): the
        probe is then regularised by the tolerance, not by l2, and a weaker grid value cannot win
        however much it would. With the tolerance at 10 l2 a warm start from 10 l2, whose gradient
        grows by about 9 l2 |W|, moves on for any weight above about 1 in standardised units
        (on the toy, masked +1 then rose from 27.6 at 1e-4 to 32.8 at 1e-5; with tol fixed, 27.9).
    history: L-BFGS memory (scipy's default is 10).
    max_halvings: backtracking steps before a problem's line search gives up.
    precondition: start each L-BFGS direction from the Gram-matrix bound on the Hessian
        (see the module docstring); False is plain L-BFGS, scipy's algorithm.
    gram_rows: training rows the Gram matrix is estimated from (evenly spaced; all if fewer).
    """

    l2: float = 1e-3
    max_iter: int = 500
    tol: float = 1e-4
    tol_follows_l2: bool = True
    history: int = 10
    max_halvings: int = 30
    precondition: bool = True
    gram_rows: int = 16384

    def __post_init__(self) -> None:
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if self.max_iter < 1 or self.history < 1 or self.max_halvings < 1 or self.gram_rows < 1:
            raise ValueError("max_iter, history, max_halvings and gram_rows must be >= 1")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")


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


@renamed_fields(kinds="families")
@dataclass(frozen=True)
class ProbeConfig:
    """How to probe a store.

    families: probe families (formerly `kinds`); seeds: MLP initialisations (the linear probe
    is convex and fitted once); shuffled_control: also fit each probe on permuted training labels;
    max_group_bytes: feature memory per batched fit (cells are fitted in groups).
    linear_l2_grid: L2 strengths the linear probe's strength is chosen from, per cell, on an inner
    label-unique split (`inner_fraction` of the training passcodes); one value, or None
    (= linear.l2), is a fixed strength. mlp_l2_grid: the same for the MLP's L2 (weight
    decay); None keeps mlp.l2 (the MLP's epochs are always chosen by early stopping).
    extend_grid: where a cell's best strength is on an edge of its grid, try it a decade further
    until interior or at a bound of `L2_BOUNDS` (rows record `l2_at_bound`); False keeps the grid.
    extend_ties: an edge with the same inner accuracy as the best is extended too (a tie the inner
    split cannot break must not stop the extension); False: only an edge that is the choice itself.
    """

    families: tuple[str, ...] = FAMILIES
    seeds: int = 3
    val_fraction: float = 0.2
    split_seed: int = 0
    pooling: str = DEFAULT_POOLING
    shuffled_control: bool = True
    n_boot: int = 2000
    layers: tuple[int, ...] | None = None  # None: every captured layer
    offsets: tuple[int, ...] | None = None
    sites: tuple[str, ...] | None = None
    max_group_bytes: int = 1 << 30
    device: str | None = None
    linear: LinearConfig = LinearConfig(tol=1e-3)
    mlp: MLPConfig = MLPConfig()
    linear_l2_grid: tuple[float, ...] | None = DEFAULT_LINEAR_L2_GRID
    mlp_l2_grid: tuple[float, ...] | None = None
    inner_fraction: float = DEFAULT_INNER_FRACTION
    extend_grid: bool = True
    extend_ties: bool = True

    def strength_grid(self, kind: str) -> tuple[float, ...]:
        """The L2 values a probe kind is chosen from (ascending); one value means fixed."""
        grid, config = (self.mlp_l2_grid, self.mlp) if kind == MLP else (self.linear_l2_grid, self.linear)
        return normalise_grid(config.l2 if grid is None else grid)


@dataclass(frozen=True)
class DecoderConfig:
    """The reconstruction probes' span decoder (`kvprobe.probes.decoder`): one learned query per target
    position cross-attends over the span's token vectors, then a feed-forward block and a classifier.

    width, heads: the attention's width and heads. lr, weight_decay, batch_size: AdamW. max_epochs,
    patience: early stopping on the inner label-unique split's cross-entropy (the best epoch is kept).
    """

    width: int = 64
    heads: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 5

    def __post_init__(self) -> None:
        if min(self.width, self.heads, self.batch_size, self.max_epochs, self.patience) < 1 or self.width % self.heads:
            raise ValueError(f"width, heads, batch_size, max_epochs and patience must be >= 1, and width a multiple "
                             f"of heads, got {self}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


# reconstruction targets: the block's first tokens by position, its first and last k, or its bag of tokens
POSITIONS, ENDS, BAG = "positions", "ends", "bag"
TARGETS = (POSITIONS, ENDS, BAG)
DECODER = "decoder"  # the span decoder's rows, beside the probe families' ("linear", "mlp")


@dataclass(frozen=True)
class ReconstructionConfig:
    """What to reconstruct and how to probe for it.

    target: "positions" (the first `positions` tokens), "ends" (the first and last `k`) or "bag" (which of
        the `vocab` tokens the block holds: its token set, one present/absent question per token).
    vocab: classes kept per the vocabulary cut (most frequent training tokens at the target positions;
        with "bag", the tokens in the most training blocks).
    smoothing: add-alpha counts of the unigram baseline.
    l2_grid: the linear probe's L2 strengths, chosen per cell by the lowest inner cross-entropy (bits
        need a calibrated probe; the passcode probes choose theirs by accuracy) and extended past an
        edge it lands on, towards `L2_BOUNDS`; one value is a fixed strength.
    probe: the probe families, split and pooling (its seeds, shuffled control and linear strength grid
        are not used: one seed per MLP is fitted, and the linear grid is `l2_grid`).
    span_decoder: also fit the span decoder (`decoder`) on every cell: it reads the span's token vectors
        (the pooling's, e.g. tail_mean's last 4 tokens and their mean) as a sequence, not one flat vector.
    """

    target: str = POSITIONS
    positions: int = 8
    k: int = 4
    vocab: int = 64
    smoothing: float = 1.0
    l2_grid: tuple[float, ...] = DEFAULT_LINEAR_L2_GRID
    span_decoder: bool = False
    decoder: DecoderConfig = DecoderConfig()
    probe: ProbeConfig = ProbeConfig(families=(LINEAR,), seeds=1, shuffled_control=False)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        half = CONTENT_TOKENS // 2  # a longer block is stored as its first and last half: t33 on is not its own
        if not 1 <= self.positions <= half or not 1 <= self.k <= half:
            raise ValueError(f"positions and k must be in 1..{half}, got {self.positions} and {self.k}")
        object.__setattr__(self, "l2_grid", normalise_grid(self.l2_grid))
        if self.vocab < 1 or not self.smoothing > 0:
            raise ValueError(f"vocab must be >= 1 and smoothing > 0, got {self.vocab} and {self.smoothing}")
