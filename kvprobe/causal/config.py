"""What to intervene on and how: `CausalConfig`, the options of the causal map (kvprobe.causal.run).

Plain data, no torch: the config reads it without loading a model's libraries;
`kvprobe.causal.run` runs it and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..grid import DEFAULT_POOLING, DEFAULT_SITE, Cell
from ..memento.config import MaskConfig

__all__ = ["FORK_RESTART", "CausalConfig"]

FORK_RESTART = MaskConfig(keep_last_n_blocks=0, mask_delimiters=True, restart_mode=True)


@dataclass(frozen=True)
class CausalConfig:
    """What to intervene on and how.

    layers, offsets, sites: the cells (offsets from the target block, as the probes'); pooling
    names the cells like the probe grid's. mask: the condition the model runs under;
    ablate_with: where ablation K/V come from. n_samples, batch_size: samples and batch rows.
    """

    layers: tuple[int, ...]
    offsets: tuple[int, ...] = (0, 1, 2)
    sites: tuple[str, ...] = (DEFAULT_SITE,)
    pooling: str = DEFAULT_POOLING
    mask: MaskConfig = MaskConfig(keep_last_n_blocks=0)
    ablate_with: MaskConfig = FORK_RESTART
    n_samples: int = 500
    batch_size: int = 100
    backend: str = "transformers"
    n_boot: int = 2000

    def cells(self) -> list[Cell]:
        return [Cell(s, o, layer, self.pooling) for s in self.sites for o in self.offsets for layer in self.layers]
