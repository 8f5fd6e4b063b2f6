"""A store in the formats the field loads: a Hugging Face `datasets` dataset (Arrow) or safetensors files.

    export_store("runs/toy/stores/memento", "export/memento", "datasets")     # or "safetensors"
    with load_export("export/memento") as x:                                  # the reader of either format
        X = x.features(layer=3, offset=1)                                     # == KVStore(...).features(3, 1)

Both formats name one feature matrix by its cell, `Cell.label` ("memento|+1|3|mean": site, offset, layer,
pooling; `Cell.parse` reads it back): a column of the dataset, or a tensor of its own safetensors file, holding
the store's `features(layer, offset, site, pooling)` with one row per sample ((N, D), (N, max_tokens, D) or
(N, max_tokens + 1, D)), in the store's storage dtype (float16 or float32; a matrix that float16 would change
stays float32). Beside them: the sample ids, passcodes, labels and layouts, and `kvprobe_export.json` (the
store's config: capture, model identity, source, versions; the layers, keys and where each cell is).

    datasets:     data-*.arrow, dataset_info.json, state.json   `datasets.load_from_disk(DIR)`: one row per
                  sample, columns sample_id, passcode, labels, layout and one per cell; the dataset's
                  `info.description` holds kvprobe_export.json too
    safetensors:  samples.safetensors (sample_id, labels, layout), passcodes.json,
                  features/{site}.{offset}.{pooling}.layer{layer}.safetensors (one tensor, named by its cell)

Memory stays one feature matrix (one key at one layer, the unit `KVStore` reads) whatever the store's size:
cells are read and written one at a time; the dataset is built from one Arrow file per cell, joined column-wise
and saved in shards of at most 500 MB (the per-cell files are deleted after, so the disk holds the export twice
while it is written). The export is written into a temporary folder beside `out` and renamed into place:
a failure leaves no part of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import KVProbeError
from .files import write_error, write_text
from .grid import DEFAULT_POOLING, DEFAULT_SITE, Cell, FeatureKey
from .store import KVStore

__all__ = ["FORMATS", "META_FILE", "ExportError", "ExportedStore", "export_store", "export_stores", "load_export"]

FORMATS = ("datasets", "safetensors")
META_FILE = "kvprobe_export.json"
FORMAT_VERSION = 1
SAMPLES_FILE = "samples.safetensors"
PASSCODES_FILE = "passcodes.json"
MAX_SHARD_SIZE = "500MB"  # of the dataset's Arrow files


class ExportError(KVProbeError, ValueError):
    """An export cannot be written where asked, or a folder is not an export kvprobe wrote."""


# ----------------------------------------------------------------------------- writing


def export_store(store: str | os.PathLike, out: str | os.PathLike, fmt: str, *, progress: bool = False) -> Path:
    """Write the store at `store` to the new folder `out` in format `fmt` ("datasets" or "safetensors")."""
    return export_stores({"": store}, out, fmt, progress=progress)


def export_stores(stores: Mapping[str, str | os.PathLike], out: str | os.PathLike, fmt: str, *,
                  progress: bool = False) -> Path:
    """Write several stores, each to `out/NAME` (a run's conditions; NAME "" is `out` itself), all or none."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    opened = [KVStore(path) for path in stores.values()]  # every store checked before anything is written
    try:
        with _staged(Path(out)) as (folder, scratch):
            for name, store in zip(stores, opened):
                target = folder / name if name else folder
                target.mkdir(exist_ok=True)
                if fmt == "datasets":
                    _write_datasets(store, target, scratch / (name or "store"), progress)
                else:
                    _write_safetensors(store, target, progress)
    finally:
        for store in opened:
            store.close()
    return Path(out)


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[tuple[Path, Path]]:
    """A folder to fill and a scratch folder, in a temporary folder beside `out`; the first is renamed to `out`
    when the block ends. A failure removes both and the folders made above `out`; OSError becomes a WriteError."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: --out already exists and is not an empty folder; choose a new output path")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()][::-1]
    root = None
    try:
        for parent in made:
            parent.mkdir()
        root = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        (root / "export").mkdir()
        (root / "scratch").mkdir()
        yield root / "export", root / "scratch"
        os.replace(root / "export", out)
    except BaseException as e:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(e, OSError) and not isinstance(e, KVProbeError):
            raise write_error(out, e) from e
        raise
    shutil.rmtree(root, ignore_errors=True)


def _cells(store: KVStore) -> list[Cell]:
    return [Cell(key.site, key.offset, layer, key.pooling) for key in store.keys for layer in store.layers]


def _matrix(store: KVStore, cell: Cell) -> np.ndarray:
    """One cell's features in the store's storage dtype: float16 when the capture stored float16 and
    the values survive it exactly, else float32."""
    x = store.features(cell.layer, cell.offset, cell.site, cell.pooling, dtype=np.float32)
    if store.config.get("capture", {}).get("dtype", "float16") == "float16":
        half = x.astype(np.float16)
        if np.array_equal(half.astype(np.float32), x, equal_nan=True):
            return half
    return x


def _metadata(store: KVStore, fmt: str, where: dict[str, str]) -> dict[str, Any]:
    """kvprobe_export.json: what the export holds, where each cell is, and the store's own config."""
    from . import __version__

    return {"schema": "kvprobe.export", "format_version": FORMAT_VERSION, "format": fmt, "kvprobe": __version__,
            "n_samples": len(store), "layers": store.layers,
            "keys": [{"site": k.site, "offset": k.offset, "pooling": k.pooling} for k in store.keys],
            "cells": where, "config": store.config}


def _bar(total: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cell", desc=desc, disable=not progress)


def _write_safetensors(store: KVStore, folder: Path, progress: bool) -> None:
    """samples.safetensors, passcodes.json, one safetensors file per cell, then kvprobe_export.json."""
    from safetensors.numpy import save_file

    save_file({"sample_id": store.sample_ids, "labels": store.labels, "layout": store.layouts},
              str(folder / SAMPLES_FILE))
    write_text(folder / PASSCODES_FILE, json.dumps(store.passcodes))
    (folder / "features").mkdir()
    where = {}
    with _bar(len(store.keys) * len(store.layers), progress, "export (safetensors)") as bar:
        for cell in _cells(store):
            name = f"features/{cell.site}.{cell.offset:+d}.{cell.pooling}.layer{cell.layer}.safetensors"
            described = {"site": cell.site, "offset": str(cell.offset), "layer": str(cell.layer),
                         "pooling": cell.pooling}
            save_file({cell.label: _matrix(store, cell)}, str(folder / name), metadata=described)
            where[cell.label] = name
            bar.update()
    write_text(folder / META_FILE, json.dumps(_metadata(store, "safetensors", where), indent=2, sort_keys=True))


def _arrow_column(values: Any) -> Any:
    """An Arrow array of one row per sample: nested fixed-size lists for the axes after the first."""
    import pyarrow as pa

    if isinstance(values, list):
        return pa.array(values, type=pa.string())
    column = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def _arrow_file(path: Path, columns: dict[str, Any]) -> Any:
    """Write `columns` as an Arrow stream file (what `datasets` memory-maps) and open it as a Dataset."""
    import pyarrow as pa
    from datasets import Dataset

    table = pa.table({name: _arrow_column(values) for name, values in columns.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4096):
            writer.write_batch(batch)
    return Dataset.from_file(str(path))


def _write_datasets(store: KVStore, folder: Path, scratch: Path, progress: bool) -> None:
    """A `datasets` dataset: the samples' columns, then one column per cell, each written to its own Arrow
    file first, joined column-wise and saved into `folder`; then kvprobe_export.json beside it."""
    from datasets import concatenate_datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    scratch.mkdir(parents=True)
    parts = [_arrow_file(scratch / "samples.arrow", {"sample_id": store.sample_ids, "passcode": store.passcodes,
                                                      "labels": store.labels, "layout": store.layouts})]
    cells = _cells(store)
    with _bar(len(cells), progress, "export (datasets)") as bar:
        for i, cell in enumerate(cells):
            parts.append(_arrow_file(scratch / f"cell_{i:05d}.arrow", {cell.label: _matrix(store, cell)}))
            bar.update()
    meta = _metadata(store, "datasets", {cell.label: cell.label for cell in cells})
    dataset = concatenate_datasets(parts, axis=1)
    dataset.info.description = json.dumps(meta, sort_keys=True)
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        dataset.save_to_disk(str(folder), max_shard_size=MAX_SHARD_SIZE)
    finally:
        if quiet:
            enable_progress_bars()
    del dataset, parts
    shutil.rmtree(scratch)
    write_text(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- reading


def load_export(path: str | os.PathLike) -> "ExportedStore":
    """The export at `path` (either format), read like a `KVStore`."""
    return ExportedStore(path)


class ExportedStore:
    """An exported store, read with `KVStore`'s reading API (layers, keys, sample_ids, passcodes, labels,
    layouts, features, config, len), so what the store gave the export gives back, array for array."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / META_FILE
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("schema") != "kvprobe.export" or meta.get("format") not in FORMATS:
                raise ValueError
        except FileNotFoundError:
            raise ExportError(f"{self.path}: not a kvprobe export (no {META_FILE})") from None
        except ValueError:
            raise ExportError(f"{meta_file}: not a kvprobe export's metadata (damaged or foreign)") from None
        if meta["format_version"] != FORMAT_VERSION:
            raise ExportError(f"{meta_file}: export format version {meta['format_version']}, this kvprobe reads "
                              f"{FORMAT_VERSION}")
        self.meta = meta
        self.format: str = meta["format"]
        self.config: dict[str, Any] = meta["config"]
        self._table: Any = None
        if self.format == "datasets":
            from datasets import load_from_disk

            self._table = load_from_disk(str(self.path)).data.table  # memory-mapped

    def close(self) -> None:
        self._table = None

    def __enter__(self) -> "ExportedStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def keys(self) -> list[FeatureKey]:
        return sorted(FeatureKey(k["site"], int(k["offset"]), k["pooling"]) for k in self.meta["keys"])

    def _samples(self, name: str) -> np.ndarray:
        if self._table is not None:
            return _numpy(self._table.column(name))
        from safetensors.numpy import load_file

        return load_file(str(self.path / SAMPLES_FILE))[name]

    @property
    def sample_ids(self) -> np.ndarray:
        return self._samples("sample_id")

    @property
    def passcodes(self) -> list[str]:
        if self._table is not None:
            return self._table.column("passcode").to_pylist()
        return json.loads((self.path / PASSCODES_FILE).read_text())

    @property
    def labels(self) -> np.ndarray:
        """(N, passcode length) class indices."""
        return self._samples("labels")

    @property
    def layouts(self) -> np.ndarray:
        """(N, n_blocks, 5): per block [start, end, summary_start, summary_end, stop], -1 if absent."""
        return self._samples("layout")

    def features(self, layer: int, offset: int, site: str = DEFAULT_SITE, pooling: str = DEFAULT_POOLING,
                 dtype: Any = np.float32) -> np.ndarray:
        """One cell's feature matrix, as `KVStore.features` gives it ((N, D), (N, max_tokens, D), ...)."""
        label = Cell(site, offset, layer, pooling).label
        where = self.meta["cells"].get(label)
        if where is None:
            raise ExportError(f"{self.path}: no features for cell {label} (layers {self.layers}, keys "
                              f"{', '.join(map(str, self.keys))})")
        if self._table is not None:
            return _numpy(self._table.column(where)).astype(dtype)
        from safetensors import safe_open

        with safe_open(str(self.path / where), framework="np") as f:
            return f.get_tensor(label).astype(dtype)


def _numpy(column: Any) -> np.ndarray:
    """A column of fixed-size lists (any depth) as one (N, ...) array, its values' dtype kept."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(shape)
