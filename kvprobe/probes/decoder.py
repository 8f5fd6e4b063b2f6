"""The span decoder: a small cross-attention readout of a block's text from a span's token vectors.

The linear and MLP probes read a cell's features as one flat vector. The decoder reads them as a
short sequence (the pooling's vectors: tail_mean's last 4 tokens and their mean, or tokens' first
4), which is how a later layer of the model would read them: one learned query per target position
attends over the span's vectors (`torch.nn.MultiheadAttention`), a feed-forward block follows, and
a shared classifier gives each position's class.

    queries (P, h) --attend--> proj(x) + pos (V, h) --> norm, FFN, norm --> head --> (B, P, C)

Training: AdamW on the mean cross-entropy over every position (as the linear probe trains), inputs
standardised with training statistics, minibatches in a seeded order; after each epoch the
cross-entropy over the scored positions of the `holdout` rows (a label-unique part of the training
split) is measured, the best epoch's weights are kept, and training stops after `patience` epochs
without gain. Used by `kvprobe.reconstruction` (`ReconstructionConfig.span_decoder`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import DecoderConfig

__all__ = ["DecoderConfig", "SpanDecoder", "fit_span_decoder"]


class SpanDecoder(nn.Module):
    """P position queries cross-attending over V span vectors of d values: x (B, V, d) -> logits (B, P, C)."""

    def __init__(self, n_vectors: int, dim: int, n_positions: int, n_classes: int, config: DecoderConfig):
        super().__init__()
        h = config.width
        self.proj = nn.Linear(dim, h)
        self.pos = nn.Parameter(torch.randn(n_vectors, h) / math.sqrt(h))  # which span vector is which
        self.queries = nn.Parameter(torch.randn(n_positions, h) / math.sqrt(h))  # one per target position
        self.attn = nn.MultiheadAttention(h, config.heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.ffn = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.head = nn.Linear(h, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = self.proj(x) + self.pos  # (B, V, h)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, P, h)
        read, _ = self.attn(q, span, span, need_weights=False)  # (B, P, h)
        h = self.norm1(q + read)
        h = self.norm2(h + self.ffn(h))
        return self.head(h)  # (B, P, C)


def _holdout_loss(model: SpanDecoder, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cross-entropy over the scored positions of x (N, V, d), y (N, P), real (N, P)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(x), dim=-1)  # (N, P, C)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (N, P)
        return float((nll * real).sum() / real.sum().clamp_min(1))


def fit_span_decoder(x_train: torch.Tensor, y_train: torch.Tensor, real_train: torch.Tensor, holdout: torch.Tensor,
                     x_val: torch.Tensor, n_classes: int, config: DecoderConfig = DecoderConfig(),
                     seed: int = 0) -> tuple[torch.Tensor, int]:
    """Train one decoder and return its validation log-probabilities (M, P, C) and the epoch kept.

    x_train (N, V, d), y_train (N, P) class ids, real_train (N, P) scored positions, holdout (N,) bool:
    the rows early stopping is measured on (never trained on); x_val (M, V, d).
    """
    if not holdout.any() or holdout.all():
        raise ValueError("the decoder's holdout must hold some training rows and leave some")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Module initialisation draws from the global generator
    fit_rows = (~holdout).nonzero().squeeze(1)
    mean = x_train[fit_rows].mean(dim=0, keepdim=True)
    std = x_train[fit_rows].std(dim=0, keepdim=True).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std  # training statistics only
    model = SpanDecoder(xt.shape[1], xt.shape[2], y_train.shape[1], n_classes, config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_epoch, since = math.inf, 0, 0
    kept = copy.deepcopy(model.state_dict())
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = fit_rows[torch.randperm(len(fit_rows), generator=gen)]
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            logits = model(xt[idx])  # (B, P, C)
            loss = nn.functional.cross_entropy(logits.reshape(-1, n_classes), y_train[idx].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        held = _holdout_loss(model, xt[holdout], y_train[holdout], real_train[holdout])
        if held < best:
            best, best_epoch, since = held, epoch, 0
            kept = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= config.patience:
                break
    model.load_state_dict(kept)
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(xv), dim=-1), best_epoch
