"""Capture into the HDF5 store on the toy: contents, controls, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kvprobe.capture import CaptureConfig, plan_capture, run_capture
from kvprobe.memento.forward import masked_forward
from kvprobe.memento.masks import MaskConfig
from kvprobe.store import KVStore, StoreError, StoreWriter
from toy_models.data import layout
from toy_models.model import build_model
from toy_models.source import ToyPasscodeSource

SPEC = CaptureConfig(layers=(0, 3), offsets=(-1, 0, 1, 7), batch_size=64, shard_size=128)


@pytest.fixture(scope="module")
def model():
    return build_model(seed=0).eval()


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path / "kvstore.h5", "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[:]) if isinstance(o, h5py.Dataset) else None)
    return out


def test_store_holds_cache_keys_at_memento_positions(model, tmp_path):
    src = ToyPasscodeSource(200, seed=3)
    spec = CaptureConfig(layers=(1, 3), offsets=(-1, 0, 2), pooling=("mean", "last", "tokens"), max_tokens=4,
                       sites=("memento_text", "memento", "block_end"), dtype="float32", batch_size=50, shard_size=80)
    run_capture(model, src, spec, tmp_path / "s", progress=False)
    store = KVStore(tmp_path / "s")
    assert len(store) == 200 and store.layers == [1, 3]
    batch = src.samples(0, 200)
    assert store.passcodes == batch.passcodes
    np.testing.assert_array_equal(store.labels, batch.labels)
    np.testing.assert_array_equal(store.sample_ids, np.arange(200))
    # the reference: a plain masked forward and its KV cache
    with torch.no_grad():
        out = masked_forward(model, batch.input_ids, layouts=batch.layouts, use_cache=True)
    lay = layout()
    for layer in (1, 3):
        k = out.past_key_values.layers[layer].keys  # (B, n_kv, T, d_head)
        v = out.past_key_values.layers[layer].values
        kv = torch.cat([k.permute(0, 2, 1, 3).flatten(2), v.permute(0, 2, 1, 3).flatten(2)], -1)  # (B, T, D)
        for offset in (-1, 0, 2):
            blk = lay.blocks[1 + offset]
            pos = list(blk.memento_text)
            text = dict(site="memento_text")
            np.testing.assert_allclose(store.features(layer, offset, pooling="mean", **text), kv[:, pos].mean(1).numpy(),
                                       atol=1e-5)
            np.testing.assert_allclose(store.features(layer, offset, pooling="last", **text), kv[:, pos[-1]].numpy(),
                                       atol=1e-6)
            toks = store.features(layer, offset, pooling="tokens", **text)  # (N, 4, D): 3 tokens, then zeros
            np.testing.assert_allclose(toks[:, :3], kv[:, pos].numpy(), atol=1e-6)
            assert not toks[:, 3].any()
            span = list(blk.memento)  # site "memento": <|summary_start|> .. <|summary_end|>
            np.testing.assert_allclose(store.features(layer, offset, pooling="mean"), kv[:, span].mean(1).numpy(),
                                       atol=1e-5)
            np.testing.assert_allclose(store.features(layer, offset, pooling="tokens"), kv[:, span[:4]].numpy(),
                                       atol=1e-6)
            np.testing.assert_allclose(
                store.features(layer, offset, site="block_end", pooling="last"), kv[:, blk.end].numpy(), atol=1e-6
            )


def test_causal_control_is_bit_identical_whatever_the_passcode(model, tmp_path):
    spec = CaptureConfig(layers=(0, 1, 2, 3), offsets=(-1, 0, 1), sites=("memento", "block_end"),
                       dtype="float32", batch_size=64, shard_size=64)
    a = run_capture(model, ToyPasscodeSource(64, seed=5, passcode_seed=1), spec, tmp_path / "a", progress=False)
    b = run_capture(model, ToyPasscodeSource(64, seed=5, passcode_seed=2), spec, tmp_path / "b", progress=False)
    sa, sb = KVStore(a), KVStore(b)
    assert sa.passcodes != sb.passcodes
    for layer in range(4):
        for site in ("memento", "block_end"):
            assert np.array_equal(sa.features(layer, -1, site=site), sb.features(layer, -1, site=site))
        # the direct memento sees the passcode, so it must change (else the test could not fail)
        assert not np.allclose(sa.features(layer, 0), sb.features(layer, 0))
    # block_end of the target block itself has seen the passcode
    assert not np.allclose(sa.features(3, 0, site="block_end"), sb.features(3, 0, site="block_end"))


def test_same_config_and_seed_give_the_same_store(model, tmp_path):
    a = run_capture(model, ToyPasscodeSource(150, seed=1), SPEC, tmp_path / "a", progress=False)
    b = run_capture(model, ToyPasscodeSource(150, seed=1), SPEC, tmp_path / "b", progress=False)
    fa, fb = _store_arrays(a), _store_arrays(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name])


def test_kill_9_then_resume_equals_an_uninterrupted_run(model, tmp_path):
    # the child builds the same model (seed 0), captures, and SIGKILLs itself after shard 1
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from kvprobe.capture import CaptureConfig, run_capture
        from toy_models.model import build_model
        from toy_models.source import ToyPasscodeSource
        spec = CaptureConfig.from_dict(json.loads({json.dumps(json.dumps(SPEC.to_dict()))}))
        def die(shard):
            if shard == 1:
                # leave a half-written shard behind too, as a crash mid-write would
                open(os.path.join({str(tmp_path / 'crashed')!r}, 'shards', 'shard_000002.h5.tmp'), 'wb').write(b'junk')
                os.kill(os.getpid(), signal.SIGKILL)
        run_capture(build_model(0).eval(), ToyPasscodeSource(400, seed=2), spec, {str(tmp_path / 'crashed')!r},
                    progress=False, on_shard=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    crashed = tmp_path / "crashed"
    assert not (crashed / "kvstore.h5").exists()
    assert sorted(p.name for p in (crashed / "shards").glob("shard_*.h5")) == ["shard_000000.h5", "shard_000001.h5"]
    with pytest.raises(StoreError, match="incomplete store"):
        KVStore(crashed)
    with pytest.raises(StoreError, match="already exists"):
        run_capture(model, ToyPasscodeSource(400, seed=2), SPEC, crashed, progress=False)
    run_capture(model, ToyPasscodeSource(400, seed=2), SPEC, crashed, mode="resume", progress=False)
    clean = run_capture(model, ToyPasscodeSource(400, seed=2), SPEC, tmp_path / "clean", progress=False)
    fa, fb = _store_arrays(crashed), _store_arrays(clean)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name])
    assert len(KVStore(crashed)) == 400


def test_resume_refuses_another_model_or_config(model, tmp_path, monkeypatch):
    out = tmp_path / "s"
    run_capture(model, ToyPasscodeSource(64, seed=1), SPEC, out, progress=False)
    monkeypatch.setattr(model.config, "_name_or_path", "/elsewhere/the-same-weights")  # a moved checkpoint
    run_capture(model, ToyPasscodeSource(64, seed=1), SPEC, out, mode="resume", progress=False)  # the same model
    monkeypatch.undo()
    other = build_model(seed=1).eval()
    with pytest.raises(StoreError, match="another model"):
        run_capture(other, ToyPasscodeSource(64, seed=1), SPEC, out, mode="resume", progress=False)
    spec2 = CaptureConfig.from_dict({**SPEC.to_dict(), "layers": [0, 1]})
    with pytest.raises(StoreError, match="another capture"):
        run_capture(model, ToyPasscodeSource(64, seed=1), spec2, out, mode="resume", progress=False)
    with pytest.raises(StoreError, match="another source"):
        run_capture(model, ToyPasscodeSource(64, seed=9), SPEC, out, mode="resume", progress=False)


@pytest.mark.parametrize(
    "spec_kw, source_kw, message",
    [
        ({"layers": (0, 4)}, {}, "layer 4 out of range: the model has 4 layers"),
        ({"layers": (-1,)}, {}, "layer -1 out of range"),
        ({"offsets": (0, 9)}, {}, r"offset \+9 .*block 10 does not exist: the sequence has 10 blocks"),
        ({"offsets": (-2,)}, {}, r"offset -2 .*block -1 does not exist"),
        ({"target_block": 9, "offsets": (1,)}, {"target_block": 9}, "block 10 does not exist"),
        ({"backend": "nope"}, {}, "capture spec field 'backend'"),
        ({"pooling": ("max",)}, {}, "capture spec field 'pooling'"),
    ],
)
def test_bad_input_fails_before_any_file_is_written(model, tmp_path, spec_kw, source_kw, message):
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=message):
        spec = CaptureConfig.from_dict({**SPEC.to_dict(), **spec_kw})
        run_capture(model, ToyPasscodeSource(64, seed=1, **source_kw), spec, out, progress=False)
    assert not out.exists()


def test_size_estimate_matches_the_file(model, tmp_path):
    src = ToyPasscodeSource(512, seed=4)
    spec = CaptureConfig(layers=(0, 1, 2, 3), offsets=tuple(range(-1, 9)), batch_size=128, shard_size=256)
    plan = plan_capture(model, src, spec)
    assert plan.estimate_bytes() == 512 * 4 * 10 * 5 * 256 * 2  # samples x layers x offsets x (4 tail + mean) x (K+V dims) x fp16
    out = run_capture(model, src, spec, tmp_path / "s", progress=False)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # compression only shrinks; metadata and labels add a little
    assert 0.5 * plan.estimate_bytes() < size < 1.05 * plan.estimate_bytes() + 200_000


def test_compression_choices_store_the_same_values(model, tmp_path):
    """gzip, lzf and none are storage choices only: the same features, read back the same."""
    from dataclasses import replace

    src = ToyPasscodeSource(96, seed=5)
    arrays, filters = {}, {}
    for compression in ("gzip", "lzf", "none"):
        out = run_capture(model, src, replace(SPEC, compression=compression, shard_size=48), tmp_path / compression,
                          progress=False)
        arrays[compression] = _store_arrays(out)
        with h5py.File(out / "shards" / "shard_000000.h5", "r") as f:
            d = f["features/memento/+1/tail_mean"]
            filters[compression] = (d.compression, d.shuffle)
        with KVStore(out) as store:
            assert store.config["capture"]["compression"] == compression
    assert filters == {"gzip": ("gzip", True), "lzf": ("lzf", True), "none": (None, False)}
    for compression in ("lzf", "none"):
        assert arrays[compression].keys() == arrays["gzip"].keys()
        for name, value in arrays["gzip"].items():
            np.testing.assert_array_equal(arrays[compression][name], value, err_msg=name)
    with pytest.raises(ValueError, match="compression"):
        replace(SPEC, compression="zstd")


def test_writer_refuses_existing_paths(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(tmp_path / "x", {"capture": {}})
    with pytest.raises(StoreError, match="not a kvprobe store"):
        StoreWriter(tmp_path / "x", {"capture": {}}, mode="resume")
    with pytest.raises(StoreError, match="nothing to resume"):
        StoreWriter(tmp_path / "y", {"capture": {}}, mode="resume")


def test_restart_mode_capture_runs_and_differs_at_masked_offsets(model, tmp_path):
    src = ToyPasscodeSource(64, seed=1)
    spec = CaptureConfig(layers=(3,), offsets=(-1, 1), batch_size=64, shard_size=64, dtype="float32")
    restart = CaptureConfig.from_dict({**spec.to_dict(), "mask": MaskConfig(0, True, True)})
    a = KVStore(run_capture(model, src, spec, tmp_path / "m", progress=False))
    b = KVStore(run_capture(model, src, restart, tmp_path / "r", progress=False))
    assert b.config["capture"]["mask"] == {"keep_last_n_blocks": 0, "mask_delimiters": True, "restart_mode": True,
                                           "evict_before_summary_end": False, "restart_sees_kept_blocks": False,
                                           "keep_last_block_for_answer": False, "prefill_causal": False}
    assert not np.allclose(a.features(3, 1), b.features(3, 1))
    assert not np.allclose(a.features(3, -1), b.features(3, -1))  # M_1 cannot see T_1 in restart mode


@pytest.mark.parametrize("backend", ["lens", "nnsight"])
def test_backends_write_the_same_store_on_the_shipped_toy(tmp_path, backend):
    pytest.importorskip({"lens": "transformer_lens", "nnsight": "nnsight"}[backend])
    import toy_models

    spec = CaptureConfig(layers=(0, 1, 3), offsets=(-1, 0, 2), sites=("memento", "block_end"),
                       pooling=("mean", "tokens"), max_tokens=3, dtype="float32", batch_size=32, shard_size=64)
    ref = KVStore(run_capture(toy_models.load(), ToyPasscodeSource(96, seed=2), spec, tmp_path / "hf", progress=False))
    other_spec = CaptureConfig.from_dict({**spec.to_dict(), "backend": backend})
    other = KVStore(run_capture(toy_models.load(), ToyPasscodeSource(96, seed=2), other_spec, tmp_path / backend,
                                progress=False))
    assert other.config["capture"]["backend"] == backend
    for key in ref.keys:
        for layer in ref.layers:
            np.testing.assert_allclose(other.features(layer, key.offset, key.site, key.pooling),
                                       ref.features(layer, key.offset, key.site, key.pooling), atol=1e-5)


def test_sharded_capture_across_ranks_equals_one_process(model, tmp_path):
    src = ToyPasscodeSource(300, seed=4)
    spec = CaptureConfig(layers=(0, 2), offsets=(-1, 1), batch_size=50, shard_size=64)  # 5 shards
    single = run_capture(model, src, spec, tmp_path / "one", progress=False)
    shared = tmp_path / "ranks"
    run_capture(model, src, spec, shared, progress=False, rank=1, world_size=2)  # shards 1, 3
    assert not (shared / "kvstore.h5").exists()  # rank 0's shards are missing: no index yet
    with pytest.raises(StoreError, match="incomplete store"):
        KVStore(shared)
    run_capture(model, src, spec, shared, progress=False, rank=0, world_size=2)  # shards 0, 2, 4; finalizes
    fa, fb = _store_arrays(single), _store_arrays(shared)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name])
    with pytest.raises(StoreError, match="another capture"):
        other = CaptureConfig.from_dict({**spec.to_dict(), "layers": [0]})
        run_capture(model, src, other, shared, progress=False, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        run_capture(model, src, spec, tmp_path / "bad", progress=False, rank=2, world_size=2)


def test_the_target_block_is_the_sources(model, tmp_path):
    """A spec without a target block reads the source's; a spec naming another is refused, nothing written."""
    source = ToyPasscodeSource(8, seed=0, target_block=3)
    assert plan_capture(model, source, CaptureConfig(layers=(0,))).spec.target_block == 3
    with pytest.raises(ValueError, match="passcode in block 3 but the capture spec reads offsets from target block 1"):
        run_capture(model, source, CaptureConfig(layers=(0,), target_block=1), tmp_path / "store")
    assert not (tmp_path / "store").exists()
    plan_capture(model, source, CaptureConfig(layers=(0,), target_block=3))  # agreeing: accepted
    path = run_capture(model, source, CaptureConfig(layers=(0,), offsets=(0,)), tmp_path / "s", progress=False)
    with KVStore(path) as store:
        assert store.config["capture"]["target_block"] == 3  # the store records the block it read


def test_capture_refuses_the_generators_prefill_mask():
    """prefill_causal needs per-sample prompt lengths the capture does not have: refused in the spec, not recorded."""
    with pytest.raises(ValueError, match="prefill_causal changes only prompts that hold blocks"):
        CaptureConfig(layers=(0,), offsets=(0,), mask=MaskConfig(0, prefill_causal=True))
