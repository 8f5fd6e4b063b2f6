"""Long traces: the FlexAttention memento mask against the dense (B, 1, T, T) mask.

For each trace length T, one synthetic Memento trace (`kvprobe.data.synthetic.LongTraceSource`:
a 32-token prompt, `--blocks` blocks of equal length, each followed by a `--memento-len`
memento) is captured through `run_capture` with the model loaded as `sdpa` (dense additive
mask) and as `flex_attention` (the interval-built BlockMask). The passcode block is three
blocks before the last and the capture reads offsets -1..+2, so the mementos it reads are the
last ones and its forward runs over nearly the whole trace (`forward_tokens`). kvprobe refuses
a dense mask above `DENSE_MASK_MAX_TOKENS` and switches to flex; this benchmark lifts that
limit in the sdpa subprocess so the dense path is measured at full length.

Each (implementation, T) runs in its own subprocess so its peak memory is its own: peak
resident set on CPU (and its growth over the resident set after the model was built), peak
allocated device memory on CUDA. Reported per run: the bare masked forward over the same
tokens (the baseline, same process, logits of the last position only), the capture (forward +
KV gather + pooling + HDF5 shard), their ratio, peak memory, and, where both implementations
ran, the largest difference between their captured features.

    python benchmarks/bench_long.py --device cpu --model qwen3-heads --lengths 4096 8192 --dense-max 8192
    python benchmarks/bench_long.py --device cuda --model qwen3-8b --lengths 4096 16384 32768   # bf16, random weights

The models are random (seeded) with real architectures (`shapes.py`, built in the target dtype):
cost and memory depend on the shapes, not on the weights. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapes import BLOCKS, MEMENTO_LEN, MODELS, build_qwen3, forward_tokens, long_source


def resident_bytes() -> int:
    """This process's resident set now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the subprocess: one implementation at one length."""
    import kvprobe.memento.forward as forward
    from kvprobe.capture import CaptureConfig, run_capture
    from kvprobe.memento.forward import masked_forward

    torch.set_num_threads(args.threads)
    if args.impl == "sdpa":  # measure the dense mask at full length: lift kvprobe's switch to flex
        forward.DENSE_MASK_MAX_TOKENS = max(forward.DENSE_MASK_MAX_TOKENS, args.length)
    model = build_qwen3(MODELS[args.model], args.impl, args.device, args.dtype, args.length)
    source = long_source(args.samples, args.length, args.blocks, args.memento_len, MODELS[args.model]["vocab"])
    n_layers = MODELS[args.model]["layers"]
    spec = CaptureConfig(layers=(0, n_layers - 1), offsets=(-1, 0, 1, 2), batch_size=1, shard_size=args.samples,
                       dtype="float32")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tokens: list[int] = []  # what each forward runs over
    model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].shape[1]), with_kwargs=True)
    last_read = forward_tokens(source)  # the capture's forward length

    def bare() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(args.samples):
                b = source.samples(i, i + 1)
                masked_forward(model, b.input_ids[:, :last_read].to(args.device), layouts=b.layouts,
                               config=spec.mask, logits_to_keep=1, truncate=True)
        sync()
        return time.perf_counter() - t

    batch = source.samples(0, 1)
    with torch.inference_mode():  # warm-up: compiles FlexAttention, fills allocator caches
        masked_forward(model, batch.input_ids[:, :last_read].to(args.device), layouts=batch.layouts, logits_to_keep=1,
                       truncate=True)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = resident_bytes()
    times = {"forward": [], "capture": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):  # interleaved, best of
            times["forward"].append(bare())
            sync()
            t = time.perf_counter()
            path = run_capture(model, source, spec, Path(d) / f"s{r}", progress=False)
            sync()
            times["capture"].append(time.perf_counter() - t)
        from kvprobe.store import KVStore

        with KVStore(path) as store:
            feats = {f"{layer}/{key.offset}/{key.pooling}": store.features(layer, key.offset, key.site, key.pooling)
                     for key in store.keys for layer in store.layers}
    np.savez(args.features_out, **feats)
    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": args.impl, "ran_as": model.config._attn_implementation, "length": args.length,
            "forward_tokens": max(tokens), "n_blocks": source.layout.n_blocks,
            "forward_s": min(times["forward"]) / args.samples, "capture_s": min(times["capture"]) / args.samples,
            "peak_bytes": int(peak), "base_bytes": int(base) if not args.device.startswith("cuda") else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dense-max", type=int, default=1 << 30, help="skip the dense mask above this length")
    ap.add_argument("--blocks", type=int, default=BLOCKS, help="blocks per trace (fewer on short traces)")
    ap.add_argument("--memento-len", type=int, default=MEMENTO_LEN)
    ap.add_argument("--samples", type=int, default=2, help="traces captured per timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the rows here")
    # internal: the subprocess
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--features-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.impl:
        print(json.dumps(one_run(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for length in args.lengths:
            feats = {}
            for impl in ("sdpa", "flex_attention"):
                if impl == "sdpa" and length > args.dense_max:
                    continue
                out = Path(d) / f"{impl}-{length}.npz"
                cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--length", str(length),
                       "--features-out", str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    row = {"impl": impl, "length": length, "error": done.stderr.strip().splitlines()[-1]}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    feats[impl] = np.load(out)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if len(feats) == 2:
                a, b = feats["sdpa"], feats["flex_attention"]
                diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
                scale = max(float(np.abs(a[k]).max()) for k in a.files)
                rows[-1]["max_abs_diff_vs_dense"] = diff
                rows[-1]["max_abs_feature"] = scale
                print(f"  T={length}: flex vs dense features, max |diff| {diff:.3g} (max |feature| {scale:.3g})")
    print(f"\n{args.model} on {args.device} ({args.dtype}), {args.samples} trace(s) per timing, best of {args.repeats}\n")
    print("| T | tokens run | mask | forward (s/trace) | capture (s/trace) | capture / forward | peak memory (MB) "
          "| flex vs dense |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['length']:,} | | {r['impl']} | failed: {r['error']} | | | | |")
            continue
        diff = f"max abs diff {r['max_abs_diff_vs_dense']:.2g}" if "max_abs_diff_vs_dense" in r else ""
        print(f"| {r['length']:,} | {r['forward_tokens']:,} | {'dense' if r['impl'] == 'sdpa' else 'flex'} | "
              f"{r['forward_s']:.3f} | "
              f"{r['capture_s']:.3f} | {r['capture_s'] / r['forward_s']:.2f} | {r['peak_bytes'] / 2**20:,.0f} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
