"""How large a tensor a piece of code makes: the check behind kvprobe's long-sequence promise.

Above `DENSE_MASK_MAX_TOKENS` nothing in kvprobe's mask path (the capture's memento inputs,
the SFT collator, the interval `BlockMask`) may make a T x T tensor. `LargestTensor` is a
torch dispatch mode that sees every op's outputs, factories included, and keeps the largest:

    with LargestTensor() as seen:
        batch = collator([row])
    assert seen.numel < T * T // 256      # no T x T mask was made, not even for a moment
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LargestTensor"]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (`numel` elements, `nbytes` bytes) any torch op makes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out
