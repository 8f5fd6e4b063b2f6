"""Capture stores in the tests: a tiny synthetic store written in-process, and comparing two stores
(same samples, same cells, same feature matrices).

    from tests.helpers.stores import assert_same_store, store_features, synthetic_shards, write_synthetic_store
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvprobe.data.passcodes import PasscodeConfig, allowed_codes
from kvprobe.memento.masks import MaskConfig
from kvprobe.store import CONTENT_TOKENS, FeatureKey, KVStore, StoreWriter

__all__ = ["assert_same_store", "store_features", "synthetic_meta", "synthetic_shards", "write_synthetic_store"]

# the leak each offset carries in the synthetic store: direct strong, masked +1 weak, the control none
SIGNAL = {-1: 0.0, 0: 3.0, 1: 0.4}


def store_features(path: str | Path) -> dict[tuple[int, str, int, str], np.ndarray]:
    """Every feature matrix of a store, keyed (layer, site, offset, pooling)."""
    with KVStore(path) as s:
        return {(layer, k.site, k.offset, k.pooling): s.features(layer, k.offset, k.site, k.pooling)
                for k in s.keys for layer in s.layers}


def assert_same_store(a: str | Path, b: str | Path, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Same passcodes, labels and cells; features equal (exactly, unless a tolerance is given)."""
    with KVStore(a) as x, KVStore(b) as y:
        assert x.passcodes == y.passcodes and len(x) == len(y)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.keys == y.keys and x.layers == y.layers
    fa, fb = store_features(a), store_features(b)
    for cell, expected in fa.items():
        if atol == rtol == 0.0:
            np.testing.assert_array_equal(fb[cell], expected, err_msg=str(cell))
        else:
            np.testing.assert_allclose(fb[cell], expected, atol=atol, rtol=rtol, err_msg=str(cell))


def synthetic_meta(*, n_layers: int = 2, offsets=tuple(SIGNAL), digit_sum: int | None = None,
                   feature_dim: int = 50, mask: MaskConfig = MaskConfig()) -> dict[str, Any]:
    """A store's config.json as a capture writes it, for a synthetic store (what KVStore and probe_store read)."""
    codes = PasscodeConfig(digit_sum=digit_sum)
    return {"model": {"name": "synthetic"}, "dims": {"feature_dim": feature_dim},
            "capture": {"layers": list(range(n_layers)), "offsets": list(offsets), "sites": ["memento"],
                        "pooling": ["mean"], "max_tokens": 1, "mask": {"keep_last_n_blocks": mask.keep_last_n_blocks,
                                                                       "restart_mode": mask.restart_mode}},
            "source": {"kind": "synthetic", "passcode": codes.describe()}}


def synthetic_shards(n: int = 600, shard_size: int = 250, *, n_layers: int = 2, offsets=tuple(SIGNAL),
                     digit_sum: int | None = None, seed: int = 0, signal: dict[int, float] | None = None):
    """Shards of a synthetic store: [(samples, features)], features keyed FeatureKey(memento, offset, mean),
    each (rows, n_layers, 50) float16: a one-hot code of the five digits scaled by SIGNAL[offset] (x1.5 at
    the last layer) plus unit noise, so a linear probe reads the direct offset almost perfectly, +1 a little
    and the control not at all. With digit_sum, only passcodes whose digits sum to it. `signal` replaces SIGNAL
    (the same seed draws the same passcodes and noise whatever the scales). The target block's text
    (`samples/content`) is its five digits, token ids 0..9, as on the toy."""
    rng = np.random.default_rng(seed)
    if digit_sum is None:
        labels = rng.integers(0, 10, (n, 5))
    else:
        codes = allowed_codes(PasscodeConfig(digit_sum=digit_sum))
        labels = codes[rng.integers(0, len(codes), n)]
    onehot = np.zeros((n, 50), dtype=np.float32)
    onehot[np.arange(n)[:, None], 10 * np.arange(5) + labels] = 1.0
    features = {}
    for offset in offsets:
        scale = (SIGNAL if signal is None else signal).get(offset, 0.0)
        x = np.stack([scale * (1.0 + 0.5 * layer) * onehot + rng.normal(size=(n, 50)) for layer in range(n_layers)],
                     axis=1)
        features[FeatureKey("memento", offset, "mean")] = x.astype(np.float16)
    content = np.full((n, CONTENT_TOKENS), -1, dtype=np.int32)
    content[:, :5] = labels
    layouts = np.tile(np.arange(15).reshape(3, 5), (n, 1, 1)).astype(np.int64)  # 3 blocks, 5 positions each
    shards = []
    for start in range(0, n, shard_size):
        rows = slice(start, min(n, start + shard_size))
        samples = {"index": np.arange(n)[rows], "passcode": ["".join(map(str, code)) for code in labels[rows]],
                   "labels": labels[rows], "layout": layouts[rows], "content": content[rows],
                   "content_length": np.full(len(labels[rows]), 5, dtype=np.int32)}
        shards.append((samples, {k: v[rows] for k, v in features.items()}))
    return shards


def write_synthetic_store(path: str | Path, n: int = 600, shard_size: int = 250, *, n_layers: int = 2,
                          offsets=tuple(SIGNAL), digit_sum: int | None = None, seed: int = 0,
                          mask: MaskConfig = MaskConfig(), signal: dict[int, float] | None = None) -> Path:
    """A complete store of `synthetic_shards`, written with StoreWriter in a fraction of a second."""
    writer = StoreWriter(path, synthetic_meta(n_layers=n_layers, offsets=offsets, digit_sum=digit_sum, mask=mask))
    shards = synthetic_shards(n, shard_size, n_layers=n_layers, offsets=offsets, digit_sum=digit_sum, seed=seed,
                              signal=signal)
    for i, (samples, features) in enumerate(shards):
        writer.write_shard(i, samples, features)
    writer.finalize(len(shards))
    return Path(path)
