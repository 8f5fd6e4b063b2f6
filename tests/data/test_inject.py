"""Passcode injection into real traces, its verification, and the trace sample source end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.data.inject import DEFAULT_TEMPLATE, inject_and_tokenize, inject_passcode, sentence_boundaries
from kvprobe.memento.layout import SpecialTokens, parse_batch
from kvprobe.data.passcodes import PasscodeConfig, passcode_labels, sample_passcodes
from kvprobe.store import KVStore
from kvprobe.data.trace_source import CHUNK, TracePasscodeSource
from kvprobe.data.traces import Trace, TraceError, read_jsonl, tokenize_trace
from tests.helpers.traces import PIPELINE, build_tokenizer, tiny_qwen3


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    return read_jsonl(PIPELINE)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def special(tok) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tok)


SMALL = Trace("s", "Q?", ["One a. Two b? Three c!", "X.", "Y y. Z z."], ["m0", "m1", "m2"], "A")


# ----------------------------------------------------------------------------- text level


def test_sentence_boundaries():
    text = "First one. Second \\( x = 3.5 \\) here! Third (quoted.) \"Fourth?\" Fifth\n\nSixth"
    cuts = sentence_boundaries(text)
    starts = [text[c : c + 5] for c in cuts[1:-1]]
    assert starts == ["Secon", "Third", "\"Four", "Fifth", "Sixth"]
    assert cuts[0] == 0 and cuts[-1] == len(text)
    assert sentence_boundaries("No boundary") == [0, 11]


@pytest.mark.parametrize(
    "where, expected",
    [
        ("start", "P12345. One a. Two b? Three c!"),
        ("end", "One a. Two b? Three c! P12345."),
        ("middle", "One a. Two b? P12345. Three c!"),  # boundary at character 14, nearest to 22 / 2
        (0, "P12345. One a. Two b? Three c!"),
        (1, "One a. P12345. Two b? Three c!"),
        (3, "One a. Two b? Three c! P12345."),
    ],
)
def test_inject_passcode_where(where, expected):
    out = inject_passcode(SMALL, 0, "12345", template="P{passcode}.", where=where)
    assert out.blocks[0] == expected
    assert out.blocks[1:] == SMALL.blocks[1:] and out.summaries == SMALL.summaries
    assert (out.prompt, out.answer, out.trace_id) == (SMALL.prompt, SMALL.answer, SMALL.trace_id)
    assert SMALL.blocks[0] == "One a. Two b? Three c!"  # the input is not modified


def test_inject_passcode_default_template(traces):
    t = inject_passcode(traces[0], 1, "04217")
    assert t.blocks[1] == "The secret passcode is 04217. " + traces[0].blocks[1]
    t = inject_passcode(traces[0], 1, "04217", where="end", template="Remember {passcode} {not a field}")
    assert t.blocks[1] == traces[0].blocks[1] + " Remember 04217 {not a field}"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"target_block": 5}, "trace 's' has 3 blocks, no target block 5"),
        ({"target_block": -1}, "trace 's' has 3 blocks, no target block -1"),
        ({"where": 4}, "trace 's', block 0: where=4 but the block has 3 sentences (0..3 allowed)"),
        ({"where": "middle", "target_block": 1}, "trace 's', block 1: one sentence, so no middle boundary"),
        ({"where": "top"}, "where must be one of ('start', 'middle', 'end') or a sentence index, got 'top'"),
        ({"template": "no placeholder"}, "template must contain {passcode} exactly once"),
        ({"template": "{passcode} {passcode}"}, "template must contain {passcode} exactly once"),
        ({"template": "<|block_end|> {passcode}"}, "trace 's', block 0 contains the marker <|block_end|>"),
        ({"passcode": " 1"}, "passcode must be a non-empty string"),
    ],
)
def test_inject_passcode_errors(kw, message):
    args = {"target_block": 0, "passcode": "12345", **kw}
    with pytest.raises(ValueError) as err:
        inject_passcode(SMALL, args.pop("target_block"), args.pop("passcode"), **args)
    assert message in str(err.value)


# ----------------------------------------------------------------------------- verified tokenization


@pytest.mark.parametrize("where", ["start", "middle", "end", 2])
def test_inject_and_tokenize_verifies(traces, tok, special, where):
    for t in traces:
        base_ids, base_lay = tokenize_trace(t, tok, special)
        for target in (1, 2):
            s = inject_and_tokenize(t, target, "90817", tok, special, where=where)
            content = s.layout.blocks[target].content
            assert s.positions and all(p in content for p in s.positions)
            assert "90817" in tok.decode(s.input_ids[list(s.positions)])
            assert s.passcode == "90817"
            assert s.trace == inject_passcode(t, target, "90817", where=where)
            # tokens outside the target block's content are the un-injected trace's, shifted after it
            head = base_lay.blocks[target].start + 1
            assert torch.equal(s.input_ids[:head], base_ids[:head])
            shift = len(s.input_ids) - len(base_ids)
            assert torch.equal(s.input_ids[s.layout.blocks[target].end :], base_ids[base_lay.blocks[target].end :])
            for old, new in zip(base_lay.blocks, s.layout.blocks):
                assert torch.equal(s.input_ids[list(new.memento_text)], base_ids[list(old.memento_text)])
                assert new.summary_end == old.summary_end + (shift if old.index >= target else 0)


class OffsetShiftingTokenizer:
    """Wraps a tokenizer and reports character offsets `shift` characters too early."""

    def __init__(self, inner, shift: int) -> None:
        self.inner, self.shift = inner, shift

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kw):
        enc = self.inner(text, **kw)
        if "offset_mapping" in enc:
            enc["offset_mapping"] = [(s - self.shift, e - self.shift) for s, e in enc["offset_mapping"]]
        return enc


def test_inject_and_tokenize_catches_failures(traces, tok, special):
    t = traces[0]
    with pytest.raises(TraceError, match=f"trace '{t.trace_id}' has 4 blocks, no target block 5"):
        inject_and_tokenize(t, 5, "12345", tok, special)
    # the passcode's tokens reach the <|block_end|> marker
    bad = OffsetShiftingTokenizer(tok, shift=3)
    with pytest.raises(TraceError, match=r"passcode tokens at positions \[\d+\] lie outside the content of block 1"):
        inject_and_tokenize(t, 1, "12345", bad, special, where="end", template="{passcode}")
    base_ids, base_lay = tokenize_trace(t, tok, special)
    m = base_lay.blocks[3].memento_text.start
    changed = base_ids.clone()
    changed[m] += 1
    with pytest.raises(TraceError, match="changed the memento text tokens of block 3"):
        inject_and_tokenize(t, 1, "12345", tok, special, base=(changed, base_lay))
    changed = base_ids.clone()
    changed[2] += 1
    with pytest.raises(TraceError, match="changed tokens before block 1"):
        inject_and_tokenize(t, 1, "12345", tok, special, base=(changed, base_lay))
    changed = base_ids.clone()
    changed[-1] += 1
    with pytest.raises(TraceError, match="changed tokens after the content of block 1"):
        inject_and_tokenize(t, 1, "12345", tok, special, base=(changed, base_lay))


# ----------------------------------------------------------------------------- the sample source


def test_source_samples(traces, tok, special):
    src = TracePasscodeSource(traces, tok, n_samples=10, seed=5)
    batch = src.samples(0, 10)
    chunk_seed = int(np.random.SeedSequence([5, 0]).generate_state(1)[0])
    assert batch.passcodes == sample_passcodes(CHUNK, chunk_seed)[:10]
    np.testing.assert_array_equal(batch.labels, passcode_labels(batch.passcodes))
    np.testing.assert_array_equal(batch.index, np.arange(10))
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > len(traces)  # passcodes tokenize to different lengths
    for i, (row, lay, n) in enumerate(zip(batch.input_ids, batch.layouts, lengths)):
        t = traces[i % len(traces)]
        s = inject_and_tokenize(t, 1, batch.passcodes[i], tok, special)
        assert torch.equal(row[:n], s.input_ids) and lay == s.layout
        assert (row[n:] == tok.eos_token_id).all() and batch.attention_mask[i, :n].all()
    assert parse_batch(batch.input_ids, special, batch.attention_mask) == batch.layouts
    # any range is the same however it is cut
    part = src.samples(3, 7)
    assert part.passcodes == batch.passcodes[3:7] and part.layouts == batch.layouts[3:7]
    assert torch.equal(part.input_ids, batch.input_ids[3:7, : part.input_ids.shape[1]])
    big = TracePasscodeSource(traces, tok, n_samples=3 * CHUNK, seed=5)
    assert big.passcodes(CHUNK - 2, CHUNK + 2) == big.passcodes(0, 2 * CHUNK)[CHUNK - 2 : CHUNK + 2]
    assert big.passcodes(0, 3) != TracePasscodeSource(traces, tok, n_samples=3, seed=6).passcodes(0, 3)
    hexed = TracePasscodeSource(traces, tok, n_samples=4, passcode_spec=PasscodeConfig(4, "0123456789abcdef"))
    assert all(len(c) == 4 for c in hexed.samples(0, 4).passcodes)


def test_source_describe(traces, tok):
    d = TracePasscodeSource(traces, tok, n_samples=4, seed=1, where="middle").describe()
    json.dumps(d)
    assert d["kind"] == "traces" and d["seed"] == 1 and d["where"] == "middle" and d["template"] == DEFAULT_TEMPLATE
    assert d["tokenizer"]["vocab_size"] == len(tok) and d["traces"]["n"] == 3
    other = TracePasscodeSource(traces, tok, n_samples=4, seed=2, where="middle").describe()
    assert {k for k in d if d[k] != other[k]} == {"seed"}
    assert TracePasscodeSource(traces[:2], tok, n_samples=4).describe()["traces"] != d["traces"]


def test_source_errors(traces, tok):
    with pytest.raises(TraceError, match=f"trace '{traces[0].trace_id}' has 4 blocks, no target block 4"):
        TracePasscodeSource(traces, tok, n_samples=4, target_block=4)
    with pytest.raises(TraceError, match=f"trace '{traces[0].trace_id}': memento at offset \\+3 from target block 1"):
        TracePasscodeSource(traces, tok, n_samples=4, offsets=(-1, 0, 3))
    src = TracePasscodeSource(traces, tok, n_samples=4)
    src.check((-1, 0, 2))
    with pytest.raises(TraceError, match="block_end at offset -2"):
        src.check((-2,), sites=("block_end",))
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        TracePasscodeSource(traces, tok, n_samples=0)
    with pytest.raises(ValueError, match=r"duplicate trace id\(s\)"):
        TracePasscodeSource(traces + traces[:1], tok, n_samples=4)
    with pytest.raises(ValueError, match=r"sample range 2..9 outside 0..4"):
        src.samples(2, 9)


def test_source_padding_token(traces):
    shared = build_tokenizer()
    tokz = type(shared)(tokenizer_object=Tokenizer.from_str(shared.backend_tokenizer.to_str()))  # no eos, no pad
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        TracePasscodeSource(traces, tokz, n_samples=2)
    tokz.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert TracePasscodeSource(traces, tokz, n_samples=2).pad_id == tokz.convert_tokens_to_ids("<|endoftext|>")
    tokz.add_special_tokens({"pad_token": "<|pad|>"})  # a pad token wins over eos
    pad = tokz.convert_tokens_to_ids("<|pad|>")
    batch = TracePasscodeSource(traces, tokz, n_samples=2).samples(0, 2)
    assert pad != tokz.eos_token_id and (batch.attention_mask == 0).any()
    assert (batch.input_ids[batch.attention_mask == 0] == pad).all()
    assert not (batch.input_ids[batch.attention_mask == 1] == pad).any()


# ----------------------------------------------------------------------------- end to end


def test_capture_on_real_traces_and_causal_control(traces, tok, tmp_path):
    model = tiny_qwen3(len(tok))
    spec = CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), sites=("memento", "block_end"), batch_size=4,
                       shard_size=8, dtype="float32")
    stores, batches = [], []
    for seed in (0, 1):  # two sources that differ only in their passcodes
        src = TracePasscodeSource(traces, tok, n_samples=12, seed=seed, offsets=spec.offsets)
        batches.append(src.samples(0, 12))
        stores.append(KVStore(run_capture(model, src, spec, tmp_path / f"s{seed}", progress=False)))
    assert batches[0].passcodes != batches[1].passcodes
    assert batches[0].attention_mask.sum(1).tolist() != batches[1].attention_mask.sum(1).tolist()  # lengths differ
    D = 2 * 2 * 16  # K and V, 2 KV heads, 16 dims
    for store, batch in zip(stores, batches):
        assert len(store) == 12 and store.passcodes == batch.passcodes
        np.testing.assert_array_equal(store.labels, batch.labels)
        assert store.config["source"]["kind"] == "traces"
        for site in ("memento", "block_end"):
            for off in (-1, 0, 1):
                assert store.features(0, off, site).shape == (12, 5, D)  # tail_mean: 4 tokens + the mean
    for site in ("memento", "block_end"):
        for layer in (0, 1):
            # M_1 and the <|block_end|> of T_1 precede the target block: same positions, same tokens, same states
            np.testing.assert_array_equal(stores[0].features(layer, -1, site), stores[1].features(layer, -1, site))
            # the direct condition sees the passcode, so it differs
            assert not np.array_equal(stores[0].features(1, 0, site), stores[1].features(1, 0, site))
    for s in stores:
        s.close()
