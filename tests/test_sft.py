"""Two-stage Memento SFT: the collator's batches (masks, labels, positions) and a CPU smoke run.

The tokenizer is the offline byte-level BPE of test_traces.py (it holds the six markers);
models are tiny random Qwen3s with sdpa attention. Traces are the shipped pipeline
examples (about 800-1200 tokens each).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_traces import PIPELINE, build_tokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

import kvprobe.training.sft as sft
from kvprobe.cli import main as cli_main
from kvprobe.memento.forward import masked_forward
from kvprobe.memento.layout import SpecialTokens, parse_layout
from kvprobe.memento.masks import MaskConfig, allow_matrix
from kvprobe.training.sft import (
    QWEN3_CHAT_TEMPLATE,
    MementoCollator,
    select_traces,
    stage_attn_implementation,
    train_stage,
    two_stage_sft,
)
from kvprobe.data.traces import Trace, read_jsonl, tokenize_trace


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


# ----------------------------------------------------------------------------- the collator


@pytest.mark.parametrize("mask", [
    MaskConfig(keep_last_n_blocks=0),
    MaskConfig(keep_last_n_blocks=1, mask_delimiters=True),
    MaskConfig(keep_last_n_blocks=0, restart_mode=True),
], ids=lambda m: m.name)
def test_stage2_mask_is_the_memento_allow_matrix_of_each_row(tok, traces, mask):
    model = tiny_model(len(tok))
    batch = MementoCollator(tok, 2, model, mask)(traces[:2])
    ids, labels, am, pos = batch["input_ids"], batch["labels"], batch["attention_mask"], batch["position_ids"]
    B, T = ids.shape
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


def test_stage2_batch_forward_equals_masked_forward(tok, traces):
    model = tiny_model(len(tok))
    mask = MaskConfig(keep_last_n_blocks=0)
    batch = MementoCollator(tok, 2, model, mask)(traces[:2])
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


def test_prompt_template_wraps_the_prompt_and_stays_out_of_the_loss(tok, traces):
    collator = MementoCollator(tok, 1, prompt_template=QWEN3_CHAT_TEMPLATE)
    wrapped = collator.prepare(traces[0])
    assert wrapped.prompt == f"<|im_start|>user\n{traces[0].prompt}<|im_end|>\n<|im_start|>assistant"
    ids, layout = collator.encode(traces[0])
    labels = collator.labels_for(ids, layout)
    think = ids.index(SpecialTokens.from_tokenizer(tok).think)
    assert labels[:think] == [-100] * think and labels[think] == ids[think]  # <think> opens the assistant turn
    assert tok.decode(ids[:think]).startswith("<|im_start|>user\n")
    # without loss_on_think the targets start at the first block
    plain = MementoCollator(tok, 1, prompt_template=QWEN3_CHAT_TEMPLATE, loss_on_think=False)
    first_block = layout.blocks[0].start
    assert plain.labels_for(ids, layout)[:first_block] == [-100] * first_block
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
    with pytest.raises(ValueError, match="stage-2 collator needs the model"):
        MementoCollator(tok, 2)
    with pytest.raises(ValueError, match="stage must be 1 .* or 2"):
        MementoCollator(tok, 3)
    short = MementoCollator(tok, 1, max_length=900)
    with pytest.raises(ValueError, match=r"trace 'aime25-i-p05' has \d+ tokens, more than max_length=900"):
        short([traces[0]])
    kept, dropped = select_traces(traces, short)
    assert [t.trace_id for t in kept] == ["aime25-i-p01"] and sorted(dropped) == ["aime25-i-p02", "aime25-i-p05"]


def test_stage_attention_implementations(monkeypatch):
    assert stage_attn_implementation(2, "flash_attention_2") == "sdpa"
    assert stage_attn_implementation(2, "eager") == "eager"
    assert stage_attn_implementation(2, None) == "sdpa"
    monkeypatch.setattr(sft, "find_spec", lambda name: None)
    assert stage_attn_implementation(1) == "sdpa"
    monkeypatch.setattr(sft, "find_spec", lambda name: object() if name == "flash_attn" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage_attn_implementation(1) == "sdpa"  # flash_attn without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_attn_implementation(1) == "flash_attention_2"


def test_stage2_refuses_an_implementation_that_ignores_4d_masks(tok, traces, tmp_path):
    with pytest.raises(ValueError, match="stage 2 needs an attention implementation that reads a 4D mask"):
        train_stage(tiny_model(len(tok)), tok, traces, 2, tmp_path, attn_implementation="flash_attention_2")


# ----------------------------------------------------------------------------- the smoke run


def test_two_stage_sft_smoke_run_on_cpu(tok, traces, tmp_path):
    """Ten steps per stage on a repeated batch of 2 traces: finite, decreasing loss; stage 1
    feeds the model a 2D padding mask, stage 2 the 4D memento mask."""
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
        assert result.n_traces == 2 and result.dropped == []
    assert first.losses[0] > second.losses[0]  # stage 2 starts from the stage-1 weights
    assert len(seen) == 20
    assert all(len(s) == 2 for s in seen[:10])  # stage 1: (B, T) padding mask only
    assert all(len(s) == 4 and s[:2] == (2, 1) and s[2] == s[3] for s in seen[10:])  # stage 2: (B, 1, T, T)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache == use_cache  # restored after training
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "config.json").is_file()
        assert (tmp_path / stage / "tokenizer.json").is_file()


def test_command_line_with_gradient_checkpointing_and_length_filter(tok, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_model(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    code = cli_main(["sft", "--model", str(ckpt), "--traces", str(PIPELINE), "--output-dir", str(tmp_path / "out"),
                     "--dtype", "float32", "--max-steps", "2", "--grad-accum", "1", "--max-length", "1000",
                     "--gradient-checkpointing", "--training-arg", "disable_tqdm=true"])
    assert code == 0
    out = capsys.readouterr().out
    assert "stage 1: 1 traces (2 dropped as too long)" in out and "stage 2: 1 traces (2 dropped" in out
    assert (tmp_path / "out" / "stage2" / "model.safetensors").is_file()
