"""Sliding-window models (OLMo-3, one of the paper's families): the window in the memento mask.

The window W (query q sees key k only if q - k < W) is part of the one predicate, so the dense
mask, the FlexAttention `mask_mod` and the interval-built `BlockMask` must all agree with the
brute-force SPEC reference extended by the window, for every mask option. Through a real model:
a windowed tiny OLMo-3 (three sliding layers, one full) under kvprobe's plain causal mask must
equal the model's own windowed attention beyond the window, and under a memento mask equal a
forward given brute-force masks per layer kind.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask
from transformers import MistralConfig, MistralForCausalLM, Olmo3Config, Olmo3ForCausalLM, Qwen3Config, \
    Qwen3ForCausalLM

from kvprobe.memento import forward as fwd
from kvprobe.memento.forward import (UnsupportedAttentionError, mask_windows, masked_forward, memento_inputs,
                                     sliding_window_layers)
from kvprobe.memento.layout import parse_batch, parse_layout
from kvprobe.memento.masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask, flex_mask_mod, mask_tables
from tests.helpers.masks import ALL_CONFIGS, EXAMPLE, T_EX, assert_block_masks_equal, assert_mask_equal, reference
from tests.helpers.models import PAD_ID, SPECIAL, VOCAB_SIZE, encode
from tests.helpers.strategies import padded_batches

TRACE = ("<think> a b <|block_start|> c d <|block_end|> <|summary_start|> x <|summary_end|> "
         "<|block_start|> e f <|block_end|> <|summary_start|> y <|summary_end|> </think> A")
ROWS = [  # left-padded, longer than the windows below
    "p <think> BS a b c BE SS m n SE BS d e BE SS o SE BS f g h BE SS q SE </think> y z",
    "_ _ _ _ _ _ _ p q <think> BS a b BE SS m SE BS c d e f BE SS n o SE </think> y",
]
WINDOWS = (1, 2, 3, 5, 8, 64)


def tiny_olmo3(window: int, attn: str = "sdpa") -> Olmo3ForCausalLM:
    torch.manual_seed(0)
    cfg = Olmo3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=window, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, attn_implementation=attn)
    return Olmo3ForCausalLM(cfg).eval()


def tiny_mistral(window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=window, attn_implementation="sdpa")).eval()


def tiny_qwen3_sliding(window: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)  # layers >= max_window_layers slide: 0 full, 1 and 2 sliding
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, use_sliding_window=True, sliding_window=window,
                                        max_window_layers=1, attn_implementation="sdpa")).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([encode(r) for r in ROWS])
    return ids, (ids != PAD_ID).long()


# --------------------------------------------------------------------------- the predicate


def test_hand_computed_window():
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    ids = torch.tensor([encode(EXAMPLE)])
    want = allow_matrix([lay], T_EX, MaskConfig(0)) & ~torch.ones(T_EX, T_EX, dtype=torch.bool).tril(-3)
    assert want[0, 0, 14].tolist() == [False] * 12 + [True] * 3  # the answer sees its last 3 keys only
    assert_mask_equal(allow_matrix([lay], T_EX, MaskConfig(0), window=3), want, ids)
    assert_mask_equal(reference([lay], T_EX, MaskConfig(0), window=3), want, ids)
    # a window as long as the row hides nothing
    assert torch.equal(allow_matrix([lay], T_EX, MaskConfig(0), window=T_EX), allow_matrix([lay], T_EX, MaskConfig(0)))


def test_the_window_lives_on_the_tables_not_the_condition():
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    t = mask_tables([lay], T_EX, MaskConfig(0))
    w = t.windowed(4)
    assert t.window is None and w.window == 4 and w.hide_block is t.hide_block and w.config == t.config
    assert w.to("cpu").window == 4
    assert type(t).from_tensors(w.tensors(), w.config, 4).window == 4
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="sliding window must be an integer >= 1"):
            t.windowed(bad)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.name)
@settings(max_examples=12, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), window=st.sampled_from(WINDOWS))
def test_windowed_allow_matrix_matches_reference(cfg, batch, window):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    T = batch.input_ids.shape[1]
    got = allow_matrix(layouts, T, cfg, window=window)
    assert_mask_equal(got, reference(layouts, T, cfg, window), batch.input_ids, batch.attention_mask)
    band = torch.ones(T, T, dtype=torch.bool).triu(-(window - 1))
    assert torch.equal(got, allow_matrix(layouts, T, cfg) & band)  # the unwindowed mask cut to the band


@settings(max_examples=50, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS), window=st.sampled_from(WINDOWS))
def test_windowed_mask_mod_evaluated_densely_equals_allow_matrix(batch, cfg, window):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    dense = create_mask(flex_mask_mod(layouts, T, cfg, window=window), B, 1, T, T, device="cpu")
    assert_mask_equal(dense, allow_matrix(layouts, T, cfg, window=window), batch.input_ids)


@settings(max_examples=60, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS),
       window=st.sampled_from(WINDOWS), block_size=st.sampled_from([1, 2, 3, 4, 8]))
def test_windowed_interval_block_mask_equals_create_block_mask(batch, cfg, window, block_size):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    ours = flex_block_mask(layouts, T, cfg, block_size=block_size, window=window)
    ref = create_block_mask(flex_mask_mod(layouts, T, cfg, window=window), B, None, T, T, device="cpu",
                            BLOCK_SIZE=block_size)
    assert_block_masks_equal(ours, ref, T)


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS),
       window=st.sampled_from(WINDOWS), block_size=st.sampled_from([1, 2, 4]))
def test_windowed_interval_tiles_equal_the_brute_force_reference(batch, cfg, window, block_size):
    """Independent of the predicate: full tiles where the reference allows every entry, listed tiles
    where it allows one (padding queries: their own key only)."""
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    if T % block_size:
        return  # ragged tiles are covered against create_block_mask above
    eye = torch.eye(T, dtype=torch.bool)
    real = batch.attention_mask.bool()
    ref = reference(layouts, T, cfg, window)[:, 0]
    ref = (ref | (~real[:, :, None] & eye)) & (real[:, :, None] | eye)
    n = T // block_size
    tiles = ref.view(B, n, block_size, n, block_size)
    ours = flex_block_mask(layouts, T, cfg, block_size=block_size, window=window)
    full = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            full[b, i, ours.full_kv_indices[b, 0, i, : ours.full_kv_num_blocks[b, 0, i]].long()] = True
    assert torch.equal(full, tiles.all(4).all(2))
    assert torch.equal(ours.to_dense()[:, 0].bool(), tiles.any(4).any(2))


# --------------------------------------------------------------------------- routing to layer kinds


def test_window_layers_are_read_per_architecture():
    assert sliding_window_layers(tiny_olmo3(8)) == (8, [0, 1, 2])  # OLMo-3: 3 sliding, then 1 full
    assert sliding_window_layers(tiny_mistral(16)) == (16, [0, 1])
    qwen = type("M", (), {"config": Qwen3Config(num_hidden_layers=2)})()
    assert sliding_window_layers(qwen) == (None, [])  # use_sliding_window is off
    assert sliding_window_layers(tiny_qwen3_sliding(4)) == (4, [1, 2])


def test_mask_windows_per_model():
    assert mask_windows(tiny_olmo3(8), 8) == {None: None}  # within the window: one plain mask
    assert mask_windows(tiny_olmo3(8), 9) == {"full_attention": None, "sliding_attention": 8}
    assert mask_windows(tiny_qwen3_sliding(4), 9) == {"full_attention": None, "sliding_attention": 4}
    assert mask_windows(tiny_mistral(4), 9) == {None: 4}  # every layer slides: one windowed mask


@pytest.mark.parametrize("build", [tiny_olmo3, tiny_qwen3_sliding, tiny_mistral], ids=["olmo3", "qwen3", "mistral"])
@pytest.mark.parametrize("window", [3, 8])
@torch.no_grad()
def test_causal_mask_equals_the_models_own_windowed_attention(build, window):
    """keep -1 (plain causal) through kvprobe's masks equals the model given no custom mask, beyond the window;
    and the window matters (the model without one differs)."""
    ids, am = _batch()
    model = build(window)
    ours = masked_forward(model, ids, special=SPECIAL, config=MaskConfig(-1), attention_mask=am).logits
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    own = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    real = am.bool()
    torch.testing.assert_close(ours[real], own[real], atol=1e-5, rtol=1e-5)
    causal = additive_mask(allow_matrix(parse_batch(ids, SPECIAL, am), ids.shape[1], MaskConfig(-1)))
    unwindowed = model(input_ids=ids, attention_mask=causal, position_ids=pos).logits  # one mask, every layer
    assert (unwindowed[real] - own[real]).abs().max() > 1e-3


def _brute_force_masks(model, ids, am, cfg, window):
    layouts = parse_batch(ids, SPECIAL, am)
    T = ids.shape[1]
    full = additive_mask(reference(layouts, T, cfg))
    windowed = additive_mask(reference(layouts, T, cfg, window))
    return full, windowed


@pytest.mark.parametrize("cfg", [MaskConfig(0), MaskConfig(1), MaskConfig(0, True, True)], ids=lambda c: c.name)
@torch.no_grad()
def test_memento_forward_beyond_the_window_equals_brute_force_masks_per_layer_kind(cfg):
    ids, am = _batch()
    model = tiny_olmo3(5)
    out = masked_forward(model, ids, special=SPECIAL, config=cfg, attention_mask=am, output_hidden_states=True)
    full, windowed = _brute_force_masks(model, ids, am, cfg, 5)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    want = model(input_ids=ids, attention_mask={"full_attention": full, "sliding_attention": windowed},
                 position_ids=pos, output_hidden_states=True)
    real = am.bool()
    torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(out.hidden_states, want.hidden_states):  # every layer
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    # one mask for every layer (either one) would be wrong: the routing matters
    for one in (full, windowed):
        wrong = model(input_ids=ids, attention_mask=one, position_ids=pos).logits
        assert (wrong[real] - out.logits[real]).abs().max() > 1e-3


@torch.no_grad()
def test_every_layer_sliding_gets_one_windowed_mask():
    ids, am = _batch()
    model, cfg = tiny_mistral(5), MaskConfig(0)
    out = masked_forward(model, ids, special=SPECIAL, config=cfg, attention_mask=am).logits
    _, windowed = _brute_force_masks(model, ids, am, cfg, 5)
    want = model(input_ids=ids, attention_mask=windowed, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(out[am.bool()], want[am.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_flex_windowed_forward_equals_sdpa_and_the_models_own():
    """FlexAttention on CPU: kvprobe's BlockMasks per layer kind equal the dense masks, and with keep -1
    the model's own windowed FlexAttention."""
    ids, am = _batch()
    real = am.bool()
    dense = masked_forward(tiny_olmo3(5), ids, special=SPECIAL, config=MaskConfig(0), attention_mask=am).logits
    model = tiny_olmo3(5, "flex_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = masked_forward(model, ids, special=SPECIAL, config=MaskConfig(0), attention_mask=am).logits
        torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)
        causal = masked_forward(model, ids, special=SPECIAL, config=MaskConfig(-1), attention_mask=am).logits
        with fwd.flex_shapes(model, "cpu"):
            own = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(causal[real], own[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- what is still refused


def test_a_model_that_cannot_take_a_mask_per_kind_is_refused_beyond_the_window(monkeypatch):
    ids = torch.tensor([encode(TRACE)])  # (1, T)
    layouts = parse_batch(ids, SPECIAL)
    T = ids.shape[1]
    monkeypatch.setattr(fwd, "_takes_mask_per_kind", lambda model: False)
    short = tiny_olmo3(window=T)  # the window hides nothing: exact
    assert short(input_ids=ids, **memento_inputs(short, ids, layouts)).logits.shape[:2] == (1, T)
    assert mask_windows(tiny_mistral(8), T) == {None: 8}  # every layer slides: no dict needed
    with pytest.raises(UnsupportedAttentionError, match=rf"olmo3: layers \[0, 1, 2\] use sliding-window attention "
                                                        rf"\(window 8\) and this forward is {T} tokens long; "
                                                        r"Olmo3ForCausalLM mixes full and sliding layers"):
        memento_inputs(tiny_olmo3(window=8), ids, layouts)


def test_a_capture_on_a_windowed_model_runs_or_is_refused_before_any_file(tmp_path, monkeypatch):
    from kvprobe.capture import CaptureConfig, run_capture
    from toy_models.source import ToyPasscodeSource

    model = tiny_olmo3(window=8)  # the toy's 122-token sequences are longer than the window
    run_capture(model, ToyPasscodeSource(4, seed=0), CaptureConfig(layers=(0, 3)), tmp_path / "ok", progress=False)
    assert (tmp_path / "ok").exists()
    monkeypatch.setattr(fwd, "_takes_mask_per_kind", lambda model: False)
    out = tmp_path / "store"
    with pytest.raises(UnsupportedAttentionError, match="sliding-window attention"):
        run_capture(model, ToyPasscodeSource(4, seed=0), CaptureConfig(layers=(0, 3)), out, progress=False)
    assert not out.exists()


@torch.no_grad()
def test_capture_kv_beyond_the_window_reads_every_position():
    """The capture's cache keeps every position of a sliding layer (transformers' keeps the last window - 1):
    K/V gathered at the last positions equal the masked forward's own cache, at positions beyond the window."""
    from kvprobe.capture.hf import capture_kv

    ids, am = _batch()
    model, window = tiny_olmo3(5), 5
    kwargs = memento_inputs(model, ids, parse_batch(ids, SPECIAL, am), MaskConfig(0), am)
    T = ids.shape[1]
    positions = torch.arange(T - window + 1, T).expand(2, -1)  # what transformers' sliding cache keeps
    got = capture_kv(model, ids, **kwargs, layers=(1, 2, 3), positions=positions)
    cache = model(input_ids=ids, **kwargs, use_cache=True).past_key_values
    for layer in (1, 2, 3):
        want = cache.layers[layer].keys[:, :, -(window - 1):]
        torch.testing.assert_close(got[layer][0], want, atol=1e-5, rtol=1e-5)
    full = capture_kv(model, ids, **kwargs, layers=(2,), positions=torch.arange(T).expand(2, -1))
    assert full[2][0].shape[2] == T  # every position, not the window's last ones
