"""The serving settings kvprobe refuses, and the error it refuses them with (`ServingError`).

One check per kind of setting, shared by `ClientConfig` (a served model), `generate_offline`
(vLLM in-process) and `serve_command` (the fork's server), so the three refuse the same
values with the same words. Plain Python: no httpx, torch or vLLM.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import KVProbeError

__all__ = ["ServingError", "check_at_least", "check_port", "check_sampling", "check_url"]


class ServingError(KVProbeError, ValueError):
    """A serving setting kvprobe refuses, in one line. `field`, when given, is the setting the message
    starts with (the keyword, which `kvprobe`'s flag spells with dashes: max_tokens is --max-tokens)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def with_flag(self) -> str:
        """The message with its field spelled as the command line's flag."""
        if self.field is None or not str(self).startswith(self.field):
            return str(self)
        return "--" + self.field.replace("_", "-") + str(self)[len(self.field):]


def check_at_least(field: str, value: int | float, low: int | float) -> None:
    """Refuse `value` below `low` (or not a number), naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:  # NaN fails too
        raise ServingError(f"{field} must be >= {low}, got {value!r}", field)


def check_port(port: int) -> None:
    """Refuse a TCP port outside 1..65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ServingError(f"port must be a TCP port, 1..65535, got {port!r}", "port")


def check_url(url: object) -> None:
    """Refuse a base_url that is not an http:// or https:// URL naming a host (and a valid port, if any)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = (parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
              and not any(c.isspace() for c in url) and (parts.port is None or 1 <= parts.port <= 65535))
    except ValueError:  # a port that is no number, a broken IPv6 address
        ok = False
    if not ok:
        raise ServingError(f"base_url must start with http:// or https:// and name a host, got {url!r}", "base_url")


def check_sampling(max_tokens: int, temperature: float, top_p: float | None, top_k: int | None) -> None:
    """Refuse sampling settings vLLM would reject mid-run: max_tokens < 1, a negative temperature,
    top_p outside (0, 1], top_k below -1 (-1 and 0 mean every token; None leaves it out)."""
    check_at_least("max_tokens", max_tokens, 1)
    check_at_least("temperature", temperature, 0)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ServingError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if top_k is not None:
        check_at_least("top_k", top_k, -1)
