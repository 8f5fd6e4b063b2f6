"""Real reasoning traces: read them, render them in the Memento token format, tokenize them.

Two input formats (SPEC section 6, docs/traces.md):

    read_jsonl(path)                 the Memento data pipeline's JSONL, one record a line
    from_generated_text(text, id)    text as a served Memento model emits it

Both give a `Trace`: prompt, block contents, mementos, answer. `render` writes a trace
in the token format of SPEC section 1 with this whitespace (the Qwen3 convention):

    {prompt}\\n<think>\\n            (or, with a chat template, the prompt as it renders it)
    <|block_start|>{T_1}<|block_end|>\\n<|summary_start|>{M_1}<|summary_end|>\\n
    \\n
    <|block_start|>{T_2}<|block_end|>\\n<|summary_start|>{M_2}<|summary_end|>\\n
    </think>\\n\\n{answer}

Block and memento text touch their markers (no padding spaces). `tokenize_trace` turns a
trace into token ids and a parsed `Layout`; the tokenizer must already hold the six
marker tokens (`add_memento_tokens` adds them, explicitly, and initialises the model's
new embedding rows).

Limits, so that a damaged or foreign file is refused in one line instead of filling memory
(tokenizing a megabyte of text takes some 300 MB):

    MAX_LINE_BYTES    the longest line of a trace file (a JSONL record, or a whole generated-text
                      file): 4 MiB; a 128K-token trace with its served ids takes about 1.5 MB.
                      Refused naming the file and line, before the line is parsed.
    MAX_TRACE_TOKENS  the longest trace kvprobe tokenizes or feeds: 131,072 tokens (Qwen3's
                      context; the paper's traces stay within 32,768). Refused naming the trace.

Both are module constants, read at each call (set `kvprobe.data.traces.MAX_LINE_BYTES` to read
longer records). A file that is not UTF-8 is refused naming the file and line.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..memento.layout import SPECIAL_TOKEN_STRINGS, Layout, LayoutError, SpecialTokens, parse_layout
from .chat import prompt_text
from .memento_text import EOS_STRINGS, MARKER_RE, split_served_text
from .quality import memento_flag, record_flag, screen
from .tokens import RELATED_WORDS, add_memento_tokens
from ..errors import KVProbeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ANSWER_KEYS",
    "MAX_LINE_BYTES",
    "MAX_TRACE_TOKENS",
    "PROMPT_KEYS",
    "RELATED_WORDS",
    "Trace",
    "TraceError",
    "add_memento_tokens",
    "check_trace_length",
    "encode_text",
    "from_generated_text",
    "from_pipeline_record",
    "parse_trace_ids",
    "prompt_head",
    "read_generated",
    "read_jsonl",
    "read_lines",
    "render",
    "end_of_turn_ids",
    "render_with_spans",
    "served_ids_differ",
    "tokenize_trace",
]

# record keys that may hold the problem text / the text after </think>, first match wins. The
# Memento pipeline (microsoft/memento data/pipeline/run_full_pipeline.py) writes `problem` with
# --include-problem and, without it, copies the input's fields as `original_<key>`.
PROMPT_KEYS = ("problem", "question", "prompt", "original_problem", "original_question", "original_prompt")
ANSWER_KEYS = ("think_suffix", "answer")
# what the pipeline writes in place of a summary it could not make (summarize_iterative.py)
PLACEHOLDER_SUMMARIES = ("Summarization failed", "[Missing summary]")
MAX_LINE_BYTES = 4 * 2**20  # the longest line of a trace file (module docstring: Limits)
MAX_TRACE_TOKENS = 2**17  # the longest trace in tokens, 131,072 (module docstring: Limits)

BS, BE = SPECIAL_TOKEN_STRINGS["block_start"], SPECIAL_TOKEN_STRINGS["block_end"]
SS, SE = SPECIAL_TOKEN_STRINGS["summary_start"], SPECIAL_TOKEN_STRINGS["summary_end"]
THINK, THINK_END = SPECIAL_TOKEN_STRINGS["think"], SPECIAL_TOKEN_STRINGS["think_end"]


class TraceError(KVProbeError, ValueError):
    """A trace (or its source record) is malformed."""


@dataclass
class Trace:
    """One reasoning trace: prompt, thinking blocks with their mementos, answer.

    `blocks[i]` is the text of T_i (content only, no markers); `summaries[i]` its memento
    M_i. `answer` is the text after </think>, or None when the trace has no </think>.
    `token_ids`: the ids a server produced the trace with (prompt then completion), when
    known; a capture feeds them (`kvprobe.data.trace_source`, `data.token_ids`) and reports
    where its own tokenization differs (`served_ids_differ`).
    """

    trace_id: str
    prompt: str
    blocks: list[str]
    summaries: list[str]
    answer: str | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        tid = self.trace_id
        if not isinstance(tid, str) or not tid:
            raise TraceError(f"trace id must be a non-empty string, got {tid!r}")
        if len(self.blocks) != len(self.summaries):
            raise TraceError(f"trace {tid!r}: {len(self.blocks)} blocks but {len(self.summaries)} summaries")
        fields = [("prompt", None, self.prompt), ("answer", None, self.answer)]
        fields += [("block", i, t) for i, t in enumerate(self.blocks)]
        fields += [("summary", i, t) for i, t in enumerate(self.summaries)]
        for name, i, text in fields:
            where = f"trace {tid!r}, {name}" + ("" if i is None else f" {i}")
            if text is None and name == "answer":
                continue
            if not isinstance(text, str):
                raise TraceError(f"{where}: expected a string, got {type(text).__name__}")
            if i is not None and not text.strip():
                raise TraceError(f"{where} is empty")
            m = MARKER_RE.search(text)
            if m:
                raise TraceError(f"{where} contains the marker {m.group()} at character {m.start()}")

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


# ----------------------------------------------------------------------------- readers


def _first_key(record: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if record.get(k) is not None:
            value = record[k]
            if not isinstance(value, str):
                raise TraceError(f"field '{k}' must be a string, got {type(value).__name__}")
            return value.strip()
    return None


def _pipeline_fields(record: dict[str, Any]) -> tuple[str, list[str], list[Any], list[str]]:
    """The trace id, sentences, block pairs and summaries of a pipeline record, their types checked."""
    if not isinstance(record, dict):
        raise TraceError(f"a pipeline record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("task_id", "sentences", "blocks", "block_summaries") if k not in record]
    if missing:
        raise TraceError(f"missing field(s) {', '.join(missing)}")
    tid = str(record["task_id"])
    sents, pairs, summaries = record["sentences"], record["blocks"], record["block_summaries"]
    if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
        raise TraceError(f"trace {tid!r}: field 'sentences' must be a list of strings")
    if not isinstance(summaries, list) or not all(isinstance(s, str) for s in summaries):
        raise TraceError(f"trace {tid!r}: field 'block_summaries' must be a list of strings")
    if not isinstance(pairs, list):
        raise TraceError(f"trace {tid!r}: field 'blocks' must be a list of [first, last] pairs")
    if len(summaries) != len(pairs):
        raise TraceError(f"trace {tid!r}: {len(pairs)} blocks but {len(summaries)} block_summaries")
    return tid, sents, pairs, summaries


def _check_block_pairs(tid: str, pairs: list[Any], n: int) -> None:
    """Refuse block pairs that are not [first, last] sentence ranges inside 0..n-1, in order, with no gap."""
    prev_last = None
    for i, pair in enumerate(pairs):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(type(v) is int for v in pair)
        if not ok:
            raise TraceError(f"trace {tid!r}: block {i} is {pair!r}, expected [first, last] integer sentence indices")
        first, last = pair
        if not 0 <= first <= last < n:
            raise TraceError(f"trace {tid!r}: block {i} = [{first}, {last}] is not a range inside 0..{n - 1}")
        if prev_last is not None and first != prev_last + 1:
            what = "overlaps" if first <= prev_last else "leaves a gap after"
            raise TraceError(f"trace {tid!r}: block {i} = [{first}, {last}] {what} block {i - 1} (ends at {prev_last})")
        prev_last = last


def _check_summaries(tid: str, summaries: list[str]) -> None:
    """Refuse the pipeline's failure placeholders and its one-reply-for-every-block fallback."""
    for i, summary in enumerate(summaries):
        if summary.strip() in PLACEHOLDER_SUMMARIES:
            raise TraceError(f"trace {tid!r}: block {i}'s summary is the pipeline's failure placeholder "
                             f"{summary.strip()!r}, not a memento; drop the record or summarize it again")
    if len(summaries) > 1 and len({s.strip() for s in summaries}) == 1:
        raise TraceError(f"trace {tid!r}: all {len(summaries)} block summaries are the same text (the pipeline's "
                         "fallback when no 'Summary N:' line parsed, the raw reply for every block); drop the record")


def from_pipeline_record(record: dict[str, Any]) -> Trace:
    """A `Trace` from one record of the Memento data pipeline (pipeline_results.jsonl).

    Needs `task_id`, `sentences` (strings), `blocks` ([first, last] inclusive sentence
    indices, in order, no gaps) and `block_summaries` (one per block). The prompt is the
    first of `problem`/`question`/`prompt`/`original_problem`/... (PROMPT_KEYS); the answer the
    first of `think_suffix`/`answer`. A record without any prompt key (absent or null) is
    refused: its prompt would silently be empty. The pipeline's failure placeholders ("Summarization
    failed", "[Missing summary]") and its one-reply-for-every-block fallback are refused.
    Sentences before the first block join the prompt, those after the last the answer.
    Sentences are stripped and joined with one space.
    """
    tid, sents, pairs, summaries = _pipeline_fields(record)
    n = len(sents)
    _check_block_pairs(tid, pairs, n)

    def join(idx: range) -> str:
        return " ".join(s.strip() for s in (sents[j] for j in idx) if s.strip())

    try:
        problem = _first_key(record, PROMPT_KEYS)
        suffix = _first_key(record, ANSWER_KEYS)
    except TraceError as e:
        raise TraceError(f"trace {tid!r}: {e}") from None
    if problem is None:
        raise TraceError(f"trace {tid!r}: no problem field (none of {', '.join(PROMPT_KEYS)} is present and not "
                         "null), so its prompt would be empty; the pipeline writes 'problem' with --include-problem")
    _check_summaries(tid, summaries)
    pre = join(range(pairs[0][0])) if pairs else join(range(n))
    post = join(range(pairs[-1][1] + 1, n)) if pairs else ""
    prompt = "\n\n".join(t for t in (problem, pre) if t)
    answer_parts = [t for t in (post, suffix) if t]
    answer = "\n\n".join(answer_parts) if answer_parts else (suffix if suffix is not None else None)
    blocks = [join(range(first, last + 1)) for first, last in pairs]
    served = record.get("token_ids")
    if served is not None and not (isinstance(served, list) and all(isinstance(i, int) for i in served)):
        raise TraceError(f"trace {tid!r}: 'token_ids' must be a list of integers")
    return Trace(tid, prompt, blocks, [s.strip() for s in summaries], answer,
                 tuple(served) if served is not None else None)


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file, never holding more than one line. A line
    longer than `MAX_LINE_BYTES` or not UTF-8 is a TraceError naming the file and the line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno in count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise TraceError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes "
                                 "(kvprobe.data.traces.MAX_LINE_BYTES); is this a trace file?")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            yield lineno, text


def read_jsonl(path: str | Path, *, summary_check: str = "refuse") -> list[Trace]:
    """Every pipeline record of a JSONL file as a `Trace`; errors name the line. Blank lines are skipped.

    Records whose mementos are templated or content-free, or that the pipeline scored 0
    (`avg_final_score`), are flagged (kvprobe.data.quality); `summary_check` says what then:
    "refuse" (a TraceError naming the count and the first ids), "drop" or "keep" (a warning)."""
    path = Path(path)
    traces: list[Trace] = []
    seen: dict[str, int] = {}
    flags: dict[str, str] = {}
    suffix_missing = set()  # ids of records with no think_suffix key at all (not: null)
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            trace = from_pipeline_record(record)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except TraceError as e:
            raise TraceError(f"{path}:{lineno}: {e}") from None
        if trace.trace_id in seen:
            first = seen[trace.trace_id]
            raise TraceError(f"{path}:{lineno}: trace id {trace.trace_id!r} already used on line {first}")
        seen[trace.trace_id] = lineno
        traces.append(trace)
        reason = record_flag(record, trace.blocks, trace.summaries)
        if reason is not None:
            flags[trace.trace_id] = reason
        if "think_suffix" not in record:
            suffix_missing.add(trace.trace_id)
    if not traces:
        raise TraceError(f"{path}: no records")
    try:
        dropped = screen(flags, len(traces), summary_check, str(path))
    except ValueError as e:
        raise TraceError(str(e)) from None
    traces = [t for t in traces if t.trace_id not in dropped]
    if not traces:
        raise TraceError(f"{path}: every record was flagged and dropped (data.summary_check: drop)")
    unfinished = [t.trace_id for t in traces if t.answer is None]
    if unfinished:
        missing = sum(tid in suffix_missing for tid in unfinished)
        why = [f"think_suffix missing in {missing}" if missing else "",
               f"think_suffix null in {len(unfinished) - missing} (their source reasoning had no </think>)"
               if len(unfinished) > missing else ""]
        warnings.warn(f"{path}: {len(unfinished)} of {len(traces)} traces have no text after </think> "
                      f"({'; '.join(w for w in why if w)}); they are used without an answer", stacklevel=2)
    return traces


def from_generated_text(text: str, trace_id: str, *, drop_unfinished: bool = False) -> Trace:
    """Parse Memento-format text as a served model emits it (``skip_special_tokens: false``).

    `prompt <think> (<|block_start|> T <|block_end|> <|summary_start|> M <|summary_end|>)*
    </think> answer`. The prompt is the text before <think> (or before the first block if
    there is no <think>); only whitespace may stand between a block, its memento and the
    next block. Fields are stripped; end-of-turn tokens (<|im_end|>, ...) after the answer
    are dropped. A trailing unfinished block (a truncated generation) is an error unless
    ``drop_unfinished=True``; without </think> the answer is None.
    """
    prompt, blocks, summaries, answer = split_served_text(text, trace_id, drop_unfinished, error=TraceError)
    return Trace(trace_id, prompt, blocks, summaries, answer)


def read_generated(path: str | Path, trace_id: str | None = None, *, summary_check: str = "refuse",
                   **kw: Any) -> Trace:
    """`from_generated_text` on a file; the trace id defaults to the file's stem.

    Templated or content-free mementos are flagged as in `read_jsonl`; "drop" leaves nothing,
    so it refuses too."""
    path = Path(path)
    if path.stat().st_size > MAX_LINE_BYTES:
        raise TraceError(f"{path}: {path.stat().st_size:,} bytes, longer than one trace may be "
                         f"({MAX_LINE_BYTES:,} bytes, kvprobe.data.traces.MAX_LINE_BYTES)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    trace = from_generated_text(text, trace_id or path.stem, **kw)
    reason = memento_flag(trace.blocks, trace.summaries)
    try:
        dropped = screen({trace.trace_id: reason} if reason else {}, 1, summary_check, str(path))
    except ValueError as e:
        raise TraceError(str(e)) from None
    if dropped:
        raise TraceError(f"{path}: its one trace was flagged and dropped (data.summary_check: drop)")
    return trace


# ----------------------------------------------------------------------------- rendering


def render_with_spans(trace: Trace, head: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """`render(trace)` and the (start, stop) character span of each block's content in it.

    head: what stands before <think>, the prompt as a chat template renders it
    (`kvprobe.data.chat.prompt_text`); None: `{prompt}\\n`."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    add(head if head is not None else (trace.prompt + "\n" if trace.prompt else ""))
    add(THINK + "\n")
    for i, (content, summary) in enumerate(zip(trace.blocks, trace.summaries)):
        if i:
            add("\n")
        add(BS)
        spans.append((pos, pos + len(content)))
        add(content + BE + "\n" + SS + summary + SE + "\n")
    if trace.answer is not None:
        add(THINK_END + ("\n\n" + trace.answer if trace.answer else ""))
    return "".join(parts), spans


def render(trace: Trace) -> str:
    """The trace as text in the Memento token format (whitespace: see the module docstring)."""
    return render_with_spans(trace)[0]


def prompt_head(trace: Trace, tokenizer: Any, chat_template: str | None) -> str | None:
    """The head `render_with_spans` takes: the prompt in `chat_template`, or None without one."""
    return None if chat_template is None else prompt_text(trace.prompt, tokenizer, chat_template)


# ----------------------------------------------------------------------------- tokenizing


def encode_text(text: str, tokenizer: Any, *, offsets: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of `text` with the tokenizer's own special-token convention (Qwen3 adds no
    BOS; tokenizers that need one add it). With `offsets`, also each token's character span."""
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise TraceError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are unavailable")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=offsets)
    return list(enc["input_ids"]), ([tuple(o) for o in enc["offset_mapping"]] if offsets else None)


def check_trace_length(ids: Sequence[int], trace: Trace, what: str) -> None:
    """TraceError naming the trace if its token ids are more than `MAX_TRACE_TOKENS`."""
    if len(ids) > MAX_TRACE_TOKENS:
        raise TraceError(f"trace {trace.trace_id!r}: {len(ids):,} {what}, more than {MAX_TRACE_TOKENS:,} "
                         "(kvprobe.data.traces.MAX_TRACE_TOKENS)")


def parse_trace_ids(ids: list[int], special: SpecialTokens, trace: Trace, what: str) -> Layout:
    """Parse a trace's token ids; TraceError naming the trace if the structure is invalid
    or the block count differs from the trace's (a marker split into several tokens)."""
    try:
        layout = parse_layout(ids, special)
    except LayoutError as e:
        raise TraceError(f"trace {trace.trace_id!r}: {what} are not valid Memento structure: {e}") from None
    if layout.n_blocks != trace.n_blocks:
        raise TraceError(
            f"trace {trace.trace_id!r}: {what} hold {layout.n_blocks} blocks, expected {trace.n_blocks} "
            "(are the markers single tokens in this tokenizer?)"
        )
    return layout


def tokenize_trace(trace: Trace, tokenizer: Any, special: SpecialTokens | None = None, *,
                   chat_template: str | None = None) -> tuple[torch.Tensor, Layout]:
    """Render, tokenize and parse one trace: input_ids (T,) int64 and its `Layout`.

    `special` defaults to `SpecialTokens.from_tokenizer(tokenizer)`, which raises if the
    markers are missing (add them with `add_memento_tokens`, never silently). A trace of more
    than `MAX_TRACE_TOKENS` tokens is refused (TraceError).
    `chat_template` (Jinja text, `kvprobe.data.chat.resolve_chat_template`) wraps the prompt.
    """
    import torch  # reading, writing and checking traces needs no torch; tokenizing one for a model does

    special = special or SpecialTokens.from_tokenizer(tokenizer)
    ids, _ = encode_text(render_with_spans(trace, prompt_head(trace, tokenizer, chat_template))[0], tokenizer)
    check_trace_length(ids, trace, "rendered tokens")
    layout = parse_trace_ids(ids, special, trace, "rendered tokens")
    return torch.tensor(ids, dtype=torch.long), layout


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids of the end-of-turn tokens a served sequence may end with: the tokenizer's eos and
    those of `EOS_STRINGS` it knows."""
    vocab = tokenizer.get_vocab()
    return {i for i in (getattr(tokenizer, "eos_token_id", None), *(vocab.get(t) for t in EOS_STRINGS))
            if i is not None}


def served_ids_differ(trace: Trace, ids: Sequence[int], ends: set[int]) -> bool:
    """Whether kvprobe's tokens `ids` of `trace` differ from the ids it was served with.

    The served sequence may end with end-of-turn tokens (`ends`, `end_of_turn_ids`) that the
    parsed trace drops; those are not compared. False when the trace has no served ids."""
    if trace.token_ids is None:
        return False

    def trimmed(seq: Sequence[int]) -> list[int]:
        out = list(seq)
        while out and out[-1] in ends:
            out.pop()
        return out

    return trimmed(trace.token_ids) != trimmed(ids)
