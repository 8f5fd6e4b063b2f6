"""`kvprobe serve`, `generate`, `generate-offline`, `export-traces`: traces from a Memento model.

Thin commands over `kvprobe.serving` (docs/real_models.md): serve a checkpoint with the
Memento vLLM fork, generate traces from the server (or in-process), and export the
parsed traces as the pipeline JSONL that `kvprobe capture` reads.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from importlib.util import find_spec

from ..data.chat import ChatTemplateError
from ..memento.config import MaskConfig
from ..serving.checks import ServingError
from ..serving.config import ClientConfig, ServeError
from ..serving.fork import check_fork_keys, serve_command
from .common import UsageError, add_mask_args, add_parser, key_values, mask_from_args

__all__ = ["register"]


def _refusing_bad_input(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The one bad-input boundary of a command: every object it builds from its arguments is built inside,
    so a setting out of range (named by its flag), a failed request, a bad file or a missing package is
    one line and exit 2."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ServingError as e:
            raise UsageError(e.with_flag()) from None
        except ChatTemplateError as e:  # the library's chat_template is the flag --chat-template
            raise UsageError("--chat-template" + str(e).removeprefix("chat_template")) from None
        except ModuleNotFoundError:  # a missing extra: `main` names it and how to install it
            raise
        except (ServeError, ValueError, OSError, ImportError) as e:
            raise UsageError(str(e)) from None
    return run


def _add_served_mask_args(p: argparse.ArgumentParser) -> None:
    """The mask flags, plus the two options that say the mask is the one the fork serves (SPEC section 2)."""
    add_mask_args(p)
    p.add_argument("--restart-sees-kept-blocks", action="store_true",
                   help="restart with keep N > 0 as the fork serves it: the memento is re-prefilled while the N kept "
                        "blocks are still cached (restart-keepN-sees-kept; required for --restart-mode with N > 0)")
    p.add_argument("--evict-before-summary-end", action="store_true",
                   help="the fork's eviction timing, before <|summary_end|>'s KV (-evict-at-se), the only one it "
                        "serves: without it, memento mode is served with a warning naming the -evict-at-se mask")


def _served_mask_from_args(args: argparse.Namespace) -> MaskConfig:
    """The MaskConfig of `_add_served_mask_args`' flags."""
    return replace(mask_from_args(args), restart_sees_kept_blocks=args.restart_sees_kept_blocks,
                   evict_before_summary_end=args.evict_before_summary_end)


@_refusing_bad_input
def _serve(args: argparse.Namespace) -> int:
    fork_keys = key_values(args.block_masking_arg, "--block-masking-arg", example="max_block_tokens=8192")
    check_fork_keys(fork_keys)  # before they can meet serve_command's own keywords
    with warnings.catch_warnings(record=True) as caught:  # e.g. the fork's eviction timing, one line each
        warnings.simplefilter("always")
        argv = serve_command(args.model_path, _served_mask_from_args(args), port=args.port,
                             max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code, **fork_keys)
    if not args.print and find_spec("vllm") is None:
        raise UsageError("vLLM is not installed here: install the Memento vLLM fork (pip install 'kvprobe[gpu]' "
                         "plus the overlay, docs/real_models.md) or use --print for the command")
    for w in caught:
        print(f"kvprobe: warning: {w.message}", file=sys.stderr)
    if args.print:
        print(shlex.join(argv))
        return 0
    os.execv(argv[0], argv)  # the fork's server takes over this process
    return 0  # pragma: no cover (execv does not return)


@_refusing_bad_input
def _generate(args: argparse.Namespace) -> int:
    from ..serving import generate_traces, read_prompts

    config = ClientConfig(
        base_url=tuple(args.base_url), dispatch=args.dispatch, model=args.model, endpoint=args.endpoint,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        concurrency=args.concurrency, max_attempts=args.max_attempts, api_key=args.api_key)
    with warnings.catch_warnings(record=True) as caught:  # an endpoint taken out of rotation, one line each
        warnings.simplefilter("always")
        try:
            run = generate_traces(read_prompts(args.prompts), args.out, config, progress=not args.no_progress)
        finally:
            for w in caught:
                print(f"kvprobe: warning: {w.message}", file=sys.stderr)
    print(f"{run.generated} generated ({run.parse_errors} with parse errors), {run.skipped} already "
          f"present, {run.total} prompts; output {args.out}")
    return 0


@_refusing_bad_input
def _generate_offline(args: argparse.Namespace) -> int:
    from ..serving import generate_offline, read_prompts

    llm_kwargs = key_values(args.llm_arg, "--llm-arg", example="gpu_memory_utilization=0.9")
    prompts = read_prompts(args.prompts)
    new = generate_offline(
        prompts, args.model_path, args.out, mask=_served_mask_from_args(args), chat=not args.no_chat,
        chat_template=args.chat_template, max_tokens=args.max_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_model_len=args.max_model_len,
        chunk_size=args.chunk_size, llm_kwargs=llm_kwargs, progress=not args.no_progress)
    errors = sum(g.trace is None for g in new)
    print(f"{len(new)} generated ({errors} with parse errors), {len(prompts) - len(new)} already present, "
          f"{len(prompts)} prompts; output {args.out}")
    return 0


@_refusing_bad_input
def _export(args: argparse.Namespace) -> int:
    from ..serving import export_pipeline_jsonl

    n = export_pipeline_jsonl(args.generations, args.out, min_blocks=args.min_blocks,
                              require_answer=args.require_answer)
    print(f"{n} trace(s) written to {args.out}")
    return 0


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


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "serve", "serve a Memento checkpoint with the Memento vLLM fork under a mask",
                   "  kvprobe serve --model-path /ckpt/memento-qwen3-8b --print\n"
                   "  kvprobe serve --model-path /ckpt/memento-qwen3-8b --restart-mode --port 8011")
    s.add_argument("--model-path", required=True)
    s.add_argument("--port", type=int, default=8010)
    s.add_argument("--max-model-len", type=int, default=32768)
    s.add_argument("--print", action="store_true", help="print the server command instead of running it")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="let vLLM run the checkpoint's own code (off by default; Memento checkpoints need none)")
    s.add_argument("--block-masking-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra key of the fork's --block-masking-config (a YAML value), e.g. "
                        "max_block_tokens=8192 or debug=true; repeatable; the mask flags set the others")
    _add_served_mask_args(s)
    s.set_defaults(func=_serve)

    g = add_parser(sub, "generate", "generate traces from a served Memento model (resumable)",
                   "  kvprobe generate --prompts prompts.jsonl --out runs/gen/generations.jsonl \\\n"
                   "      --base-url http://127.0.0.1:8010/v1 --model memento --max-tokens 32000 --concurrency 32\n"
                   "  kvprobe generate --prompts prompts.jsonl --out runs/gen/generations.jsonl \\\n"
                   "      --base-url http://127.0.0.1:8010/v1 http://127.0.0.1:8011/v1 --concurrency 32")
    _add_generation_args(g)
    g.add_argument("--base-url", nargs="+", default=[ClientConfig.base_url], metavar="URL",
                   help="the server's URL with /v1; several (one server per GPU) share the prompts out")
    g.add_argument("--dispatch", choices=("least-loaded", "round-robin"), default=ClientConfig.dispatch,
                   help="which endpoint gets the next prompt: the one with the fewest in flight, or each in turn")
    g.add_argument("--model", default=ClientConfig.model, help="the server's --served-model-name")
    g.add_argument("--endpoint", choices=("chat", "completions"), default=ClientConfig.endpoint)
    g.add_argument("--concurrency", type=int, default=ClientConfig.concurrency, help="requests in flight per endpoint")
    g.add_argument("--max-attempts", type=int, default=ClientConfig.max_attempts)
    g.add_argument("--api-key", default=None)
    g.set_defaults(func=_generate)

    o = add_parser(sub, "generate-offline", "generate traces in-process with vLLM's offline engine (the fork)",
                   "  kvprobe generate-offline --prompts prompts.jsonl --out runs/gen/generations.jsonl \\\n"
                   "      --model-path /ckpt/memento-qwen3-8b --max-tokens 32000 --llm-arg gpu_memory_utilization=0.9")
    _add_generation_args(o)
    o.add_argument("--model-path", required=True)
    o.add_argument("--no-chat", action="store_true", help="send prompts verbatim (no chat template)")
    o.add_argument("--max-model-len", type=int, default=32768)
    o.add_argument("--chunk-size", type=int, default=256, help="prompts per engine call (and per append)")
    o.add_argument("--chat-template", default="memento",
                   help="memento (the fork's memento_nosys.jinja, default), tokenizer, auto, or a .jinja file")
    o.add_argument("--llm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM keyword (a YAML value), e.g. gpu_memory_utilization=0.9; repeatable")
    _add_served_mask_args(o)
    o.set_defaults(func=_generate_offline)

    e = add_parser(sub, "export-traces", "write the parsed traces as pipeline JSONL (for kvprobe capture)",
                   "  kvprobe export-traces --generations runs/gen/generations.jsonl --out runs/gen/traces.jsonl "
                   "--min-blocks 4\n"
                   "  kvprobe export-traces --generations runs/a/generations.jsonl runs/b/generations.jsonl "
                   "--out runs/gen/traces.jsonl")
    e.add_argument("--generations", required=True, nargs="+", metavar="FILE",
                   help="one or several generations files, merged: a prompt id once, conflicting duplicates refused")
    e.add_argument("--out", required=True)
    e.add_argument("--min-blocks", type=int, default=1)
    e.add_argument("--require-answer", action="store_true")
    e.set_defaults(func=_export)
