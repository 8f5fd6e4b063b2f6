"""The SFT batch: padded ids, labels, and for stage 2 the memento mask as O(B x T) tables.

`MementoCollator` pads a batch of rows on the right:

    input_ids       (B, T) long     tokens of each row (`TraceEncoder`: rendered, EOS, cut)
    labels          (B, T) long     the input ids, -100 before each row's loss start and on padding
    stage 1:
    attention_mask  (B, T) long     1 on real tokens
    stage 2:
    position_ids    (B, T) long     0.. on each row
    memento_tables  dict of (B, T)  `MaskTables.tensors()`: hide_block, memento_of, n_completed
                                    (int32) and valid (bool), the memento mask of the batch

Stage 2 never builds a T x T tensor on the host: the tables are a few bytes per token, and
the trainer (`MementoTrainer`, `with_memento_mask`) turns them into the attention mask on
the model's device, after the batch has moved there: FlexAttention's block-sparse
`BlockMask` (interval-built, milliseconds at 32K tokens) or, for eager/sdpa and sequences
up to `DENSE_MASK_MAX_TOKENS`, the dense additive (B, 1, T, T) mask in the model's dtype.

Rows are `EncodedTrace`s, the columns of a tokenised table (`tokenize_traces`, what the
Trainer feeds), or `Trace`s (also ``{"trace": Trace}``), which are encoded on the spot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.traces import Trace
from ..memento.forward import attention_mask_from_tables
from ..memento.masks import MaskConfig, MaskTables, mask_tables
from .encode import IGNORE_INDEX, EncodedTrace, Overlength, TraceEncoder

__all__ = ["MASK_TABLES_KEY", "MementoCollator", "with_memento_mask"]

MASK_TABLES_KEY = "memento_tables"  # the stage-2 batch entry that holds `MaskTables.tensors()`


def _check_stage(stage: int) -> None:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (causal attention) or 2 (memento attention), got {stage!r}")


@dataclass
class MementoCollator:
    """Pad and label a batch of rows for one SFT stage (see the module docstring).

    tokenizer:       a tokenizer holding the six Memento markers
    stage:           1 (causal, 2D padding mask) or 2 (memento mask tables + position ids)
    mask:            the memento mask of stage 2 (default: hide every completed block)
    max_length:      longest row in tokens; longer traces are cut or dropped (`overlength`)
    prompt_template: a format string with ``{prompt}`` wrapped around each trace's prompt
    append_eos:      end each row with the tokenizer's EOS token (learn to stop)
    loss_on_prompt:  also train on the prompt tokens
    pad_to_multiple_of: round the padded length up (tensor-core and FlexAttention tiles)
    loss_on_think:   train on <think> (and what follows it), the assistant turn's first token
                     (the paper's; False: targets start at the first <|block_start|>)
    overlength:      "truncate" (the paper's) or "drop" a trace longer than max_length
    """

    tokenizer: Any
    stage: int
    mask: MaskConfig = field(default_factory=MaskConfig)
    max_length: int | None = None
    prompt_template: str | None = None
    append_eos: bool = True
    loss_on_prompt: bool = False
    pad_to_multiple_of: int | None = None
    loss_on_think: bool = True
    overlength: Overlength = "truncate"

    def __post_init__(self) -> None:
        _check_stage(self.stage)
        if not isinstance(self.mask, MaskConfig):
            raise TypeError(f"mask must be a MaskConfig, got {type(self.mask).__name__}")
        self.encoder = TraceEncoder(self.tokenizer, self.prompt_template, self.append_eos, self.max_length,
                                    self.overlength, self.loss_on_think, self.loss_on_prompt)
        eos = self.encoder.eos_id if self.encoder.eos_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)

    def prepare(self, trace: Trace) -> Trace:
        """The trace as it is rendered for training (prompt wrapped in the template, if any)."""
        return self.encoder.prepare(trace)

    def encode(self, trace: Trace) -> EncodedTrace:
        """One trace's row (`TraceEncoder.encode`)."""
        return self.encoder.encode(trace)

    def _rows(self, features: Sequence[Any]) -> list[EncodedTrace]:
        if not features:
            raise TypeError("MementoCollator takes a non-empty list of rows")
        rows: list[EncodedTrace | None] = [None] * len(features)
        traces: list[tuple[int, Trace]] = []
        for i, f in enumerate(features):
            if isinstance(f, EncodedTrace):
                rows[i] = f
            elif isinstance(f, Trace):
                traces.append((i, f))
            elif isinstance(f, Mapping) and isinstance(f.get("trace"), Trace):
                traces.append((i, f["trace"]))
            elif isinstance(f, Mapping) and "input_ids" in f:
                rows[i] = EncodedTrace.from_record(f)
            else:
                raise TypeError("MementoCollator takes EncodedTrace rows, their table columns, Trace or "
                                f"{{'trace': Trace}} features; got {type(f).__name__}")
        for (i, _), row in zip(traces, self.encoder.encode_batch([t for _, t in traces]) if traces else []):
            rows[i] = row
        return rows  # type: ignore[return-value]

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        rows = self._rows(features)
        B = len(rows)
        T = max(len(r.ids) for r in rows)
        if self.pad_to_multiple_of:
            T = math.ceil(T / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            n = len(r.ids)
            input_ids[b, :n] = torch.from_numpy(np.asarray(r.ids, dtype=np.int64))
            labels[b, r.loss_start : n] = input_ids[b, r.loss_start : n]
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if self.stage == 1:
            lengths = torch.tensor([len(r.ids) for r in rows])
            batch["attention_mask"] = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
            return batch
        # right padding: each row's layout (offset 0) indexes the padded row as it is
        batch["position_ids"] = torch.arange(T).repeat(B, 1)  # (B, T)
        batch[MASK_TABLES_KEY] = mask_tables([r.layout for r in rows], T, self.mask).tensors()  # 4 x (B, T)
        return batch


def with_memento_mask(model: Any, batch: Mapping[str, Any], mask: MaskConfig) -> dict[str, Any]:
    """A stage-2 batch ready for `model`: the tables under `MASK_TABLES_KEY` replaced by the
    `attention_mask` built from them on their device (`attention_mask_from_tables`: a
    `BlockMask` for flex_attention, else the dense additive (B, 1, T, T) mask, refused above
    `DENSE_MASK_MAX_TOKENS`). A batch without tables (stage 1) is returned as it is."""
    if MASK_TABLES_KEY not in batch:
        return dict(batch)
    out = dict(batch)
    tables = MaskTables.from_tensors(out.pop(MASK_TABLES_KEY), mask)
    out["attention_mask"] = attention_mask_from_tables(model, tables)
    return out
