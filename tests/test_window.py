"""Sliding-window models (OLMo-3, one of the paper's families): refused where the window would matter."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Olmo3Config, Olmo3ForCausalLM, Qwen3Config

from kvprobe.memento.forward import UnsupportedAttentionError, memento_inputs, sliding_window_layers
from kvprobe.memento.layout import parse_batch

from models import SPECIAL, VOCAB_SIZE, encode

TRACE = ("<think> a b <|block_start|> c d <|block_end|> <|summary_start|> x <|summary_end|> "
         "<|block_start|> e f <|block_end|> <|summary_start|> y <|summary_end|> </think> A")


def tiny_olmo3(window: int) -> Olmo3ForCausalLM:
    torch.manual_seed(0)
    cfg = Olmo3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=window, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, attn_implementation="sdpa")
    return Olmo3ForCausalLM(cfg).eval()


def test_window_layers_are_read_per_architecture():
    assert sliding_window_layers(tiny_olmo3(8)) == (8, [0, 1, 2])  # OLMo-3: 3 sliding, then 1 full
    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16))
    assert sliding_window_layers(mistral) == (16, [0, 1])
    qwen = type("M", (), {"config": Qwen3Config(num_hidden_layers=2)})()
    assert sliding_window_layers(qwen) == (None, [])  # use_sliding_window is off


def test_a_forward_longer_than_the_window_is_refused_and_a_shorter_one_runs():
    ids = torch.tensor([encode(TRACE)])  # (1, T)
    layouts = parse_batch(ids, SPECIAL)
    T = ids.shape[1]
    short = tiny_olmo3(window=T)  # the window hides nothing: exact
    kwargs = memento_inputs(short, ids, layouts)
    assert short(input_ids=ids, **kwargs).logits.shape[:2] == (1, T)
    with pytest.raises(UnsupportedAttentionError, match=rf"olmo3: layers \[0, 1, 2\] use sliding-window attention "
                                                        rf"\(window 8\) and this forward is {T} tokens long"):
        memento_inputs(tiny_olmo3(window=8), ids, layouts)


def test_a_capture_on_a_windowed_model_is_refused_before_any_file(tmp_path):
    from kvprobe.capture import CaptureSpec, run_capture
    from toy_models.source import ToyPasscodeSource

    model = tiny_olmo3(window=8)  # the toy's 122-token sequences are longer than the window
    out = tmp_path / "store"
    with pytest.raises(UnsupportedAttentionError, match="sliding-window attention"):
        run_capture(model, ToyPasscodeSource(16, seed=0), CaptureSpec(layers=(0, 3)), out, progress=False)
    assert not out.exists()
