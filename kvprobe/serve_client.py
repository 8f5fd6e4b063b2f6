"""Generate Memento traces from a served Memento model (the Memento vLLM fork).

The Memento vLLM fork (`microsoft/memento`, directory `vllm/`: an overlay on stock
vLLM 0.13) serves a Memento checkpoint behind an OpenAI-compatible API and evicts each
block's KV entries once its memento is complete. This module talks to such a server over
plain HTTP (``httpx``; the ``openai`` package is not needed) and turns the answers into
`kvprobe.traces.Trace` records:

    prompts = read_prompts("prompts.jsonl")            # {"prompt_id": ..., "prompt": ...} per line
    cfg = ClientConfig(base_url="http://127.0.0.1:8010/v1", model="memento", seed=0)
    generate_traces(prompts, "generations.jsonl", cfg)  # resumable; one JSON line per prompt
    export_pipeline_jsonl("generations.jsonl", "traces.jsonl", min_blocks=4)  # for kvprobe capture

Requests
    POST ``{base_url}/chat/completions`` (``endpoint="chat"``, the server's chat template
    wraps the prompt) or ``{base_url}/completions`` (``endpoint="completions"``, the prompt
    is sent verbatim). ``base_url`` follows the OpenAI convention and includes ``/v1``.
    Every request carries ``"skip_special_tokens": false``: without it the server strips
    the block markers and the structure is lost. Each prompt gets its own sampling seed,
    ``prompt_seed(seed, prompt_id)``, so a prompt's sample does not depend on the order in
    which prompts run or on a restart.

Retries
    Connection errors (any ``httpx.TransportError``: refused, reset, timeouts), HTTP 429
    and HTTP 5xx are retried with exponential backoff (``backoff * 2**(attempt - 1)``
    seconds, capped at ``max_backoff``, a ``Retry-After`` header is honoured up to that
    cap), at most ``max_attempts`` attempts in all. Other statuses (400, 404, ...) are not
    retried. Either way the failure is a `ServeError` naming the prompt id and the URL.

Output (resumable)
    One JSON object per finished prompt, appended and flushed as soon as it is done::

        {"prompt_id": "p1", "text": "<think>\\n<|block_start|>...", "finish_reason": "stop",
         "usage": {...}, "trace": {"trace_id": "p1", "prompt": ..., "blocks": [...],
         "summaries": [...], "answer": ...}, "error": null}

    The returned text is parsed with `kvprobe.traces.from_generated_text`. A text that is
    not a complete Memento trace (a truncated generation, broken structure) is recorded
    with ``"trace": null`` and the parse error in ``"error"``; it does not stop the run. The
    trace's prompt is the prompt's `Prompt.problem` text (the problem as you gave it), not
    whatever the completion holds before ``<think>``. On restart, prompt ids already in the
    output are skipped, so no id is ever written twice; a last line cut off by a crash is
    dropped and redone. When a request fails for good, no new requests are started, the
    requests in flight finish and are written, and the `ServeError` is raised. One process
    per output file.

`block_masking_config` builds the fork's ``--block-masking-config`` JSON from a
`kvprobe.masks.MaskConfig`; `serve_command` the whole server command line.
`generate_offline` runs the fork's offline ``vllm.LLM`` instead of a server (vLLM is
imported only there). ``python -m kvprobe.serve_client --help`` is a small command line
over the same functions. See docs/real_models.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import httpx
from tqdm.auto import tqdm

from .config import key_value_arg
from .masks import MaskConfig
from .traces import Trace, TraceError, from_generated_text

__all__ = [
    "ClientConfig",
    "Generation",
    "GenerationRun",
    "Prompt",
    "ServeError",
    "block_masking_config",
    "completed_ids",
    "export_pipeline_jsonl",
    "generate_offline",
    "generate_traces",
    "main",
    "parse_generation",
    "prompt_seed",
    "read_generations",
    "read_prompts",
    "request_body",
    "serve_command",
    "trace_to_pipeline_record",
]

# status codes worth another try: rate limiting and server-side failures
_RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
_PROMPT_ID_KEYS = ("prompt_id", "id", "task_id")
_PROMPT_TEXT_KEYS = ("prompt", "problem", "question")


class ServeError(RuntimeError):
    """A request failed for good: retries exhausted, or a status that is not retried.

    `prompt_id` names the prompt whose request failed.
    """

    def __init__(self, message: str, prompt_id: str | None = None) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


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


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server and how to sample.

    base_url includes the API version prefix (OpenAI convention): ``http://host:8010/v1``.
    top_k is a vLLM extension of the OpenAI API (left out of the request when None).
    extra_body is merged into every request body last (it may override any field, e.g.
    ``{"stop": [...]}``; overriding ``skip_special_tokens`` defeats the purpose).
    backoff/max_backoff are seconds; jitter adds up to that fraction of each wait at random.
    timeout is the read timeout of one request in seconds (long generations take minutes).
    """

    base_url: str = "http://127.0.0.1:8010/v1"
    model: str = "memento"
    endpoint: Literal["chat", "completions"] = "chat"
    max_tokens: int = 16384
    temperature: float = 0.6
    top_p: float | None = 0.95
    top_k: int | None = 20
    seed: int | None = 0
    concurrency: int = 8
    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: float = 0.1
    timeout: float = 3600.0
    connect_timeout: float = 10.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        for name in ("max_tokens", "concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("backoff, max_backoff and jitter must be >= 0")

    @property
    def url(self) -> str:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return self.base_url.rstrip("/") + path


@dataclass
class Generation:
    """One finished prompt: the raw text and either its parsed `Trace` or the parse error."""

    prompt_id: str
    text: str
    finish_reason: str | None = None
    trace: Trace | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None

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
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Generation":
        t = record.get("trace")
        return cls(
            prompt_id=record["prompt_id"],
            text=record.get("text", ""),
            finish_reason=record.get("finish_reason"),
            trace=None if t is None else Trace(t["trace_id"], t["prompt"], list(t["blocks"]),
                                               list(t["summaries"]), t.get("answer")),
            error=record.get("error"),
            usage=record.get("usage"),
        )


@dataclass(frozen=True)
class GenerationRun:
    """What one `generate_traces` call did."""

    total: int  # prompts given
    skipped: int  # already in the output file before this call
    generated: int  # written by this call
    parse_errors: int  # of those, recorded with an error instead of a trace


# ----------------------------------------------------------------------------- the fork's config


def block_masking_config(mask: MaskConfig, *, compact_on_summary_end: bool = True, **extra: Any) -> dict[str, Any]:
    """The vLLM fork's ``--block-masking-config`` for a kvprobe `MaskConfig`.

    ========================  ======================================================
    ``enable``                block masking on; False for plain causal attention
                              (``keep_last_n_blocks = -1``)
    ``keep_last_n_blocks``    as in MaskConfig: 0 evicts every completed block, N > 0
                              keeps the N most recent, -1 disables eviction
    ``mask_delimiters``       evict <|block_start|>/<|block_end|> with the content
                              (false for Qwen3/OLMo3, true for Phi-3/Phi-4)
    ``compact_on_summary_end``  evict when <|summary_end|> is produced (the Memento
                              behaviour; keep True)
    ``restart_mode``          after eviction, recompute the memento's KV without its
                              block (the paper's ablation)
    ========================  ======================================================

    Other keys the fork knows (``require_assistant_section``, ``keep_last_block_for_answer``,
    ``max_block_tokens``, ``debug``) pass through `extra`. The fork's restart mode
    re-prefills the memento tokens only, which is kvprobe's restart mask with the same
    ``mask_delimiters``. Restart mode without eviction (``keep_last_n_blocks = -1``) has no
    equivalent in the fork and raises ValueError.
    """
    if mask.restart_mode and mask.keep_last_n_blocks == -1:
        raise ValueError(
            "restart mode with keep_last_n_blocks=-1 has no equivalent in the vLLM fork "
            "(its restart mode works on evicted blocks); use keep_last_n_blocks >= 0"
        )
    config: dict[str, Any] = {
        "enable": mask.keep_last_n_blocks != -1,
        "keep_last_n_blocks": mask.keep_last_n_blocks,
        "mask_delimiters": mask.mask_delimiters,
        "compact_on_summary_end": compact_on_summary_end,
        "restart_mode": mask.restart_mode,
    }
    config.update(extra)
    return config


def serve_command(
    model_path: str,
    mask: MaskConfig = MaskConfig(),
    *,
    served_model_name: str = "memento",
    port: int = 8010,
    max_model_len: int = 32768,
    gpu_memory_utilization: float = 0.9,
    chat_template: str | None = "chat_templates/memento_nosys.jinja",
    extra_args: Sequence[str] = (),
    **config_extra: Any,
) -> list[str]:
    """The argv that starts the fork's OpenAI-compatible server for `model_path` under `mask`.

    Prefix caching is switched off: the fork requires it and does not do it itself.
    `chat_template` is relative to the fork's ``vllm/`` directory (None to use the
    checkpoint's own template). `config_extra` goes into the block-masking config.
    """
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", served_model_name,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--trust-remote-code",
        "--no-enable-prefix-caching",
    ]
    if chat_template:
        argv += ["--chat-template", chat_template]
    argv += ["--block-masking-config", json.dumps(block_masking_config(mask, **config_extra))]
    return argv + list(extra_args)


# ----------------------------------------------------------------------------- requests


def prompt_seed(seed: int | None, prompt_id: str) -> int | None:
    """The sampling seed of one prompt: a stable hash of (seed, prompt_id) in [0, 2**31)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def request_body(prompt: Prompt, config: ClientConfig) -> dict[str, Any]:
    """The JSON body of the request for one prompt."""
    body: dict[str, Any] = {"model": config.model}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    body.update(max_tokens=config.max_tokens, temperature=config.temperature, n=1, skip_special_tokens=False)
    if config.top_p is not None:
        body["top_p"] = config.top_p
    if config.top_k is not None:
        body["top_k"] = config.top_k
    seed = prompt_seed(config.seed, prompt.prompt_id)
    if seed is not None:
        body["seed"] = seed
    body.update(config.extra_body)
    return body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


def _post(
    client: httpx.Client, prompt_id: str, body: dict[str, Any], config: ClientConfig, sleep: Callable[[float], None]
) -> dict[str, Any]:
    """POST with bounded retries; the decoded JSON answer, or ServeError naming the prompt."""
    url = config.url
    last = "no attempt made"
    for attempt in range(1, config.max_attempts + 1):
        wait_at_least = 0.0
        try:
            response = client.post(url, json=body)
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if 200 <= response.status_code < 300:
                try:
                    return response.json()
                except ValueError:
                    raise ServeError(
                        f"prompt {prompt_id!r}: {url} answered HTTP {response.status_code} with a body that is "
                        f"not JSON: {response.text[:200]!r}", prompt_id) from None
            detail = response.text[:300].strip()
            if response.status_code not in _RETRY_STATUS:
                hint = " (does base_url end in /v1, and is the model name the server's?)" \
                    if response.status_code == 404 else ""
                raise ServeError(
                    f"prompt {prompt_id!r}: {url} answered HTTP {response.status_code}, not retried{hint}: {detail}",
                    prompt_id)
            last = f"HTTP {response.status_code}: {detail}"
            wait_at_least = _retry_after(response) or 0.0
        if attempt == config.max_attempts:
            break
        delay = max(config.backoff * 2 ** (attempt - 1), wait_at_least)
        delay = min(delay, config.max_backoff) * (1 + config.jitter * random.random())
        sleep(delay)
    raise ServeError(
        f"prompt {prompt_id!r}: gave up on {url} after {config.max_attempts} attempt(s); last error: {last}",
        prompt_id)


def _completion_text(payload: dict[str, Any], config: ClientConfig, prompt_id: str) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of an OpenAI-style completion answer.

    Chat answers split by a reasoning parser (``reasoning_content`` or ``reasoning`` beside
    ``content``) are joined back as ``<think>\\n{reasoning}\\n</think>\\n\\n{content}``.
    """
    try:
        choice = payload["choices"][0]
        if config.endpoint == "completions":
            text = choice["text"]
        else:
            message = choice["message"]
            text = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning and "<think>" not in text:
                text = f"<think>\n{reasoning}\n</think>\n\n{text}"
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ServeError(f"prompt {prompt_id!r}: unexpected answer from {config.url}: {str(payload)[:300]}",
                         prompt_id) from None
    if not isinstance(text, str):
        raise ServeError(f"prompt {prompt_id!r}: the answer's text is {type(text).__name__}, not a string", prompt_id)
    return text, choice.get("finish_reason"), payload.get("usage")


def parse_generation(prompt: Prompt, text: str, finish_reason: str | None = None, usage: Any = None) -> Generation:
    """Parse a generated text into a `Generation`: the trace, or the parse error (never raises TraceError).

    The trace's id is the prompt id and its prompt `Prompt.problem` (default: the text sent).
    """
    try:
        parsed = from_generated_text(text, prompt.prompt_id)
        trace = Trace(prompt.prompt_id, prompt.trace_prompt, parsed.blocks, parsed.summaries, parsed.answer)
    except TraceError as e:
        why = f" (finish_reason {finish_reason!r})" if finish_reason not in (None, "stop") else ""
        return Generation(prompt.prompt_id, text, finish_reason, None, f"{e}{why}", usage)
    return Generation(prompt.prompt_id, text, finish_reason, trace, None, usage)


def _generate_one(client: httpx.Client, prompt: Prompt, config: ClientConfig,
                  sleep: Callable[[float], None]) -> Generation:
    payload = _post(client, prompt.prompt_id, request_body(prompt, config), config, sleep)
    text, finish_reason, usage = _completion_text(payload, config, prompt.prompt_id)
    return parse_generation(prompt, text, finish_reason, usage)


# ----------------------------------------------------------------------------- the output file


def _repair_tail(path: Path) -> None:
    """Drop a last line cut off by a crash (a file that does not end with a newline)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every complete line; a cut-off last line is ignored."""
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                return  # a write cut off by a crash: redone on the next run
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


def trace_to_pipeline_record(trace: Trace) -> dict[str, Any]:
    """A Memento data-pipeline record (what `kvprobe.traces.read_jsonl` reads) holding `trace`.

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
    return record


def export_pipeline_jsonl(generations: str | Path, out: str | Path, *, min_blocks: int = 1,
                          require_answer: bool = False) -> int:
    """Write the parsed traces of an output file as pipeline JSONL for `kvprobe capture`.

    Records with a parse error, fewer than `min_blocks` blocks, or (with `require_answer`)
    no ``</think>`` are left out. Traces are written sorted by id, so the file (and the
    capture's trace order) does not depend on the order in which requests finished.
    Returns the number of traces written. For the leakage
    experiment `min_blocks` must cover the target block plus the largest offset
    (target block 1 and offsets up to +2 need 4 blocks).
    """
    kept = sorted((g.trace for g in read_generations(generations)
                   if g.trace is not None and g.trace.n_blocks >= min_blocks
                   and (g.trace.answer is not None or not require_answer)), key=lambda t: t.trace_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for trace in kept:
            f.write(json.dumps(trace_to_pipeline_record(trace), ensure_ascii=False) + "\n")
    return len(kept)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: an id (``prompt_id``, ``id`` or ``task_id``) and a text
    (``prompt``, ``problem`` or ``question``) per line; an optional ``problem`` beside a
    ``prompt`` becomes the recorded trace prompt."""
    path = Path(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
    """Appends generation records to the output file, one flushed line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        self.file = path.open("a", encoding="utf-8")

    def write(self, generation: Generation) -> None:
        self.file.write(json.dumps(generation.to_json(), ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- the run


def generate_traces(
    prompts: Iterable[Prompt],
    output: str | Path,
    config: ClientConfig = ClientConfig(),
    *,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    transport: httpx.BaseTransport | None = None,
) -> GenerationRun:
    """Generate a trace for every prompt not yet in `output` (JSONL), `config.concurrency` at a time.

    Appends one record per finished prompt (see the module docstring) and returns counts.
    Raises `ServeError` (after writing whatever else finished) when a request fails for
    good; run again to continue. `sleep` and `transport` are for tests.
    """
    prompts = list(prompts)
    _check_unique(prompts)
    output = Path(output)
    writer = _Writer(output)  # repairs a cut-off last line before the ids are read
    try:
        done = completed_ids(output)
        todo = [p for p in prompts if p.prompt_id not in done]
        skipped = len(prompts) - len(todo)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
        limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
        bar = tqdm(total=len(prompts), initial=skipped, unit="prompt", desc="generate", disable=not progress)
        written = parse_errors = 0
        failures: list[ServeError] = []
        with bar, httpx.Client(timeout=timeout, headers=headers, limits=limits, transport=transport) as client, \
                ThreadPoolExecutor(max_workers=config.concurrency) as pool:
            queue = iter(todo)
            pending: dict[Future[Generation], Prompt] = {}

            def submit_next() -> None:
                prompt = next(queue, None)
                if prompt is not None:
                    pending[pool.submit(_generate_one, client, prompt, config, sleep)] = prompt

            for _ in range(config.concurrency):
                submit_next()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    prompt = pending.pop(future)
                    try:
                        generation = future.result()
                    except ServeError as e:
                        failures.append(e)
                        continue
                    except Exception as e:  # unexpected: still name the prompt
                        failures.append(ServeError(f"prompt {prompt.prompt_id!r}: {type(e).__name__}: {e}",
                                                   prompt.prompt_id))
                        continue
                    writer.write(generation)
                    written += 1
                    parse_errors += generation.error is not None
                    bar.update(1)
                    bar.set_postfix(parse_errors=parse_errors, refresh=False)
                    if not failures:
                        submit_next()
    finally:
        writer.close()
    if failures:
        first = failures[0]
        more = f" ({len(failures) - 1} more request(s) failed too)" if len(failures) > 1 else ""
        raise ServeError(f"{first}{more}; {written} new record(s) written to {output}, "
                         f"run again to continue", first.prompt_id)
    return GenerationRun(len(prompts), skipped, written, parse_errors)


# ----------------------------------------------------------------------------- offline vLLM


def generate_offline(
    prompts: Iterable[Prompt],
    model_path: str,
    output: str | Path | None = None,
    *,
    mask: MaskConfig = MaskConfig(),
    chat: bool = True,
    max_tokens: int = 16384,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 20,
    seed: int | None = 0,
    max_model_len: int = 32768,
    chunk_size: int = 256,
    llm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Generate traces with the fork's offline engine (``vllm.LLM`` with ``block_masking_config``).

    Needs vLLM 0.13 with the Memento overlay installed; imported here only, so kvprobe
    works without it. With `chat`, each prompt's text is wrapped in the tokenizer's chat
    template (with the generation prompt). Prompts run in chunks of `chunk_size`; with an
    `output` file, each chunk is appended when done and prompts already there are skipped,
    as in `generate_traces`. Returns the generations of this call. Same per-prompt seeds.
    """
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "generate_offline needs vLLM with the Memento block-masking overlay, which is not installed: "
            "`pip install vllm==0.13.0`, then `bash install_overlay.sh` in the vllm/ directory of "
            "microsoft/memento (a CUDA GPU is required). Without it, serve the model elsewhere and use "
            "generate_traces"
        ) from e

    prompts = list(prompts)
    _check_unique(prompts)
    done = completed_ids(output) if output is not None else set()  # a cut-off last line does not count
    todo = [p for p in prompts if p.prompt_id not in done]
    try:
        llm = vllm.LLM(model=model_path, block_masking_config=block_masking_config(mask),
                       max_model_len=max_model_len, enable_prefix_caching=False, **(llm_kwargs or {}))
    except TypeError as e:
        if "block_masking_config" in str(e):
            raise ImportError("this vLLM does not know block_masking_config: apply the Memento overlay "
                              "(microsoft/memento, vllm/install_overlay.sh)") from e
        raise
    writer = _Writer(Path(output)) if output is not None else None  # opened once the engine is up
    try:
        tokenizer = llm.get_tokenizer()
        results: list[Generation] = []
        for start in tqdm(range(0, len(todo), chunk_size), desc="generate (vLLM)", unit="chunk", disable=not progress):
            chunk = todo[start : start + chunk_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                                   add_generation_prompt=True) if chat else p.text for p in chunk]
            params = [vllm.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                          seed=prompt_seed(seed, p.prompt_id), skip_special_tokens=False)
                      for p in chunk]
            for prompt, out in zip(chunk, llm.generate(texts, params)):
                completion = out.outputs[0]
                generation = parse_generation(prompt, completion.text, completion.finish_reason)
                results.append(generation)
                if writer is not None:
                    writer.write(generation)
        return results
    finally:
        if writer is not None:
            writer.close()


# ----------------------------------------------------------------------------- command line


def _mask_from_args(args: argparse.Namespace) -> MaskConfig:
    return MaskConfig(keep_last_n_blocks=args.keep_last_n_blocks, mask_delimiters=args.mask_delimiters,
                      restart_mode=args.restart_mode)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` (served model) and `generate-offline` (vLLM in-process)."""
    p.add_argument("--prompts", required=True, help="JSONL: prompt_id + prompt per line")
    p.add_argument("--out", required=True, help="output JSONL (appended; existing prompt ids are skipped)")
    p.add_argument("--max-tokens", type=int, default=ClientConfig.max_tokens)
    p.add_argument("--temperature", type=float, default=ClientConfig.temperature)
    p.add_argument("--top-p", type=float, default=ClientConfig.top_p)
    p.add_argument("--top-k", type=int, default=ClientConfig.top_k)
    p.add_argument("--seed", type=int, default=ClientConfig.seed)
    p.add_argument("--no-progress", action="store_true")


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-last-n-blocks", type=int, default=0, help="0 evicts every completed block (default)")
    p.add_argument("--mask-delimiters", action="store_true", help="evict the block delimiters too (Phi-4)")
    p.add_argument("--restart-mode", action="store_true", help="recompute memento KV without the block")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvprobe.serve_client {generate,export,serve-command}``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m kvprobe.serve_client", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate traces from a served Memento model (resumable)")
    _add_generation_args(g)
    g.add_argument("--base-url", default=ClientConfig.base_url)
    g.add_argument("--model", default=ClientConfig.model, help="the server's --served-model-name")
    g.add_argument("--endpoint", choices=("chat", "completions"), default=ClientConfig.endpoint)
    g.add_argument("--concurrency", type=int, default=ClientConfig.concurrency)
    g.add_argument("--max-attempts", type=int, default=ClientConfig.max_attempts)
    g.add_argument("--api-key", default=None)

    o = sub.add_parser("generate-offline", help="generate traces in-process with vLLM's offline engine (the fork)")
    _add_generation_args(o)
    o.add_argument("--model-path", required=True)
    o.add_argument("--no-chat", action="store_true", help="send prompts verbatim (no chat template)")
    o.add_argument("--max-model-len", type=int, default=32768)
    o.add_argument("--chunk-size", type=int, default=256, help="prompts per engine call (and per append)")
    o.add_argument("--llm-arg", type=key_value_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM keyword (JSON value or string), e.g. gpu_memory_utilization=0.9; repeatable")
    _add_mask_args(o)

    e = sub.add_parser("export", help="write the parsed traces as pipeline JSONL (for kvprobe capture)")
    e.add_argument("--generations", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--min-blocks", type=int, default=1)
    e.add_argument("--require-answer", action="store_true")

    s = sub.add_parser("serve-command", help="print the vLLM fork's server command for a mask")
    s.add_argument("--model-path", required=True)
    s.add_argument("--port", type=int, default=8010)
    s.add_argument("--max-model-len", type=int, default=32768)
    _add_mask_args(s)

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            config = ClientConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint,
                                  max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, concurrency=args.concurrency,
                                  max_attempts=args.max_attempts, api_key=args.api_key)
            run = generate_traces(read_prompts(args.prompts), args.out, config, progress=not args.no_progress)
            print(f"{run.generated} generated ({run.parse_errors} with parse errors), {run.skipped} already "
                  f"present, {run.total} prompts; output {args.out}")
        elif args.command == "generate-offline":
            prompts = read_prompts(args.prompts)
            new = generate_offline(prompts, args.model_path, args.out, mask=_mask_from_args(args),
                                   chat=not args.no_chat, max_tokens=args.max_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                   max_model_len=args.max_model_len, chunk_size=args.chunk_size,
                                   llm_kwargs=dict(args.llm_arg), progress=not args.no_progress)
            errors = sum(g.trace is None for g in new)
            print(f"{len(new)} generated ({errors} with parse errors), {len(prompts) - len(new)} already present, "
                  f"{len(prompts)} prompts; output {args.out}")
        elif args.command == "export":
            n = export_pipeline_jsonl(args.generations, args.out, min_blocks=args.min_blocks,
                                      require_answer=args.require_answer)
            print(f"{n} trace(s) written to {args.out}")
        else:
            import shlex

            argv_out = serve_command(args.model_path, _mask_from_args(args), port=args.port,
                                     max_model_len=args.max_model_len)
            print(shlex.join(argv_out))
    except (ServeError, ValueError, OSError, ImportError) as err:
        print(f"serve_client: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
