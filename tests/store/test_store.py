"""The HDF5 store (kvprobe.store) on a tiny synthetic store written in-process: what goes in comes
back out, resume keeps whole shards and rewrites damaged ones, an incomplete store and an overwrite
are refused, and verify_store finds a flipped byte.

The store written through a real capture, kill -9 and resume: tests/capture/test_capture.py; the
same damage met through `kvprobe`: tests/cli/test_bad_input.py and test_recovery.py.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from kvprobe.store import SCHEMA_VERSION, FeatureKey, KVStore, StoreError, StoreWriter, is_store, verify_store
from tests.helpers.stores import assert_same_store, synthetic_meta, synthetic_shards, write_synthetic_store

N, SHARD = 70, 30  # three shards: 30, 30 and 10 samples
KEY = FeatureKey("memento", 0, "mean")


def _write(path, shards, indices, mode="create", meta=None):
    writer = StoreWriter(path, meta or synthetic_meta(), mode=mode)
    for i in indices:
        writer.write_shard(i, *shards[i])
    return writer


def _shard(path, i: int):
    return path / "shards" / f"shard_{i:06d}.h5"


def _flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def shards():
    return synthetic_shards(N, SHARD, seed=3)


def test_features_labels_and_metadata_round_trip(tmp_path, shards):
    writer = _write(tmp_path / "s", shards, range(3))
    writer.finalize(3, attrs={"note": "synthetic"})
    assert is_store(tmp_path / "s") and not is_store(tmp_path)
    with KVStore(tmp_path / "s") as store:
        assert len(store) == N and store.layers == [0, 1] and store.checksummed
        assert store.keys == sorted(FeatureKey("memento", o, "mean") for o in (-1, 0, 1))
        assert store.config == {"schema_version": SCHEMA_VERSION, **synthetic_meta()}
        np.testing.assert_array_equal(store.sample_ids, np.arange(N))
        assert store.passcodes == [p for samples, _ in shards for p in samples["passcode"]]
        labels = np.concatenate([samples["labels"] for samples, _ in shards])
        assert store.labels.dtype == np.int64 and np.array_equal(store.labels, labels)
        assert np.array_equal(store.layouts, np.concatenate([samples["layout"] for samples, _ in shards]))
        for key in store.keys:
            written = np.concatenate([features[key] for _, features in shards])  # (N, layers, D) float16
            for layer in store.layers:
                got = store.features(layer, key.offset, key.site, key.pooling)
                assert got.dtype == np.float32 and got.shape == (N, 50)
                np.testing.assert_array_equal(got, written[:, layer].astype(np.float32), err_msg=str((key, layer)))
        with pytest.raises(StoreError, match=r"no features for .*offset=2.*available: "):
            store.features(0, 2, "memento", "mean")
        with pytest.raises(StoreError, match=r"layer 5 was not captured \(layers \[0, 1\]\)"):
            store.features(5, 0, "memento", "mean")
    with h5py.File(tmp_path / "s" / "kvstore.h5", "r") as f:
        assert f.attrs["note"] == "synthetic" and f.attrs["n_shards"] == 3
    assert verify_store(tmp_path / "s") == []


def test_resume_keeps_whole_shards_and_rewrites_a_damaged_one(tmp_path, shards):
    """A capture that died after shard 2: shard 1 damaged since, shard 2 without its checksum record
    (killed between the two writes), a temporary file left behind. Resume keeps shard 0 untouched and
    writes 1 and 2 again; the store equals one written without interruption."""
    path = tmp_path / "crashed"
    _write(path, shards, range(3))
    (path / "shards" / "shard_000003.h5.tmp").write_bytes(b"half a shard")
    _shard(path, 2).with_suffix(".json").unlink()
    _flip(_shard(path, 1), _shard(path, 1).stat().st_size // 2)
    kept = _shard(path, 0).stat()

    writer = StoreWriter(path, synthetic_meta(), mode="resume")
    assert writer.done_shards() == {0, 1}  # a shard without its record is not done
    assert writer.drop_damaged() == [1, 2]  # shard 1 fails its SHA-256, shard 2 has none to check
    assert writer.done_shards() == {0} and not _shard(path, 1).exists() and not _shard(path, 2).exists()
    for i in sorted({0, 1, 2} - writer.done_shards()):
        writer.write_shard(i, *shards[i])
    writer.finalize(3)
    again = _shard(path, 0).stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # never rewritten

    straight = _write(tmp_path / "straight", shards, range(3))
    straight.finalize(3)
    assert_same_store(path, tmp_path / "straight")
    assert verify_store(path) == []


def test_an_incomplete_store_is_refused(tmp_path, shards):
    path = tmp_path / "s"
    writer = _write(path, shards, [0, 2])
    with pytest.raises(StoreError, match=r"incomplete store \(no kvstore.h5\); resume the capture"):
        KVStore(path)
    assert verify_store(path) == [f"{path}: incomplete store (no kvstore.h5)"]
    with pytest.raises(StoreError, match=r"cannot finalize, shards \[1\] are missing"):
        writer.finalize(3)
    assert not (path / "kvstore.h5").exists()
    with pytest.raises(StoreError, match="no such store"):
        KVStore(tmp_path / "nowhere")
    # a store whose index names a shard that is gone is refused on opening, naming it
    writer.write_shard(1, *shards[1])
    writer.finalize(3)
    _shard(path, 2).unlink()
    with pytest.raises(StoreError, match=r"shard_000002.h5: missing; resume the capture"):
        KVStore(path)


def test_an_existing_store_is_not_overwritten_unless_asked(tmp_path, shards):
    path = write_synthetic_store(tmp_path / "s", n=N, shard_size=SHARD)
    before = sorted(p.name for p in (path / "shards").iterdir())
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(path, synthetic_meta())
    other = synthetic_meta(offsets=(0,))
    with pytest.raises(StoreError, match="was written by another capture"):
        StoreWriter(path, other, mode="resume")
    with pytest.raises(StoreError, match="was written by another capture"):
        StoreWriter(path, other, mode="join")
    with pytest.raises(StoreError, match="was written by another model"):  # an identity without weights: whole
        StoreWriter(path, {**synthetic_meta(), "model": {"name": "another"}}, mode="resume")
    with pytest.raises(StoreError, match="nothing to resume"):
        StoreWriter(tmp_path / "nowhere", synthetic_meta(), mode="resume")
    assert sorted(p.name for p in (path / "shards").iterdir()) == before  # every refusal left it alone
    with KVStore(path) as store:  # and readable
        assert len(store) == N

    writer = StoreWriter(path, other, mode="overwrite")  # asked for: the old store is gone
    assert list((path / "shards").iterdir()) == [] and not (path / "kvstore.h5").exists()
    assert json.loads((path / "config.json").read_text())["capture"]["offsets"] == [0]
    assert writer.done_shards() == set()


def test_verify_store_catches_a_flipped_byte(tmp_path):
    path = write_synthetic_store(tmp_path / "s", n=N, shard_size=SHARD)
    assert verify_store(path) == []
    shard = _shard(path, 1)
    with h5py.File(shard, "r") as f:  # a byte inside the first chunk of a feature dataset
        chunk = f[KEY.path].id.get_chunk_info(0)
    _flip(shard, chunk.byte_offset + chunk.size // 2)
    assert verify_store(path) == [f"{shard}: checksum mismatch (its bytes changed after it was written)"]
    with KVStore(path) as store:  # opening checks sizes and headers only; reading the chunk fails, naming it
        with pytest.raises(StoreError, match=r"shard_000001.h5: checksum mismatch.*resume the capture"):
            store.features(0, 0, "memento", "mean")
    _flip(shard, chunk.byte_offset + chunk.size // 2)  # flipped back: whole again
    assert verify_store(path) == []
    _flip(shard, shard.stat().st_size - 1)  # the last byte: outside any chunk, still found
    assert verify_store(path) == [f"{shard}: checksum mismatch (its bytes changed after it was written)"]
