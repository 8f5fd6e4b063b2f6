"""Batched linear probes vs scikit-learn one probe at a time, on a toy-sized grid.

The grid mimics the toy experiment: 4 layers x 10 memento offsets (-1 .. +8) =
40 groups of D = 256 features, 4000 training and 1000 validation passcodes of
5 digits, so 200 linear probes. Signal grows with depth and decays with
offset; offset -1 (the causal control) carries none. Both fits see the same
standardised features and minimise the same objective (C = 1 / (l2 * N)).

    python benchmarks/bench_probes.py            # ~ a few minutes on 2 cores
    python benchmarks/bench_probes.py --mlp      # also time the paper's MLP on the grid
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvprobe.probes import LinearConfig, fit_probes, fit_sklearn


@dataclass
class BenchConfig:
    layers: int = 4
    offsets: tuple[int, ...] = tuple(range(-1, 9))
    dim: int = 256
    n_train: int = 4000
    n_val: int = 1000
    n_digits: int = 5
    l2: float = 1e-3
    seed: int = 0
    threads: int = 2


def make_grid(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features (G, N, D) with signal strength[layer, offset] on a linear passcode code, plus labels (N, K)."""
    rng = np.random.default_rng(cfg.seed)
    depth = np.linspace(0.3, 1.0, cfg.layers)[:, None]  # (L, 1)
    offsets = np.asarray(cfg.offsets)
    decay = np.where(offsets < 0, 0.0, np.where(offsets == 0, 1.0, 0.35 / np.maximum(offsets, 1) ** 0.5))
    strength = (depth * decay[None]).reshape(-1, 1, 1)  # (G, 1, 1)
    emb = rng.normal(size=(cfg.n_digits, 10, cfg.dim)) * 2.5 / np.sqrt(cfg.dim)  # (K, C, D)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, (n, cfg.n_digits))  # (n, K)
        signal = emb[np.arange(cfg.n_digits), y].sum(axis=1)  # (n, D)
        x = strength * signal[None] + rng.normal(size=(len(strength), n, cfg.dim))  # (G, n, D)
        return x.astype(np.float32), y

    return (*draw(cfg.n_train), *draw(cfg.n_val))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlp", action="store_true", help="also fit the paper's MLP probe on the grid")
    parser.add_argument("--device", default="cpu", help="where the batched probes run (cpu, cuda)")
    args = parser.parse_args()
    cfg = BenchConfig()
    torch.set_num_threads(cfg.threads)
    xt, yt, xv, yv = make_grid(cfg)
    G, K = xt.shape[0], yt.shape[1]
    print(f"grid: {G} groups x {K} digits = {G * K} probes, D={cfg.dim}, N_train={cfg.n_train}, "
          f"N_val={cfg.n_val}, l2={cfg.l2}, torch threads={cfg.threads}, batched on {args.device}")

    fit_probes(xt[:2, :200], yt[:200], xv[:2, :50], yv[:50], l2=cfg.l2, device=args.device)  # warm-up
    ours, wall_b, cpu_b = timed(lambda: fit_probes(xt, yt, xv, yv, config=LinearConfig(l2=cfg.l2), device=args.device))
    print(f"batched torch L-BFGS : {wall_b:7.1f} s wall  {cpu_b:7.1f} s CPU  "
          f"(iterations mean {ours.n_steps.mean():.1f}, max {ours.n_steps.max()}, "
          f"converged {ours.converged.mean():.0%})")
    ref, wall_s, cpu_s = timed(lambda: fit_sklearn(xt, yt, xv, yv, l2=cfg.l2))
    print(f"sklearn, one by one  : {wall_s:7.1f} s wall  {cpu_s:7.1f} s CPU  "
          f"(iterations mean {ref.n_steps.mean():.1f}, max {ref.n_steps.max()})")
    print(f"speed-up             : {wall_s / wall_b:7.1f}x wall  {cpu_s / cpu_b:7.1f}x CPU")

    diff = np.abs(ours.digit_accuracy - ref.digit_accuracy)
    print(f"accuracy agreement   : max |diff| per probe {100 * diff.max():.2f} pp, per group "
          f"{100 * np.abs(ours.accuracy - ref.accuracy).max():.2f} pp, mean {100 * diff.mean():.3f} pp")
    print(f"max |log-prob diff|  : {np.abs(ours.log_probs - ref.log_probs).max():.4f}")
    table = ours.accuracy.reshape(cfg.layers, len(cfg.offsets))
    print("batched accuracy (%), rows = layers, columns = offsets", list(cfg.offsets))
    for row in table:
        print("   " + " ".join(f"{100 * a:5.1f}" for a in row))

    if args.mlp:
        mlp, wall_m, cpu_m = timed(lambda: fit_probes(xt, yt, xv, yv, "mlp", seed=0, device=args.device))
        print(f"MLP (512-256-128)    : {wall_m:7.1f} s wall  {cpu_m:7.1f} s CPU  "
              f"(best epoch mean {mlp.n_steps[:, 0].mean():.1f}); accuracy minus linear, pp: "
              f"mean {100 * (mlp.accuracy - ours.accuracy).mean():+.2f}")


if __name__ == "__main__":
    main()
