"""Passcode samples on the toy task, as a `kvprobe.capture.SampleSource`.

Injection on the toy: the target block's five digits *are* the passcode, and every
memento is recomputed, so each sequence is a valid task sequence. Samples are made
in fixed chunks seeded by (seed, chunk), so any range of samples is the same however
a capture batches or shards it.

The text-controlled conditions (`ToyPasscodeSource.text_controlled`): passcodes with one
fixed digit sum (22). A memento is the running sum, so its text is then the same
whichever passcode fills the target block: the texts carry nothing of the passcode, and
whatever a probe reads at a masked memento came through the KV states alone (as in the
paper's real traces, whose mementos never mention the passcode). The other nine blocks
stay random, as noise the probe must see through. With `shared_background=True` they
hold the same digits in every sample too, so every memento text is identical across
samples: the channel with no distractors at all. Chance is the exact majority-class
baseline of the constrained passcodes, 11.17%, not 10% (`PasscodeConfig.chance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from kvprobe.data.passcodes import PasscodeConfig, passcode_labels, sample_passcodes
from kvprobe.data.samples import SampleBatch

from .data import N_BLOCKS, N_DIGITS, generate, layout
from .vocab import SPECIAL

__all__ = ["ToyPasscodeSource"]

CHUNK = 1024


@lru_cache(maxsize=4)
def _chunk(seed: int, passcode_seed: int, chunk: int, target_block: int, codes: PasscodeConfig,
           shared_background: bool) -> tuple[torch.Tensor, tuple[str, ...]]:
    seeds = np.random.SeedSequence([seed, chunk]).generate_state(1)
    code_seed = np.random.SeedSequence([passcode_seed, chunk, 1]).generate_state(1)
    passcodes = sample_passcodes(CHUNK, seed=int(code_seed[0]), spec=codes)
    labels = passcode_labels(passcodes)  # (CHUNK, 5)
    forced = {target_block: labels}
    if shared_background:  # one draw of the other blocks, the same for every chunk
        background = generate(1, seed=int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])).digits[0].numpy()
        forced.update({b: np.broadcast_to(background[b], (CHUNK, N_DIGITS)) for b in range(N_BLOCKS) if b != target_block})
    batch = generate(CHUNK, seed=int(seeds[0]), block_digits=forced)
    return batch.input_ids, tuple(passcodes)


@dataclass
class ToyPasscodeSource:
    """`n_samples` toy sequences whose block `target_block` holds a random 5-digit passcode.

    `seed` draws the other blocks' digits; `passcode_seed` (default: `seed`) draws the
    passcodes, so two sources that differ only in it differ only in the target block.
    `digit_sum` draws only passcodes with that digit sum; `shared_background` gives every
    sample the same digits outside the target block.
    """

    n_samples: int
    seed: int = 0
    target_block: int = 1
    passcode_seed: int | None = None
    digit_sum: int | None = None
    shared_background: bool = False
    special: Any = field(default=SPECIAL, init=False)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not 0 <= self.target_block < N_BLOCKS:
            raise ValueError(f"target_block must be in 0..{N_BLOCKS - 1}, got {self.target_block}")
        self.codes = PasscodeConfig(length=N_DIGITS, digit_sum=self.digit_sum)  # validates digit_sum

    @classmethod
    def text_controlled(cls, n_samples: int, seed: int = 0, digit_sum: int = 22, shared_background: bool = False,
                        **kw: Any) -> "ToyPasscodeSource":
        """Memento texts independent of the passcode (fixed digit sum); with
        `shared_background`, identical across samples."""
        return cls(n_samples=n_samples, seed=seed, digit_sum=digit_sum, shared_background=shared_background, **kw)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "toy",
            "n_samples": self.n_samples,
            "seed": self.seed,
            "passcode_seed": self._passcode_seed,
            "target_block": self.target_block,
            "shared_background": self.shared_background,
            "passcode": self.codes.describe(),
        }

    @property
    def _passcode_seed(self) -> int:
        return self.seed if self.passcode_seed is None else self.passcode_seed

    def samples(self, start: int, stop: int) -> SampleBatch:
        """Samples start..stop-1: ids (n, 122), passcodes, labels (n, 5), layouts."""
        if not 0 <= start < stop <= self.n_samples:
            raise ValueError(f"sample range {start}..{stop} outside 0..{self.n_samples}")
        ids, codes = [], []
        for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            chunk_ids, chunk_codes = _chunk(self.seed, self._passcode_seed, chunk, self.target_block, self.codes,
                                            self.shared_background)
            lo = max(start, chunk * CHUNK) - chunk * CHUNK
            hi = min(stop, (chunk + 1) * CHUNK) - chunk * CHUNK
            ids.append(chunk_ids[lo:hi])
            codes.extend(chunk_codes[lo:hi])
        lay = layout()
        return SampleBatch(
            index=np.arange(start, stop, dtype=np.int64),
            input_ids=torch.cat(ids),
            attention_mask=None,
            passcodes=codes,
            labels=passcode_labels(codes),
            layouts=[lay] * (stop - start),
        )
