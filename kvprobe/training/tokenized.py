"""Tokenise the traces once and share the rows: a cached HF `datasets` table.

Under a launcher every rank would otherwise render and tokenise every trace itself (30K
traces of 10K tokens: minutes per rank, and a private copy of the ids in each rank's
memory). `tokenize_traces` runs `TraceEncoder` over the traces as a `datasets` map and
saves the result (`save_to_disk`: Arrow files) in a directory named by a key of everything
that decides the rows: the traces' text, the tokenizer (its full serialised state) and the
encoder's options. A later call with the same key, in this process or another,
memory-maps that directory instead of tokenising (`TokenizedTraces.reused`). `train_stage`
calls it inside `TrainingArguments.main_process_first`, so the main process of each node
builds the table while the other ranks wait, then they all map the same files.

The table holds every trace, with the reason each one left out was dropped (a trace whose
tokens are not valid Memento structure; one over `max_length` with ``overlength="drop"``;
one whose prompt alone fills `max_length`); `TokenizedTraces.rows` is the kept rows.
A directory appears whole or not at all (written beside it, then renamed), so two nodes
that build the same key on a shared file system do not corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.traces import Trace
from ..files import write_error
from .encode import EncodedTrace, TraceEncoder

__all__ = ["TokenizedTraces", "cache_key", "tokenize_traces", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

FORMAT = "kvprobe-sft-rows/1"  # bump when the columns or their meaning change
_INPUT_COLUMNS = ("trace_id", "prompt", "block_texts", "summaries", "answer")


@dataclass
class TokenizedTraces:
    """The rows of a set of traces, tokenised once.

    rows:      `datasets.Dataset` of the kept rows (`EncodedTrace.record()` columns,
               memory-mapped from `path`; `input_ids` as numpy arrays)
    dropped:   trace id -> why it was left out (one line)
    truncated: ids of the kept traces cut to max_length
    path:      the cache directory
    reused:    True if `path` existed: nothing was tokenised
    """

    rows: Any
    dropped: dict[str, str]
    truncated: list[str]
    path: Path
    reused: bool
    n_tokens: list[int] = field(default_factory=list)  # tokens of each kept row, as trained on

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def max_tokens(self) -> int:
        """The longest kept row, in tokens (0 if none is kept)."""
        return max(self.n_tokens, default=0)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything a tokenizer's output depends on: a fast tokenizer's serialised
    state (vocabulary, merges, added tokens, pre- and post-processing), else its vocabulary,
    plus its class and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, str(getattr(tokenizer, "special_tokens_map", {}))])
    return hashlib.sha256((state + extra).encode()).hexdigest()


def _trace_record(trace: Trace) -> dict[str, Any]:
    return {"trace_id": trace.trace_id, "prompt": trace.prompt, "block_texts": list(trace.blocks),
            "summaries": list(trace.summaries), "answer": trace.answer}


def cache_key(traces: Sequence[Trace], encoder: TraceEncoder) -> str:
    """The cache directory's name: a digest of the format, the traces' text, the tokenizer
    and the encoder's options (24 hex digits)."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, tokenizer_fingerprint(encoder.tokenizer), encoder.options()]).encode())
    for t in traces:
        h.update(json.dumps(_trace_record(t)).encode())
    return h.hexdigest()[:24]


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("kvprobe's SFT keeps its tokenised traces in an HF datasets table: "
                          "pip install 'kvprobe[train]'") from None
    return datasets


def _row_features() -> Any:
    from datasets import Features, List, Value

    return Features({
        "trace_id": Value("string"), "input_ids": List(Value("int32")), "loss_start": Value("int64"),
        "n_tokens": Value("int64"), "truncated": Value("bool"), "prompt_stop": Value("int64"),
        "think_end": Value("int64"), "blocks": List(List(Value("int64"))), "drop_reason": Value("string"),
    })


def _encode_batch(batch: dict[str, list], encoder: TraceEncoder) -> dict[str, list]:
    """A batched `datasets.map` function: trace columns in, row columns out (one row per trace)."""
    traces = [Trace(*fields) for fields in zip(*(batch[c] for c in _INPUT_COLUMNS))]
    out: dict[str, list] = {name: [] for name in _row_features()}
    for trace, row in zip(traces, encoder.encode_or_reason(traces)):
        if isinstance(row, EncodedTrace):
            record = {**row.record(), "drop_reason": ""}
        else:  # left out: an empty row that carries the reason
            record = {"trace_id": trace.trace_id, "input_ids": [], "loss_start": 0, "n_tokens": 0,
                      "truncated": False, "prompt_stop": 0, "think_end": -1, "blocks": [], "drop_reason": row}
        for name, value in record.items():
            out[name].append(value)
    return out


def _build(traces: Sequence[Trace], encoder: TraceEncoder, path: Path, num_proc: int | None) -> None:
    """Tokenise the traces into `path` (written beside it, then renamed into place)."""
    table = _datasets().Dataset.from_list([_trace_record(t) for t in traces])
    rows = table.map(_encode_batch, batched=True, batch_size=64, remove_columns=list(_INPUT_COLUMNS),
                     features=_row_features(), fn_kwargs={"encoder": encoder}, num_proc=num_proc,
                     desc="tokenising traces")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            rows.save_to_disk(str(tmp))
        except OSError as e:  # a full disk: one line naming the cache, not the temporary
            raise write_error(path, e) from e
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not another process that renamed the same key first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_traces(traces: Sequence[Trace], encoder: TraceEncoder, cache_dir: str | Path, *,
                    num_proc: int | None = None) -> TokenizedTraces:
    """The rows of `traces` under `encoder`, from ``cache_dir/<cache_key>`` if it exists, else
    tokenised now and saved there. `num_proc` tokenises in that many processes."""
    load_from_disk = _datasets().load_from_disk
    if not traces:
        raise ValueError("no traces to tokenise")
    path = Path(cache_dir) / cache_key(traces, encoder)
    reused = path.is_dir()
    if not reused:
        _build(traces, encoder, path, num_proc)
    table = load_from_disk(str(path))
    if len(table) != len(traces):
        raise ValueError(f"the tokenised cache {path} holds {len(table)} rows for {len(traces)} traces; "
                         "delete it to rebuild")
    reasons = table["drop_reason"]
    ids = table["trace_id"]
    dropped = {i: r for i, r in zip(ids, reasons) if r}
    kept = [n for n, r in enumerate(reasons) if not r]
    rows = table if len(kept) == len(table) else table.select(kept, keep_in_memory=True)
    truncated = [i for i, t in zip(rows["trace_id"], rows["truncated"]) if t]
    n_tokens = [min(n, encoder.max_length or n) for n in rows["n_tokens"]]
    rows = rows.with_format("numpy", columns=["input_ids"], output_all_columns=True)
    log.info("tokenised traces %s %s: %d rows, %d dropped, %d truncated", "reused from" if reused else "written to",
             path, len(rows), len(dropped), len(truncated))
    return TokenizedTraces(rows, dropped, truncated, path, reused, n_tokens)
