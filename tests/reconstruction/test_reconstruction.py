"""Reconstruction probes: targets and baseline by hand, and the known answers (issue 32).

Known answers on synthetic stores whose target block is five digits (as on the toy):
- a block copied verbatim into its memento (offset 0 carries it, in the memento and restart
  conditions alike) reconstructs at about 100%, about log2(10) bits a token, in both, and the
  implicit channel (memento - restart) there is about 0;
- a block the memento never saw (offset -1) reads at the unigram baseline: 0 bits a token, to 0.01;
- a signal only the memento condition's K/V carry (offset +1) shows as memento - restart > 0.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvprobe.memento.masks import MaskConfig
from kvprobe.probes.config import DecoderConfig, ProbeConfig
from kvprobe.probes.decoder import fit_span_decoder
from kvprobe.reconstruction import (ReconstructionConfig, ReconstructionError, block_targets, compare_bits,
                                    compare_pairs, reconstruct_store, token_bits, unigram_log2)
from kvprobe.store import CONTENT_TOKENS, KVStore, StoreError
from tests.helpers.stores import write_synthetic_store

PROBE = ProbeConfig(families=("linear",), seeds=1, shuffled_control=False, n_boot=500, pooling="mean")
CONFIG = ReconstructionConfig(probe=PROBE)
RESTART = MaskConfig(keep_last_n_blocks=0, mask_delimiters=True, restart_mode=True)


def _content(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    table = np.full((len(rows), CONTENT_TOKENS), -1)
    for i, r in enumerate(rows):
        kept = r if len(r) <= CONTENT_TOKENS else r[:32] + r[-32:]
        table[i, :len(kept)] = kept
    return table, np.array([len(r) for r in rows])


def test_targets_by_position_and_by_ends_with_a_vocabulary_cut():
    long = list(range(100, 170))  # 70 tokens: stored as its first and last 32
    content, lengths = _content([[7, 7, 8], [7, 9], long])
    by_pos = block_targets(content, lengths, ReconstructionConfig(positions=4, vocab=2), train=np.arange(3))
    assert by_pos.names == ("t1", "t2", "t3", "t4")
    np.testing.assert_array_equal(by_pos.vocab, [7, 8])  # 7 three times, then the lowest id among the ones
    other, past = 2, 3
    np.testing.assert_array_equal(by_pos.labels, [[0, 0, 1, past], [0, other, past, past],
                                                  [other, other, other, other]])
    np.testing.assert_array_equal(by_pos.real, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ends = block_targets(content, lengths, ReconstructionConfig(target="ends", k=2, vocab=300), train=np.arange(3))
    assert ends.names == ("first 1", "first 2", "last 2", "last 1")
    tokens = ends.vocab[np.minimum(ends.labels, len(ends.vocab) - 1)]
    np.testing.assert_array_equal(tokens[2], [100, 101, 168, 169])  # the true last tokens of the long block
    np.testing.assert_array_equal(tokens[1], [7, 9, 7, 9])
    np.testing.assert_array_equal(tokens[0], [7, 7, 7, 8])
    short, n = _content([[5], [1, 2, 3]])  # shorter than 2k: each token scored once
    raw = block_targets(short, n, ReconstructionConfig(target="ends", k=3, vocab=10), train=np.arange(2))
    np.testing.assert_array_equal(raw.vocab, [1, 2, 3, 5])
    past = 5
    np.testing.assert_array_equal(raw.labels, [[3, past, past, past, past, 3], [0, 1, 2, 0, 1, 2]])
    np.testing.assert_array_equal(raw.real, [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    base = unigram_log2(raw.labels, raw.n_classes, real=raw.real)  # in-block rows only: "past" gets no count
    np.testing.assert_allclose(2 ** base[1], np.array([1, 2, 1, 1, 1, 1]) / 7)  # the one in-block token, +1 each
    bag = block_targets(content, lengths, ReconstructionConfig(target="bag", vocab=2), train=np.arange(3))
    np.testing.assert_array_equal(bag.vocab, [7, 8])  # 7 in two blocks; then the lowest id among the ones in one
    np.testing.assert_array_equal(bag.labels, [[1, 1], [1, 0], [0, 0]])
    assert bag.n_classes == 2 and bag.real.all() and bag.names == ("id 7", "id 8")
    only_train = block_targets(content, lengths, ReconstructionConfig(positions=2), train=np.array([0]))
    np.testing.assert_array_equal(only_train.vocab, [7])  # the cut sees the training rows only


def test_bits_are_zero_for_the_baseline_and_log2_c_minus_baseline_for_a_perfect_probe():
    labels = np.array([[0, 1], [1, 1], [2, 1], [0, 1]])
    base = unigram_log2(labels, 4, smoothing=1.0)  # position 2 is always class 1: 4 + 1 of 8 counts
    np.testing.assert_allclose(2 ** base[1], [1 / 8, 5 / 8, 1 / 8, 1 / 8])
    real = np.ones_like(labels, dtype=bool)
    as_base = np.broadcast_to(base * np.log(2), (4, 2, 4))  # the baseline itself, natural log
    np.testing.assert_allclose(token_bits(as_base, labels, real, base), 0, atol=1e-12)
    perfect = np.log(np.eye(4)[labels] + 1e-300)  # (4, 2, 4) all mass on the label
    expected = -(base[0, labels[:, 0]] + base[1, labels[:, 1]]) / 2
    np.testing.assert_allclose(token_bits(perfect, labels, real, base), expected)
    real[0, 1] = False  # a position past the block's end is not scored
    np.testing.assert_allclose(token_bits(perfect, labels, real, base)[0], -base[0, 0])


def test_known_answers_copied_block_unseen_block_and_the_implicit_channel(tmp_path):
    memento = write_synthetic_store(tmp_path / "memento", n=1500, offsets=(-1, 0, 1), signal={0: 3.0, 1: 0.6})
    restart = write_synthetic_store(tmp_path / "restart", n=1500, offsets=(-1, 0, 1), signal={0: 3.0},
                                    mask=RESTART)  # the text copy stays, the K/V-only signal at +1 does not
    with KVStore(memento) as a, KVStore(restart) as b:
        ra, rb = reconstruct_store(a, "memento", CONFIG), reconstruct_store(b, "restart", CONFIG)
    assert ra.names == ("t1", "t2", "t3", "t4", "t5")
    cell = {(r.condition, r.offset, r.layer): r for r in ra.rows + rb.rows}
    ceiling = np.log2(10)
    for cond in ("memento", "restart"):
        copied = cell[(cond, 0, 1)]
        assert copied.accuracy > 0.97 and copied.bits > ceiling - 0.35  # about 100%, about log2(10) bits
        assert min(copied.position_accuracy) > 0.95
        unseen = cell[(cond, -1, 1)]
        assert abs(unseen.bits) < 0.01 and unseen.bits_high < 0.02  # the unigram baseline: 0 bits, to 0.01
        assert abs(unseen.accuracy - unseen.baseline_accuracy) < 0.04
    diffs = {(d.offset, d.layer): d for d in compare_bits(ra, rb, n_boot=500)}
    assert diffs[(0, 1)].ci_low < 0.1 and abs(diffs[(0, 1)].difference) < 0.1  # the text carries the copy alike
    assert diffs[(1, 1)].ci_low > 0.1  # only the memento condition's K/V carry +1
    assert cell[("memento", 1, 1)].bits > cell[("restart", 1, 1)].bits
    family = compare_pairs({"memento": ra, "restart": rb}, [("memento", "restart")], n_boot=500)
    assert [d.difference for d in family] == [d.difference for d in diffs.values()]
    assert all(d.p_holm >= d.p_value for d in family)  # Holm-corrected together, as one family
    assert {(d.offset, d.layer) for d in family if d.significant} >= {(1, 1)}


def test_the_bag_of_tokens_of_a_copied_block_is_read_and_of_an_unseen_one_is_not(tmp_path):
    path = write_synthetic_store(tmp_path / "s", n=1500, offsets=(-1, 0), signal={0: 3.0})
    with KVStore(path) as store:
        result = reconstruct_store(store, "memento", ReconstructionConfig(target="bag", probe=PROBE))
    assert sorted(result.names) == sorted(f"id {d}" for d in range(10))  # every digit is in some block
    cell = {(r.offset, r.layer): r for r in result.rows}
    # a digit is in 41% of blocks (1 - 0.9^5): at most H(0.41) = 0.98 bits an item, 59% for the baseline. "Holds
    # digit d" is an OR over positions, which a linear read of the copied one-hot code gets mostly, not wholly
    copied = cell[(0, 1)]
    assert copied.bits > 0.4 and copied.accuracy > copied.baseline_accuracy + 0.2
    assert abs(cell[(-1, 1)].bits) < 0.01  # nothing of a block it never saw


def test_conditions_must_share_their_validation_blocks(tmp_path):
    a = write_synthetic_store(tmp_path / "a", n=400, offsets=(0,), seed=0)
    b = write_synthetic_store(tmp_path / "b", n=400, offsets=(0,), seed=1)
    with KVStore(a) as sa, KVStore(b) as sb:
        ra, rb = reconstruct_store(sa, "a", CONFIG), reconstruct_store(sb, "b", CONFIG)
    with pytest.raises(ValueError, match="not scored on the same validation blocks"):
        compare_bits(ra, rb)


def test_a_store_without_block_content_is_refused_in_one_line(tmp_path):
    path = write_synthetic_store(tmp_path / "s", n=300, offsets=(0,))
    import h5py

    with h5py.File(path / "kvstore.h5", "r+") as f:  # as a store captured before the content was kept
        del f["samples/content"]
    (path / "kvstore.json").unlink()  # the index's recorded checksum no longer holds
    with KVStore(path) as s, pytest.raises(StoreError, match="no block content .*capture the store again"):
        reconstruct_store(s, "x", CONFIG)


@pytest.mark.parametrize("bad, match", [
    (dict(target="set"), "target must be one of"),
    (dict(positions=0), "positions and k must be in 1..32"),
    (dict(positions=33), "positions and k must be in 1..32"),
    (dict(k=40), "positions and k must be in 1..32"),
    (dict(vocab=0), "vocab must be >= 1"),
])
def test_bad_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ReconstructionConfig(**bad)


def test_the_real_trace_path_on_a_tiny_qwen3_with_qwen3s_tokenizer(tmp_path):
    """Capture -> stored block text -> reconstruction, on real-format traces, Qwen3's own tokenizer and a tiny
    random Qwen3. Random weights still mix a block into the K/V that see it (random features), and the memento
    before the block knows which trace it is in, which predicts the block's own text; the injected passcode
    alone is independent of everything before it: at offset -1 its digits must read at the baseline."""
    from kvprobe.capture import CaptureConfig, run_capture
    from kvprobe.data.trace_source import TracePasscodeSource
    from kvprobe.data.traces import read_jsonl
    from tests.helpers.traces import PIPELINE, qwen3_tokenizer, tiny_qwen3

    tok = qwen3_tokenizer()
    source = TracePasscodeSource(read_jsonl(PIPELINE), tok, n_samples=400, offsets=(-1, 0))
    spec = CaptureConfig(layers=(0, 1), offsets=(-1, 0), batch_size=50, shard_size=200, dtype="float32")
    path = run_capture(tiny_qwen3(len(tok)), source, spec, tmp_path / "s", progress=False)
    batch = source.samples(0, 3)
    with KVStore(path) as store:
        content, lengths = store.content
        for i in range(3):
            block = batch.layouts[i].blocks[1]
            text = batch.input_ids[i, block.start + 1:block.end].numpy()
            assert lengths[i] == len(text) > CONTENT_TOKENS  # these blocks are long: their first and last 32 kept
            np.testing.assert_array_equal(content[i], np.concatenate([text[:32], text[-32:]]))
        assert batch.passcodes[0] in tok.decode(content[0, :32].tolist())  # injected at the block's start
        config = ReconstructionConfig(positions=12, vocab=32, probe=replace(PROBE, pooling="tail_mean", n_boot=300))
        result = reconstruct_store(store, "memento", config)
        ends = reconstruct_store(store, "memento", replace(config, target="ends", k=4))
    assert ends.names == ("first 1", "first 2", "first 3", "first 4", "last 4", "last 3", "last 2", "last 1")
    with KVStore(path) as store:
        bag = reconstruct_store(store, "memento", replace(config, target="bag", vocab=16))
    assert len(bag.names) == 16 and all(np.isfinite(r.bits) for r in bag.rows)
    pieces = [tok.decode([t]) for t in content[0, :12]]
    digits = [p for p, piece in enumerate(pieces) if piece.isdigit()]  # Qwen3 writes a digit per token
    assert "".join(pieces[p] for p in digits) == batch.passcodes[0]
    for row in result.rows + ends.rows:
        assert np.isfinite([row.bits, row.bits_low, row.bits_high]).all()
    for row in result.rows:
        if row.offset == -1:  # the passcode is drawn independently of all that precedes the block
            assert max(row.position_bits[p] for p in digits) < 0.05
            assert max(abs(row.position_accuracy[p] - 0.1) for p in digits) < 0.1


def test_the_span_decoder_reads_a_copied_block_and_nothing_of_an_unseen_one(tmp_path):
    """The decoder's known answers: much of a copied block, nothing of a block before it."""
    path = write_synthetic_store(tmp_path / "s", n=1200, n_layers=1, offsets=(-1, 0), signal={0: 3.0})
    config = ReconstructionConfig(probe=PROBE, span_decoder=True, decoder=DecoderConfig(max_epochs=25))
    with KVStore(path) as store:
        result = reconstruct_store(store, "memento", config)
    cell = {(r.probe, r.offset): r for r in result.rows}
    assert set(cell) == {(p, o) for p in ("linear", "decoder") for o in (-1, 0)}
    # data-hungrier than the linear probe: from ~770 training blocks it reads most, not all, of the copy
    assert cell[("decoder", 0)].bits > 1.4 and cell[("decoder", 0)].accuracy > 0.6
    assert abs(cell[("decoder", -1)].bits) < 0.06 and cell[("decoder", -1)].bits_low < 0.01


def test_the_span_decoder_is_seeded_and_refuses_an_empty_holdout():
    x = torch.randn(60, 3, 8)
    y, real = torch.randint(0, 4, (60, 2)), torch.ones(60, 2, dtype=torch.bool)
    held = torch.arange(60) % 5 == 0
    runs = [fit_span_decoder(x, y, real, held, x[:7], 4, DecoderConfig(max_epochs=3), seed=s)[0] for s in (1, 1, 2)]
    assert runs[0].shape == (7, 2, 4) and torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="holdout must hold some training rows"):
        fit_span_decoder(x, y, real, torch.zeros(60, dtype=torch.bool), x, 4)


def test_a_store_of_empty_blocks_is_refused_in_one_line():
    class EmptyBlocks:  # what reconstruct_store reads before any feature: the block text, and the path
        path = "runs/x/stores/memento"
        content = (np.full((40, CONTENT_TOKENS), -1), np.zeros(40, dtype=np.int64))

    with pytest.raises(ReconstructionError, match=r"runs/x/stores/memento: too few blocks with text to reconstruct "
                                                  r"\(1 distinct block text\(s\) in 40 samples\)"):
        reconstruct_store(EmptyBlocks(), "memento", CONFIG)


def test_a_run_saved_before_the_difference_was_renamed_reads_under_todays_name(tmp_path):
    """Runs before 2026-12-07 saved a paired difference as `diff` (the former BitsDiff); `kvprobe reconstruct
    --show` and the report read it as `difference`, like every other paired difference."""
    from kvprobe.experiment.reconstruct import reconstruction_path, saved_reconstruction

    path = reconstruction_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"diffs": [{"a": "memento", "b": "restart", "diff": 0.25, "ci_low": 0.1}]}))
    assert saved_reconstruction(tmp_path)["diffs"] == [{"a": "memento", "b": "restart", "ci_low": 0.1,
                                                       "difference": 0.25}]
    assert saved_reconstruction(tmp_path / "none") is None
