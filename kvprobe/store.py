"""The HDF5 KV store: sharded, resumable, self-describing (schema in docs/store.md).

A store is a directory:

    store/
      config.json                the full capture config, model identity and versions
      shards/shard_000000.h5     one file per shard of samples, written atomically
      shards/shard_000000.json   its size and SHA-256, written just before it
      kvstore.h5                 written last: HDF5 virtual datasets over all shards
      kvstore.json               the index's size and SHA-256, written just after it

Each shard is written to a temporary name and renamed into place, so a crash (even
kill -9) leaves only whole shards; resuming skips them, once their checksum matches
(a damaged shard is captured again). A store is complete once `kvstore.h5` exists.
Shards from several processes (one per rank) are joined by the same virtual-dataset
index, and readers see one store either way.

Integrity: every shard's size and SHA-256 are recorded in the index; opening a store
checks that each shard is there, readable, of its recorded size and an HDF5 file (an
HDF5 virtual dataset would read a missing shard as zeros), and every numeric dataset
carries HDF5's Fletcher-32 checksum per chunk, so a damaged chunk fails when it is
read; the index is checked against its own size (on open) and SHA-256 (`verify_store`), which
stores written before that was recorded lack. `verify_store` reads every byte against the SHA-256.

The store knows nothing of probes: it holds features, labels and sample metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import KVProbeError
from .files import remove_leftovers, together, write_bytes, write_text
from .grid import (CONTENT_TOKENS, DEFAULT_POOLING, DEFAULT_SITE, Cell, FeatureKey,  # noqa: F401  (re-exported)
                   feature_path)

__all__ = [
    "CONTENT_TOKENS",
    "SCHEMA_VERSION",
    "Cell",
    "FeatureKey",
    "KVStore",
    "StoreError",
    "StoreWriter",
    "feature_path",
    "is_store",
    "verify_store",
]

SCHEMA_VERSION = 2  # 2: site "memento" is the whole span <|summary_start|> .. <|summary_end|>
CONFIG_FILE = "config.json"
INDEX_FILE = "kvstore.h5"
INDEX_RECORD = "kvstore.json"  # the index's size and SHA-256, written just after it (older stores: none)
SHARD_DIR = "shards"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
REPAIR = "resume the capture that wrote it (`kvprobe run CONFIG --out RUN --resume`) to capture it again"


class StoreError(KVProbeError, ValueError):
    """A store is missing, incomplete, or does not match what was asked of it."""


def _shard_name(index: int) -> str:
    return f"shard_{index:06d}.h5"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_shard(path: Path, record: dict[str, Any] | None, *, full: bool) -> str | None:
    """What is wrong with one shard file, or None: present, readable, of the recorded size,
    an HDF5 file, and (full) of the recorded SHA-256. `record` is {"bytes", "sha256"} or None
    for a store written before checksums were recorded (presence and header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if record is not None and size != record["bytes"]:
        return f"{size:,} bytes, {record['bytes']:,} recorded (truncated or replaced)"
    if head != HDF5_SIGNATURE:
        return "not an HDF5 file (damaged header)"
    if full and record is not None and _sha256(path) != record["sha256"]:
        return "checksum mismatch (its bytes changed after it was written)"
    return None


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory kvprobe wrote a store into (its config.json says so)."""
    config = Path(path) / CONFIG_FILE
    try:
        return "schema_version" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


MODEL_WEIGHTS = ("class", "n_params", "param_hash")
"""What of a recorded model identity (`kvprobe.capture.run.model_identity`) says which weights made a store: not
its name, which is a path or a hub id, so the same weights loaded from another folder are the same model."""


def differs(recorded: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """The first of "model", "capture", "source" on which a store's config.json and a capture's meta
    (`kvprobe.capture.store_meta`, compared as the JSON the store records) disagree, or None: the model by
    its weights (`MODEL_WEIGHTS`, where both carry a parameter hash; else whole), the others whole."""
    meta = json.loads(json.dumps(meta))  # tuples as lists: what config.json holds
    for key in ("model", "capture", "source"):
        before, now = recorded.get(key), meta.get(key)
        if key == "model" and all(isinstance(d, dict) and "param_hash" in d for d in (before, now)):
            before, now = ({k: d.get(k) for k in MODEL_WEIGHTS} for d in (before, now))
        if before != now:
            return key
    return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _hdf5_image(fill: Callable[[h5py.File], None]) -> bytes:
    """The bytes of an HDF5 file that `fill` builds in memory. HDF5 itself never writes to disk here:
    `kvprobe.files` does, so a full disk is one clean error (HDF5 writing onto a full disk can crash the process)."""
    with h5py.File(f"kvprobe-{secrets.token_hex(8)}.h5", "w", driver="core", backing_store=False) as f:
        fill(f)
        f.flush()
        return f.id.get_file_image()


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
                if any(self.path.iterdir()) and not is_store(self.path):
                    raise StoreError(f"{self.path}: not a kvprobe store (no kvprobe {CONFIG_FILE}); refusing to delete it")
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
        key = differs(existing, self.meta)
        if key is not None:
            raise StoreError(
                f"{self.path} was written by another {key} "
                f"({json.dumps(existing.get(key), sort_keys=True)[:120]}); use a new output path or overwrite"
            )

    @property
    def shard_dir(self) -> Path:
        return self.path / SHARD_DIR

    def done_shards(self) -> set[int]:
        """Indices of shards already written whole (with their checksum record)."""
        return {int(p.stem.split("_")[1]) for p in self.shard_dir.glob("shard_*.h5")
                if p.with_suffix(".json").is_file()}

    def drop_damaged(self) -> list[int]:
        """Check every written shard against its SHA-256 and delete the damaged ones (and the
        index, which names them), so a resume captures them again. Returns their indices. The
        temporary files of killed writers are deleted too (`kvprobe.files.remove_leftovers`; `shard_*.h5.tmp`
        before)."""
        remove_leftovers(self.path)
        for leftover in self.shard_dir.glob("shard_*.h5.tmp"):
            leftover.unlink(missing_ok=True)
        damaged = []
        for p in sorted(self.shard_dir.glob("shard_*.h5")):
            record = self._record(p)
            if record is None or _check_shard(p, record, full=True) is not None:
                damaged.append(int(p.stem.split("_")[1]))
                p.unlink()
                p.with_suffix(".json").unlink(missing_ok=True)
        if damaged:
            (self.path / INDEX_FILE).unlink(missing_ok=True)
        return damaged

    @staticmethod
    def _record(shard: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(shard.with_suffix(".json").read_text())
            return {"bytes": int(record["bytes"]), "sha256": str(record["sha256"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
        checked = {"fletcher32": True, "chunks": True}  # a per-chunk checksum HDF5 verifies on read

        def fill(f: h5py.File) -> None:
            f.attrs["shard"] = index
            for name, arr in samples.items():
                if len(arr) != n:
                    raise ValueError(f"samples/{name} has {len(arr)} rows, expected {n}")
                if name == "passcode":  # variable-length strings take no filters (the SHA-256 covers them)
                    f.create_dataset(f"samples/{name}", data=np.asarray(arr, dtype=h5py.string_dtype()))
                else:
                    f.create_dataset(f"samples/{name}", data=arr, **checked)
            for key, arr in features.items():
                if len(arr) != n:
                    raise ValueError(f"{key.path} has {len(arr)} rows, expected {n}")
                chunks = (min(n, 256), 1) + arr.shape[2:]  # one layer of a few hundred samples
                f.create_dataset(key.path, data=arr, chunks=chunks, fletcher32=True, **filters)

        image = _hdf5_image(fill)
        record = {"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest(), "n_samples": n}
        with together():  # both or neither; the record is renamed first: a shard in place always has one
            _write_json_atomic(final.with_suffix(".json"), record)
            write_bytes(final, image)
        return final

    def finalize(self, n_shards: int, attrs: dict[str, Any] | None = None, tag: str = "") -> Path:
        """Join shards 0..n_shards-1 into the virtual-dataset index; the store is then complete.

        Processes finalizing at once each write their own temporary file (`tag` is no longer
        needed for that); the rename into place is atomic and their indexes identical.
        """
        missing = sorted(set(range(n_shards)) - self.done_shards())
        if missing:
            raise StoreError(f"{self.path}: cannot finalize, shards {missing[:5]} are missing")
        shards = [self.shard_dir / _shard_name(i) for i in range(n_shards)]
        records = [self._record(p) for p in shards]
        for shard, record in zip(shards, records):
            problem = "no checksum record" if record is None else _check_shard(shard, record, full=False)
            if problem:
                raise StoreError(f"{shard}: {problem}; {REPAIR}")
        with h5py.File(shards[0], "r") as f0:
            names: list[str] = []
            f0.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            specs = {name: (f0[name].shape[1:], f0[name].dtype) for name in names}
        sizes = []
        for shard in shards:
            with h5py.File(shard, "r") as f:
                sizes.append(len(f["samples/index"]))
        total = sum(sizes)

        def fill(out: h5py.File) -> None:
            out.attrs["schema"] = "kvprobe.kvstore"
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["n_samples"] = total
            out.attrs["n_shards"] = n_shards
            out.attrs["config"] = json.dumps({"schema_version": SCHEMA_VERSION, **self.meta}, sort_keys=True)
            out.attrs["shard_checksums"] = json.dumps(
                {p.name: r for p, r in zip(shards, records)}, sort_keys=True)  # name -> {bytes, sha256}
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

        write_bytes(self.path / INDEX_FILE, _hdf5_image(fill))
        _record_index(self.path)
        return self.path / INDEX_FILE


class KVStore:
    """Read a complete store. Feature matrices are read lazily, one (key, layer) at a time.

    Opening checks the index and, cheaply, every shard it names (present, readable, of the
    recorded size, an HDF5 file); a damaged chunk found while reading raises `StoreError`
    naming its shard. `verify_store` checks every byte.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store")
        if not index.exists():
            raise StoreError(f"{self.path}: incomplete store (no {INDEX_FILE}); resume the capture to finish it")
        self._file, self.config = _open_index(index)
        problems = [p for p in [_index_problem(self.path, full=False)] if p]
        problems += _shard_problems(self.path, self._file, full=False)
        if problems:
            self._file.close()
            raise StoreError(f"{problems[0]}; {REPAIR}")

    @property
    def checksummed(self) -> bool:
        """Whether the index records every shard's SHA-256 (stores written before that hold none)."""
        return "shard_checksums" in self._file.attrs

    @property
    def index_checksummed(self) -> bool:
        """Whether the index's own size and SHA-256 are recorded beside it (stores written before that: no)."""
        return (self.path / INDEX_RECORD).is_file()

    def _read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """Read a dataset of the index; a chunk that fails its checksum names its shard."""
        try:
            return self._file[name][selection]
        except OSError as e:
            problems = _shard_problems(self.path, self._file, full=True)
            where = problems[0] if problems else f"{self.path / INDEX_FILE}: reading {name} failed ({e})"
            raise StoreError(f"{where}; {REPAIR}") from None

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
        return self._read("samples/index")

    @property
    def passcodes(self) -> list[str]:
        return [p.decode() if isinstance(p, bytes) else p for p in self._read("samples/passcode")]

    @property
    def labels(self) -> np.ndarray:
        """(N, passcode length) class indices."""
        return self._read("samples/labels").astype(np.int64)

    @property
    def content(self) -> tuple[np.ndarray, np.ndarray]:
        """The target block's text between its delimiters: token ids (N, CONTENT_TOKENS), -1 after its end
        (a block longer than CONTENT_TOKENS keeps its first and last half), and its true lengths (N,)."""
        if "samples/content" not in self._file:
            raise StoreError(f"{self.path}: no block content (captured before kvprobe stored it); capture the "
                             "store again to reconstruct from it")
        return self._read("samples/content").astype(np.int64), self._read("samples/content_length").astype(np.int64)

    @property
    def layouts(self) -> np.ndarray:
        """(N, n_blocks, 5): per block [start, end, summary_start, summary_end, stop], -1 if absent."""
        return self._read("samples/layout")

    def features(
        self, layer: int, offset: int, site: str = DEFAULT_SITE, pooling: str = DEFAULT_POOLING, dtype: Any = np.float32
    ) -> np.ndarray:
        """Feature matrix of one layer: (N, D) for 'mean' and 'last', (N, max_tokens, D) for
        'tokens', (N, max_tokens + 1, D) for 'tail_mean' (the last tokens, then the mean)."""
        key = FeatureKey(site, offset, pooling)
        if key.path not in self._file:
            raise StoreError(f"{self.path}: no features for {key} (available: {', '.join(map(str, self.keys))})")
        if layer not in self.layers:
            raise StoreError(f"{self.path}: layer {layer} was not captured (layers {self.layers})")
        return self._read(key.path, np.s_[:, self.layers.index(layer)]).astype(dtype)


def _open_index(index: Path) -> tuple[h5py.File, dict[str, Any]]:
    """The open index file and the store's config; a damaged or foreign index is a StoreError."""
    try:
        f = h5py.File(index, "r")
    except OSError as e:
        raise StoreError(f"{index}: damaged index ({str(e).split('(')[-1].rstrip(')') or e}); resume the "
                         "capture (`kvprobe run CONFIG --out RUN --resume`) to write it again") from None
    try:
        config = json.loads(f.attrs["config"])
        version = int(f.attrs["schema_version"])
    except (KeyError, ValueError, TypeError):
        f.close()
        raise StoreError(f"{index}: not a kvprobe store index (no config)") from None
    if version != SCHEMA_VERSION:
        f.close()
        raise StoreError(f"{index.parent}: schema version {version}, this kvprobe reads {SCHEMA_VERSION}")
    return f, config


def _shard_problems(path: Path, index: h5py.File, *, full: bool) -> list[str]:
    """'shards/shard_000001.h5: missing', ... for every shard the index names; [] when whole.
    Stores written before checksums were recorded are checked for presence and header only."""
    n_shards = int(index.attrs["n_shards"])
    records = json.loads(index.attrs["shard_checksums"]) if "shard_checksums" in index.attrs else {}
    problems = []
    for i in range(n_shards):
        shard = path / SHARD_DIR / _shard_name(i)
        problem = _check_shard(shard, records.get(shard.name), full=full)
        if problem:
            problems.append(f"{shard}: {problem}")
    return problems


def _index_problem(path: Path, *, full: bool) -> str | None:
    """'store/kvstore.h5: ...' when the index differs from its record (kvstore.json): its size, and (full)
    its SHA-256; None when it matches or the store predates index records."""
    record_file = path / INDEX_RECORD
    if not record_file.exists():
        return None
    record = StoreWriter._record(path / INDEX_FILE)  # kvstore.h5 -> kvstore.json, as a shard's record
    if record is None:
        return f"{record_file}: damaged checksum record of {INDEX_FILE}"
    problem = _check_shard(path / INDEX_FILE, record, full=full)
    return f"{path / INDEX_FILE}: {problem}" if problem else None


def _record_index(path: Path) -> None:
    """Record the index's size and SHA-256 beside it (kvstore.json), read from the file in place. Processes
    finalizing at once may replace the index after another recorded it: each checks after writing its
    record that the index is still the one it hashed, and records again if not."""
    index = path / INDEX_FILE
    while True:
        data = index.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        _write_json_atomic(path / INDEX_RECORD, {"bytes": len(data), "sha256": digest})
        if hashlib.sha256(index.read_bytes()).hexdigest() == digest:
            return


def verify_store(path: str | os.PathLike) -> list[str]:
    """Check a store byte for byte: the index opens and matches its recorded SHA-256 (stores written
    before the index was recorded: it opens), and every shard it names is present and matches its
    recorded SHA-256. Returns one line per problem ([] for a whole store)."""
    path = Path(path)
    index = path / INDEX_FILE
    if not index.is_file():
        return [f"{path}: incomplete store (no {INDEX_FILE})"]
    try:
        f, _ = _open_index(index)
    except StoreError as e:
        return [str(e)]
    with f:
        problems = _shard_problems(path, f, full=True)
    return [p for p in [_index_problem(path, full=True)] if p] + problems
