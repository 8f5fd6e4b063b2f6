"""Generate Memento traces from a served model over its OpenAI-compatible API: requests, retries, the run."""

from __future__ import annotations

import hashlib
import random
from collections import deque
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
from tqdm.auto import tqdm

from ..data.traces import Trace, TraceError, from_generated_text
from .config import ClientConfig, ServeError  # the settings and the error, without httpx; re-exported here
from .generations import Generation, Prompt, _check_unique, _Writer, completed_ids

# status codes worth another try: rate limiting and server-side failures
_RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class GenerationRun:
    """What one `generate_traces` call did."""

    total: int  # prompts given
    skipped: int  # already in the output file before this call
    generated: int  # written by this call
    parse_errors: int  # of those, recorded with an error instead of a trace


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
    if config.return_token_ids:
        body["return_token_ids"] = True
    body.update(config.extra_body)
    return body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


def _post(
    client: httpx.Client, prompt_id: str, body: dict[str, Any], config: ClientConfig, sleep: Callable[[float], None],
    url: str | None = None,
) -> dict[str, Any]:
    """POST to `url` (default: the first endpoint's) with bounded retries; the decoded JSON
    answer, or ServeError naming the prompt."""
    url = url or config.url
    last = "no attempt made"
    unreachable = False
    for attempt in range(1, config.max_attempts + 1):
        wait_at_least = 0.0
        try:
            response = client.post(url, json=body)
        except httpx.TransportError as e:
            last, unreachable = f"{type(e).__name__}: {e}", True
        else:
            unreachable = False
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
        prompt_id, unreachable)


def _completion_text(payload: dict[str, Any], config: ClientConfig, prompt_id: str,
                     url: str | None = None) -> tuple[str, str | None, Any]:
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
        raise ServeError(f"prompt {prompt_id!r}: unexpected answer from {url or config.url}: {str(payload)[:300]}",
                         prompt_id) from None
    if not isinstance(text, str):
        raise ServeError(f"prompt {prompt_id!r}: the answer's text is {type(text).__name__}, not a string", prompt_id)
    return text, choice.get("finish_reason"), payload.get("usage")


def parse_generation(prompt: Prompt, text: str, finish_reason: str | None = None, usage: Any = None,
                     prompt_token_ids: list[int] | None = None, token_ids: list[int] | None = None) -> Generation:
    """Parse a generated text into a `Generation`: the trace, or the parse error (never raises TraceError).

    The trace's id is the prompt id and its prompt `Prompt.problem` (default: the text sent);
    served ids, when given, are kept with the generation and its trace.
    """
    g = Generation(prompt.prompt_id, text, finish_reason, None, None, usage, prompt_token_ids, token_ids)
    try:
        parsed = from_generated_text(text, prompt.prompt_id)
        g.trace = Trace(prompt.prompt_id, prompt.trace_prompt, parsed.blocks, parsed.summaries, parsed.answer,
                        g.served_ids)
    except TraceError as e:
        why = f" (finish_reason {finish_reason!r})" if finish_reason not in (None, "stop") else ""
        g.error = f"{e}{why}"
    return g


def served_token_ids(payload: dict[str, Any]) -> tuple[list[int] | None, list[int] | None]:
    """(prompt ids, generated ids) of an answer to a ``return_token_ids`` request, None where absent.

    vLLM puts the generated ids on the choice and the prompt ids on the choice (completions)
    or on the answer itself (chat)."""
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, None

    def ids(value: Any) -> list[int] | None:
        return list(value) if isinstance(value, list) and all(isinstance(i, int) for i in value) else None

    return ids(choice.get("prompt_token_ids", payload.get("prompt_token_ids"))), ids(choice.get("token_ids"))


def _generate_one(client: httpx.Client, prompt: Prompt, config: ClientConfig,
                  sleep: Callable[[float], None], base_url: str | None = None) -> Generation:
    url = config.url_of(base_url) if base_url else config.url
    payload = _post(client, prompt.prompt_id, request_body(prompt, config), config, sleep, url)
    text, finish_reason, usage = _completion_text(payload, config, prompt.prompt_id, url)
    g = parse_generation(prompt, text, finish_reason, usage, *served_token_ids(payload))
    g.endpoint = base_url or config.base_urls[0]
    return g


ASSISTANT_TURN = "<|im_start|>assistant"


def warn_if_never_evicted(prompts: Iterable[Prompt], endpoint: str) -> int:
    """Warn (and return how many) when completions prompts hold no assistant turn.

    The vLLM fork tracks blocks only after ``<|im_start|>assistant`` (its
    ``require_assistant_section``, on by default): a raw completions prompt without one is
    generated with nothing ever evicted, plain causal attention. The chat endpoint applies
    the server's template, so it always has the turn."""
    if endpoint != "completions":
        return 0
    prompts = list(prompts)
    bare = sum(ASSISTANT_TURN not in p.text for p in prompts)
    if bare:
        warnings.warn(f"{bare} of {len(prompts)} completions prompts have no {ASSISTANT_TURN!r} turn: the vLLM fork "
                      "(require_assistant_section, its default) never evicts a block for them; use the chat "
                      "endpoint or render each prompt with the chat template (kvprobe.data.chat)", stacklevel=3)
    return bare


class _Endpoints:
    """Which endpoint gets the next request: requests in flight per endpoint, and the dead ones."""

    def __init__(self, config: ClientConfig) -> None:
        self.urls = config.base_urls
        self.capacity = config.concurrency
        self.round_robin = config.dispatch == "round-robin"
        self.in_flight = [0] * len(self.urls)
        self.dead: dict[int, ServeError] = {}
        self.cursor = 0

    def pick(self) -> int | None:
        """The endpoint of the next request, None while every live endpoint is full (or none is left)."""
        free = [i for i in range(len(self.urls)) if i not in self.dead and self.in_flight[i] < self.capacity]
        if not free:
            return None
        if not self.round_robin:  # least-loaded; ties go to the endpoint after the last one picked
            n = len(self.urls)
            i = min(free, key=lambda i: (self.in_flight[i], (i - self.cursor) % n))
        else:
            i = min(free, key=lambda i: (i - self.cursor) % len(self.urls))
        self.cursor = i + 1
        self.in_flight[i] += 1
        return i

    def take_out(self, i: int, error: ServeError, stacklevel: int = 3) -> None:
        """Take endpoint i out of rotation, with a warning at `stacklevel` (generate_traces' caller)."""
        if i in self.dead:
            return
        self.dead[i] = error
        left = len(self.urls) - len(self.dead)
        warnings.warn(f"endpoint {self.urls[i]} is unreachable, taken out of rotation ({left} of {len(self.urls)} "
                      f"left; its prompts go to the others): {error}", stacklevel=stacklevel)


class _Requests:
    """The prompts of one run: those waiting, the requests in flight, and what came back."""

    def __init__(self, todo: list[Prompt], endpoints: _Endpoints, writer: _Writer, bar: Any) -> None:
        self.queue = deque(todo)
        self.pending: dict[Future[Generation], tuple[Prompt, int]] = {}
        self.endpoints = endpoints
        self.writer = writer
        self.bar = bar
        self.failures: list[ServeError] = []
        self.written = self.parse_errors = 0

    def run(self, submit: Callable[[Prompt, str], Future[Generation]]) -> None:
        """Keep every endpoint busy until each prompt is written or a request has failed for good."""
        self.fill(submit)
        while self.pending:
            finished, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            for future in finished:
                self.collect(future)
            self.fill(submit)

    def fill(self, submit: Callable[[Prompt, str], Future[Generation]]) -> None:
        """Send waiting prompts to endpoints with room."""
        while self.queue and not self.failures:  # no new request once one has failed for good
            i = self.endpoints.pick()
            if i is None:
                return
            prompt = self.queue.popleft()
            future = submit(prompt, self.endpoints.urls[i])
            self.pending[future] = (prompt, i)

    def collect(self, future: Future[Generation]) -> None:
        """Write a finished request's generation, or record why it failed."""
        prompt, i = self.pending.pop(future)
        self.endpoints.in_flight[i] -= 1
        try:
            generation = future.result()
        except ServeError as e:
            self.failed(prompt, i, e)
            return
        except Exception as e:  # unexpected: still name the prompt
            self.failures.append(ServeError(f"prompt {prompt.prompt_id!r}: {type(e).__name__}: {e}",
                                            prompt.prompt_id))
            return
        self.writer.write(generation)
        self.written += 1
        self.parse_errors += generation.error is not None
        self.bar.update(1)
        self.bar.set_postfix(parse_errors=self.parse_errors, refresh=False)

    def failed(self, prompt: Prompt, i: int, e: ServeError) -> None:
        """A request to endpoint i failed for good: with several endpoints an unreachable one is taken out and
        its prompt waits for a live one; otherwise the run fails."""
        n_urls = len(self.endpoints.urls)
        if e.unreachable and n_urls > 1:
            # warn at generate_traces' caller: take_out <- failed <- collect <- run <- generate_traces <- caller
            self.endpoints.take_out(i, e, stacklevel=6)
            if len(self.endpoints.dead) < n_urls:
                self.queue.appendleft(prompt)  # to a live endpoint
            elif not self.failures:
                self.failures.append(ServeError(f"no endpoint left: all {n_urls} are unreachable; last error: {e}",
                                                prompt.prompt_id, True))
        else:
            self.failures.append(e)

    def raise_failures(self, output: Path) -> None:
        """ServeError naming the first failure and what was written, if any request failed for good."""
        if self.failures:
            first = self.failures[0]
            more = f" ({len(self.failures) - 1} more request(s) failed too)" if len(self.failures) > 1 else ""
            raise ServeError(f"{first}{more}; {self.written} new record(s) written to {output}, "
                             f"run again to continue", first.prompt_id, first.unreachable)


def _http_client(config: ClientConfig, transport: httpx.BaseTransport | None) -> httpx.Client:
    """One client for every endpoint, with a connection for each request that may be in flight."""
    width = config.concurrency * len(config.base_urls)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    return httpx.Client(timeout=timeout, headers=headers, limits=limits, transport=transport)


def generate_traces(
    prompts: Iterable[Prompt],
    output: str | Path,
    config: ClientConfig = ClientConfig(),
    *,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    transport: httpx.BaseTransport | None = None,
) -> GenerationRun:
    """Generate a trace for every prompt not yet in `output` (JSONL), `config.concurrency` at a time
    on each of `config.base_urls`.

    Appends one record per finished prompt (see the module docstring) and returns counts.
    Raises `ServeError` (after writing whatever else finished) when a request fails for
    good; run again to continue. With several endpoints, one that stays unreachable through
    the retries is taken out of rotation with a warning and its prompts are sent to the
    others; the run fails only when none is left. `sleep` and `transport` are for tests.
    """
    prompts = list(prompts)
    _check_unique(prompts)
    warn_if_never_evicted(prompts, config.endpoint)
    output = Path(output)
    writer = _Writer(output)  # repairs a cut-off last line before the ids are read
    try:
        done = completed_ids(output)
        todo = [p for p in prompts if p.prompt_id not in done]
        skipped = len(prompts) - len(todo)
        endpoints = _Endpoints(config)
        bar = tqdm(total=len(prompts), initial=skipped, unit="prompt", desc="generate", disable=not progress)
        requests = _Requests(todo, endpoints, writer, bar)
        with bar, _http_client(config, transport) as client, \
                ThreadPoolExecutor(max_workers=config.concurrency * len(endpoints.urls)) as pool:
            requests.run(lambda prompt, url: pool.submit(_generate_one, client, prompt, config, sleep, url))
    finally:
        writer.close()
    requests.raise_failures(output)
    return GenerationRun(len(prompts), skipped, requests.written, requests.parse_errors)
