"""kvprobe: measure KV-cache leakage in block-masked (Memento) transformers.

Pipeline, data flowing one way (tests/project/test_architecture.py enforces it): memento (layout,
masks, forward) -> data (passcodes, traces, injection) -> store -> capture -> probes -> stats
-> analysis -> causal -> reporting -> serving -> training -> config -> experiment -> cli; every
room may use `errors` (KVProbeError, the base of the bad-input errors). This module
re-exports the small public core.
"""

from .errors import KVProbeError
from .memento.forward import UnsupportedAttentionError, masked_forward, memento_inputs
from .memento.layout import Block, Layout, LayoutError, SpecialTokens, parse_batch, parse_layout
from .memento.masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask, flex_mask_mod

__version__ = "0.1.0"

__all__ = [
    "Block",
    "KVProbeError",
    "Layout",
    "LayoutError",
    "MaskConfig",
    "SpecialTokens",
    "UnsupportedAttentionError",
    "additive_mask",
    "allow_matrix",
    "flex_block_mask",
    "flex_mask_mod",
    "masked_forward",
    "memento_inputs",
    "parse_batch",
    "parse_layout",
]
