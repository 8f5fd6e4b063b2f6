"""The FlexAttention path through a real model, on CPU: it must equal the dense path.

For long traces (32K tokens) a dense (B, 1, T, T) mask is too big, so `masked_forward`
hands a model loaded with `attn_implementation="flex_attention"` a block-sparse
`BlockMask` built from the same predicate. Here the whole model runs both ways on short
padded batches and must agree: logits, KV cache, and a capture's stores. FlexAttention
runs compiled (transformers compiles it; on CPU through inductor's C++ backend, about
20 s the first time), forward only: CPU FlexAttention has no backward. Each new shape
here compiles again with static shapes, which kvprobe asks for on CPU (`flex_shapes`):
without it dynamo's dynamic-shape recompile emits C++ that does not compile (torch 2.13,
"'cur_qSplitSize8' was not declared"), so these tests fail. The GPU side, including
32K-token sequences, is in tests/project/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.memento.forward import masked_forward
from kvprobe.memento.masks import MaskConfig
from kvprobe.data.trace_source import TracePasscodeSource
from kvprobe.data.traces import read_jsonl
from tests.helpers.models import PAD_ID, SPECIAL, encode, tiny_qwen3
from tests.helpers.stores import assert_same_store
from tests.helpers.traces import PIPELINE, build_tokenizer
from tests.helpers.traces import tiny_qwen3 as trace_qwen3

pytestmark = pytest.mark.slow


ROWS = [  # two layouts, left-padded into one batch
    "p <think> BS a b c BE SS m n SE BS d e BE SS o SE BS f g h BE SS q SE </think> y z",
    "_ _ _ _ _ _ _ p q <think> BS a b BE SS m SE BS c d e f BE SS n o SE </think> y",
]
CONFIGS = [MaskConfig(0), MaskConfig(1), MaskConfig(0, mask_delimiters=True, restart_mode=True)]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([encode(r) for r in ROWS])
    return ids, (ids != PAD_ID).long()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
@torch.no_grad()
def test_flex_model_forward_equals_the_dense_forward(cfg):
    ids, am = _batch()
    dense = masked_forward(tiny_qwen3("sdpa"), ids, special=SPECIAL, config=cfg, attention_mask=am, use_cache=True)
    flex = masked_forward(tiny_qwen3("flex_attention"), ids, special=SPECIAL, config=cfg, attention_mask=am,
                          use_cache=True)
    real = am.bool()
    torch.testing.assert_close(flex.logits[real], dense.logits[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(flex.past_key_values.layers, dense.past_key_values.layers):
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real], atol=1e-5,
                                   rtol=1e-5)
    # the mask matters: the causal forward differs (so this comparison could fail)
    causal = tiny_qwen3("sdpa")(input_ids=ids, attention_mask=am).logits
    assert (causal[real] - dense.logits[real]).abs().max() > 1e-2


def test_flex_capture_equals_the_dense_capture(tmp_path):
    tok = build_tokenizer()
    spec = CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), sites=("memento", "block_end"), batch_size=4,
                       shard_size=8, dtype="float32", mask=MaskConfig(0, restart_mode=True))
    source = TracePasscodeSource(read_jsonl(PIPELINE), tok, n_samples=8, offsets=spec.offsets)
    paths = {}
    for impl in ("sdpa", "flex_attention"):
        model = trace_qwen3(len(tok))
        model.set_attn_implementation(impl)
        paths[impl] = run_capture(model, source, spec, tmp_path / impl, progress=False)
    assert_same_store(paths["sdpa"], paths["flex_attention"], atol=1e-5, rtol=1e-5)
