"""Generate Memento traces from a served Memento model (the Memento vLLM fork).

The Memento vLLM fork (`microsoft/memento`, directory `vllm/`: an overlay on stock
vLLM 0.13) serves a Memento checkpoint behind an OpenAI-compatible API and evicts each
block's KV entries once its memento is complete. This module talks to such a server over
plain HTTP (``httpx``; the ``openai`` package is not needed) and turns the answers into
`kvprobe.data.traces.Trace` records:

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

        {"prompt_id": "p1", "text": "<think>\n<|block_start|>...", "finish_reason": "stop",
         "usage": {...}, "trace": {"trace_id": "p1", "prompt": ..., "blocks": [...],
         "summaries": [...], "answer": ...}, "error": null}

    The returned text is parsed with `kvprobe.data.traces.from_generated_text`. A text that is
    not a complete Memento trace (a truncated generation, broken structure) is recorded
    with ``"trace": null`` and the parse error in ``"error"``; it does not stop the run. The
    trace's prompt is the prompt's `Prompt.problem` text (the problem as you gave it), not
    whatever the completion holds before ``<think>``. On restart, prompt ids already in the
    output are skipped, so no id is ever written twice; a last line cut off by a crash is
    dropped and redone. When a request fails for good, no new requests are started, the
    requests in flight finish and are written, and the `ServeError` is raised. One process
    per output file.

Several servers
    ``base_url`` may be a tuple of URLs (one server per GPU): each request goes to the
    endpoint with the fewest in flight (``dispatch="least-loaded"``) or to each in turn
    (``"round-robin"``), ``concurrency`` per endpoint, into the one output file; each record
    names its ``endpoint``. An endpoint that stays unreachable through the retries is taken
    out of rotation with a warning and its prompts go to the others; the run fails only
    when none is left. `merge_generations` (and `export_pipeline_jsonl`) read several
    output files as one, a prompt id once, and refuse an id found with different content.

`block_masking_config` builds the fork's ``--block-masking-config`` JSON from a
`kvprobe.memento.masks.MaskConfig`; `serve_command` the whole server command line.
`generate_offline` runs the fork's offline ``vllm.LLM`` instead of a server (vLLM is
imported only there). `kvprobe serve`, `kvprobe generate`, `kvprobe generate-offline` and
`kvprobe export-traces` are the command line over the same functions. See docs/real_models.md.

Rooms: `config` (`ClientConfig`, `ServeError`), `fork` (the fork's config and server command), `client`
(requests, retries, the run), `generations` (the records and the resumable output file), `offline` (vLLM
in-process).
"""

from .. import lazy_exports

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
    "merge_generations",
    "parse_generation",
    "prompt_seed",
    "read_generations",
    "read_prompts",
    "request_body",
    "serve_command",
    "trace_to_pipeline_record",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".client": ("GenerationRun", "generate_traces", "parse_generation", "prompt_seed", "request_body"),
    ".config": ("ClientConfig", "ServeError"),
    ".fork": ("block_masking_config", "serve_command"),
    ".generations": ("Generation", "Prompt", "completed_ids", "export_pipeline_jsonl", "merge_generations",
                     "read_generations", "read_prompts", "trace_to_pipeline_record"),
    ".offline": ("generate_offline",),
})
