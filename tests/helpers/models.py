"""A tiny synthetic vocabulary and tiny random GPT-2 / Qwen3 models for the tests.

Nothing here downloads anything: models are built in-process from small configs with
random weights (seeded), and the six Memento marker tokens sit inside the vocabulary.

    from tests.helpers.models import SPECIAL, encode, tiny_gpt2, tiny_qwen3

`encode` turns a readable whitespace-separated string into token ids:

    "<think>"  "</think>"  and  BS BE SS SE  (block_start, block_end, summary_start, summary_end)
    the full marker texts "<|block_start|>" ... are accepted too
    "_"        the padding token
    a single letter a-z / A-Z: an ordinary token (each letter its own id)
"""

from __future__ import annotations

import string

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS, SpecialTokens

__all__ = [
    "FIRST_ORDINARY",
    "ORDINARY_IDS",
    "PAD_ID",
    "SPECIAL",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "tiny_gpt2",
    "tiny_qwen3",
]

VOCAB_SIZE = 64
PAD_ID = 0
SPECIAL = SpecialTokens(think=1, think_end=2, block_start=3, block_end=4, summary_start=5, summary_end=6)
FIRST_ORDINARY = 7
ORDINARY_IDS = tuple(range(FIRST_ORDINARY, VOCAB_SIZE))  # never a marker, never padding

_LETTERS = string.ascii_lowercase + string.ascii_uppercase  # 52 letters -> ids 7..58
_WORD_TO_ID: dict[str, int] = {
    "_": PAD_ID,
    "BS": SPECIAL.block_start,
    "BE": SPECIAL.block_end,
    "SS": SPECIAL.summary_start,
    "SE": SPECIAL.summary_end,
    **{text: getattr(SPECIAL, field) for field, text in SPECIAL_TOKEN_STRINGS.items()},
    **{c: FIRST_ORDINARY + i for i, c in enumerate(_LETTERS)},
}
_ID_TO_WORD = {
    PAD_ID: "_",
    SPECIAL.think: "<think>",
    SPECIAL.think_end: "</think>",
    SPECIAL.block_start: "BS",
    SPECIAL.block_end: "BE",
    SPECIAL.summary_start: "SS",
    SPECIAL.summary_end: "SE",
    **{FIRST_ORDINARY + i: c for i, c in enumerate(_LETTERS)},
}


def encode(text: str) -> list[int]:
    """Token ids of a readable sequence such as "p <think> BS a b BE SS m SE </think> y"."""
    try:
        return [_WORD_TO_ID[w] for w in text.split()]
    except KeyError as e:
        raise ValueError(f"encode: unknown word {e.args[0]!r} in {text!r}") from None


def decode(ids) -> str:
    """Inverse of `encode`, for readable failure messages (unnamed ids print as #id)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return " ".join(_ID_TO_WORD.get(i, f"#{i}") for i in ids)


def tiny_gpt2(
    attn_implementation: str = "eager",
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (learned positions, 4 heads of 8 dims) with seeded random weights, in eval mode.

    initializer_range is raised from GPT-2's 0.02 so attention is far from uniform and
    masking a key changes the output measurably (tests that must be able to fail rely on it).
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_qwen3(
    attn_implementation: str = "eager",
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3 (RoPE, q/k RMS norm, grouped-query: 4 query heads, 2 KV heads) with
    seeded random weights, in eval mode."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        attention_dropout=0.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).to(dtype).eval()
