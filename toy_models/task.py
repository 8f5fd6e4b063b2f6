"""The toy task: predict each memento digit under memento attention.

Training loss and task accuracy look at the same 30 tokens per sequence, the memento
digits `s s s` of the 10 blocks. Block digits are uniform noise (nothing to learn) and
marker tokens sit at fixed positions (trivial), so only memento digits carry the loss:
they are the one place where the model must compute something, the running sum, from
the previous memento and the current block, which is the Memento pattern itself.

The logits that predict the token at position p come out of position p-1, so the
hundreds digit is predicted at <|summary_start|>, the tens at the hundreds digit, and
the units at the tens digit.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kvprobe.memento.forward import memento_inputs
from kvprobe.memento.masks import MaskConfig

from .data import MEMENTO_POSITIONS, SEQ_LEN, generate, layout

__all__ = [
    "HELDOUT_SEED_BASE",
    "TRAIN_SEED_BASE",
    "MEMENTO_MASK",
    "heldout_seed",
    "memento_attention",
    "memento_logits",
    "task_accuracy",
    "task_loss",
    "train_seed",
]

MEMENTO_MASK = MaskConfig(keep_last_n_blocks=0)  # the toy is trained and evaluated like this
# Training batches use seeds in [2**62, 2**63), held-out sets seeds >= 2**63, so neither
# collides with the other or with the small seeds that experiments pass to `generate`.
TRAIN_SEED_BASE = 2**62
HELDOUT_SEED_BASE = 2**63
_TARGETS = torch.from_numpy(MEMENTO_POSITIONS.ravel())  # (30,) positions of memento digits


def train_seed(seed: int, step: int) -> int:
    """Generator seed of the training batch at `step` (0-based) of a run with `seed`."""
    if not 0 <= seed < 2**30 or not 0 <= step < 2**32:
        raise ValueError(f"training seed must be in [0, 2**30) and step in [0, 2**32), got {seed}, {step}")
    return TRAIN_SEED_BASE + seed * 2**32 + step


def heldout_seed(k: int = 0) -> int:
    """Generator seed of held-out set k; disjoint from every training seed."""
    return HELDOUT_SEED_BASE + k


def memento_attention(model: PreTrainedModel, keep_last_n_blocks: int = 0) -> dict[str, torch.Tensor]:
    """Forward kwargs for memento attention shared by every toy sequence.

    One (1, 1, T, T) additive mask in the model's dtype and (1, T) position ids: all
    sequences share one layout, so both broadcast over the batch. keep_last_n_blocks > 0
    leaves the last N finished blocks visible (a keep-N toy's training mask; 0 is the paper's).
    """
    ids = torch.zeros(1, SEQ_LEN, dtype=torch.long, device=model.device)
    mask = replace(MEMENTO_MASK, keep_last_n_blocks=keep_last_n_blocks)
    return memento_inputs(model, ids, [layout()], mask)


def memento_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention: dict | None = None) -> torch.Tensor:
    """Logits that predict the 30 memento digits. input_ids (N, T) -> (N, 30, vocab)."""
    attention = attention if attention is not None else memento_attention(model)
    out = model(input_ids=input_ids, **attention, use_cache=False)
    return out.logits[:, _TARGETS.to(out.logits.device) - 1]  # (N, 30, V)


def task_loss(model: PreTrainedModel, input_ids: torch.Tensor, attention: dict | None = None) -> torch.Tensor:
    """Mean cross-entropy of the memento digits under memento attention; input_ids (N, T)."""
    logits = memento_logits(model, input_ids, attention)  # (N, 30, V)
    targets = input_ids[:, _TARGETS.to(input_ids.device)]  # (N, 30)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def task_accuracy(model: PreTrainedModel, n: int = 1000, seed: int = heldout_seed(1), batch_size: int = 1000,
                  keep_last_n_blocks: int = 0) -> float:
    """Next-token argmax accuracy on the memento digits of `n` sequences drawn with `seed`, under the
    mask with `keep_last_n_blocks` (the one the model was trained with; 0 for the shipped toys).

    The default seed is a held-out set that no training run sees. The model is put in
    eval mode and left there.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    model.eval()
    attention = memento_attention(model, keep_last_n_blocks)
    ids = generate(n, seed).input_ids.to(model.device)  # (n, T)
    correct = 0
    for chunk in ids.split(batch_size):
        pred = memento_logits(model, chunk, attention).argmax(-1)  # (b, 30)
        correct += (pred == chunk[:, _TARGETS.to(chunk.device)]).sum().item()
    return correct / (n * _TARGETS.numel())
