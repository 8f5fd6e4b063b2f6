"""An OpenAI-compatible stand-in server on 127.0.0.1, for the serving tests.

`FakeServer` is a stdlib `http.server` in a thread on a random port. It answers each
request with a canned Memento-format completion (or what its `responder` decides: chosen
requests can fail with 500/429), records every request body, and is shut down by the
`server` fixture (tests/serving/conftest.py). Prompts are "Solve problem <pid>".
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from kvprobe.serving import ClientConfig, Prompt

__all__ = ["FakeServer", "Responder", "canned", "config", "lines", "memento_text", "ok", "pid_of", "prompts"]


def memento_text(pid: str, n_blocks: int = 2) -> str:
    """A completion as the fork returns it with skip_special_tokens=false. Its mementos are templated
    (kvprobe.data.quality flags them): reading them back needs summary_check="keep"."""
    blocks = "\n".join(
        f"<|block_start|>Step {i} of {pid}: think hard.<|block_end|>\n<|summary_start|>memento {i} of {pid}"
        f"<|summary_end|>\n" for i in range(n_blocks))
    return f"<think>\n{blocks}</think>\n\nThe answer for {pid} is 42.<|im_end|>"


# a responder maps (path, body, attempt number of this prompt) -> (status, payload or text, headers)
Responder = Callable[[str, dict, int], "tuple[int, Any, dict]"]


def pid_of(body: dict) -> str:
    text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
    return text.split()[-1]  # prompts are "Solve problem <pid>"


def ok(path: str, body: dict, text: str, finish: str = "stop") -> tuple[int, Any, dict]:
    if path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return 200, {"id": "x", "choices": [choice], "usage": {"completion_tokens": len(text.split())}}, {}


def canned(path: str, body: dict, attempt: int) -> tuple[int, Any, dict]:
    return ok(path, body, memento_text(pid_of(body)))


class FakeServer:
    """An OpenAI-compatible stand-in: `responder` decides each answer; requests are recorded."""

    def __init__(self, responder: Responder = canned) -> None:
        self.responder = responder
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                    key = pid_of(body)
                    server.attempts[key] = server.attempts.get(key, 0) + 1
                    attempt = server.attempts[key]
                status, payload, headers = server.responder(self.path, body, attempt)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def ids_requested(self) -> list[str]:
        with self.lock:
            return [pid_of(b) for _, b in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", f"Solve problem p{i}", problem=f"Problem {i}?") for i in range(n)]


def config(srv: FakeServer, **kw: Any) -> ClientConfig:
    base = dict(base_url=srv.base_url, model="memento", max_tokens=512, temperature=0.6, seed=7,
                concurrency=2, max_attempts=3, backoff=0.001, max_backoff=0.01, timeout=10.0)
    base.update(kw)
    return ClientConfig(**base)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
