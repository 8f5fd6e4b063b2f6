"""The toy Memento transformer: a 4-layer GPT-2 of 811,776 parameters with a tied output head, 813,824
with an untied one, as shipped since issue 30 (SPEC section 4: about 810K).

A plain `transformers.GPT2LMHeadModel`, so every tool that reads GPT-2 (TransformerLens,
nnsight, kvprobe's capture) reads it unchanged. Dropout is off: the task is noiseless
and runs must be deterministic.
"""

from __future__ import annotations

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from .config import InitScheme  # torch-free, with the training options; re-exported here
from .data import SEQ_LEN
from .vocab import SPECIAL, VOCAB_SIZE

__all__ = ["GPT2_INIT", "N_PARAMS", "PYTORCH_INIT", "InitScheme", "build_model", "init_weights", "toy_config"]

N_PARAMS = 811_776  # tied head; an untied head adds VOCAB_SIZE x n_embd = 2,048


GPT2_INIT = InitScheme(embedding="gpt2", linear="gpt2")
PYTORCH_INIT = InitScheme(embedding=1.0, linear="pytorch")


@torch.no_grad()
def init_weights(model: GPT2LMHeadModel, scheme: InitScheme) -> GPT2LMHeadModel:
    """Redraw `model`'s weights in place after transformers' GPT-2 init, as `scheme` says."""
    if scheme.embedding != "gpt2":
        for emb in (model.transformer.wte, model.transformer.wpe):
            emb.weight.normal_(0.0, float(scheme.embedding))
    if scheme.linear != "gpt2":
        for module in model.modules():
            if isinstance(module, Conv1D):  # weight (in, out)
                if scheme.linear == "pytorch":
                    bound = 1.0 / math.sqrt(module.weight.shape[0])
                    module.weight.uniform_(-bound, bound)
                    module.bias.uniform_(-bound, bound)
                else:
                    module.weight.normal_(0.0, float(scheme.linear))
                    module.bias.zero_()
    if not model.config.tie_word_embeddings and scheme.linear != "gpt2":
        bound = 1.0 / math.sqrt(model.lm_head.weight.shape[1])  # an untied head is a Linear (out, in)
        if scheme.linear == "pytorch":
            model.lm_head.weight.uniform_(-bound, bound)
        else:
            model.lm_head.weight.normal_(0.0, float(scheme.linear))
    return model


def toy_config(
    attn_implementation: str | None = None, *, tied: bool = True, n_embd: int = 128, n_layer: int = 4
) -> GPT2Config:
    """4 layers, d_model 128, 4 heads, MLP 512, 128 learned positions, 16 tokens, tied embeddings.

    `tied=False` gives the output head its own weights; `n_embd` / `n_layer` change the
    capacity (heads stay 32-dimensional, the MLP 4 * n_embd) for the capacity study.
    """
    assert SEQ_LEN <= 128
    if n_embd % 32:
        raise ValueError(f"n_embd must be a multiple of 32 (heads of 32 dims), got {n_embd}")
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_embd // 32,
        n_inner=4 * n_embd,
        activation_function="gelu_pytorch_tanh",  # = gelu_new, fused kernel (several x faster on CPU)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=SPECIAL.think,
        eos_token_id=SPECIAL.think_end,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )


def build_model(
    seed: int,
    attn_implementation: str = "sdpa",
    init: InitScheme = PYTORCH_INIT,
    *,
    tied: bool = True,
    n_embd: int = 128,
    n_layer: int = 4,
) -> GPT2LMHeadModel:
    """A freshly initialised toy model; the same seed and settings give the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(toy_config(attn_implementation, tied=tied, n_embd=n_embd, n_layer=n_layer))
        return init_weights(model, init)
