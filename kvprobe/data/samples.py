"""What a capture runs on: a batch of samples and the protocol of a sample source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..memento.layout import Layout, SpecialTokens

__all__ = ["SampleBatch", "SampleSource"]


@dataclass
class SampleBatch:
    """A batch of samples: token ids with their passcodes and parsed layouts.

    index (n,) global sample ids; input_ids (n, T); attention_mask (n, T) or None;
    passcodes: n strings; labels (n, L) class indices; layouts: n parsed layouts.
    """

    index: np.ndarray
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    passcodes: list[str]
    labels: np.ndarray
    layouts: list[Layout]


class SampleSource(Protocol):
    """Deterministic samples for a capture: `samples(start, stop)` always returns the same
    batch for the same range. `describe()` identifies the source in the store's config.
    A source with a `target_block` attribute (the block holding the passcode) must agree
    with the capture spec's; `plan_capture` refuses a mismatch."""

    n_samples: int
    special: SpecialTokens

    def samples(self, start: int, stop: int) -> SampleBatch: ...

    def describe(self) -> dict[str, Any]: ...
