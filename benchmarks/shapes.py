"""The models and long traces the long-trace benchmarks share (bench_long.py, bench_scale.py, gpu_check.py).

Models: Qwen3 architectures by shape, built from their configs with seeded random weights (cost and
memory depend on the shapes, not on the weights; nothing is downloaded). Traces: synthetic Memento
traces of a chosen length (`kvprobe.data.synthetic.LongTraceSource`), the passcode block three
before the last, so that a capture of offsets -1..+2 reads the last mementos and its forward runs
over nearly the whole trace.

Only the standard library is imported here; torch, transformers and kvprobe are imported by the
functions that use them, so that gpu_check.py's parent process can import this on a bare machine.
"""

from __future__ import annotations

from typing import Any


def qwen3_shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                vocab: int) -> dict[str, int]:
    return dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, vocab=vocab)


# bench_long.py's --model choices: (hidden, intermediate, layers, heads, kv heads, head dim, vocab).
# qwen3-heads has Qwen3-8B's attention (32 query, 8 KV heads of 128) and is tiny elsewhere.
MODELS = {
    "tiny": qwen3_shape(256, 768, 2, 8, 2, 32, 512),
    "qwen3-heads": qwen3_shape(256, 768, 2, 32, 8, 128, 1024),
    "qwen3-0.6b": qwen3_shape(1024, 3072, 28, 16, 8, 128, 151936),
    "qwen3-8b": qwen3_shape(4096, 12288, 36, 32, 8, 128, 151936),
}
# gpu_check.py's rehearsal model: Qwen3's head layout (4 query heads per KV head) at a tiny width and
# depth, with 4 layers so that the capture reads the paper's 4th layer; and its vLLM engine's model
TINY_4_LAYERS = dict(MODELS["tiny"], layers=4)
VLLM_MODEL = qwen3_shape(512, 1024, 4, 8, 4, 64, 512)
SPECIAL_IDS = dict(think=1, think_end=2, block_start=3, block_end=4, summary_start=5, summary_end=6)
BLOCKS, MEMENTO_LEN = 50, 32  # the synthetic traces' blocks and mementos (fewer blocks on short traces)


def qwen3_config(shape: dict[str, int], max_len: int, **extra: Any) -> Any:
    """The Qwen3Config of `shape` (untied embeddings), `max_len` positions, and `extra` settings."""
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
                       max_position_embeddings=max_len, tie_word_embeddings=False, **extra)


def build_qwen3(shape: dict[str, int], impl: str, device: str, dtype: str, max_len: int) -> Any:
    """A Qwen3ForCausalLM of `shape` with seeded random weights, made in `dtype` ('float32',
    'bfloat16') on `device`, with attention `impl`; no fp32 copy is made (32 GB on Qwen3-8B)."""
    import torch
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(shape, max_len, attn_implementation=impl)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def long_source(n: int, length: int, blocks: int, memento_len: int, vocab: int) -> Any:
    """`n` traces of `length` tokens, the passcode block three before the last."""
    from kvprobe.data.synthetic import LongTraceSource
    from kvprobe.memento.layout import SpecialTokens

    blocks = max(6, min(blocks, (length - 40) // (memento_len + 12)))  # short traces: fewer, shorter blocks
    return LongTraceSource(n, length, SpecialTokens(**SPECIAL_IDS), vocab, n_blocks=blocks, memento_len=memento_len)


def forward_tokens(source: Any) -> int:
    """The tokens a capture of offsets -1..+2 runs its forward over: up to the memento of the block
    two after the target, the last position it reads."""
    return source.layout.blocks[source.target_block + 2].summary_end + 1
