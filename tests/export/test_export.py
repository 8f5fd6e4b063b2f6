"""kvprobe.export on tiny synthetic stores written in-process: each format gives back every array of the
store bit for bit (features of every cell, sample ids, passcodes, labels, layouts) and its config; the files
load with the plain `datasets` and `safetensors` libraries under the documented names; a failure or a
refusal leaves nothing behind.

The command (`kvprobe export`, run directories, --push-to-hub): tests/cli/test_export_cli.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kvprobe import export
from kvprobe.export import FORMATS, META_FILE, ExportError, export_store, export_stores, load_export
from kvprobe.files import WriteError
from kvprobe.grid import Cell, FeatureKey
from kvprobe.store import KVStore, StoreError, StoreWriter
from tests.helpers.stores import synthetic_meta, synthetic_shards, write_synthetic_store

N_TOKENS = 3


def write_rich_store(path, *, dtype: str = "float16"):
    """A store with every shape of feature: the synthetic 'mean' keys and a 'tokens' key ((N, layers, 3, 50)),
    int32 layouts, three shards; with dtype float32, values float16 cannot hold."""
    meta = synthetic_meta()
    meta["capture"]["dtype"] = dtype
    writer = StoreWriter(path, meta)
    rng = np.random.default_rng(1)
    shards = synthetic_shards(70, 30)
    for i, (samples, features) in enumerate(shards):
        n = len(samples["index"])
        samples["layout"] = samples["layout"].astype(np.int32)
        tokens = rng.normal(size=(n, 2, N_TOKENS, 50)).astype(dtype)
        features = {**{k: v.astype(dtype) + (rng.normal(size=v.shape) * 1e-3 if dtype == "float32" else 0)
                       for k, v in features.items()},
                    FeatureKey("memento", 1, "tokens"): tokens}
        writer.write_shard(i, samples, {k: np.asarray(v, dtype=dtype) for k, v in features.items()})
    writer.finalize(len(shards))
    return path


def assert_same_as_store(exported, store_path):
    """Every array of the export equals the store's, dtype included, and so does the metadata."""
    with KVStore(store_path) as s, load_export(exported) as x:
        assert (len(x), x.layers, x.keys, x.config) == (len(s), s.layers, s.keys, s.config)
        assert x.passcodes == s.passcodes
        for name in ("sample_ids", "labels", "layouts"):
            a, b = getattr(s, name), getattr(x, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(b, a, err_msg=name)
        for key in s.keys:
            for layer in s.layers:
                for dtype in (np.float32, np.float16):
                    a = s.features(layer, key.offset, key.site, key.pooling, dtype=dtype)
                    b = x.features(layer, key.offset, key.site, key.pooling, dtype=dtype)
                    assert a.dtype == b.dtype and a.shape == b.shape
                    assert a.tobytes() == b.tobytes(), (key, layer)  # bit for bit


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_every_array_bit_for_bit(tmp_path, fmt, dtype):
    store = write_rich_store(tmp_path / "store", dtype=dtype)
    assert export_store(store, tmp_path / "out", fmt) == tmp_path / "out"
    assert_same_as_store(tmp_path / "out", store)
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["format"] == fmt and meta["n_samples"] == 70 and meta["layers"] == [0, 1]
    assert {Cell.parse(label) for label in meta["cells"]} == {Cell(k.site, k.offset, layer, k.pooling)
                                                              for k in KVStore(store).keys for layer in (0, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # no temporary left beside it


def test_datasets_export_loads_with_plain_datasets(tmp_path):
    from datasets import load_from_disk

    store = write_rich_store(tmp_path / "store")
    export_store(store, tmp_path / "out", "datasets")
    ds = load_from_disk(str(tmp_path / "out"))
    cells = [c for c in ds.column_names if "|" in c]
    assert ds.column_names[:4] == ["sample_id", "passcode", "labels", "layout"] and len(cells) == 8
    assert ds.num_rows == 70 and json.loads(ds.info.description)["cells"] == {c: c for c in cells}
    rows = ds.with_format("numpy")
    with KVStore(store) as s:
        np.testing.assert_array_equal(np.asarray(rows["memento|+1|1|tokens"][:]),
                                      s.features(1, 1, "memento", "tokens", dtype=np.float16))
        assert list(rows["passcode"][:]) == s.passcodes


def test_safetensors_export_loads_with_plain_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    store = write_rich_store(tmp_path / "store")
    export_store(store, tmp_path / "out", "safetensors")
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    where = meta["cells"]["memento|-1|0|mean"]
    assert where == "features/memento.-1.mean.layer0.safetensors"
    with safe_open(str(tmp_path / "out" / where), framework="np") as f, KVStore(store) as s:
        assert list(f.keys()) == ["memento|-1|0|mean"]
        assert f.metadata() == {"site": "memento", "offset": "-1", "layer": "0", "pooling": "mean"}
        np.testing.assert_array_equal(f.get_tensor("memento|-1|0|mean"),
                                      s.features(0, -1, "memento", "mean", dtype=np.float16))
        samples = load_file(str(tmp_path / "out" / "samples.safetensors"))
        np.testing.assert_array_equal(samples["sample_id"], s.sample_ids)
    assert json.loads((tmp_path / "out" / "passcodes.json").read_text()) == KVStore(store).passcodes


def test_a_dataset_in_several_arrow_shards_reads_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "MAX_SHARD_SIZE", "20KB")
    store = write_rich_store(tmp_path / "store")
    export_store(store, tmp_path / "out", "datasets")
    assert len(list((tmp_path / "out").glob("data-*.arrow"))) > 3
    assert_same_as_store(tmp_path / "out", store)


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_stores_go_to_one_folder_each(tmp_path, fmt):
    a = write_synthetic_store(tmp_path / "a", n=40, shard_size=25)
    b = write_synthetic_store(tmp_path / "b", n=30, shard_size=25, seed=5)
    export_stores({"memento": a, "full": b}, tmp_path / "out", fmt)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["full", "memento"]
    assert_same_as_store(tmp_path / "out" / "memento", a)
    assert_same_as_store(tmp_path / "out" / "full", b)


def test_an_existing_output_is_refused_and_left_as_it_was(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n=20)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="out: --out already exists"):
        export_store(store, tmp_path / "out", "safetensors")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="file: --out already exists"):
        export_store(store, tmp_path / "file", "safetensors")
    (tmp_path / "empty").mkdir()  # an empty folder is filled
    export_store(store, tmp_path / "empty", "safetensors")
    assert_same_as_store(tmp_path / "empty", store)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n=20)
    with pytest.raises(ExportError, match="--format: unknown format 'parquet'"):
        export_store(store, tmp_path / "deep" / "out", "parquet")
    with pytest.raises(StoreError, match="no such store"):
        export_store(tmp_path / "missing", tmp_path / "deep" / "out", "datasets")
    (store / "kvstore.h5").unlink()
    with pytest.raises(StoreError, match="incomplete store"):
        export_store(store, tmp_path / "deep" / "out", "datasets")
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failure_mid_export_leaves_nothing(tmp_path, monkeypatch, fmt):
    store = write_synthetic_store(tmp_path / "store", n=20)
    real, calls = export._matrix, []

    def failing(s, cell):
        calls.append(cell)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(s, cell)

    monkeypatch.setattr(export, "_matrix", failing)
    with pytest.raises(WriteError, match=r"deep/out: could not be written \(no space left on device\)"):
        export_store(store, tmp_path / "deep" / "out", fmt)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # neither the export, its temporary nor the folders made


def test_the_loader_refuses_what_is_not_an_export(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n=20)
    with pytest.raises(ExportError, match=f"store: not a kvprobe export \\(no {META_FILE}\\)"):
        load_export(store)
    export_store(store, tmp_path / "out", "safetensors")
    with load_export(tmp_path / "out") as x:
        with pytest.raises(ExportError, match=r"no features for cell memento\|\+7\|0\|mean"):
            x.features(0, 7, "memento", "mean")
    (tmp_path / "out" / META_FILE).write_text("{not json")
    with pytest.raises(ExportError, match=f"{META_FILE}: not a kvprobe export's metadata"):
        load_export(tmp_path / "out")
