"""The leakage grid's vocabulary: the one place its words are written (SPEC section 3).

A probing experiment reads a grid. Each point of it is a `Cell`:

    site      which positions of a block are read
                memento       the whole memento span, <|summary_start|> .. <|summary_end|> inclusive
                memento_text  only the memento text between the markers
                block_end     the block's <|block_end|> delimiter
    offset    blocks from the target block: -1 causal control, 0 direct, +1, +2, ... masked
    layer     the decoder layer whose K/V are read
    pooling   how a site's tokens become vectors
                tail_mean     the last `max_tokens` tokens (zero-padded in front), then the site mean
                tokens        the first `max_tokens` tokens, zero-padded
                mean          the site mean
                last          the site's last token

and what is read at a cell is one or both of the cached `TENSORS` (keys after any key
norm and RoPE, and values), fitted by one or more probe `FAMILIES`. Everything else in
kvprobe imports these names; none writes them as literals.

    Cell("memento", 1, 3).label         # 'memento|+1|3|tail_mean'
    Cell.parse("memento|+1|3|tail_mean").key.path   # 'features/memento/+1/tail_mean'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BLOCK_END", "CONTENT_TOKENS", "DEFAULT_POOLING", "DEFAULT_SITE", "FAMILIES", "LAST", "LINEAR", "MEAN", "MEMENTO", "MEMENTO_TEXT",
    "MLP", "POOLINGS", "SITES", "TAIL_MEAN", "TENSORS", "TOKENS", "Cell", "FeatureKey", "feature_path", "offset_role",
    "pooled_vectors",
]

# sites: where in a block a probe reads
MEMENTO, MEMENTO_TEXT, BLOCK_END = "memento", "memento_text", "block_end"
SITES = (MEMENTO, MEMENTO_TEXT, BLOCK_END)
DEFAULT_SITE = MEMENTO

# poolings: how a site's tokens become vectors
TAIL_MEAN, TOKENS, MEAN, LAST = "tail_mean", "tokens", "mean", "last"
POOLINGS = (TAIL_MEAN, TOKENS, MEAN, LAST)
DEFAULT_POOLING = TAIL_MEAN

# what is read: the KV cache's keys and values, each (B, n_kv_heads, T, d_head)
TENSORS = ("k", "v")

# the block text a store keeps for the reconstruction probes: the target block's tokens between its
# delimiters, its first and last CONTENT_TOKENS // 2 when longer
CONTENT_TOKENS = 64

# probe families: multinomial logistic regression, and the paper's 512-256-128 MLP
LINEAR, MLP = "linear", "mlp"
FAMILIES = (LINEAR, MLP)


def pooled_vectors(pooling: str, max_tokens: int) -> int:
    """Vectors of D values that one site keeps per layer under `pooling`."""
    return {MEAN: 1, LAST: 1, TOKENS: max_tokens, TAIL_MEAN: max_tokens + 1}[pooling]


def offset_role(offset: int) -> str:
    """SPEC section 3's name for a memento at `offset` blocks from the target block: 'causal control'
    (before it: must read chance), 'direct' (its own memento) or 'masked' (written after it was hidden)."""
    return "causal control" if offset < 0 else "direct" if offset == 0 else "masked"


def feature_path(site: str, offset: int, pooling: str) -> str:
    """HDF5 path of a feature dataset, e.g. 'features/memento/+1/mean'."""
    return f"features/{site}/{offset:+d}/{pooling}"


@dataclass(frozen=True, order=True)
class FeatureKey:
    """One captured feature family: a site (`SITES`), an offset from the target block, and a
    pooling (`POOLINGS`)."""

    site: str
    offset: int
    pooling: str

    @property
    def path(self) -> str:
        return feature_path(self.site, self.offset, self.pooling)


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the leakage grid, named the same way everywhere (store, probes, results,
    per-sample scores): the features of `site` at `offset` blocks from the target block, at
    `layer`, pooled by `pooling`. A `FeatureKey` plus a layer."""

    site: str
    offset: int
    layer: int
    pooling: str = DEFAULT_POOLING

    @property
    def key(self) -> FeatureKey:
        return FeatureKey(self.site, self.offset, self.pooling)

    @property
    def label(self) -> str:
        """'memento|+1|3|tail_mean': the cell as one string (file keys)."""
        return f"{self.site}|{self.offset:+d}|{self.layer}|{self.pooling}"

    @classmethod
    def parse(cls, label: str) -> "Cell":
        """The inverse of `label`."""
        site, offset, layer, pooling = label.split("|")
        return cls(site, int(offset), int(layer), pooling)
