"""Reconstruction probes: how much of an erased block's text a memento's K/V still hold, in bits.

A passcode probe answers one planted question (can 5 digits be read back?). A reconstruction
probe reads the target block's own text, as the store records it (`KVStore.content`), so it
needs no injection: each target position of the block is a classification over a vocabulary
cut (the `vocab` most frequent training tokens there, one class for any other token, one for
"past the block's end"), fitted on a cell's features with the probe families' solvers.

    target "positions"  the block's first `positions` tokens, by position (the toy's block: its 5 digits)
    target "ends"       its first k and last k tokens (a real trace's blocks differ in length)
    target "bag"        its token set: for each of the `vocab` tokens in the most training blocks,
                        does the block hold it (a present/absent question per token; a block longer
                        than CONTENT_TOKENS is its first and last half)

Metrics, per (site, offset, layer) cell, on the validation split:
- accuracy per position, and its mean over a block's real positions (those inside the block);
- bits per token: log2 p_probe(y) - log2 p_unigram(y), averaged over a block's real positions, where
  p_unigram is the training split's class frequency at that position (add-`smoothing` counts); with
  "bag", bits per vocabulary item over the token's training rate of presence. 0 is
  what the position's frequencies alone give; a probe that reads the block scores above 0. It is a
  lower bound on the information the features hold about the token (a variational bound). The
  probe's L2 is chosen per cell by the lowest inner cross-entropy (not accuracy, as the passcode
  probes do), extending the grid as far as `L2_BOUNDS`, so a cell without signal is regularised
  towards the baseline rather than overfitted below it;
- a 95% bootstrap interval over validation blocks for both.
The split is label-unique over blocks: no block text is on both sides. Scored on the restart
condition (the memento text alone) with the same source and seed, the same blocks are validated,
so `compare_bits(memento, restart)` gives the implicit channel, memento - restart in bits, with
paired intervals. The passcode probe is the special case of a 5-token block whose text is the label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .analysis import (DiffResult, apply_holm, feature_groups, paired_differences,  # shared with the passcode probes
                       planned_cells)
from .data.passcodes import label_unique_split
from .errors import KVProbeError
from .grid import MLP, Cell, pooled_vectors
from .probes.config import BAG, DECODER, POSITIONS, TARGETS, ProbeConfig, ReconstructionConfig  # torch-free: the config reads them
from .probes.decoder import fit_span_decoder
from .probes.selection import fit_selected
from .stats import bootstrap_ci
from .store import CONTENT_TOKENS, KVStore

__all__ = ["TARGETS", "ReconstructionConfig", "ReconstructionError", "ReconstructionResult",
           "ReconstructionRow", "Targets", "block_targets", "compare_bits", "compare_pairs", "reconstruct_store",
           "token_bits", "unigram_log2", "with_probe"]

class ReconstructionError(KVProbeError, ValueError):
    """A store that cannot be reconstructed from (too few blocks with text); bad input, one line."""


@dataclass(frozen=True)
class Targets:
    """The target classes of N blocks at P positions, each position a question with n_classes answers.

    By position ("positions", "ends"): labels (N, P) class ids; vocab (V,) the token id of classes 0..V-1,
    class V any other token, class V+1 past the block's end; n_classes V + 2. real (N, P): the position
    lies inside the block (only those are scored). names (P,): 't1', 't2', ... or 'first 1' .. 'last 1'.
    Bag of tokens ("bag"): P = V positions, one per kept token (names 'id 123'), labels 1 where the block
    holds it, 0 where not; n_classes 2, every position real.
    """

    labels: np.ndarray
    real: np.ndarray
    vocab: np.ndarray
    names: tuple[str, ...]
    n_classes: int


def _target_tokens(content: np.ndarray, lengths: np.ndarray,
                   config: ReconstructionConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Token ids (N, P) at the target positions (-1 past a block's end), which of them are scored (N, P):
    inside the block, and with "ends" not already among its first k (a block shorter than 2k is scored
    once per token), and the positions' names."""
    N = len(content)
    if config.target == POSITIONS:
        P = int(min(config.positions, max(int(lengths.max()), 1)))
        tokens = content[:, :P]
        return tokens, tokens >= 0, tuple(f"t{p + 1}" for p in range(P))
    k = config.k
    first = np.where(np.arange(k)[None] < lengths[:, None], content[:, :k], -1)  # (N, k)
    stored = np.minimum(lengths, CONTENT_TOKENS)  # the stored row ends at the block's last token either way
    at = stored[:, None] - k + np.arange(k)[None]  # (N, k): positions of the last k tokens in the row
    last = np.where(at >= 0, content[np.arange(N)[:, None], np.clip(at, 0, None)], -1)
    in_block = lengths[:, None] - k + np.arange(k)[None]  # (N, k): the last k tokens' positions in the block
    tokens = np.concatenate([first, last], axis=1)
    scored = np.concatenate([first >= 0, (last >= 0) & (in_block >= k)], axis=1)
    return tokens, scored, (*(f"first {i + 1}" for i in range(k)), *(f"last {k - i}" for i in range(k)))


def _bag_targets(content: np.ndarray, config: ReconstructionConfig, train: np.ndarray) -> Targets:
    """Which of the `vocab` tokens in the most training blocks each block holds: labels (N, V) of 0/1."""
    sets = [np.unique(row[row >= 0]) for row in content]  # each block's distinct tokens
    seen, blocks = np.unique(np.concatenate([sets[i] for i in train] or [np.zeros(0, np.int64)]), return_counts=True)
    vocab = seen[np.lexsort((seen, -blocks))][:config.vocab]  # in most training blocks first, ties by id
    labels = np.stack([np.isin(vocab, tokens) for tokens in sets]).astype(np.int64)  # (N, V)
    return Targets(labels=labels, real=np.ones_like(labels, dtype=bool), vocab=vocab,
                   names=tuple(f"id {t}" for t in vocab), n_classes=2)


def block_targets(content: np.ndarray, lengths: np.ndarray, config: ReconstructionConfig,
                  train: np.ndarray) -> Targets:
    """Targets of blocks `content` (N, CONTENT_TOKENS) of true `lengths` (N,), the vocabulary cut made on the
    `train` rows (indices) only."""
    if config.target == BAG:
        return _bag_targets(content, config, train)
    tokens, scored, names = _target_tokens(content, lengths, config)  # (N, P) each
    seen = tokens[train][tokens[train] >= 0]
    ids, counts = np.unique(seen, return_counts=True)
    vocab = ids[np.lexsort((ids, -counts))][:config.vocab]  # most frequent first, ties by id
    lookup = {int(t): c for c, t in enumerate(vocab)}
    other, past = len(vocab), len(vocab) + 1
    labels = np.array([[past if t < 0 else lookup.get(int(t), other) for t in row] for row in tokens], dtype=np.int64)
    return Targets(labels=labels.reshape(tokens.shape), real=scored, vocab=vocab, names=names,
                   n_classes=len(vocab) + 2)


def unigram_log2(labels: np.ndarray, n_classes: int, smoothing: float = 1.0,
                 real: np.ndarray | None = None) -> np.ndarray:
    """log2 of each class's training frequency at each position, (P, C), from labels (N, P), add-`smoothing`;
    counted over the rows where `real` (N, P) holds (the scored ones), so a probe that only knows a block's
    length gains nothing over it."""
    real = np.ones_like(labels, dtype=bool) if real is None else real
    counts = np.stack([np.bincount(labels[real[:, p], p], minlength=n_classes) for p in range(labels.shape[1])])
    counts = counts + smoothing
    return np.log2(counts / counts.sum(axis=1, keepdims=True))


def _position_gains(log_probs: np.ndarray, labels: np.ndarray, real: np.ndarray, base: np.ndarray) -> np.ndarray:
    """log2 p_probe(y) - log2 p_unigram(y) at each scored position, 0 at the others: (..., M, P).

    log_probs (..., M, P, C) natural-log probabilities; labels, real (M, P); base (P, C) from `unigram_log2`."""
    ln_p = np.take_along_axis(log_probs, np.broadcast_to(labels[..., None], log_probs.shape[:-1] + (1,)), -1)[..., 0]
    return (ln_p / np.log(2) - base[np.arange(labels.shape[1])[None], labels]) * real


def _hits(log_probs: np.ndarray, labels: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Scored positions predicted right, (..., M, P)."""
    return (log_probs.argmax(axis=-1) == labels) & real


def _per_block(values: np.ndarray, real: np.ndarray) -> np.ndarray:
    """The mean of per-position values (..., M, P) over each block's scored positions, (..., M)."""
    return values.sum(axis=-1) / np.maximum(real.sum(axis=-1), 1)


def token_bits(log_probs: np.ndarray, labels: np.ndarray, real: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Bits per token of each block, (..., M): log2 p_probe(y) - log2 p_unigram(y) over its real positions.

    log_probs (..., M, P, C) natural-log probabilities; labels, real (M, P); base (P, C) from `unigram_log2`."""
    return _per_block(_position_gains(log_probs, labels, real, base), real)


@dataclass
class ReconstructionRow:
    """One probe on one cell. Accuracies are fractions, bits per token; intervals are 95% bootstrap."""

    condition: str
    site: str
    offset: int
    layer: int
    probe: str
    pooling: str
    bits: float
    bits_low: float
    bits_high: float
    accuracy: float
    ci_low: float
    ci_high: float
    baseline_accuracy: float  # the unigram's most frequent class at each position
    position_accuracy: list[float]  # per target position, over the blocks it lies inside
    position_bits: list[float]
    l2: float  # the chosen L2 strength (the span decoder: its weight decay)
    n_train: int
    n_val: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReconstructionResult:
    """A condition's rows, the validation sample ids, the position names, and per-block bits for pairing."""

    condition: str
    rows: list[ReconstructionRow]
    val_index: np.ndarray
    names: tuple[str, ...]
    per_sample: dict[tuple[Cell, str], np.ndarray]  # (cell, probe) -> bits (M,)


def _split(content: np.ndarray, lengths: np.ndarray, probe: ProbeConfig, where: Any) -> tuple[np.ndarray, ...]:
    """Outer train / validation indices and the inner validation mask, label-unique over block texts;
    too few distinct blocks to split is bad input about the store at `where`."""
    keys = [" ".join(map(str, row[row >= 0].tolist())) + f"|{n}" for row, n in zip(content, lengths)]
    try:
        is_val = label_unique_split(keys, probe.val_fraction, probe.split_seed)
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        inner = label_unique_split([keys[i] for i in tr], probe.inner_fraction, probe.split_seed)
    except ValueError as e:  # e.g. every block the same text: nothing to hold out
        raise ReconstructionError(f"{where}: too few blocks with text to reconstruct ({len(set(keys))} distinct "
                                  f"block text(s) in {len(keys)} samples): {e}") from None
    return tr, va, inner


def reconstruct_store(store: KVStore, condition: str, config: ReconstructionConfig = ReconstructionConfig(), *,
                      progress: bool = False, label: str | None = None) -> ReconstructionResult:
    """Fit reconstruction probes on every requested cell of `store` and score them in bits per token.
    With `progress`, a bar (`label`, default "reconstruct CONDITION") counts the cells fitted."""
    content, lengths = store.content  # (N, CONTENT_TOKENS), (N,)
    settings = replace(config.probe, linear_l2_grid=config.l2_grid, extend_grid=True)
    tr, va, inner = _split(content, lengths, settings, store.path)
    targets = block_targets(content, lengths, config, tr)
    va = va[targets.real[va].any(axis=1)]  # a block with nothing to score (empty) is not averaged in
    if len(va) < 2 or len(targets.vocab) == 0:
        raise ReconstructionError(f"{store.path}: too few blocks with text to reconstruct ({len(va)} to validate, "
                                  f"{len(targets.vocab)} token(s) seen in training)")
    y_tr, y_va, real_va = targets.labels[tr], targets.labels[va], targets.real[va]
    base = unigram_log2(y_tr, targets.n_classes, config.smoothing, targets.real[tr])  # (P, C)
    base_acc = _per_block(_hits(np.broadcast_to(base, y_va.shape + base.shape[-1:]), y_va, real_va), real_va).mean()
    rows: list[ReconstructionRow] = []
    per_sample: dict[tuple[Cell, str], np.ndarray] = {}
    families = (*settings.families, *((DECODER,) if config.span_decoder else ()))
    bar = tqdm(total=len(planned_cells(store, settings)) * len(families), unit="cell", disable=not progress,
               desc=label or f"reconstruct {condition}", dynamic_ncols=True)
    common = dict(condition=condition, baseline_accuracy=float(base_acc), n_train=len(tr), n_val=len(va))

    def score(group: list[Cell], kind: str, log_probs: np.ndarray, l2: list[float]) -> None:
        """Rows of one family's fits on a group: log_probs (G, M, P, C)."""
        gain, hit = _position_gains(log_probs, y_va, real_va, base), _hits(log_probs, y_va, real_va)  # (G, M, P)
        bits_s, acc_s = _per_block(gain, real_va), _per_block(hit, real_va)  # (G, M)
        bits_ci, acc_ci = (bootstrap_ci(s, n_boot=settings.n_boot) for s in (bits_s, acc_s))
        n_real = np.maximum(real_va.sum(axis=0), 1)  # (P,)
        for g, cell in enumerate(group):
            per_sample[(cell, kind)] = bits_s[g]
            rows.append(ReconstructionRow(
                site=cell.site, offset=cell.offset, layer=cell.layer, probe=kind, pooling=cell.pooling,
                bits=float(bits_ci.estimate[g]), bits_low=float(bits_ci.low[g]), bits_high=float(bits_ci.high[g]),
                accuracy=float(acc_ci.estimate[g]), ci_low=float(acc_ci.low[g]), ci_high=float(acc_ci.high[g]),
                position_accuracy=(hit[g].sum(axis=0) / n_real).tolist(),
                position_bits=(gain[g].sum(axis=0) / n_real).tolist(), l2=l2[g], **common))
        bar.update(len(group))

    for group, X_tr, X_va in feature_groups(store, settings, tr, va):  # (G, N_tr, D), (G, N_va, D)
        for kind in settings.families:
            config_k = settings.mlp if kind == MLP else settings.linear
            fit, sel = fit_selected(X_tr, y_tr, X_va, y_va, settings.strength_grid(kind), kind=kind, inner_val=inner,
                                    config=config_k, n_classes=targets.n_classes, device=settings.device,
                                    extend=settings.extend_grid, criterion="loss",
                                    extend_ties=settings.extend_ties)
            score(group, kind, fit.log_probs, [float(v) for v in sel.chosen])
        if config.span_decoder:  # the span's vectors as a sequence: (N, V, d)
            V = pooled_vectors(settings.pooling, int(store.config["capture"].get("max_tokens", 1)))
            fits = [fit_span_decoder(X_tr[g].reshape(len(tr), V, -1), torch.as_tensor(y_tr),
                                     torch.as_tensor(targets.real[tr]), torch.as_tensor(inner),
                                     X_va[g].reshape(len(va), V, -1), targets.n_classes, config.decoder)[0]
                    for g in range(len(group))]
            score(group, DECODER, torch.stack(fits).numpy(), [config.decoder.weight_decay] * len(group))
    bar.close()
    rows.sort(key=lambda r: (r.probe, r.site, r.offset, r.layer))
    return ReconstructionResult(condition, rows, store.sample_ids[va], targets.names, per_sample)


def compare_bits(a: ReconstructionResult, b: ReconstructionResult, n_boot: int = 2000) -> list[DiffResult]:
    """Paired differences a - b in bits per token for every cell both results have (e.g. memento - restart:
    what the K/V carry beyond the memento text); `DiffResult.difference` is in bits per token."""
    return paired_differences(a, b, n_boot, "blocks")


def compare_pairs(results: dict[str, ReconstructionResult], pairs: Any, n_boot: int = 2000) -> list[DiffResult]:
    """`compare_bits` for every (a, b) condition pair, Holm-corrected together as one family."""
    diffs = [d for a, b in pairs for d in compare_bits(results[a], results[b], n_boot)]
    apply_holm(diffs)
    return diffs


def with_probe(config: ReconstructionConfig, **changes: Any) -> ReconstructionConfig:
    """`config` with its probe settings changed (e.g. layers, offsets, families)."""
    return replace(config, probe=replace(config.probe, **changes))
