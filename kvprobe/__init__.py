"""kvprobe: measure KV-cache leakage in block-masked (Memento) transformers.

Pipeline, data flowing one way (tests/project/test_architecture.py enforces it): memento (layout,
masks, forward) -> data (passcodes, traces, injection) -> store -> capture -> probes -> stats
-> analysis -> reconstruction -> causal -> reporting -> serving -> training -> config -> experiment -> cli; every
room may use `errors` (KVProbeError, the base of the bad-input errors). This module
re-exports the small public core.

Names are re-exported lazily (`lazy_exports`, PEP 562): `from kvprobe import masked_forward` and
`kvprobe.MaskConfig` work as always, but a module is imported only when one of its names is first
used, so `import kvprobe` (and `kvprobe --help`) does not pay for torch. The subpackages re-export
their modules' names the same way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import KVProbeError

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


def lazy_exports(package: str, exports: Mapping[str, Iterable[str]], fallback: Callable[[str], Any] | None = None,
                 *, modules: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of a package that re-exports its modules' names lazily.

    `exports` maps a module, relative to `package` (".layout", "..data.samples"), to the names
    the package takes from it; `modules` names submodules the package hands out themselves
    (`package.data`). A module is imported when one of its names is first looked up, and the
    name is then kept in the package, so later lookups are plain attribute reads. Any other
    name goes to `fallback` (e.g. `kvprobe.errors.renamed`'s old names), else it is an
    AttributeError as usual.

        __getattr__, __dir__ = lazy_exports(__name__, {".layout": ("Layout", "parse_layout")})
    """
    source = {name: module for module, names in exports.items() for name in names}
    source.update({name: None for name in modules})

    def __getattr__(name: str) -> Any:
        if name not in source:
            if fallback is not None:
                return fallback(name)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if source[name] is None:  # a submodule: importing it sets it on the package
            return importlib.import_module(f".{name}", package)
        value = getattr(importlib.import_module(source[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(source))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, {
    ".memento.forward": ("UnsupportedAttentionError", "masked_forward", "memento_inputs"),
    ".memento.layout": ("Block", "Layout", "LayoutError", "SpecialTokens", "parse_batch", "parse_layout"),
    ".memento.config": ("MaskConfig",),
    ".memento.masks": ("additive_mask", "allow_matrix", "flex_block_mask", "flex_mask_mod"),
})
