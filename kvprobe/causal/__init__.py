"""Does the model use what leaks? Interventions on memento KV beside the probe map.

`effects` runs the two interventions on one batch (KV interchange with a donor sample, and
channel ablation: the memento KV replaced by its restart-mode KV) and measures what changes
downstream; `run` makes the causal map over a sample source, with intervals, and saves it.
KV is set through the capture backends that can (`forward_patched`: transformers). What to
intervene on, `CausalConfig`, is in `config` (no torch).
"""

from .. import lazy_exports
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

__getattr__, __dir__ = lazy_exports(__name__, {
    ".effects": ("INTERVENTIONS", "BatchEffects", "ProbeReader", "batch_effects", "cell_positions",
                 "downstream_masks", "pair_donors"),
    ".run": ("CausalResult", "CausalRow", "causal_map", "load_causal", "save_causal"),
    ".config": ("CausalConfig",),
}, fallback=renamed(__name__, {"CausalSpec": "CausalConfig"}))  # the old names, for one release
