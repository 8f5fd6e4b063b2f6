"""Interventions on memento KV and what they change downstream, one batch at a time.

A cell is the KV of one site (a memento span, or a <|block_end|>) at one offset from the
target block, at one layer: the same `Cell` the probes read. Two interventions replace
the cell's K/V and run the rest of the sequence again:

- **ablation**: the same sample's K/V computed under `ablate_with` (default: restart mode
  with the delimiters hidden, the fork's restart: the memento written without seeing any
  block, so the implicit channel is gone and the memento text is kept);
- **interchange**: the K/V of a donor sample under the same mask (row i takes row
  donor[i]'s), the base sequence otherwise. With the donor as itself, nothing changes, bit
  for bit (tested).

Downstream is every prediction computed after the cell's block's <|summary_end|>:
`later_memento` (the text of every later memento: the toy's task tokens), `later_all`
(every later token). Per sample and cell: the change in mean next-token loss (nats),
the fraction of greedy predictions that change, and optionally what a probe decodes from
a later memento's KV after the intervention (does it follow the donor's passcode?).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..capture.hf import KVPatch
from ..capture.run import pool_sites, pool_tables
from ..capture.backend_helpers import gather_positions
from ..capture.spec import CaptureConfig
from ..data.samples import SampleBatch
from ..memento.forward import memento_inputs
from ..memento.layout import Layout
from ..memento.masks import MaskConfig
from ..memento.sites import site_positions
from ..grid import Cell, FeatureKey

__all__ = ["INTERVENTIONS", "BatchEffects", "ProbeReader", "batch_effects", "cell_positions", "downstream_masks",
           "pair_donors"]

INTERVENTIONS = ("ablation", "interchange")


def pair_donors(layouts: Sequence[Layout]) -> np.ndarray:
    """(B,) each row's donor: the next row (cyclically) with the same layout, so every cell sits
    at the same positions in both; -1 for a row whose layout no other row has."""
    donor = np.full(len(layouts), -1)
    groups: dict[Layout, list[int]] = {}
    for row, lay in enumerate(layouts):
        groups.setdefault(lay, []).append(row)
    for rows in groups.values():
        if len(rows) > 1:
            donor[rows] = np.roll(rows, -1)
    return donor


def cell_positions(layouts: Sequence[Layout], site: str, block: int) -> torch.Tensor:
    """(B, P) positions of `site` of `block` per row, a shorter site padded by repeating its
    last position (writing the same K/V twice is harmless)."""
    rows = [site_positions(lay, site, block) for lay in layouts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long)


def downstream_masks(layouts: Sequence[Layout], block: int, length: int) -> dict[str, torch.Tensor]:
    """Which next-token predictions lie downstream of block `block`'s memento, (B, T - 1) bool
    each: position t predicts token t + 1, and downstream means computed by a later token,
    t after <|summary_end|> of `block`. 'later_memento': token t + 1 is memento text of a
    later block (the toy's task tokens); 'later_all': every prediction made after the memento;
    'answer': the tokens after </think> (a real trace's answer; none on the toy)."""
    B = len(layouts)
    later_all = torch.zeros(B, length - 1, dtype=torch.bool)
    later_memento = torch.zeros(B, length - 1, dtype=torch.bool)
    answer = torch.zeros(B, length - 1, dtype=torch.bool)
    for row, lay in enumerate(layouts):
        end = lay.blocks[block].summary_end
        later_all[row, end + 1 : lay.stop - 1] = True
        for b in lay.blocks[block + 1 :]:
            if b.completed:
                text = b.memento_text
                later_memento[row, text.start - 1 : text.stop - 1] = True
        if len(lay.answer):
            answer[row, lay.answer.start - 1 : lay.answer.stop - 1] = True
    return {"later_memento": later_memento, "later_all": later_all, "answer": answer}


@dataclass
class ProbeReader:
    """A fitted probe that decodes the passcode from one cell of KV features.

    cell: what it reads; fit: a `ProbeFit` of one group (kvprobe.probes.fit_probes);
    max_tokens: the capture's, so the features are pooled as the store's were.
    """

    cell: Cell
    fit: Any
    max_tokens: int

    def decode(self, cache: Any, layouts: Sequence[Layout], target_block: int) -> np.ndarray:
        """(B, K) decoded digits from the K/V a forward left in `cache`."""
        c = self.cell
        spec = CaptureConfig(layers=(c.layer,), offsets=(c.offset,), sites=(c.site,), pooling=(c.pooling,),
                           max_tokens=self.max_tokens, target_block=target_block)
        tables = pool_tables(list(layouts), spec)
        keys, values = cache.layers[c.layer].keys, cache.layers[c.layer].values  # (B, n_kv, T, d_head)
        kv = {c.layer: (gather_positions(keys, tables.positions).cpu(), gather_positions(values, tables.positions).cpu())}
        key = FeatureKey(c.site, c.offset, c.pooling)
        x = pool_sites(kv, tables, spec, (key,))[key][:, 0]  # (B, D) or (B, M, D)
        x = x.reshape(len(layouts), -1)[None].astype(np.float32)  # (1, B, D)
        return self.fit.predict_log_proba(x)[0].argmax(-1)  # (B, K)


@dataclass
class BatchEffects:
    """Per-sample effects of one intervention on one cell over a batch, each (B,).

    delta_loss_memento / delta_loss_all / delta_loss_answer: mean next-token loss after minus
    before (nats per token) over the later memento tokens / all later tokens / the answer
    (minus the change of the answer's mean log-probability; NaN without an answer);
    flip_memento / flip_all: fraction of those tokens whose greedy prediction changed;
    follow_donor / follow_base: fraction of the probe's decoded digits equal to the donor's /
    the base's passcode (NaN without a probe).
    """

    delta_loss_memento: np.ndarray
    delta_loss_all: np.ndarray
    delta_loss_answer: np.ndarray
    flip_memento: np.ndarray
    flip_all: np.ndarray
    follow_donor: np.ndarray
    follow_base: np.ndarray


def _token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss (B, T - 1) and greedy prediction (B, T - 1) of logits (B, T, V)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    loss = -logp.gather(-1, input_ids[:, 1:, None].to(logp.device)).squeeze(-1)
    return loss.cpu(), logp.argmax(-1).cpu()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    n = mask.sum(-1)
    return torch.where(n > 0, (x * mask).sum(-1) / n.clamp_min(1), torch.nan).double().numpy()


def batch_effects(
    model: Any,
    forward: Callable,
    batch: SampleBatch,
    cells: Sequence[Cell],
    *,
    target_block: int,
    mask: MaskConfig,
    ablate_with: MaskConfig,
    donor: np.ndarray | None = None,
    reader: ProbeReader | None = None,
) -> dict[tuple[str, Cell], BatchEffects]:
    """Both interventions on every cell for one batch: (intervention, cell) -> BatchEffects.

    forward: a backend's `forward_patched`. donor (B,): the row each row takes its
    interchange K/V from, -1 for none (its interchange effects are NaN); default
    `pair_donors` (rows whose cell positions differ from their donor's are refused).
    Runs 2 + 2 x len(cells) forwards (clean, ablation source, then one per intervention).
    """
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    layouts = batch.layouts
    donor = pair_donors(layouts) if donor is None else np.asarray(donor)
    alone = donor < 0
    donor = np.where(alone, np.arange(len(layouts)), donor)  # a row without a donor takes its own K/V
    clean_inputs = memento_inputs(model, ids, layouts, mask)
    logits, clean = forward(model, ids, **clean_inputs)
    base_loss, base_pred = _token_losses(logits, ids)
    _, source = forward(model, ids, **memento_inputs(model, ids, layouts, ablate_with))
    base_codes = batch.labels
    results = {}
    for cell in cells:
        block = target_block + cell.offset
        pos = cell_positions(layouts, cell.site, block)  # (B, P)
        donor_pos = pos[torch.as_tensor(donor)]
        if not torch.equal(pos, donor_pos):
            raise ValueError(f"{cell.label}: a donor's {cell.site} of block {block} sits at other positions than its "
                             "base's; interchange needs pairs with the same layout")
        down = downstream_masks(layouts, block, ids.shape[1])

        def at(cache: Any, rows: Any = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = cache.layers[cell.layer].keys[rows], cache.layers[cell.layer].values[rows]  # (B, n_kv, T, d)
            return gather_positions(k, pos), gather_positions(v, pos)  # (B, n_kv, P, d)

        swaps = {"ablation": at(source), "interchange": at(clean, torch.as_tensor(donor, device=device))}
        for name, (k, v) in swaps.items():
            out, cache = forward(model, ids, **clean_inputs, patches=[KVPatch(cell.layer, pos, k, v)])
            loss, pred = _token_losses(out, ids)
            follow_donor = follow_base = np.full(len(layouts), np.nan)
            if reader is not None and name == "interchange" and reader.cell.offset > cell.offset:
                decoded = reader.decode(cache, layouts, target_block)  # (B, K)
                follow_donor = (decoded == base_codes[donor]).mean(-1)
                follow_base = (decoded == base_codes).mean(-1)
            effects = BatchEffects(
                delta_loss_memento=_masked_mean(loss - base_loss, down["later_memento"]),
                delta_loss_all=_masked_mean(loss - base_loss, down["later_all"]),
                delta_loss_answer=_masked_mean(loss - base_loss, down["answer"]),
                flip_memento=_masked_mean((pred != base_pred).float(), down["later_memento"]),
                flip_all=_masked_mean((pred != base_pred).float(), down["later_all"]),
                follow_donor=np.asarray(follow_donor, dtype=np.float64),
                follow_base=np.asarray(follow_base, dtype=np.float64),
            )
            if name == "interchange" and alone.any():
                for metric in vars(effects).values():
                    metric[alone] = np.nan
            results[(name, cell)] = effects
    return results
