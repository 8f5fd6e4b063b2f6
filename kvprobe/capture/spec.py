"""What to capture: the capture spec, the samples it runs on, and where positions come from.

A capture runs a `SampleSource` (deterministic batches of token ids with passcodes and
parsed layouts) through a model under a memento mask and keeps, per layer, the KV
states at chosen *sites*:

    memento       the whole memento span of block target+offset, <|summary_start|> ..
                  <|summary_end|> inclusive (the default: the markers' KV carry the
                  block too; on the toy, 5 tokens)
    memento_text  only the memento text between the markers (on the toy, the 3 digits)
    block_end     the <|block_end|> delimiter of block target+offset

Offsets follow SPEC section 3: -1 causal control (M_1), 0 direct (M_2), +1, +2, ...
masked. Each site's tokens are pooled ('mean', 'last'), kept ('tokens': the first
`max_tokens`, zero-padded), or kept at bounded size ('tail_mean', the default: the last
`max_tokens` tokens, zero-padded in front, then the site mean; with max_tokens 4 on the
toy's 5-token span this is an invertible linear map of all 5 tokens, and on a real
model's memento of hundreds of tokens it stays 5 vectors). Keys and values are
concatenated per token: D = len(tensors) * n_kv * d_head per stored vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import renamed, renamed_fields
from ..grid import DEFAULT_POOLING, DEFAULT_SITE, POOLINGS, SITES, TENSORS
from ..memento.config import MaskConfig

__all__ = ["BACKENDS", "CaptureConfig", "DEFAULT_TARGET_BLOCK"]

DEFAULT_TARGET_BLOCK = 1  # for a source that does not say where its passcode is: the paper's T_2

BACKENDS = ("transformers", "lens", "nnsight")
STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("gzip", "lzf", "none")  # HDF5 filters for feature datasets (with byte shuffle)

# field -> the name a store's config.json records it under ("capture"): stores keep the format they were
# written in, so stores from before the rename open and resume, and a new store is byte for byte an old one's
STORED_NAMES = {"tensors": "kinds"}


@renamed_fields(kinds="tensors")
@dataclass(frozen=True)
class CaptureConfig:
    """Everything that decides what a capture writes. Stored in full with the data.

    tensors: what is read at a site, the cached keys `k` and/or values `v` (grid.TENSORS), concatenated
    per position in this order (formerly `kinds`; `CaptureConfig(kinds=...)` works for one release).
    """

    layers: tuple[int, ...]
    offsets: tuple[int, ...] = (-1, 0, 1, 2)
    target_block: int | None = None  # 0-based (1 is the paper's T_2); None: the sample source's
    sites: tuple[str, ...] = (DEFAULT_SITE,)
    tensors: tuple[str, ...] = TENSORS
    pooling: tuple[str, ...] = (DEFAULT_POOLING,)
    max_tokens: int = 4  # tokens kept per site with pooling 'tokens' (the first) or 'tail_mean' (the last)
    dtype: str = "float16"
    mask: MaskConfig = field(default_factory=MaskConfig)
    batch_size: int = 64
    shard_size: int = 1024
    backend: str = "transformers"
    compression: str = "none"  # none (the default: fastest; KV bits barely compress), lzf, gzip (level 1, 27% smaller)

    def __post_init__(self) -> None:
        for name in ("layers", "offsets", "sites", "tensors", "pooling"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.mask, dict):
            object.__setattr__(self, "mask", MaskConfig(**self.mask))
        _check(len(self.layers) > 0 and len(set(self.layers)) == len(self.layers), "layers", self.layers,
               "a non-empty list of distinct layer indices")
        _check(len(self.offsets) > 0 and len(set(self.offsets)) == len(self.offsets), "offsets", self.offsets,
               "a non-empty list of distinct offsets")
        _check(self.target_block is None or self.target_block >= 0, "target_block", self.target_block, ">= 0 or None")
        _check(set(self.sites) <= set(SITES) and self.sites, "sites", self.sites, f"a subset of {SITES}")
        _check(set(self.tensors) <= set(TENSORS) and self.tensors, "tensors", self.tensors, f"a subset of {TENSORS}")
        _check(set(self.pooling) <= set(POOLINGS) and self.pooling, "pooling", self.pooling, f"a subset of {POOLINGS}")
        if self.mask.prefill_causal:  # the capture reads generated traces: no per-sample prompt lengths reach it
            raise ValueError("mask.prefill_causal changes only prompts that hold blocks (the fork's continuation "
                             "prompts), and the capture is given no prompt lengths: it would record the name and "
                             "apply the ordinary rule; drop it (it is for kvprobe.memento.generate)")
        _check(self.dtype in STORAGE_DTYPES, "dtype", self.dtype, f"one of {STORAGE_DTYPES}")
        _check(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        _check(self.compression in COMPRESSIONS, "compression", self.compression, f"one of {COMPRESSIONS}")
        for name in ("max_tokens", "batch_size", "shard_size"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a store records it (JSON types; `tensors` under its stored name, STORED_NAMES)."""
        d = asdict(self)
        return {STORED_NAMES.get(k, k): list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptureConfig":
        """A spec from `to_dict`'s form (a store's config.json) or from its field names."""
        d = dict(d)
        for name, stored in STORED_NAMES.items():
            if stored in d:
                if name in d:
                    raise ValueError(f"capture spec: both {name!r} and {stored!r} (its stored name) given")
                d[name] = d.pop(stored)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"capture spec: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def _check(ok: Any, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"capture spec field '{name}' = {value!r}: expected {expected}")


__getattr__ = renamed(__name__, {"CaptureSpec": "CaptureConfig"})  # the old names, for one release
