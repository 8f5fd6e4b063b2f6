"""Long sequences: no T x T mask above DENSE_MASK_MAX_TOKENS, FlexAttention taking over, refusals.

The paper's traces reach 32K tokens, where a dense memento mask is 2 GiB (bf16) per row.
Above `DENSE_MASK_MAX_TOKENS` kvprobe builds the interval `BlockMask` only; here a torch
dispatch mode records every tensor made, so a T x T one cannot slip in unseen. The
capture tests lower the threshold so a short trace exercises the long path at test speed.
"""

from __future__ import annotations

import pytest
import torch

import kvprobe.memento.forward as forward
from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.data.synthetic import LongTraceSource
from kvprobe.memento.budget import LargestTensor
from kvprobe.memento.forward import UnsupportedAttentionError, check_length, memento_inputs
from kvprobe.memento.masks import MaskConfig
from tests.helpers.models import SPECIAL, VOCAB_SIZE, tiny_qwen3
from tests.helpers.stores import assert_same_store


def long_batch(length: int, n_blocks: int = 50):
    source = LongTraceSource(1, length, SPECIAL, VOCAB_SIZE, n_blocks=n_blocks)
    return source, source.samples(0, 1)


def test_long_source_lays_out_the_requested_length_and_blocks():
    source, batch = long_batch(4096, n_blocks=20)
    assert batch.input_ids.shape == (1, 4096)
    assert source.layout.n_blocks == 20 and source.layout.n_completed == 20
    assert source.target_block == 17  # deep in the trace: offsets -1..+2 read blocks 16..19
    with pytest.raises(ValueError, match="cannot hold 50 blocks"):
        LongTraceSource(1, 600, SPECIAL, VOCAB_SIZE)


@pytest.mark.parametrize("cfg", [MaskConfig(0), MaskConfig(0, restart_mode=True), MaskConfig(1)], ids=lambda c: c.name)
def test_no_t_by_t_tensor_is_made_for_a_long_flex_mask(cfg):
    """16K tokens: the memento inputs of a flex model hold a BlockMask, and no op makes anything near T x T."""
    T = 16384
    _, batch = long_batch(T)
    model = tiny_qwen3("flex_attention")
    with LargestTensor() as spy:
        kwargs = memento_inputs(model, batch.input_ids, batch.layouts, cfg)
    assert kwargs["attention_mask"].shape == (1, 1, T, T)  # a BlockMask, not a tensor
    assert not isinstance(kwargs["attention_mask"], torch.Tensor)
    assert spy.numel < T * T // 256, f"a tensor of {spy.numel} elements was made (T x T is {T * T})"


def test_a_dense_mask_above_the_threshold_is_refused_naming_its_memory():
    T = forward.DENSE_MASK_MAX_TOKENS + 1
    _, batch = long_batch(T)
    model = tiny_qwen3("sdpa", dtype=torch.bfloat16)
    with pytest.raises(UnsupportedAttentionError, match=r"dense: 0\.1 GiB .*attn_implementation='flex_attention'") as e:
        memento_inputs(model, batch.input_ids, batch.layouts)
    assert "\n" not in str(e.value)


def test_check_length_names_why_flex_cannot_take_over(monkeypatch):
    model = tiny_qwen3("sdpa")
    check_length(model, 32768)  # supports FlexAttention: it will switch
    with pytest.raises(UnsupportedAttentionError, match=r"4\.0 GiB per sequence \(this capture backend takes dense"):
        check_length(model, 32768, block_mask_ok=False)
    monkeypatch.setattr(type(model), "_supports_flex_attn", False)
    with pytest.raises(UnsupportedAttentionError, match="Qwen3ForCausalLM does not support FlexAttention"):
        check_length(model, 32768)
    check_length(model, forward.DENSE_MASK_MAX_TOKENS)  # at the threshold: dense is fine


def test_flex_for_long_switches_only_above_the_threshold_and_only_inside():
    model = tiny_qwen3("sdpa")
    with forward.flex_for_long(model, forward.DENSE_MASK_MAX_TOKENS) as impl:
        assert impl == "sdpa" == model.config._attn_implementation
    with forward.flex_for_long(model, forward.DENSE_MASK_MAX_TOKENS + 1) as impl:
        assert impl == "flex_attention" == model.config._attn_implementation
    assert model.config._attn_implementation == "sdpa"  # switched back: shorter forwards keep the dense kernel


def _spec(**kw) -> CaptureConfig:
    return CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), batch_size=2, shard_size=4, dtype="float32", **kw)


@pytest.mark.slow
def test_a_capture_above_the_threshold_runs_on_flex_and_equals_the_dense_capture(tmp_path, monkeypatch):
    """With the threshold lowered below the traces, an sdpa model's capture switches to FlexAttention
    (compiled on CPU) and writes the store the dense capture writes; the forward stops at the last
    position read, deep in the trace. A second trace length compiles again, with static shapes on CPU
    (`flex_shapes`; test_flex.py fails without it)."""
    model = tiny_qwen3("sdpa")
    lengths, kernels = [], []

    def seen(m, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        kernels.append(m.config._attn_implementation)

    model.register_forward_pre_hook(seen, with_kwargs=True)
    for n_tokens in (700, 900):
        source = LongTraceSource(4, n_tokens, SPECIAL, VOCAB_SIZE, n_blocks=10, memento_len=8)
        with monkeypatch.context() as patch:
            patch.setattr(forward, "DENSE_MASK_MAX_TOKENS", 4096)
            run_capture(tiny_qwen3("sdpa"), source, _spec(), tmp_path / f"dense{n_tokens}", progress=False)
        lengths.clear(), kernels.clear()
        monkeypatch.setattr(forward, "DENSE_MASK_MAX_TOKENS", 64)
        run_capture(model, source, _spec(), tmp_path / f"flex{n_tokens}", progress=False)
        assert set(kernels) == {"flex_attention"} and model.config._attn_implementation == "sdpa"
        last_read = source.layout.blocks[source.target_block + 1].summary_end
        assert set(lengths) == {last_read + 1} and last_read + 1 < n_tokens
        assert_same_store(tmp_path / f"dense{n_tokens}", tmp_path / f"flex{n_tokens}", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, flex_support", [("lens", True), ("transformers", False)])
def test_a_long_capture_that_flex_cannot_take_is_refused_before_any_file(tmp_path, monkeypatch, backend, flex_support):
    source = LongTraceSource(2, 700, SPECIAL, VOCAB_SIZE, n_blocks=10, memento_len=8)
    model = tiny_qwen3("sdpa")
    monkeypatch.setattr(type(model), "_supports_flex_attn", flex_support)
    monkeypatch.setattr(forward, "DENSE_MASK_MAX_TOKENS", 64)
    with pytest.raises(ValueError, match="memento mask would be dense") as e:
        run_capture(model, source, _spec(backend=backend), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_model_spread_over_devices_masks_densely_and_refuses_long_traces(monkeypatch):
    """A device-mapped model cannot carry a BlockMask (its tables sit on one device): no switch, a refusal."""
    model = tiny_qwen3("sdpa")
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": 0, "model.layers.1": 1}, raising=False)
    with forward.flex_for_long(model, 32768) as impl:
        assert impl == "sdpa"
    with pytest.raises(UnsupportedAttentionError, match="spread over devices"):
        check_length(model, 32768)
    monkeypatch.setattr(model, "hf_device_map", {"model.embed_tokens": 0, "model.layers.1": 0})
    with forward.flex_for_long(model, 32768) as impl:
        assert impl == "flex_attention"  # one device: flex takes over
