"""The table of capture backends. Every backend module has the same two functions:

    prepare(hf_model) -> wrapped            # whatever the framework runs
    capture_kv(wrapped, input_ids, *, attention_mask, position_ids, layers, positions)
        -> {layer: (K, V)}, each (B, n_kv, P, d_head), K post-RoPE as the cache holds it
    READS_BLOCK_MASK: bool                  # can attention_mask be a FlexAttention BlockMask
                                            # (long traces: above DENSE_MASK_MAX_TOKENS only that)

A backend that can also set KV has a third, which the causal experiments use:

    forward_patched(hf_model, input_ids, *, attention_mask, position_ids, patches)
        -> (logits (B, T, vocab), cache)    # patches: KVPatch per layer, K post-RoPE

Backends whose package is an optional extra are imported only when asked for.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

__all__ = ["BACKEND_EXTRAS", "get_backend", "get_patcher"]


def _transformers() -> ModuleType:
    from . import hf

    return hf


def _lens() -> ModuleType:
    from . import lens

    return lens


def _nnsight() -> ModuleType:
    from . import nnsight

    return nnsight


_LOADERS: dict[str, Callable[[], ModuleType]] = {"transformers": _transformers, "lens": _lens, "nnsight": _nnsight}
BACKEND_EXTRAS = {"transformers": None, "lens": "lens", "nnsight": "nnsight"}


def get_backend(name: str) -> ModuleType:
    """The backend module called `name`; a clear error if unknown or its extra is missing."""
    if name not in _LOADERS:
        raise ValueError(f"unknown capture backend {name!r}; choose one of {sorted(_LOADERS)}")
    try:
        return _LOADERS[name]()
    except ImportError as e:
        raise ValueError(
            f"capture backend {name!r} needs the '{BACKEND_EXTRAS[name]}' extra: pip install 'kvprobe[{BACKEND_EXTRAS[name]}]' ({e})"
        ) from None


def get_patcher(name: str) -> Callable:
    """The `forward_patched` of backend `name`; a clear error if that backend cannot set KV."""
    patcher = getattr(get_backend(name), "forward_patched", None)
    if patcher is None:
        raise ValueError(f"capture backend {name!r} cannot set KV states; the causal experiments need one that can "
                         "(transformers)")
    return patcher
