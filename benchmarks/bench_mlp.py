"""The MLP's seeds and shuffled-label control: one batched run against one run each.

The probe stage trains, per MLP cell, `seeds` initialisations and a shuffled-label control.
This benchmark times them as separate `fit_probes(..., "mlp", seed=s)` runs (the baseline)
and as one `fit_mlp_replicas` run, in one process, interleaved, on the same features, and
reports the ratio and the largest accuracy difference between the two (they are the same
runs, so it should be float noise).

Features: the cells of a store (`--store`, e.g. the masked +1 cells of the 50K toy store)
or, without one, random features of the toy's default width (D = 1,280) whose first
coordinates carry the digits, so early stopping has something to find.

    python benchmarks/bench_mlp.py                                    # random, a few minutes
    python benchmarks/bench_mlp.py --store runs/toy/stores/memento --cells 0:1 3:1 --epochs 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from kvprobe.cli.runtime import keep_freed_memory
from kvprobe.probes import MLPConfig, fit_mlp_replicas, fit_probes
from kvprobe.stats import shuffle_labels


def random_cells(n_cells: int, n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (G, n, dim) float32 whose first 5 x 10 coordinates hold noisy one-hot digits; labels (n, 5)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, (n, 5))
    x = rng.normal(size=(n_cells, n, dim)).astype(np.float32)
    onehot = np.zeros((n, 50), dtype=np.float32)
    onehot[np.arange(n)[:, None], np.arange(5) * 10 + y] = 1.0
    x[:, :, :50] += 1.5 * onehot
    return x, y


def store_cells(path: str, cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features (G, N, D) of the requested LAYER:OFFSET memento cells and labels (N, K)."""
    from kvprobe.analysis import Cell, ProbeConfig, _plan
    from kvprobe.store import KVStore

    store = KVStore(path)
    _, D = _plan(store, ProbeConfig())
    pooling = store.keys[0].pooling
    group = [Cell("memento", int(c.split(":")[1]), int(c.split(":")[0]), pooling) for c in cells]
    x = np.stack([store.features(c.layer, c.offset, c.site, c.pooling) for c in group]).reshape(len(group), -1, D)
    return x, store.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="read cells from this store (default: random features)")
    ap.add_argument("--cells", nargs="+", default=["0:1", "3:1"], help="LAYER:OFFSET cells of --store")
    ap.add_argument("--samples", type=int, default=8000, help="random features: samples")
    ap.add_argument("--dim", type=int, default=1280, help="random features: width")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="MLP max_epochs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI runs it

    if args.store:
        x, y = store_cells(args.store, args.cells)
    else:
        x, y = random_cells(len(args.cells), args.samples, args.dim)
    n_val = len(y) // 5
    xt, xv, yt, yv = x[:, n_val:], x[:, :n_val], y[n_val:], y[:n_val]
    cfg = MLPConfig(max_epochs=args.epochs)
    label_sets = [yt] * args.seeds + [shuffle_labels(yt, seed=1000)]
    seeds = [*range(args.seeds), 0]

    t = time.perf_counter()
    alone = [fit_probes(xt, ys, xv, yv, "mlp", seed=s, config=cfg) for ys, s in zip(label_sets, seeds)]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    together = fit_mlp_replicas(xt, label_sets, xv, yv, seeds, config=cfg)
    t_together = time.perf_counter() - t

    diff = max(float(np.abs(a.accuracy - b.accuracy).max()) for a, b in zip(alone, together))
    print(f"{x.shape[0]} cells x {len(label_sets)} runs ({args.seeds} seeds + shuffled), "
          f"{xt.shape[1]} training samples, D = {x.shape[2]}, max_epochs {args.epochs}, {args.threads} threads")
    print("| runs | seconds | ratio |\n|---|---|---|")
    print(f"| one each (baseline) | {t_alone:.1f} | 1.00 |")
    print(f"| one batched run | {t_together:.1f} | {t_alone / t_together:.2f}x faster |")
    print(f"largest accuracy difference between the two: {100 * diff:.3f} pp")
    for r, (a, s) in enumerate(zip(together, seeds)):
        print(f"  replica {r} (seed {s}{', shuffled' if r == args.seeds else ''}): accuracy "
              + " ".join(f"{100 * v:.2f}" for v in a.accuracy) + f", best epoch {a.n_steps[:, 0].tolist()}")


if __name__ == "__main__":
    main()
