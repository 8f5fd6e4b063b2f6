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
concatenated per token: D = len(kinds) * n_kv * d_head per stored vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..memento.masks import MaskConfig
from ..memento.sites import SITES

__all__ = ["POOLINGS", "BACKENDS", "CaptureSpec", "DEFAULT_TARGET_BLOCK", "pooled_vectors"]

DEFAULT_TARGET_BLOCK = 1  # for a source that does not say where its passcode is: the paper's T_2

POOLINGS = ("tail_mean", "tokens", "mean", "last")
BACKENDS = ("transformers", "lens", "nnsight")
STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("gzip", "lzf", "none")  # HDF5 filters for feature datasets (with byte shuffle)


@dataclass(frozen=True)
class CaptureSpec:
    """Everything that decides what a capture writes. Stored in full with the data."""

    layers: tuple[int, ...]
    offsets: tuple[int, ...] = (-1, 0, 1, 2)
    target_block: int | None = None  # 0-based (1 is the paper's T_2); None: the sample source's
    sites: tuple[str, ...] = ("memento",)
    kinds: tuple[str, ...] = ("k", "v")
    pooling: tuple[str, ...] = ("tail_mean",)
    max_tokens: int = 4  # tokens kept per site with pooling 'tokens' (the first) or 'tail_mean' (the last)
    dtype: str = "float16"
    mask: MaskConfig = field(default_factory=MaskConfig)
    batch_size: int = 64
    shard_size: int = 1024
    backend: str = "transformers"
    compression: str = "none"  # none (the default: fastest; KV bits barely compress), lzf, gzip (level 1, 27% smaller)

    def __post_init__(self) -> None:
        for name in ("layers", "offsets", "sites", "kinds", "pooling"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.mask, dict):
            object.__setattr__(self, "mask", MaskConfig(**self.mask))
        _check(len(self.layers) > 0 and len(set(self.layers)) == len(self.layers), "layers", self.layers,
               "a non-empty list of distinct layer indices")
        _check(len(self.offsets) > 0 and len(set(self.offsets)) == len(self.offsets), "offsets", self.offsets,
               "a non-empty list of distinct offsets")
        _check(self.target_block is None or self.target_block >= 0, "target_block", self.target_block, ">= 0 or None")
        _check(set(self.sites) <= set(SITES) and self.sites, "sites", self.sites, f"a subset of {SITES}")
        _check(set(self.kinds) <= {"k", "v"} and self.kinds, "kinds", self.kinds, "a subset of ('k', 'v')")
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
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptureSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"capture spec: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def pooled_vectors(pooling: str, max_tokens: int) -> int:
    """Vectors of D values that one site keeps per layer under `pooling`."""
    return {"mean": 1, "last": 1, "tokens": max_tokens, "tail_mean": max_tokens + 1}[pooling]


def _check(ok: Any, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"capture spec field '{name}' = {value!r}: expected {expected}")


