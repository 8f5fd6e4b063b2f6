"""kvprobe: measure KV-cache leakage in block-masked (Memento) transformers.

Pipeline, data flowing one way: layout -> masks -> injection -> capture -> store ->
probes -> analysis -> CLI. This module re-exports the small public core.
"""

from .forward import UnsupportedAttentionError, masked_forward, memento_inputs
from .layout import Block, Layout, LayoutError, SpecialTokens, parse_batch, parse_layout
from .masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask, flex_mask_mod

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
