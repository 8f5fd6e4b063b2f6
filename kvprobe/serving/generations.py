"""The generations file (one JSON line per finished prompt, resumable), prompts in, pipeline JSONL out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..data.traces import Trace, TraceError, read_lines
from ..files import Appender, check_not_input, check_ours, replacing
from .checks import check_at_least

EXPORTED_BY = "kvprobe export-traces"  # the first field of every exported record: kvprobe knows its files by it
_EXPORT_START = json.dumps({"exported_by": EXPORTED_BY})[:-1].encode()
_RECORD_START = re.compile(rb'\{"prompt_id": "(?:[^"\\]|\\.)*", "text": ')  # how every generation line begins


def _is_generations(head: bytes) -> bool:
    """Whether a file's first bytes are those of a generations file kvprobe wrote (a first record cut off
    by a crash counts)."""
    return bool(_RECORD_START.match(head)) or (b"\n" not in head and head.startswith(b'{"prompt_id": "'))


def _is_export(head: bytes) -> bool:
    """Whether a file's first bytes are those of a traces file `export_pipeline_jsonl` wrote."""
    return head.startswith(_EXPORT_START)


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate a trace for.

    text:    what is sent: the user message (chat endpoint) or the whole prompt string
             (completions endpoint, e.g. an already chat-templated prompt)
    problem: the text recorded as the trace's prompt; defaults to `text`
    """

    prompt_id: str
    text: str
    problem: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_id, str) or not self.prompt_id:
            raise ValueError(f"prompt_id must be a non-empty string, got {self.prompt_id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt {self.prompt_id!r}: text must be a non-empty string")

    @property
    def trace_prompt(self) -> str:
        return (self.problem if self.problem is not None else self.text).strip()


@dataclass
class Generation:
    """One finished prompt: the raw text and either its parsed `Trace` or the parse error."""

    prompt_id: str
    text: str
    finish_reason: str | None = None
    trace: Trace | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None  # what the server tokenized the prompt to (chat template applied)
    token_ids: list[int] | None = None  # the ids it generated
    endpoint: str | None = None  # the base URL of the server that answered (None: generated offline)

    def to_json(self) -> dict[str, Any]:
        t = self.trace
        return {
            "prompt_id": self.prompt_id,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "trace": None if t is None else {
                "trace_id": t.trace_id, "prompt": t.prompt, "blocks": t.blocks,
                "summaries": t.summaries, "answer": t.answer,
            },
            "error": self.error,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "endpoint": self.endpoint,
        }

    @property
    def served_ids(self) -> tuple[int, ...] | None:
        """The whole served sequence, prompt then completion (None unless the server gave both)."""
        if self.prompt_token_ids is None or self.token_ids is None:
            return None
        return tuple(self.prompt_token_ids) + tuple(self.token_ids)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Generation":
        t = record.get("trace")
        g = cls(
            prompt_id=record["prompt_id"],
            text=record.get("text", ""),
            finish_reason=record.get("finish_reason"),
            error=record.get("error"),
            usage=record.get("usage"),
            prompt_token_ids=record.get("prompt_token_ids"),
            token_ids=record.get("token_ids"),
            endpoint=record.get("endpoint"),
        )
        if t is not None:
            g.trace = Trace(t["trace_id"], t["prompt"], list(t["blocks"]), list(t["summaries"]), t.get("answer"),
                            g.served_ids)
        return g


_PROMPT_ID_KEYS = ("prompt_id", "id", "task_id")


_PROMPT_TEXT_KEYS = ("prompt", "problem", "question")


def _repair_tail(path: Path) -> None:
    """Drop a last line cut off by a crash (a file that does not end with a newline); only for a file
    `check_ours` found to be a generations file."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every complete line; a cut-off last line is ignored."""
    for lineno, line in read_lines(path):  # a line too long or not UTF-8 is refused, naming the file and line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if not line.endswith("\n"):  # the last line, its write cut off by a crash: redone on the next run
                return
            raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg}); fix or remove it") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt_id"), str):
            raise ValueError(f"{path}:{lineno}: not a generation record (no string 'prompt_id')")
        yield lineno, record


def completed_ids(path: str | Path) -> set[str]:
    """Prompt ids already in an output file (empty if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    return {record["prompt_id"] for _, record in _records(path)}


def read_generations(path: str | Path) -> list[Generation]:
    """Every record of an output file of `generate_traces`, in file order."""
    path = Path(path)
    out: list[Generation] = []
    for lineno, record in _records(path):
        try:
            out.append(Generation.from_json(record))
        except (KeyError, TypeError, TraceError) as e:
            raise ValueError(f"{path}:{lineno}: bad generation record: {e}") from None
    return out


# what says where or at what cost a record was generated, not what was generated
_BOOKKEEPING = frozenset({"usage", "endpoint"})


def merge_generations(paths: str | Path | Iterable[str | Path]) -> list[Generation]:
    """The records of one or several output files, each prompt id once, in first-seen order.

    A prompt id found again with the same content (everything but `usage` and `endpoint`)
    is one record; found again with other content it is refused (ValueError naming the id,
    both places and the fields that differ).
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no generations file given")
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    out: list[Generation] = []
    for path in paths:
        for lineno, record in _records(path):
            where = f"{path}:{lineno}"
            content = {k: v for k, v in record.items() if k not in _BOOKKEEPING}
            pid = record["prompt_id"]
            if pid in seen:
                first, before = seen[pid]
                fields = sorted(k for k in set(before) | set(content) if before.get(k) != content.get(k))
                if fields:  # a key missing in one file and null in the other is no difference
                    raise ValueError(f"prompt id {pid!r} is in {first} and {where} with different content "
                                     f"({', '.join(fields)} differ): keep one of them")
                continue
            seen[pid] = (where, content)
            try:
                out.append(Generation.from_json(record))
            except (KeyError, TypeError, TraceError) as e:
                raise ValueError(f"{where}: bad generation record: {e}") from None
    return out


def trace_to_pipeline_record(trace: Trace) -> dict[str, Any]:
    """A Memento data-pipeline record (what `kvprobe.data.traces.read_jsonl` reads) holding `trace`.

    Each block is one "sentence", so `read_jsonl` gives the same trace back.
    """
    record: dict[str, Any] = {
        "task_id": trace.trace_id,
        "problem": trace.prompt,
        "sentences": list(trace.blocks),
        "blocks": [[i, i] for i in range(trace.n_blocks)],
        "block_summaries": list(trace.summaries),
    }
    if trace.answer is not None:
        record["answer"] = trace.answer
    if trace.token_ids is not None:
        record["token_ids"] = list(trace.token_ids)  # the served ids, checked at capture
    return record


def export_pipeline_jsonl(generations: str | Path | Iterable[str | Path], out: str | Path, *, min_blocks: int = 1,
                          require_answer: bool = False) -> int:
    """Write the parsed traces of one or several output files as pipeline JSONL for `kvprobe capture`.

    Several files are merged by `merge_generations`: a prompt id once, conflicting
    duplicates refused.

    Records with a parse error, fewer than `min_blocks` blocks, or (with `require_answer`)
    no ``</think>`` are left out. Traces are written sorted by id, so the file (and the
    capture's trace order) does not depend on the order in which requests finished.
    Returns the number of traces written. For the leakage
    experiment `min_blocks` must cover the target block plus the largest offset
    (target block 1 and offsets up to +2 need 4 blocks).

    Each record starts with ``"exported_by": "kvprobe export-traces"`` (readers ignore it): an
    existing `out` is replaced only if it starts so, and never if it is one of the inputs.
    """
    check_at_least("min_blocks", min_blocks, 0)
    sources = [generations] if isinstance(generations, (str, Path)) else list(generations)
    out = Path(out)
    check_not_input(out, sources)
    check_ours(out, _is_export, "a traces file", "give a new --out, or delete it yourself first")
    kept = sorted((g.trace for g in merge_generations(sources)
                   if g.trace is not None and g.trace.n_blocks >= min_blocks
                   and (g.trace.answer is not None or not require_answer)), key=lambda t: t.trace_id)
    with replacing(out) as f:
        for trace in kept:
            record = {"exported_by": EXPORTED_BY, **trace_to_pipeline_record(trace)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(kept)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: an id (``prompt_id``, ``id`` or ``task_id``) and a text
    (``prompt``, ``problem`` or ``question``) per line; an optional ``problem`` beside a
    ``prompt`` becomes the recorded trace prompt."""
    path = Path(path)
    prompts: list[Prompt] = []
    for lineno, line in read_lines(path):  # a line too long or not UTF-8 is refused, naming the file and line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pid = next(str(record[k]) for k in _PROMPT_ID_KEYS if record.get(k) is not None)
            key = next(k for k in _PROMPT_TEXT_KEYS if isinstance(record.get(k), str))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        except (StopIteration, AttributeError):
            raise ValueError(f"{path}:{lineno}: needs an id ({'/'.join(_PROMPT_ID_KEYS)}) and a text "
                             f"({'/'.join(_PROMPT_TEXT_KEYS)})") from None
        problem = record.get("problem") if key == "prompt" else None
        prompts.append(Prompt(pid, record[key], problem if isinstance(problem, str) else None))
    return prompts


def _check_unique(prompts: Sequence[Prompt]) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.prompt_id in seen:
            raise ValueError(f"prompt id {p.prompt_id!r} appears twice in the prompts")
        seen.add(p.prompt_id)


class _Writer:
    """Appends generation records to the output file, one whole line each (`kvprobe.files.Appender`).

    A file that is not a generations file kvprobe wrote is refused before anything is touched,
    its last line included. The file (and its folder) is created at the first record, so a run
    that fails before any prompt finishes (an unreachable server) leaves nothing behind."""

    def __init__(self, path: Path) -> None:
        check_ours(path, _is_generations, "a generations file",
                   "give a new --out (kvprobe appends only to a generations file it wrote)")
        _repair_tail(path)
        self.lines = Appender(path)

    def write(self, generation: Generation) -> None:
        self.lines.write_line(json.dumps(generation.to_json(), ensure_ascii=False))

    def close(self) -> None:
        self.lines.close()
