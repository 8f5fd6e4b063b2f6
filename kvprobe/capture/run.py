"""Run a capture: validate, estimate the size, then stream shards into an HDF5 store.

    plan = plan_capture(model, source, spec)        # validates; no files touched
    print(plan.summary())                            # the dry run
    run_capture(model, source, spec, "out/store")    # writes, resumable

Everything that can be checked is checked before the store directory is created, so
bad input never leaves a partial store. A crash leaves whole shards only; calling
again with `mode="resume"` continues from the first missing shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.samples import SampleBatch, SampleSource
from ..grid import LAST, MEAN, POOLINGS, TAIL_MEAN, TOKENS, FeatureKey, pooled_vectors
from ..memento.forward import check_length, flex_for_long, flex_shapes, input_device, memento_inputs
from ..memento.sites import site_positions
from ..store import CONTENT_TOKENS, StoreWriter
from .backends import get_backend
from .spec import DEFAULT_TARGET_BLOCK, CaptureConfig

__all__ = ["CapturePlan", "PoolTables", "package_versions", "model_dims", "model_identity", "plan_capture", "pool_sites", "pool_tables", "run_capture"]


def model_dims(model: Any) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, d_head) from a Hugging Face config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return cfg.num_hidden_layers, n_kv, d_head


def _offloaded(model: Any, name: str) -> torch.Tensor:
    """A parameter that a device map offloaded (it sits on "meta"), read from accelerate's weights map."""
    module, _, leaf = name.rpartition(".")
    weights = getattr(getattr(model.get_submodule(module), "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise ValueError(f"parameter {name!r} has no data (meta device) and no offloaded copy to read")
    return weights[leaf]


def model_identity(model: Any, name: str | None = None) -> dict[str, Any]:
    """Name, class, parameter count and a SHA-256 over every parameter's bytes (offloaded ones included)."""
    h = hashlib.sha256()
    n_params = 0
    for pname, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            tensor = _offloaded(model, pname)
        h.update(pname.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        n_params += t.numel()
    return {
        "name": name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "n_params": n_params,
        "param_hash": h.hexdigest(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed version of each named distribution ('not installed' if absent)."""
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _versions(backend: str) -> dict[str, str]:
    extra = {"lens": ["transformer-lens"], "nnsight": ["nnsight"]}.get(backend, [])
    return package_versions(["kvprobe", "torch", "transformers", "h5py", "numpy", *extra])


@dataclass(frozen=True)
class CapturePlan:
    """A validated capture: what it writes and how big it will be."""

    spec: CaptureConfig
    n_samples: int
    n_layers_model: int
    n_kv: int
    d_head: int
    keys: tuple[FeatureKey, ...]

    @property
    def feature_dim(self) -> int:
        return len(self.spec.tensors) * self.n_kv * self.d_head

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_samples / self.spec.shard_size)

    def estimate_bytes(self) -> int:
        """Uncompressed bytes of features (samples x layers x positions x heads x dims x dtype)."""
        itemsize = np.dtype(self.spec.dtype).itemsize
        per_sample = 0
        for key in self.keys:
            tokens = pooled_vectors(key.pooling, self.spec.max_tokens)
            per_sample += len(self.spec.layers) * tokens * self.feature_dim * itemsize
        return self.n_samples * per_sample

    def summary(self) -> str:
        s = self.spec
        gb = self.estimate_bytes() / 1e9
        return "\n".join(
            [
                f"samples        {self.n_samples} in {self.n_shards} shard(s) of {s.shard_size}",
                f"layers         {list(s.layers)} of {self.n_layers_model}",
                f"sites          {list(s.sites)} at offsets {list(s.offsets)} from target block {s.target_block}",
                f"pooling        {list(s.pooling)}" + (f" (max_tokens {s.max_tokens})" if {TOKENS, TAIL_MEAN} & set(s.pooling) else ""),
                f"per position   {'+'.join(s.tensors).upper()} x {self.n_kv} KV heads x {self.d_head} dims = {self.feature_dim} values, {s.dtype}",
                f"mask           {s.mask.name} {s.mask}",
                f"backend        {s.backend}",
                f"expected size  {self.estimate_bytes():,} bytes ({gb:.3f} GB) before compression",
                f"per pooling    {self.pooling_costs()}",
            ]
        )

    def pooling_costs(self) -> str:
        """What one site x offset x layer costs over all samples under each pooling choice."""
        one = self.n_samples * self.feature_dim * np.dtype(self.spec.dtype).itemsize
        costs = [f"{p} {pooled_vectors(p, self.spec.max_tokens) * one / 1e6:,.1f} MB" for p in POOLINGS]
        return "; ".join(costs) + f" (one site x offset x layer, max_tokens {self.spec.max_tokens})"


def _check_batch(batch: SampleBatch, spec: CaptureConfig) -> None:
    first_row = {}
    for row, layout in enumerate(batch.layouts):  # rows sharing a layout are checked once
        first_row.setdefault(layout, row)
    for layout, row in first_row.items():
        for site in spec.sites:
            for offset in spec.offsets:
                try:
                    site_positions(layout, site, spec.target_block + offset)
                except ValueError as e:
                    raise ValueError(
                        f"sample {int(batch.index[row])}: {site} at offset {offset:+d} "
                        f"(target block {spec.target_block}): {e}"
                    ) from None


def plan_capture(model: Any, source: SampleSource, spec: CaptureConfig) -> CapturePlan:
    """Validate the spec against the model and the source (first batch); no files touched.

    The target block is the source's: a spec without one (the default) takes it, and a spec
    naming another is refused. The plan's spec has it filled in.
    """
    n_layers, n_kv, d_head = model_dims(model)
    bad = [l for l in spec.layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if source.n_samples < 1:
        raise ValueError("the sample source is empty")
    get_backend(spec.backend)  # fails now if the backend's package is missing
    injected = getattr(source, "target_block", None)  # the block the source puts the passcode in
    if spec.target_block is None:
        spec = replace(spec, target_block=DEFAULT_TARGET_BLOCK if injected is None else injected)
    elif injected is not None and injected != spec.target_block:
        raise ValueError(f"the source puts the passcode in block {injected} but the capture spec reads offsets "
                         f"from target block {spec.target_block}: leave the spec's target_block unset (it "
                         "follows the source) or give both the same")
    check = getattr(source, "check", None)
    if callable(check):  # sources that can check every sample up front do so
        check(spec.offsets, spec.sites)
    first = source.samples(0, min(source.n_samples, spec.batch_size))
    _check_batch(first, spec)
    # a sliding window the mask cannot carry, or a dense T x T mask too long: refused now, before any file
    check_length(model, forward_length(pool_tables(first.layouts, spec)), _reads_block_mask(spec.backend))
    keys = tuple(FeatureKey(s, o, p) for s in spec.sites for o in spec.offsets for p in spec.pooling)
    return CapturePlan(spec, source.n_samples, n_layers, n_kv, d_head, keys)


@dataclass(frozen=True)
class PoolTables:
    """Where each row's sites sit among its gathered positions, and how to pool them.

    positions (B, P): absolute positions to gather, the row's segments concatenated
    (segment s = (site, offset) in spec order), padded by repeating the last one;
    mean_w (B, S, P): averaging weights; last (B, S): index of each segment's last
    token; tok_idx, tok_ok (B, S, max_tokens): the first max_tokens tokens of each;
    tail_idx, tail_ok (B, S, max_tokens): the last max_tokens, right-aligned.
    """

    positions: torch.Tensor
    mean_w: torch.Tensor
    last: torch.Tensor
    tok_idx: torch.Tensor
    tok_ok: torch.Tensor
    tail_idx: torch.Tensor
    tail_ok: torch.Tensor


def pool_tables(layouts: list, spec: CaptureConfig) -> PoolTables:
    """PoolTables for a batch; built once per distinct layout, then indexed by row."""
    distinct = list(dict.fromkeys(layouts))
    segments = [[site_positions(lay, site, spec.target_block + off) for site in spec.sites for off in spec.offsets]
                for lay in distinct]
    U, S, M = len(distinct), len(segments[0]), spec.max_tokens
    P = max(sum(len(seg) for seg in segs) for segs in segments)
    positions = torch.zeros(U, P, dtype=torch.long)
    mean_w = torch.zeros(U, S, P)
    last = torch.zeros(U, S, dtype=torch.long)
    tok_idx = torch.zeros(U, S, M, dtype=torch.long)
    tok_ok = torch.zeros(U, S, M, dtype=torch.bool)
    tail_idx = torch.zeros(U, S, M, dtype=torch.long)
    tail_ok = torch.zeros(U, S, M, dtype=torch.bool)
    for u, segs in enumerate(segments):
        flat = [p for seg in segs for p in seg]
        positions[u] = torch.tensor(flat + [flat[-1]] * (P - len(flat)))
        start = 0
        for s, seg in enumerate(segs):
            n, m = len(seg), min(len(seg), M)
            mean_w[u, s, start : start + n] = 1.0 / n
            last[u, s] = start + n - 1
            tok_idx[u, s, :m] = torch.arange(start, start + m)
            tok_ok[u, s, :m] = True
            tail_idx[u, s, M - m :] = torch.arange(start + n - m, start + n)
            tail_ok[u, s, M - m :] = True
            start += n
    row = {lay: u for u, lay in enumerate(distinct)}
    idx = torch.tensor([row[lay] for lay in layouts])
    return PoolTables(positions[idx], mean_w[idx], last[idx], tok_idx[idx], tok_ok[idx], tail_idx[idx], tail_ok[idx])


def pool_sites(
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
    tables: PoolTables,
    spec: CaptureConfig,
    keys: tuple[FeatureKey, ...],
) -> dict[FeatureKey, np.ndarray]:
    """Pool captured states into features.

    kv: layer -> (K, V), each (B, n_kv, P, d_head) at `tables.positions`.
    Returns key -> (B, n_layers, D) for 'mean' and 'last', (B, n_layers, max_tokens, D)
    for 'tokens', (B, n_layers, max_tokens + 1, D) for 'tail_mean'.
    """
    dtype = getattr(torch, spec.dtype)  # pooled in float32, stored in the capture dtype
    B, P = tables.positions.shape
    S, M, L = tables.last.shape[1], spec.max_tokens, len(spec.layers)
    X = None  # (B, P + 1, L, D) float32; position P stays zero: the token slots a site does not fill read it
    for i, layer in enumerate(spec.layers):
        parts = [kv[layer][0] if k == "k" else kv[layer][1] for k in spec.tensors]
        row = torch.cat([p.permute(0, 2, 1, 3).flatten(2) for p in parts], dim=-1)  # (B, P, D)
        if X is None:
            X = torch.zeros(B, P + 1, L, row.shape[-1])
        X[:, :P, i] = row
    D = X.shape[-1]
    rows = torch.arange(B)[:, None]

    def take(idx: torch.Tensor) -> torch.Tensor:  # idx (B, n) positions -> (B, n, L, D)
        return X[rows, idx]

    def tokens(idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:  # (B, S, M) -> (B, S, L, M, D)
        return take(torch.where(ok, idx, P).flatten(1)).view(B, S, M, L, D).transpose(2, 3)

    def mean() -> torch.Tensor:  # (B, S, L, D); no weight on the zero position
        w = torch.nn.functional.pad(tables.mean_w, (0, 1))  # (B, S, P + 1)
        return torch.bmm(w, X.view(B, P + 1, L * D)).view(B, S, L, D)

    def tail_mean() -> torch.Tensor:  # (B, S, L, M + 1, D), written once in the storage dtype
        out = torch.empty(B, S, L, M + 1, D, dtype=dtype)
        out[:, :, :, :M] = tokens(tables.tail_idx, tables.tail_ok)  # zeros in front of a shorter site
        out[:, :, :, M] = mean()
        return out

    pooled = {
        MEAN: mean,
        LAST: lambda: take(tables.last),  # (B, S, L, D)
        TOKENS: lambda: tokens(tables.tok_idx, tables.tok_ok),  # (B, S, L, M, D), zeros past a site's end
        TAIL_MEAN: tail_mean,  # the last M tokens, then the site mean
    }
    results: dict[str, torch.Tensor] = {p: pooled[p]().to(dtype) for p in spec.pooling}
    out = {}
    seg_names = [(site, off) for site in spec.sites for off in spec.offsets]
    for key in keys:
        s = seg_names.index((key.site, key.offset))
        out[key] = results[key.pooling][:, s].numpy()  # a view; the shard's concatenate copies it
    return out


def forward_length(tables: "PoolTables") -> int:
    """Tokens a capture's forward runs over: up to the last position it reads. A causal model's
    KV at position p depends on tokens <= p only, so nothing after it is computed or masked."""
    return int(tables.positions.max()) + 1


def _reads_block_mask(backend: str) -> bool:
    return bool(getattr(get_backend(backend), "READS_BLOCK_MASK", False))


def _capture_batch(model: Any, wrapped: Any, capture: Callable, batch: SampleBatch, spec: CaptureConfig, keys) -> dict:
    tables = pool_tables(batch.layouts, spec)
    device = input_device(model)
    T = forward_length(tables)  # the toy at offsets up to +7 skips 12% of every forward; a long trace far more
    block_mask_ok = _reads_block_mask(spec.backend)
    # above DENSE_MASK_MAX_TOKENS: FlexAttention's BlockMask for this forward, never a T x T mask
    with flex_for_long(model, T) if block_mask_ok else contextlib.nullcontext():
        check_length(model, T, block_mask_ok)
        input_ids = batch.input_ids[:, :T].to(device)  # (B, T)
        am = batch.attention_mask[:, :T].to(device) if batch.attention_mask is not None else None
        kwargs = memento_inputs(model, input_ids, batch.layouts, spec.mask, am, truncate=True)  # built on the device
        with flex_shapes(model, device):  # CPU FlexAttention: each trace length compiles with static shapes
            kv = capture(wrapped, input_ids, layers=spec.layers, positions=tables.positions.to(device), **kwargs)
    kv = {l: (k.cpu(), v.cpu()) for l, (k, v) in kv.items()}
    return pool_sites(kv, tables, spec, keys)


def _content_table(batch: SampleBatch, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of block `block` between its delimiters, for the reconstruction probes: (n, CONTENT_TOKENS)
    int32, -1 after the end (a longer block keeps its first and last CONTENT_TOKENS // 2), and the true
    lengths (n,)."""
    half = CONTENT_TOKENS // 2
    table = np.full((len(batch.layouts), CONTENT_TOKENS), -1, dtype=np.int32)
    lengths = np.zeros(len(batch.layouts), dtype=np.int32)
    ids = batch.input_ids
    for i, lay in enumerate(batch.layouts):
        b = lay.blocks[block]
        row = ids[i, b.start + 1:b.end].numpy()  # (L,) the block's text, its delimiters left out
        lengths[i] = len(row)
        kept = row if len(row) <= CONTENT_TOKENS else np.concatenate([row[:half], row[-half:]])
        table[i, :len(kept)] = kept
    return table, lengths


def _layout_table(batch: SampleBatch, n_blocks: int) -> np.ndarray:
    """(n, n_blocks, 5) block positions per row; built once per distinct layout."""
    distinct = list(dict.fromkeys(batch.layouts))
    table = np.full((len(distinct), n_blocks, 5), -1, dtype=np.int32)
    for u, lay in enumerate(distinct):
        for b in lay.blocks[:n_blocks]:
            vals = [b.start, b.end, b.summary_start, b.summary_end, b.stop]
            table[u, b.index] = [-1 if v is None else v for v in vals]
    row = {lay: u for u, lay in enumerate(distinct)}
    return table[[row[lay] for lay in batch.layouts]]


def store_meta(model: Any, source: SampleSource, plan: CapturePlan, model_name: str | None = None,
               identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The store's config a capture of `source` through `model` as `plan` writes (its config.json): the capture
    spec, model identity, source, dimensions, versions and expected size. `kvprobe.store.differs` compares one
    with a store's recorded config."""
    spec = plan.spec
    return {
        "capture": spec.to_dict(),
        "model": identity or model_identity(model, model_name),
        "source": source.describe(),
        "dims": {"n_layers": plan.n_layers_model, "n_kv_heads": plan.n_kv, "d_head": plan.d_head,
                 "feature_dim": plan.feature_dim, "kinds_order": list(spec.tensors)},
        "versions": _versions(spec.backend),
        "expected_bytes": plan.estimate_bytes(),
    }


def _open_store(out: str | Path, meta: dict[str, Any], mode: str, progress: bool) -> StoreWriter:
    """The store writer at `out`; resuming drops the shards that fail their checksum, to capture them again."""
    writer = StoreWriter(out, meta, mode=mode)
    if mode == "resume":
        damaged = writer.drop_damaged()
        if damaged and progress:
            print(f"{out}: shard(s) {damaged} failed their checksum and are captured again")
    return writer


def _progress_bar(plan: CapturePlan, done: set[int], rank: int, world_size: int, progress: bool) -> tqdm:
    """A bar over the samples of this rank's shards, those already written counted."""
    size = plan.spec.shard_size
    bar = tqdm(total=plan.n_samples, unit="sample", desc="capture", disable=not progress)
    mine = [i for i in range(plan.n_shards) if i % world_size == rank]
    bar.total = sum(min(size, plan.n_samples - i * size) for i in mine)
    bar.update(sum(min(size, plan.n_samples - i * size) for i in done if i in mine))
    return bar


def _capture_shard(model: Any, wrapped: Any, backend: Any, source: SampleSource, plan: CapturePlan, shard: int,
                   n_blocks: int, bar: tqdm) -> tuple[dict[str, np.ndarray], dict[FeatureKey, np.ndarray]]:
    """One shard's samples, captured batch by batch: their metadata, and key -> features (n, ...)."""
    spec = plan.spec
    lo, hi = shard * spec.shard_size, min((shard + 1) * spec.shard_size, plan.n_samples)
    feats: dict[FeatureKey, list[np.ndarray]] = {k: [] for k in plan.keys}
    meta_rows: dict[str, list] = {"index": [], "passcode": [], "labels": [], "layout": [], "content": [],
                                  "content_length": []}
    for start in range(lo, hi, spec.batch_size):
        batch = source.samples(start, min(start + spec.batch_size, hi))
        _check_batch(batch, spec)
        for k, arr in _capture_batch(model, wrapped, backend.capture_kv, batch, spec, plan.keys).items():
            feats[k].append(arr)
        meta_rows["index"].append(batch.index)
        meta_rows["passcode"].extend(batch.passcodes)
        meta_rows["labels"].append(batch.labels.astype(np.int8))
        meta_rows["layout"].append(_layout_table(batch, n_blocks))
        content, lengths = _content_table(batch, spec.target_block)
        meta_rows["content"].append(content)
        meta_rows["content_length"].append(lengths)
        bar.update(len(batch.index))
    samples = {
        "index": np.concatenate(meta_rows["index"]).astype(np.int64),
        "passcode": np.array(meta_rows["passcode"], dtype=object),
        "labels": np.concatenate(meta_rows["labels"]),
        "layout": np.concatenate(meta_rows["layout"]),
        "content": np.concatenate(meta_rows["content"]),
        "content_length": np.concatenate(meta_rows["content_length"]),
    }
    return samples, {k: np.concatenate(v) for k, v in feats.items()}


def run_capture(
    model: Any,
    source: SampleSource,
    spec: CaptureConfig,
    out: str | Path,
    *,
    mode: str = "create",
    model_name: str | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    identity: dict[str, Any] | None = None,
) -> Path:
    """Capture `source` through `model` into the store at `out`; returns the store path.

    mode: 'create' (refuse an existing store), 'resume' (continue the same config),
    'overwrite'. Writes shard by shard; memory stays flat in the number of samples.

    Several processes (e.g. under torchrun) split a capture with `rank`/`world_size`:
    rank r writes shards r, r + world_size, ...; each joins the same store directory
    (same config required) and whichever finishes last writes the index. The result
    is the same store a single process writes. `identity` is `model_identity(model,
    model_name)` when the caller has it already (it hashes every parameter).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if world_size > 1 and mode == "create":
        mode = "join"
    plan = plan_capture(model, source, spec)
    spec = plan.spec  # with the source's target block
    backend = get_backend(spec.backend)
    writer = _open_store(out, store_meta(model, source, plan, model_name, identity), mode, progress)
    wrapped = backend.prepare(model)
    done = writer.done_shards()
    n_blocks = max(lay.n_blocks for lay in source.samples(0, 1).layouts)
    with _progress_bar(plan, done, rank, world_size, progress) as bar, torch.inference_mode():  # closed on failure too
        for shard in range(plan.n_shards):
            if shard in done or shard % world_size != rank:
                continue
            samples, feats = _capture_shard(model, wrapped, backend, source, plan, shard, n_blocks, bar)
            writer.write_shard(shard, samples, feats, compression=spec.compression)
            if on_shard is not None:
                on_shard(shard)
    if len(writer.done_shards() & set(range(plan.n_shards))) == plan.n_shards:
        writer.finalize(plan.n_shards, tag=str(rank))
    return Path(out)
