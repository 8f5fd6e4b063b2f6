"""kvprobe: measure KV-cache leakage in block-masked (Memento) transformers.

Pipeline, data flowing one way: memento (layout, masks, forward) -> data (passcodes,
traces, injection) -> capture -> store -> probes -> analysis -> reporting -> experiment
-> cli. This module re-exports the small public core.
"""

from .memento.forward import UnsupportedAttentionError, masked_forward, memento_inputs
from .memento.layout import Block, Layout, LayoutError, SpecialTokens, parse_batch, parse_layout
from .memento.masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask, flex_mask_mod

__version__ = "0.1.0"

__all__ = [
    "Block",
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
