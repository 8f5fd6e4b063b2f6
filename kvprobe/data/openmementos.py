"""Read OpenMementos (microsoft/OpenMementos on the Hugging Face hub) as kvprobe `Trace`s.

What the format is, from the sources (nothing here is guessed beyond what they state):

- Dataset card, https://huggingface.co/datasets/microsoft/OpenMementos, README.md at hub
  commit caaf4bf. Two configs, one split (`train`, 228,557 rows), Parquet shards:
  `default` (data/train-*): `problem` (string), `response` (string), `domain` (string),
  `source` (string), `difficulty` (int64).
  `full` (full/train-*): the same five, plus `sentences` (sequence of string), `blocks`
  (sequence of sequence of int64) and `block_summaries` (sequence of string).
  `response` is the training-ready text: `<think>`, then per block
  `<|block_start|> ... <|block_end|>` `<|summary_start|> ... <|summary_end|>`, then
  `</think>` and the final answer.
- github.com/microsoft/memento at commit d8c10e66ff313844b4b5f063dd4c075d3ea56aab:
  README.md (the same six markers and the block structure), data/README.md (the pipeline's
  output fields `sentences`, `blocks`, `block_summaries`; its example `blocks` [[0, 5],
  [6, 12], [13, 20]] with `num_sentences` 21) and data/pipeline/segment.py:140
  (`blocks.append((j, i - 1))`: a block is [first, last] sentence indices, inclusive).

Not stated by the sources, so decided here (docs/traces.md, "Input format 3"):
- The rows carry no id: a trace's id is `{id_prefix}-{row}` (row: 0-based, in file order).
- The card gives `blocks`' type, not its index convention; the `full` columns are read
  with the pipeline's convention (inclusive pairs), and only when asked (`use="full"`).

Mapping onto `Trace`: `problem` -> prompt; with `use="response"` (the default) the blocks,
mementos and answer are parsed from `response` by `from_generated_text` (text before
`<think>` must be blank); with `use="full"` they come from `sentences`/`blocks`/
`block_summaries` by `from_pipeline_record`, and the answer from `response` after
`</think>`. `domain`, `source` and `difficulty` are not part of a `Trace` and are not used.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterable

from .quality import memento_flag, screen
from . import traces
from .traces import THINK_END, Trace, TraceError, from_generated_text, from_pipeline_record, read_lines

__all__ = ["HUB_ID", "CONFIGS", "read_openmementos", "from_openmementos_row"]

HUB_ID = "microsoft/OpenMementos"
CONFIGS = ("default", "full")  # the card's two configs
DEFAULT_COLUMNS = ("problem", "response", "domain", "source", "difficulty")
FULL_COLUMNS = ("sentences", "blocks", "block_summaries")
USES = ("response", "full")


def from_openmementos_row(row: dict[str, Any], trace_id: str, *, use: str = "response") -> Trace:
    """One OpenMementos row as a `Trace` (module docstring: the mapping)."""
    if use not in USES:
        raise TraceError(f"use must be one of {USES}, got {use!r}")
    if not isinstance(row, dict):
        raise TraceError(f"trace {trace_id!r}: a row must be an object, got {type(row).__name__}")
    need = ("problem", "response") + (FULL_COLUMNS if use == "full" else ())
    missing = [k for k in need if row.get(k) is None]
    if missing:
        hint = " (use='full' needs the hub's 'full' config)" if use == "full" else ""
        raise TraceError(f"trace {trace_id!r}: missing column(s) {', '.join(missing)}{hint}")
    problem, response = row["problem"], row["response"]
    for name, value in (("problem", problem), ("response", response)):
        if not isinstance(value, str):
            raise TraceError(f"trace {trace_id!r}: column {name!r} must be a string, got {type(value).__name__}")
        if len(value) > traces.MAX_LINE_BYTES:  # a Parquet row is read whole: the limit of a JSONL line
            raise TraceError(f"trace {trace_id!r}: column {name!r} is longer than {traces.MAX_LINE_BYTES:,} "
                             "characters (kvprobe.data.traces.MAX_LINE_BYTES)")
    parsed = from_generated_text(response, trace_id)
    if parsed.prompt:
        raise TraceError(f"trace {trace_id!r}: 'response' has text before <think> ({parsed.prompt[:30]!r}); "
                         "OpenMementos responses start with <think>")
    if use == "response":
        return Trace(trace_id, problem.strip(), parsed.blocks, parsed.summaries, parsed.answer)
    record = {"task_id": trace_id, "problem": problem, "sentences": _as_list(row["sentences"]),
              "blocks": [_as_list(b) for b in _as_list(row["blocks"])],
              "block_summaries": _as_list(row["block_summaries"])}
    if THINK_END in response:
        record["answer"] = response.split(THINK_END, 1)[1]
    trace = from_pipeline_record(record)
    if trace.n_blocks != parsed.n_blocks:
        raise TraceError(f"trace {trace_id!r}: 'blocks' has {trace.n_blocks} blocks but 'response' has "
                         f"{parsed.n_blocks}")
    return trace


def _as_list(value: Any) -> Any:
    """Parquet/`datasets` sequences may arrive as numpy arrays; the pipeline reader wants lists of ints."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    return value


def _rows_from_file(path: Path) -> Iterable[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TraceError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        yield from pq.read_table(path).to_pylist()
        return
    if path.suffix != ".jsonl":
        raise TraceError(f"{path}: OpenMementos files are read as .parquet (as the hub ships them) or .jsonl")
    for lineno, line in read_lines(path):  # a line longer than MAX_LINE_BYTES, or not UTF-8, is refused
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _rows_from_hub(config: str, limit: int | None) -> Iterable[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise TraceError("loading OpenMementos from the hub needs the 'datasets' package") from None
    ds = load_dataset(HUB_ID, config, split="train", streaming=True)
    return ds if limit is None else itertools.islice(ds, limit)


def read_openmementos(path: str | Path | None = None, *, use: str = "response", limit: int | None = None,
                      id_prefix: str | None = None, summary_check: str = "refuse",
                      allow_download: bool = False) -> list[Trace]:
    """OpenMementos rows as `Trace`s, from a local .parquet/.jsonl file or (opt-in) the hub.

    `path`: a local file with the card's columns. With `path` None the rows are streamed from
    the hub (`HUB_ID`, config "full" when `use="full"`, else "default"), which needs
    `allow_download=True`: nothing reaches the network otherwise. `limit`: read at most this
    many rows. Ids are `{id_prefix}-{row}` (default prefix: the file stem, or "OpenMementos").
    Templated or content-free mementos are flagged as in `read_jsonl` (`summary_check`).
    Errors name the file and row."""
    if use not in USES:
        raise TraceError(f"use must be one of {USES}, got {use!r}")
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be at least 1, got {limit}")
    if path is None:
        if not allow_download:
            raise TraceError(f"no OpenMementos file given, and reading {HUB_ID} from the hub is off: pass a local "
                             ".parquet/.jsonl path, or allow downloads (model.allow_download)")
        where, rows = HUB_ID, _rows_from_hub("full" if use == "full" else "default", limit)
        prefix = id_prefix or "OpenMementos"
    else:
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"{path}: no such file")
        where, rows = str(path), _rows_from_file(path)
        prefix = id_prefix or path.stem
    traces: list[Trace] = []
    flags: dict[str, str] = {}
    for row_no, row in enumerate(rows):
        if limit is not None and row_no >= limit:
            break
        try:
            trace = from_openmementos_row(row, f"{prefix}-{row_no}", use=use)
        except TraceError as e:
            raise TraceError(f"{where}: row {row_no}: {e}") from None
        traces.append(trace)
        reason = memento_flag(trace.blocks, trace.summaries)
        if reason is not None:
            flags[trace.trace_id] = reason
    if not traces:
        raise TraceError(f"{where}: no rows")
    try:
        dropped = screen(flags, len(traces), summary_check, where)
    except ValueError as e:
        raise TraceError(str(e)) from None
    traces = [t for t in traces if t.trace_id not in dropped]
    if not traces:
        raise TraceError(f"{where}: every row was flagged and dropped (data.summary_check: drop)")
    return traces
