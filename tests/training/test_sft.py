"""Two-stage Memento SFT: rows, the collator's batches (tables, labels, positions), the mask the
trainer builds on the device, truncation, the tokenised cache, and a CPU smoke run.

The tokenizer is the offline byte-level BPE of tests/helpers/traces.py (it holds the six markers);
models are tiny random Qwen3s with sdpa attention. Traces are the shipped pipeline
examples (about 800-1200 tokens each) and, for the length checks, a synthetic trace of
about 17K tokens and 50 blocks.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

import kvprobe.training.sft as sft
from kvprobe.memento.budget import LargestTensor
from kvprobe.cli import main as cli_main
from kvprobe.data.traces import Trace, TraceError, read_jsonl, tokenize_trace
from kvprobe.memento.forward import DENSE_MASK_MAX_TOKENS, UnsupportedAttentionError, masked_forward
from kvprobe.memento.layout import SpecialTokens, parse_layout
from kvprobe.memento.masks import MaskConfig, allow_matrix
from kvprobe.training.collate import MASK_TABLES_KEY, with_memento_mask
from kvprobe.training.encode import OverlengthError, TraceEncoder
from kvprobe.training.sft import (
    QWEN3_CHAT_TEMPLATE,
    MementoCollator,
    select_traces,
    stage_attn_implementation,
    tokenize_traces,
    train_stage,
    two_stage_sft,
)
from tests.helpers.paths import ROOT as REPO
from tests.helpers.traces import PIPELINE, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    return read_jsonl(PIPELINE)


def tiny_model(vocab_size: int, seed: int = 0, attn: str = "sdpa") -> Qwen3ForCausalLM:
    cfg = Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=2048,
                      tie_word_embeddings=False, attention_dropout=0.0, attn_implementation=attn)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def reference_row(trace: Trace, tok) -> tuple[list[int], object]:
    """Ids and layout of one trace built without the collator: tokenize_trace, then EOS."""
    ids, _ = tokenize_trace(trace, tok)
    ids = ids.tolist() + [tok.eos_token_id]
    return ids, parse_layout(ids, SpecialTokens.from_tokenizer(tok))


def long_trace(traces: list[Trace], n_blocks: int = 50, chars_per_block: int = 800) -> Trace:
    """A synthetic trace of `n_blocks` blocks cut from the pipeline traces' text (about 350
    tokens per block with the test BPE: 17K tokens at 50 blocks)."""
    text = " ".join(b for t in traces for b in t.blocks)
    blocks = [text[(i * 997) % (len(text) - chars_per_block):][:chars_per_block].strip() for i in range(n_blocks)]
    return Trace("long", traces[0].prompt, blocks, [f"step {i} done" for i in range(n_blocks)], "42")


# ----------------------------------------------------------------------------- the collator


@pytest.mark.parametrize("mask", [
    MaskConfig(keep_last_n_blocks=0),
    MaskConfig(keep_last_n_blocks=1, mask_delimiters=True),
    MaskConfig(keep_last_n_blocks=0, restart_mode=True),
], ids=lambda m: m.name)
def test_stage2_mask_is_the_memento_allow_matrix_of_each_row(tok, traces, mask):
    """The collator ships (B, T) tables; the mask the trainer builds from them on the model's
    side equals allow_matrix of each row's independently parsed layout."""
    model = tiny_model(len(tok))
    batch = MementoCollator(tok, 2, mask)(traces[:2])
    assert set(batch) == {"input_ids", "labels", "position_ids", MASK_TABLES_KEY}
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    B, T = ids.shape
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch[MASK_TABLES_KEY].items()} == {
        "hide_block": ((B, T), torch.int32), "memento_of": ((B, T), torch.int32),
        "n_completed": ((B, T), torch.int32), "valid": ((B, T), torch.bool)}
    am = with_memento_mask(model, batch, mask)["attention_mask"]
    assert am.shape == (B, 1, T, T) and am.dtype == model.dtype
    assert set(am.unique().tolist()) == {0.0, torch.finfo(model.dtype).min}
    for b, trace in enumerate(traces[:2]):
        ref_ids, layout = reference_row(trace, tok)
        n = len(ref_ids)
        assert ids[b, :n].tolist() == ref_ids and ref_ids[-1] == tok.eos_token_id
        allow = allow_matrix([layout], T, mask)[0]  # (1, T, T): the padded row's mask, built independently
        assert torch.equal(am[b] == 0, allow)
        causal = torch.ones(T, T).tril().bool()
        assert (causal[:n, :n] & ~allow[0, :n, :n]).any()  # masking is really applied: some past keys hidden
        assert pos[b, :n].tolist() == list(range(n))
        # loss on everything from <think> on (the assistant turn, as the paper), nothing on the prompt or padding
        think = ref_ids.index(SpecialTokens.from_tokenizer(tok).think)
        assert think < layout.blocks[0].start
        assert (labels[b, :think] == -100).all()
        assert labels[b, think:n].tolist() == ref_ids[think:]
        assert (labels[b, n:] == -100).all()


def test_stage1_batch_has_only_a_padding_mask(tok, traces):
    batch = MementoCollator(tok, 1)(traces[:2])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    am = batch["attention_mask"]
    assert am.dim() == 2 and am.dtype == torch.long
    lengths = [len(reference_row(t, tok)[0]) for t in traces[:2]]
    assert am.sum(1).tolist() == lengths
    assert torch.equal(batch["labels"] != -100, (am == 1) & (batch["labels"] == batch["input_ids"]))
    same = with_memento_mask(tiny_model(len(tok)), batch, MaskConfig())  # no tables: passed on unchanged
    assert same.keys() == batch.keys() and all(same[k] is batch[k] for k in batch)


def test_stage2_batch_forward_equals_masked_forward(tok, traces):
    model = tiny_model(len(tok))
    mask = MaskConfig(keep_last_n_blocks=0)
    batch = with_memento_mask(model, MementoCollator(tok, 2, mask)(traces[:2]), mask)
    with torch.no_grad():
        out = model(**batch)
        nll, count = 0.0, 0
        for b, trace in enumerate(traces[:2]):
            ids, layout = reference_row(trace, tok)
            ref = masked_forward(model, torch.tensor([ids]), layouts=[layout], config=mask).logits[0]
            n = len(ids)
            torch.testing.assert_close(out.logits[b, :n], ref, atol=1e-4, rtol=1e-4)
            causal = model(input_ids=torch.tensor([ids])).logits[0]
            assert (causal - ref).abs().max() > 1e-2  # the memento mask changes the logits
            labels = batch["labels"][b, 1:n]
            keep = labels != -100
            nll += F.cross_entropy(ref[:-1][keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert out.loss.item() == pytest.approx(nll / count, rel=1e-4)


def test_table_rows_collate_like_traces(tok, traces, tmp_path):
    """Rows read back from the tokenised table give the batch the traces give."""
    collator = MementoCollator(tok, 2, pad_to_multiple_of=128)
    rows = tokenize_traces(traces, collator.encoder, tmp_path).rows
    from_table, from_traces = collator([rows[0], rows[2]]), collator([traces[0], {"trace": traces[2]}])
    assert from_table["input_ids"].shape[1] % 128 == 0
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(from_table[key], from_traces[key]), key
    for key, value in from_traces[MASK_TABLES_KEY].items():
        assert torch.equal(from_table[MASK_TABLES_KEY][key], value), key
    with pytest.raises(TypeError, match="MementoCollator takes EncodedTrace rows"):
        collator([{"text": "no ids"}])


def test_prompt_template_wraps_the_prompt_and_stays_out_of_the_loss(tok, traces):
    collator = MementoCollator(tok, 1, prompt_template=QWEN3_CHAT_TEMPLATE)
    wrapped = collator.prepare(traces[0])
    assert wrapped.prompt == f"<|im_start|>user\n{traces[0].prompt}<|im_end|>\n<|im_start|>assistant"
    row = collator.encode(traces[0])
    ids, labels = list(row.ids), row.labels()
    think = ids.index(SpecialTokens.from_tokenizer(tok).think)
    assert row.loss_start == think
    assert labels[:think] == [-100] * think and labels[think] == ids[think]  # <think> opens the assistant turn
    assert tok.decode(ids[:think]).startswith("<|im_start|>user\n")
    # without loss_on_think the targets start at the first block
    plain = MementoCollator(tok, 1, prompt_template=QWEN3_CHAT_TEMPLATE, loss_on_think=False)
    assert plain.encode(traces[0]).loss_start == row.layout.blocks[0].start
    assert MementoCollator(tok, 1, loss_on_prompt=True).encode(traces[0]).loss_start == 0
    with pytest.raises(ValueError, match=r"must contain '\{prompt\}'"):
        MementoCollator(tok, 1, prompt_template="no slot")


def test_the_default_recipe_is_the_papers():
    """Appendix A.2.1: lr 8e-5, cosine with 5% warmup, 5 epochs per stage, AdamW (0.9, 0.999), no weight decay,
    clipping 1.0, global batch 512, gradient checkpointing, seed 42, checkpoints every 50 steps, 32K tokens."""
    from kvprobe.training.sft import PAPER_RECIPE, accumulation_for

    r = PAPER_RECIPE
    assert (r.learning_rate, r.lr_scheduler_type, r.warmup_steps, r.num_train_epochs) == (8e-5, "cosine", 0.05, 5.0)
    assert (r.weight_decay, r.adam_beta1, r.adam_beta2, r.max_grad_norm) == (0.0, 0.9, 0.999, 1.0)
    assert (r.global_batch_size, r.gradient_checkpointing, r.seed, r.save_steps, r.max_length) == (
        512, True, 42, 50, 32768)
    assert r.loss_on_think
    assert accumulation_for(512, 1, 32) == 16 and accumulation_for(512, 2, 8) == 32 and accumulation_for(4, 8, 2) == 1
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        accumulation_for(512, 0, 1)


def test_collator_errors(tok, traces):
    with pytest.raises(ValueError, match="stage must be 1 .* or 2"):
        MementoCollator(tok, 3)
    with pytest.raises(ValueError, match="overlength must be 'truncate' or 'drop', got 'cut'"):
        MementoCollator(tok, 1, max_length=900, overlength="cut")
    with pytest.raises(ValueError, match="max_length must be at least 2 tokens"):
        MementoCollator(tok, 1, max_length=1)
    with pytest.raises(TypeError, match="mask must be a MaskConfig"):
        MementoCollator(tok, 2, mask={"keep_last_n_blocks": 0})
    drop = MementoCollator(tok, 1, max_length=900, overlength="drop")
    with pytest.raises(OverlengthError, match=r"trace 'aime25-i-p05' has 1193 tokens, more than max_length=900 "
                                              r"\(overlength='drop'\)"):
        drop([traces[0]])
    kept, dropped = select_traces(traces, drop)
    assert [t.trace_id for t in kept] == ["aime25-i-p01"] and sorted(dropped) == ["aime25-i-p02", "aime25-i-p05"]
    kept, dropped = select_traces(traces, MementoCollator(tok, 1, max_length=900))  # truncated, all kept
    assert len(kept) == 3 and dropped == []


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("mask", [
    MaskConfig(keep_last_n_blocks=0),
    MaskConfig(keep_last_n_blocks=1, mask_delimiters=True),
    MaskConfig(keep_last_n_blocks=0, evict_before_summary_end=True),
], ids=lambda m: m.name)
@pytest.mark.parametrize("where", ["in a block", "in a memento", "after a memento", "in the answer"])
def test_a_truncated_row_is_the_prefix_of_the_full_row_with_its_mask(tok, traces, where, mask):
    """A trace cut at max_length (anywhere: mid-block, mid-memento) keeps the first max_length
    ids and targets, parses with the cut block unfinished, and its mask is the full row's
    mask restricted to those positions (a query never depends on later keys)."""
    full_ids, full = reference_row(traces[0], tok)
    blk = full.blocks[1]
    cut = {"in a block": blk.start + 5, "in a memento": blk.summary_start + 2,
           "after a memento": blk.summary_end + 1, "in the answer": full.think_end + 3}[where]
    collator = MementoCollator(tok, 2, mask, max_length=cut)
    row = collator.encode(traces[0])
    assert row.truncated and row.n_tokens == len(full_ids) and list(row.ids) == full_ids[:cut]
    assert row.labels() == reference_labels(full_ids, full, tok)[:cut]
    if where in ("in a block", "in a memento"):
        assert not row.layout.blocks[-1].completed  # the cut block is unfinished, never hidden
    batch = collator([traces[0]])
    am = with_memento_mask(tiny_model(len(tok)), batch, mask)["attention_mask"]
    assert torch.equal(am[0] == 0, allow_matrix([full], cut, mask, truncate=True)[0])


def reference_labels(ids: list[int], layout, tok) -> list[int]:
    think = ids.index(SpecialTokens.from_tokenizer(tok).think)
    return [-100] * think + ids[think:]


def test_a_trace_whose_prompt_fills_max_length_is_dropped(tok, traces):
    encoder = TraceEncoder(tok, max_length=20)
    with pytest.raises(OverlengthError, match=r"trace 'aime25-i-p05': no target token within max_length=20 "
                                              r"\(its prompt takes \d+ of its 1193 tokens\)"):
        encoder.encode(traces[0])
    rows = encoder.encode_or_reason(traces)
    assert all(isinstance(r, str) and "no target token within max_length=20" in r for r in rows)


# ----------------------------------------------------------------------------- no T x T on the host


def test_the_stage2_collator_makes_no_t_by_t_tensor_at_17k_tokens(tok, traces, tmp_path):
    """Above the dense threshold the collator's batch is O(B x T): every op it runs, from the
    table row and from the trace itself, makes tensors of at most a few B x T entries. The dense
    mask is refused with one line naming its size, before any T x T allocation; flex gets a
    BlockMask of tiles."""
    trace = long_trace(traces)
    collator = MementoCollator(tok, 2, max_length=32768)
    rows = tokenize_traces([trace], collator.encoder, tmp_path).rows
    T = len(rows[0]["input_ids"])
    assert T > 2 * DENSE_MASK_MAX_TOKENS and collator.encode(trace).layout.n_blocks == 50
    for feature in (rows[0], trace):
        with LargestTensor() as seen:
            batch = collator([feature])
        assert T <= seen.numel <= 4 * T, (seen.numel, T)  # the mode sees the (B, T) tables; T x T would be 3e8
        assert all(v.numel() == T for v in [batch["input_ids"], *batch[MASK_TABLES_KEY].values()])
    dense = tiny_model(len(tok))
    with LargestTensor() as seen, pytest.raises(UnsupportedAttentionError) as refused:
        with_memento_mask(dense, batch, collator.mask)
    assert seen.numel <= 4 * T
    assert len(str(refused.value).splitlines()) == 1 and f"a {T}-token memento mask" in str(refused.value)
    assert "GiB" in str(refused.value)
    flex = tiny_model(len(tok), attn="flex_attention")
    with LargestTensor() as seen:
        block_mask = with_memento_mask(flex, batch, collator.mask)["attention_mask"]
    assert type(block_mask).__name__ == "BlockMask" and block_mask.shape[-2:] == (T, T)
    assert seen.numel <= 4 * T


def test_stage2_flex_mask_equals_the_dense_mask(tok, traces):
    """The BlockMask the trainer builds for a flex_attention model allows what the dense mask allows."""
    mask = MaskConfig(keep_last_n_blocks=1)
    batch = MementoCollator(tok, 2, mask, pad_to_multiple_of=128)(traces[:2])
    block_mask = with_memento_mask(tiny_model(len(tok), attn="flex_attention"), batch, mask)["attention_mask"]
    dense = with_memento_mask(tiny_model(len(tok)), batch, mask)["attention_mask"]
    T = batch["input_ids"].shape[1]
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(T), torch.arange(T), indexing="ij")
    allowed = block_mask.mask_mod(b, torch.zeros_like(b), q, k)  # (B, T, T), inside every tile
    assert torch.equal(allowed, dense[:, 0] == 0)
    tiles = block_mask.to_dense()[:, 0].bool()  # (B, T/128, T/128): every allowed entry lies in a listed tile
    assert torch.equal(allowed.view(2, T // 128, 128, T // 128, 128).any(4).any(2) & ~tiles,
                       torch.zeros_like(tiles))


# ----------------------------------------------------------------------------- tokenise once


def test_traces_are_tokenised_once_and_the_table_is_reused_by_another_process(tok, traces, tmp_path):
    encoder = TraceEncoder(tok, max_length=1000)
    first = tokenize_traces(traces, encoder, tmp_path)
    assert not first.reused and first.path.parent == tmp_path and first.path.is_dir()
    assert len(first) == 3 and sorted(first.truncated) == ["aime25-i-p02", "aime25-i-p05"] and first.dropped == {}
    short = len(reference_row(traces[1], tok)[0])  # aime25-i-p01 fits
    assert first.max_tokens == 1000 and sorted(first.n_tokens) == [short, 1000, 1000]
    again = tokenize_traces(traces, encoder, tmp_path)
    assert again.reused and again.path == first.path
    assert [list(r["input_ids"]) for r in again.rows] == [list(r["input_ids"]) for r in first.rows]
    # another process with the same traces, tokenizer and options maps the table and tokenises nothing
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    script = textwrap.dedent(f"""
        from transformers import AutoTokenizer
        from kvprobe.data.traces import read_jsonl
        from kvprobe.training import encode, tokenized

        def refuse(*a, **k):
            raise AssertionError("tokenised again")

        encode.TraceEncoder._token_ids = refuse
        tok = AutoTokenizer.from_pretrained({str(tok_dir)!r})
        rows = tokenized.tokenize_traces(read_jsonl({str(PIPELINE)!r}), encode.TraceEncoder(tok, max_length=1000),
                                         {str(tmp_path)!r})
        print(rows.reused, rows.path.name, len(rows), sorted(rows.truncated))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"True {first.path.name} 3 ['aime25-i-p02', 'aime25-i-p05']"
    # other options or other traces: another table
    dropping = tokenize_traces(traces, TraceEncoder(tok, max_length=1000, overlength="drop"), tmp_path)
    assert not dropping.reused and dropping.path != first.path and len(dropping) == 1
    assert set(dropping.dropped) == {"aime25-i-p02", "aime25-i-p05"}
    assert "more than max_length=1000" in dropping.dropped["aime25-i-p05"]
    assert not tokenize_traces(traces[:2], encoder, tmp_path).reused
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [first.path.name, dropping.path.name, tokenize_traces(traces[:2], encoder, tmp_path).path.name, "tok"])


def test_a_trace_that_does_not_parse_is_dropped_with_its_reason(tok, traces, tmp_path, monkeypatch):
    """A trace whose tokens are not valid Memento structure (here: one loses its last
    <|summary_end|>, as a tokenizer that splits a marker would) is left out with the reason."""
    special = SpecialTokens.from_tokenizer(tok)
    token_ids = TraceEncoder._token_ids

    def break_the_second(self, batch):
        ids = token_ids(self, batch)
        for t, row in zip(batch, ids):
            if t.trace_id == traces[1].trace_id:
                row.remove(special.summary_end)
        return ids

    monkeypatch.setattr(TraceEncoder, "_token_ids", break_the_second)
    rows = tokenize_traces(traces, TraceEncoder(tok), tmp_path)
    assert len(rows) == 2 and list(rows.dropped) == [traces[1].trace_id]
    assert "rendered tokens are not valid Memento structure" in rows.dropped[traces[1].trace_id]
    with pytest.raises(TraceError, match="not valid Memento structure"):
        TraceEncoder(tok).encode(traces[1])


# ----------------------------------------------------------------------------- attention per stage


def test_stage_attention_implementations(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage_attn_implementation(2, "flash_attention_2") == "sdpa"
    assert stage_attn_implementation(2, "eager") == "eager"
    assert stage_attn_implementation(2, "flex_attention") == "sdpa"  # CPU flex has no backward
    assert stage_attn_implementation(2, None) == "sdpa"
    monkeypatch.setattr(sft, "find_spec", lambda name: None)
    assert stage_attn_implementation(1) == "sdpa"
    monkeypatch.setattr(sft, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert stage_attn_implementation(1) == "sdpa"  # flash_attn without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_attn_implementation(1) == "flash_attention_2"
    assert stage_attn_implementation(2, "sdpa") == "flex_attention"  # GPU: the block-sparse mask, any length


def test_stage2_refuses_an_implementation_that_ignores_4d_masks(tok, traces, tmp_path):
    with pytest.raises(ValueError, match="stage 2 needs an attention implementation that reads a 4D mask"):
        train_stage(tiny_model(len(tok)), tok, traces, 2, tmp_path, attn_implementation="flash_attention_2")


def test_stage2_refuses_long_rows_with_a_dense_mask_before_training(tok, traces, tmp_path):
    model = tiny_model(len(tok))
    with pytest.raises(UnsupportedAttentionError) as refused:
        train_stage(model, tok, [long_trace(traces, n_blocks=30)], 2, tmp_path, max_steps=1, save=False)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert "stage 2 with 'sdpa' attention builds a dense (B, 1, T, T) memento mask" in message
    assert f"limit {DENSE_MASK_MAX_TOKENS} tokens" in message and "GiB per row" in message
    assert not (tmp_path / "checkpoint-1").exists()


# ----------------------------------------------------------------------------- the smoke run


def test_two_stage_sft_smoke_run_on_cpu(tok, traces, tmp_path):
    """Ten steps per stage on a repeated batch of 2 traces: finite, decreasing loss; stage 1
    feeds the model a 2D padding mask, stage 2 the 4D memento mask the trainer built from the
    collator's tables; stage 2 reuses stage 1's tokenised table."""
    model = tiny_model(len(tok))
    use_cache = model.config.use_cache
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(kwargs["attention_mask"].shape)),
                                    with_kwargs=True)
    first, second = two_stage_sft(
        model, tok, traces[:2], tmp_path, max_steps=10, per_device_train_batch_size=2, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, disable_tqdm=True,
    )
    for result in (first, second):
        assert len(result.losses) == 10 and all(math.isfinite(x) for x in result.losses)
        assert result.losses[-1] < 0.9 * result.losses[0], result.losses  # about 0.77 and 0.74 here
        assert result.n_traces == 2 and result.dropped == {} and result.truncated == []
        assert result.tokenized.parent == tmp_path / "tokenized"
    assert (first.tokenized_reused, second.tokenized_reused) == (False, True)
    assert first.losses[0] > second.losses[0]  # stage 2 starts from the stage-1 weights
    assert len(seen) == 20
    assert all(len(s) == 2 for s in seen[:10])  # stage 1: (B, T) padding mask only
    assert all(len(s) == 4 and s[:2] == (2, 1) and s[2] == s[3] for s in seen[10:])  # stage 2: (B, 1, T, T)
    assert type(second.trainer).__name__ == "MementoTrainer"
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache == use_cache  # restored after training
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "config.json").is_file()
        assert (tmp_path / stage / "tokenizer.json").is_file()


def test_command_line_truncates_or_drops_over_length_traces(tok, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_model(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    common = ["sft", "--model", str(ckpt), "--traces", str(PIPELINE), "--dtype", "float32", "--max-steps", "2",
              "--grad-accum", "1", "--max-length", "1000", "--gradient-checkpointing", "--chat-template", "none",
              "--training-arg", "disable_tqdm=true", "--training-arg", "save_strategy=no"]
    assert cli_main([*common, "--out", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 3 traces (0 dropped as too long), 2 steps on 1 process(es), 2 truncated to 1000 tokens" in out
    assert "stage 2: 3 traces (0 dropped as too long)" in out
    assert (tmp_path / "cut" / "stage2" / "model.safetensors").is_file()
    assert len(list((tmp_path / "cut" / "tokenized").iterdir())) == 1  # one table for both stages
    assert cli_main([*common, "--out", str(tmp_path / "drop"), "--overlength", "drop", "--stages", "2",
                     "--tokenized-cache", str(tmp_path / "shared")]) == 0
    out = capsys.readouterr().out
    assert "stage 2: 1 traces (2 dropped as too long), 2 steps on 1 process(es), 0 truncated" in out
    assert (tmp_path / "drop" / "model.safetensors").is_file() and (tmp_path / "shared").is_dir()
