"""Comparing two capture stores in the tests: same samples, same cells, same feature matrices.

    from stores import assert_same_store, store_features
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvprobe.store import KVStore

__all__ = ["assert_same_store", "store_features"]


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
