"""Does the model use what leaks? Interventions on memento KV beside the probe map.

`effects` runs the two interventions on one batch (KV interchange with a donor sample, and
channel ablation: the memento KV replaced by its restart-mode KV) and measures what changes
downstream; `run` makes the causal map over a sample source, with intervals, and saves it.
KV is set through the capture backends that can (`forward_patched`: transformers).
"""

from .effects import (
    INTERVENTIONS,
    BatchEffects,
    ProbeReader,
    batch_effects,
    cell_positions,
    downstream_masks,
    pair_donors,
)
from .run import (
    CausalResult,
    CausalRow,
    CausalConfig,
    causal_map,
    load_causal,
    save_causal,
)
from ..errors import renamed

__all__ = [
    "INTERVENTIONS",
    "BatchEffects",
    "CausalResult",
    "CausalRow",
    "CausalConfig",
    "ProbeReader",
    "batch_effects",
    "causal_map",
    "cell_positions",
    "downstream_masks",
    "load_causal",
    "pair_donors",
    "save_causal",
]


__getattr__ = renamed(__name__, {"CausalSpec": "CausalConfig"})  # the old names, for one release
