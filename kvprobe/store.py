"""The HDF5 KV store: sharded, resumable, self-describing (schema in docs/store.md).

A store is a directory:

    store/
      config.json              the full capture config, model identity and versions
      shards/shard_000000.h5   one file per shard of samples, written atomically
      kvstore.h5               written last: HDF5 virtual datasets over all shards

Each shard is written to a temporary name and renamed into place, so a crash (even
kill -9) leaves only whole shards; resuming skips them. A store is complete once
`kvstore.h5` exists. Shards from several processes (one per rank) are joined by the
same virtual-dataset index, and readers see one store either way.

The store knows nothing of probes: it holds features, labels and sample metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "Cell",
    "FeatureKey",
    "KVStore",
    "StoreError",
    "StoreWriter",
    "feature_path",
]

SCHEMA_VERSION = 2  # 2: site "memento" is the whole span <|summary_start|> .. <|summary_end|>
CONFIG_FILE = "config.json"
INDEX_FILE = "kvstore.h5"
SHARD_DIR = "shards"


class StoreError(ValueError):
    """A store is missing, incomplete, or does not match what was asked of it."""


@dataclass(frozen=True, order=True)
class FeatureKey:
    """One captured feature family: a site ('memento' or 'block_end'), an offset from
    the target block, and a pooling ('mean', 'last' or 'tokens')."""

    site: str
    offset: int
    pooling: str

    @property
    def path(self) -> str:
        return feature_path(self.site, self.offset, self.pooling)


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the leakage grid, named the same way everywhere (store, probes, results,
    per-sample scores): the features of `site` at `offset` blocks from the target block, at
    `layer`, pooled by `pooling`. A `FeatureKey` plus a layer."""

    site: str
    offset: int
    layer: int
    pooling: str = "tail_mean"

    @property
    def key(self) -> FeatureKey:
        return FeatureKey(self.site, self.offset, self.pooling)

    @property
    def label(self) -> str:
        """'memento|+1|3|tail_mean': the cell as one string (file keys)."""
        return f"{self.site}|{self.offset:+d}|{self.layer}|{self.pooling}"

    @classmethod
    def parse(cls, label: str) -> "Cell":
        """The inverse of `label`."""
        site, offset, layer, pooling = label.split("|")
        return cls(site, int(offset), int(layer), pooling)


def feature_path(site: str, offset: int, pooling: str) -> str:
    """HDF5 path of a feature dataset, e.g. 'features/memento/+1/mean'."""
    return f"features/{site}/{offset:+d}/{pooling}"


def _shard_name(index: int) -> str:
    return f"shard_{index:06d}.h5"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class StoreWriter:
    """Writes a store shard by shard.

    `meta` is everything that identifies the store's contents (capture config, model
    identity, versions); it is written to config.json first. mode: 'create' refuses an
    existing path, 'resume' continues a store whose meta matches, 'overwrite' deletes it,
    'join' creates the store or joins one with the same meta (processes sharing a capture).
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, mode: str = "create") -> None:
        if mode not in ("create", "resume", "overwrite", "join"):
            raise ValueError(f"mode must be 'create', 'resume', 'overwrite' or 'join', got {mode!r}")
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta))  # canonical JSON types
        config_file = self.path / CONFIG_FILE
        if self.path.exists():
            if mode == "create":
                raise StoreError(f"{self.path} already exists (resume or overwrite it explicitly)")
            if mode == "overwrite":
                shutil.rmtree(self.path)
            elif not config_file.exists() and mode != "join":
                raise StoreError(f"{self.path} exists but is not a kvprobe store (no {CONFIG_FILE})")
            else:
                self._check_same(json.loads(config_file.read_text()))
        elif mode == "resume":
            raise StoreError(f"{self.path} does not exist: nothing to resume")
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if not config_file.exists():
            _write_json_atomic(config_file, {"schema_version": SCHEMA_VERSION, **self.meta})
        elif mode == "join":  # another process created it first
            self._check_same(json.loads(config_file.read_text()))

    def _check_same(self, existing: dict[str, Any]) -> None:
        for key in ("model", "capture", "source"):
            if existing.get(key) != self.meta.get(key):
                raise StoreError(
                    f"{self.path} was written by another {key} "
                    f"({json.dumps(existing.get(key), sort_keys=True)[:120]}); use a new output path or overwrite"
                )

    @property
    def shard_dir(self) -> Path:
        return self.path / SHARD_DIR

    def done_shards(self) -> set[int]:
        """Indices of shards already written whole."""
        return {int(p.stem.split("_")[1]) for p in self.shard_dir.glob("shard_*.h5")}

    def write_shard(
        self,
        index: int,
        samples: dict[str, np.ndarray],
        features: dict[FeatureKey, np.ndarray],
        compression: str = "gzip",
        compression_opts: int | None = 1,
    ) -> Path:
        """Write one shard atomically.

        samples: 'index' (n,), 'passcode' (n,) str, 'labels' (n, L), 'layout' (n, n_blocks, 5).
        features: key -> (n, n_layers, D), (n, n_layers, max_tokens, D) for 'tokens' or
        (n, n_layers, max_tokens + 1, D) for 'tail_mean'.
        compression: 'gzip' (at level `compression_opts`), 'lzf' or 'none', for the features.
        """
        if compression not in ("gzip", "lzf", "none"):
            raise ValueError(f"compression must be 'gzip', 'lzf' or 'none', got {compression!r}")
        filters = {"compression": None if compression == "none" else compression,
                   "compression_opts": compression_opts if compression == "gzip" else None,
                   "shuffle": compression != "none"}
        n = len(samples["index"])
        final = self.shard_dir / _shard_name(index)
        tmp = final.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["shard"] = index
            for name, arr in samples.items():
                if len(arr) != n:
                    raise ValueError(f"samples/{name} has {len(arr)} rows, expected {n}")
                if name == "passcode":
                    f.create_dataset(f"samples/{name}", data=np.asarray(arr, dtype=h5py.string_dtype()))
                else:
                    f.create_dataset(f"samples/{name}", data=arr)
            for key, arr in features.items():
                if len(arr) != n:
                    raise ValueError(f"{key.path} has {len(arr)} rows, expected {n}")
                chunks = (min(n, 256), 1) + arr.shape[2:]  # one layer of a few hundred samples
                f.create_dataset(key.path, data=arr, chunks=chunks, **filters)
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        os.replace(tmp, final)
        return final

    def finalize(self, n_shards: int, attrs: dict[str, Any] | None = None, tag: str = "") -> Path:
        """Join shards 0..n_shards-1 into the virtual-dataset index; the store is then complete.

        `tag` names this process's temporary file, so processes finalizing at once never
        write the same file; the rename into place is atomic and their indexes identical.
        """
        missing = sorted(set(range(n_shards)) - self.done_shards())
        if missing:
            raise StoreError(f"{self.path}: cannot finalize, shards {missing[:5]} are missing")
        shards = [self.shard_dir / _shard_name(i) for i in range(n_shards)]
        index_tmp = self.path / f"{INDEX_FILE}.{tag or os.getpid()}.tmp"
        with h5py.File(shards[0], "r") as f0:
            names: list[str] = []
            f0.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            specs = {name: (f0[name].shape[1:], f0[name].dtype) for name in names}
        sizes = []
        for shard in shards:
            with h5py.File(shard, "r") as f:
                sizes.append(len(f["samples/index"]))
        total = sum(sizes)
        with h5py.File(index_tmp, "w") as out:
            out.attrs["schema"] = "kvprobe.kvstore"
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["n_samples"] = total
            out.attrs["n_shards"] = n_shards
            out.attrs["config"] = json.dumps({"schema_version": SCHEMA_VERSION, **self.meta}, sort_keys=True)
            for k, v in (attrs or {}).items():
                out.attrs[k] = v
            for name, (tail, dtype) in specs.items():
                layout = h5py.VirtualLayout(shape=(total,) + tail, dtype=dtype)
                start = 0
                for shard, size in zip(shards, sizes):
                    rel = os.path.join(SHARD_DIR, shard.name)  # resolved against the index file's folder
                    layout[start : start + size] = h5py.VirtualSource(rel, name, shape=(size,) + tail)
                    start += size
                out.create_virtual_dataset(name, layout)
        os.replace(index_tmp, self.path / INDEX_FILE)
        return self.path / INDEX_FILE


class KVStore:
    """Read a complete store. Feature matrices are read lazily, one (key, layer) at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store")
        if not index.exists():
            raise StoreError(f"{self.path}: incomplete store (no {INDEX_FILE}); resume the capture to finish it")
        self._file = h5py.File(index, "r")
        self.config: dict[str, Any] = json.loads(self._file.attrs["config"])
        version = int(self._file.attrs["schema_version"])
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this kvprobe reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._file.attrs["n_samples"])

    @property
    def layers(self) -> list[int]:
        return list(self.config["capture"]["layers"])

    @property
    def keys(self) -> list[FeatureKey]:
        """Every (site, offset, pooling) in the store."""
        out = []
        for site, g_site in self._file["features"].items():
            for offset, g_off in g_site.items():
                for pooling in g_off:
                    out.append(FeatureKey(site, int(offset), pooling))
        return sorted(out)

    @property
    def sample_ids(self) -> np.ndarray:
        return self._file["samples/index"][:]

    @property
    def passcodes(self) -> list[str]:
        return [p.decode() if isinstance(p, bytes) else p for p in self._file["samples/passcode"][:]]

    @property
    def labels(self) -> np.ndarray:
        """(N, passcode length) class indices."""
        return self._file["samples/labels"][:].astype(np.int64)

    @property
    def layouts(self) -> np.ndarray:
        """(N, n_blocks, 5): per block [start, end, summary_start, summary_end, stop], -1 if absent."""
        return self._file["samples/layout"][:]

    def features(
        self, layer: int, offset: int, site: str = "memento", pooling: str = "tail_mean", dtype: Any = np.float32
    ) -> np.ndarray:
        """Feature matrix of one layer: (N, D) for 'mean' and 'last', (N, max_tokens, D) for
        'tokens', (N, max_tokens + 1, D) for 'tail_mean' (the last tokens, then the mean)."""
        key = FeatureKey(site, offset, pooling)
        if key.path not in self._file:
            raise StoreError(f"{self.path}: no features for {key} (available: {', '.join(map(str, self.keys))})")
        if layer not in self.layers:
            raise StoreError(f"{self.path}: layer {layer} was not captured (layers {self.layers})")
        return self._file[key.path][:, self.layers.index(layer)].astype(dtype)
