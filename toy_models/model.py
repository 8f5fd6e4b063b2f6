"""The toy Memento transformer: a 4-layer GPT-2 of 811,776 parameters (SPEC section 4).

A plain `transformers.GPT2LMHeadModel`, so every tool that reads GPT-2 (TransformerLens,
nnsight, kvprobe's capture) reads it unchanged. Dropout is off: the task is noiseless
and runs must be deterministic.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .data import SEQ_LEN
from .vocab import SPECIAL, VOCAB_SIZE

__all__ = ["N_PARAMS", "build_model", "toy_config"]

N_PARAMS = 811_776


def toy_config(attn_implementation: str | None = None) -> GPT2Config:
    """4 layers, d_model 128, 4 heads, MLP 512, 128 learned positions, 16 tokens, tied embeddings."""
    assert SEQ_LEN <= 128
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        activation_function="gelu_pytorch_tanh",  # = gelu_new, fused kernel (several x faster on CPU)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=SPECIAL.think,
        eos_token_id=SPECIAL.think_end,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )


def build_model(seed: int, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """A freshly initialised toy model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(toy_config(attn_implementation))
