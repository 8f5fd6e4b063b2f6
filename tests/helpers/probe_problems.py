"""Probe problems with a known answer, and a store-shaped stand-in, for the probe tests.

`correlated_noise` is a problem where strong L2 loses, `class_means` one where it wins (both
(1, n, D) float32 features and (n, K) digit labels, K = 3); `FakeStore` is what `probe_store`
reads from a KVStore, with a signal that falls with the offset.

    from tests.helpers.probe_problems import FakeStore, class_means, correlated_noise
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["K", "FakeStore", "class_means", "correlated_noise"]

K = 3  # digits: 1,000 passcodes, enough for label-unique splits


def correlated_noise(n: int, seed: int, noise: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Strong L2 loses: digit k lives in x[a] - x[b] of its own block [code + shared, shared], each
    half buried in one large shared noise. The weak-L2 probe learns the difference (about 80%); a
    shrunk probe is close to a nearest-centroid rule, which sees the code under the noise (near chance).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, (n, K))
    blocks = []
    for k in range(K):
        angle = 2 * np.pi * y[:, k] / 10
        shared = rng.normal(scale=noise, size=(n, 2))
        blocks += [np.stack([np.cos(angle), np.sin(angle)], axis=1) + shared, shared]
    x = np.concatenate(blocks, axis=1) + 0.02 * rng.normal(size=(n, 4 * K))
    return x[None].astype(np.float32), y


def class_means(n: int, seed: int, d: int = 120, scale: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Strong L2 wins: isotropic noise around one mean per digit value, few samples for the
    number of features (near the interpolation threshold, where a weakly penalised fit overfits)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(K, 10, d)) * scale / np.sqrt(d)
    y = rng.integers(0, 10, (n, K))
    x = means[np.arange(K), y].sum(axis=1) + rng.normal(size=(n, d))
    return x[None].astype(np.float32), y


@dataclass(frozen=True)
class _Key:
    site: str
    offset: int
    pooling: str


class FakeStore:
    """What probe_store reads from a KVStore: passcodes, labels, cells and their features."""

    def __init__(self, n: int = 900, d: int = 12, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.passcodes = ["".join(map(str, rng.integers(0, 10, 5))) for _ in range(n)]
        self.labels = np.array([[int(c) for c in p] for p in self.passcodes])
        self.layers = [0, 1]
        self.keys = [_Key("memento", o, "mean") for o in (-1, 0, 1)]
        self.config = {"dims": {"feature_dim": d}, "capture": {"max_tokens": 1}}
        self.path = Path("fake-store")
        self.sample_ids = np.arange(n)
        emb = np.random.default_rng(1).normal(size=(5, 10, d))
        signal = emb[np.arange(5), self.labels].sum(axis=1)
        noise = rng.normal(size=(2, 3, n, d))
        self._x = {(layer, o): (signal * (0.0 if o < 0 else 0.6 / (1 + o)) + noise[layer, o + 1]).astype(np.float16)
                   for layer in self.layers for o in (-1, 0, 1)}

    def features(self, layer: int, offset: int, site: str = "memento", pooling: str = "mean") -> np.ndarray:
        return self._x[(layer, offset)]
