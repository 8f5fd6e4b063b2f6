"""How to reach a served Memento model and sample from it (`ClientConfig`), and the error of a request
that failed for good (`ServeError`), for `kvprobe.serving.client`.

Plain data, no httpx or torch: `kvprobe generate --help` shows these defaults at once;
`kvprobe.serving.client` makes the requests and re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import ServingError, check_at_least, check_sampling, check_url

__all__ = ["ClientConfig", "ServeError"]


class ServeError(RuntimeError):
    """A request failed for good: retries exhausted, or a status that is not retried.

    `prompt_id` names the prompt whose request failed; `unreachable` says the last attempt
    got no answer at all (a connection error or timeout), so the endpoint may be down.
    """

    def __init__(self, message: str, prompt_id: str | None = None, unreachable: bool = False) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id
        self.unreachable = unreachable


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server and how to sample.

    base_url includes the API version prefix (OpenAI convention): ``http://host:8010/v1``.
    Several servers (one per GPU) are a tuple of such URLs: prompts are fanned out over them,
    `dispatch` picking the endpoint of each request ("least-loaded": the one with the fewest
    requests in flight; "round-robin": each in turn), `concurrency` requests in flight per endpoint.
    top_k is a vLLM extension of the OpenAI API (left out of the request when None).
    extra_body is merged into every request body last (it may override any field, e.g.
    ``{"stop": [...]}``; overriding ``skip_special_tokens`` defeats the purpose).
    backoff/max_backoff are seconds; jitter adds up to that fraction of each wait at random.
    timeout is the read timeout of one request in seconds (long generations take minutes).
    """

    base_url: str | tuple[str, ...] = "http://127.0.0.1:8010/v1"
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
    return_token_ids: bool = True  # ask for the prompt and generated ids (vLLM >= 0.10.2), kept with each trace
    extra_body: dict[str, Any] = field(default_factory=dict)
    dispatch: Literal["least-loaded", "round-robin"] = "least-loaded"

    def __post_init__(self) -> None:
        """Refuse (ServingError naming the field) any setting a run would fail on later."""
        if self.endpoint not in ("chat", "completions"):
            raise ServingError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}", "endpoint")
        if self.dispatch not in ("least-loaded", "round-robin"):
            raise ServingError(f"dispatch must be 'least-loaded' or 'round-robin', got {self.dispatch!r}", "dispatch")
        urls = (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url)
        if not urls:
            raise ServingError("base_url: give at least one URL", "base_url")
        for url in urls:
            check_url(url)
        if len(set(u.rstrip("/") for u in urls)) < len(urls):
            raise ServingError(f"base_url: the same URL is given twice in {list(urls)}", "base_url")
        object.__setattr__(self, "base_url", urls[0] if len(urls) == 1 else urls)
        check_sampling(self.max_tokens, self.temperature, self.top_p, self.top_k)
        for name in ("concurrency", "max_attempts"):
            check_at_least(name, getattr(self, name), 1)
        for name in ("backoff", "max_backoff", "jitter"):
            check_at_least(name, getattr(self, name), 0)
        for name in ("timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ServingError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}", name)

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every endpoint's base URL (one unless several servers were given)."""
        return (self.base_url,) if isinstance(self.base_url, str) else self.base_url

    def url_of(self, base_url: str) -> str:
        """The request URL on one endpoint."""
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        return base_url.rstrip("/") + path

    @property
    def url(self) -> str:
        """The request URL on the first endpoint."""
        return self.url_of(self.base_urls[0])
