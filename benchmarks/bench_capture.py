"""Capture overhead and memory.

1. Overhead: wall time of `run_capture` (forward passes + KV gathering + pooling +
   compressed HDF5 shards) divided by the wall time of the same masked forward passes
   with no capture, measured in one process, interleaved, best of `--repeats`.
   On the toy checkpoint and on a tiny random Qwen3 (grouped-query, RoPE, q/k norm).
   Target: at most 1.10.
2. Streaming: peak resident memory of a 5K- and a 50K-sample toy capture, each in its
   own subprocess. Target: they differ by less than 10%.

    python benchmarks/bench_capture.py                # everything (a few minutes on 2 cores)
    python benchmarks/bench_capture.py --skip-memory
    python benchmarks/bench_capture.py --skip-memory --models toy --compression gzip lzf none
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import toy_models
from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.memento.forward import masked_forward
from toy_models.source import ToyPasscodeSource

# the paper's setting on the toy: every layer, every memento offset, K+V, mean-pooled
SPEC = CaptureConfig(layers=(0, 1, 2, 3), offsets=tuple(range(-1, 9)), batch_size=256, shard_size=1024)


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=16, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(cfg).eval()


def bare_forward(model, source, spec: CaptureConfig) -> float:
    """The same masked forward passes, batches prepared beforehand, nothing kept."""
    batches = [source.samples(s, min(s + spec.batch_size, source.n_samples))
               for s in range(0, source.n_samples, spec.batch_size)]
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            masked_forward(model, b.input_ids, layouts=b.layouts, config=spec.mask)
    return time.perf_counter() - t


def capture_time(model, source, spec: CaptureConfig) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        run_capture(model, source, spec, Path(d) / "store", progress=False)
        return time.perf_counter() - t


def overhead(name: str, model, n: int, repeats: int, spec: CaptureConfig = SPEC) -> dict:
    source = ToyPasscodeSource(n, seed=0)
    bare_forward(model, ToyPasscodeSource(256, seed=1), spec)  # warm up
    bare, cap = [], []
    for _ in range(repeats):
        bare.append(bare_forward(model, source, spec))
        cap.append(capture_time(model, source, spec))
    return {"model": name, "compression": spec.compression, "samples": n, "bare_s": min(bare), "capture_s": min(cap),
            "ratio": min(cap) / min(bare)}


MEMORY_CHILD = """
import resource, sys, tempfile, torch
torch.set_num_threads(2)
import toy_models
from kvprobe.capture import CaptureConfig, run_capture
from toy_models.source import ToyPasscodeSource
spec = CaptureConfig(**__import__("json").loads(sys.argv[2]))
with tempfile.TemporaryDirectory() as d:
    run_capture(toy_models.load(), ToyPasscodeSource(int(sys.argv[1]), seed=0), spec, d + "/s", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory_mb(n: int) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), json.dumps(SPEC.to_dict())],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--models", nargs="+", choices=("toy", "qwen3"), default=["toy", "qwen3"])
    ap.add_argument("--compression", nargs="+", choices=("gzip", "lzf", "none"), default=[SPEC.compression])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"toy": ("toy (GPT-2, 811K)", toy_models.load), "qwen3": ("tiny Qwen3 (GQA, RoPE, qk-norm)", tiny_qwen3)}
    rows = [overhead(models[m][0], models[m][1](), args.samples, args.repeats, replace(SPEC, compression=c))
            for m in args.models for c in args.compression]
    print(f"capture overhead: {SPEC.to_dict()['layers']} layers x {len(SPEC.offsets)} offsets, K+V, "
          f"{SPEC.pooling[0]} pooling (max_tokens {SPEC.max_tokens}), {SPEC.dtype}")
    print("| model | compression | samples | bare forward (s) | capture (s) | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['compression']} | {r['samples']} | {r['bare_s']:.2f} | {r['capture_s']:.2f} | "
              f"{r['ratio']:.3f} |")
    if not args.skip_memory:
        small, large = peak_memory_mb(5_000), peak_memory_mb(50_000)
        print("\npeak resident memory of a toy capture (own process)")
        print(f"| samples | peak RSS (MB) |\n|---|---|\n| 5,000 | {small:.0f} |\n| 50,000 | {large:.0f} |")
        print(f"50K / 5K = {large / small:.3f}")
    print(f"\nusing {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB in this process")


if __name__ == "__main__":
    main()
