"""What store integrity costs: a checksummed shard against the same shard written plainly.

    python benchmarks/bench_store_integrity.py                 # a toy-sized shard, best of 3
    python benchmarks/bench_store_integrity.py --samples 1024 --keys 10 --compression lzf

One shard as the toy's default capture writes it (samples x 4 layers x (4 tail tokens +
mean) x 256 float16 values per key, a key per offset), written (a) by `StoreWriter`, with
HDF5's Fletcher-32 on every chunk and the SHA-256 record, and (b) by plain h5py with the
same chunks and filter but neither check, interleaved in one process. Also: a full
`verify_store` of a finished store (every byte against its SHA-256) and a cheap open
(`KVStore`: size and header of every shard). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from kvprobe.grid import FeatureKey
from kvprobe.store import KVStore, StoreWriter, verify_store


def _plain(path: Path, samples: dict, features: dict, compression: str) -> None:
    """The same datasets, chunks and filter as StoreWriter.write_shard, without Fletcher-32 or SHA-256."""
    opts = {"compression": None if compression == "none" else compression,
            "compression_opts": 1 if compression == "gzip" else None, "shuffle": compression != "none"}
    with h5py.File(path, "w") as f:
        for name, arr in samples.items():
            if name == "passcode":
                f.create_dataset(f"samples/{name}", data=np.asarray(arr, dtype=h5py.string_dtype()))
            else:
                f.create_dataset(f"samples/{name}", data=arr)
        for key, arr in features.items():
            n = len(arr)
            f.create_dataset(key.path, data=arr, chunks=(min(n, 256), 1) + arr.shape[2:], **opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=10, help="feature keys (offsets) per shard")
    ap.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.samples
    samples = {"index": np.arange(n, dtype=np.int64), "passcode": np.array([f"{i:05d}" for i in range(n)], dtype=object),
               "labels": rng.integers(0, 10, (n, 5)).astype(np.int8), "layout": np.zeros((n, 10, 5), dtype=np.int32)}
    features = {FeatureKey("memento", o, "tail_mean"): rng.standard_normal((n, 4, 5, 256)).astype(np.float16)
                for o in range(args.keys)}
    raw = sum(a.nbytes for a in features.values())
    root = Path(tempfile.mkdtemp())
    try:
        checked, plain = [], []
        for r in range(args.repeats):
            writer = StoreWriter(root / f"store{r}", {"model": {}, "capture": {"layers": [0, 1, 2, 3]}, "source": {}})
            t = time.perf_counter()
            writer.write_shard(0, samples, features, compression=args.compression)
            checked.append(time.perf_counter() - t)
            t = time.perf_counter()
            _plain(root / f"plain{r}.h5", samples, features, args.compression)
            plain.append(time.perf_counter() - t)
        writer.finalize(1)
        store = writer.path
        size = (store / "shards" / "shard_000000.h5").stat().st_size
        t = time.perf_counter()
        problems = verify_store(store)
        verify_s = time.perf_counter() - t
        assert problems == [], problems
        t = time.perf_counter()
        with KVStore(store):
            pass
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        with KVStore(store) as s:
            for o in range(args.keys):
                s.features(3, o)
        read_s = time.perf_counter() - t
    finally:
        shutil.rmtree(root)
    c, p = min(checked), min(plain)
    print(f"shard: {n} samples x {args.keys} keys, {raw / 1e6:.1f} MB raw, {size / 1e6:.1f} MB on disk ({args.compression})")
    print(f"write, checksummed (Fletcher-32 + SHA-256): {c:.3f} s; plain: {p:.3f} s; ratio {c / p:.3f}")
    print(f"verify_store (every byte): {verify_s:.3f} s ({size / 1e6 / verify_s:,.0f} MB/s); open (size + header): "
          f"{1000 * open_s:.1f} ms; reading one layer of every key: {read_s:.3f} s")


if __name__ == "__main__":
    main()
