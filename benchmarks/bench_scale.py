"""How time and memory grow with trace length on CPU: the paper's lengths (4K to 32K tokens).

Three measurements at each length, every one in its own subprocess (so its peak resident set
is its own), on `--threads` CPU threads (1 by default), for one synthetic Memento trace with
50 blocks and 32-token mementos (`kvprobe.data.synthetic.LongTraceSource`):

    mask      the memento mask of one trace, built the old way (the dense (1, 1, T, T) allow
              matrix and its additive bf16 mask, on the host, as capture and SFT stage 2 did)
              and the new way (`flex_block_mask`: the interval-built FlexAttention BlockMask).
              Time (best of 3; 1 for dense above 8K) and peak resident-set growth over the
              process's resident set before the build.
    capture   `run_capture` of layers 0 and 1 at offsets -1..+2, the mementos three blocks
              before the end (`bench_long.py`), on a Qwen3-shaped model: Qwen3-8B's attention
              (32 query heads, 8 KV heads of 128 dims, q/k norms, RoPE), hidden size 256,
              2 layers, random fp32 weights. FlexAttention (compiled on CPU) at every length,
              the dense mask where it is allowed (up to DENSE_MASK_MAX_TOKENS). Time per token
              and peak resident set, and its growth over the resident set after the model was built.
    collator  the SFT stage-2 collator (`kvprobe.training.collate.MementoCollator`) on one
              trace of T tokens (Qwen3's real tokenizer, read from the tokenised table as the
              Trainer's loader does): median time per sample over 20 calls, from
              `bench_collator.py`, and its largest tensor over T (a T x T mask would be T).

For each series the growth exponent k of y ~ T^k is fitted by least squares on log-log over
the lengths from 8K on (1: linear, 2: quadratic); at 4K fixed costs (imports, compiled kernels,
allocator pools) still dominate the small terms. The results go to `--out` (JSON, committed as
benchmarks/results/scale_cpu.json) and `render` prints the Markdown table that
benchmarks/RESULTS.md quotes (tests/project/test_published.py checks that the two agree).

    python benchmarks/bench_scale.py --out benchmarks/results/scale_cpu.json     # about 15 minutes
    python benchmarks/bench_scale.py --render benchmarks/results/scale_cpu.json  # the table only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
LENGTHS = (4096, 8192, 16384, 32768)
BLOCKS, MEMENTO_LEN, MODEL = 50, 32, "qwen3-heads"


FIT_FROM = 8192  # the shortest length the growth exponents are fitted on


def growth_exponent(lengths: list[int], values: list[float]) -> float:
    """k in values ~ lengths^k, least squares on log-log over the lengths from FIT_FROM on."""
    kept = [(t, v) for t, v in zip(lengths, values) if t >= FIT_FROM]
    return float(np.polyfit(np.log([t for t, _ in kept]), np.log([v for _, v in kept]), 1)[0])


def mask_child(impl: str, length: int, threads: int) -> dict[str, Any]:
    """Runs in the subprocess: build one trace's mask `impl` ('dense' or 'interval') at `length`."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_long import resident_bytes
    from shapes import long_source
    from kvprobe.memento.masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask

    torch.set_num_threads(threads)
    source = long_source(1, length, BLOCKS, MEMENTO_LEN, 1024)
    layouts, config = [source.layout], MaskConfig(0)
    build = {"dense": lambda: additive_mask(allow_matrix(layouts, length, config), torch.bfloat16),  # (1, 1, T, T)
             "interval": lambda: flex_block_mask(layouts, length, config)}[impl]
    allow_matrix(layouts, 256, config, truncate=True), flex_block_mask(layouts, 256, config, truncate=True)  # warm-up
    base = resident_bytes()
    times = []
    for _ in range(1 if impl == "dense" and length > 8192 else 3):
        t = time.perf_counter()
        mask = build()
        times.append(time.perf_counter() - t)
        del mask
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "length": length, "seconds": min(times), "peak_growth_bytes": max(0, peak - base)}


def run_child(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(lengths: tuple[int, ...], threads: int) -> dict[str, Any]:
    import torch

    import kvprobe.memento.forward as forward

    rows: dict[str, list[dict[str, Any]]] = {"mask": [], "capture": [], "collator": []}
    for length in lengths:
        for impl in ("dense", "interval"):
            rows["mask"].append(run_child([__file__, "--child-mask", impl, "--length", str(length),
                                           "--threads", str(threads)]))
            print(json.dumps(rows["mask"][-1]), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for length in lengths:
            impls = ["flex_attention"] + (["sdpa"] if length <= forward.DENSE_MASK_MAX_TOKENS else [])
            for impl in impls:
                row = run_child([str(HERE / "bench_long.py"), "--device", "cpu", "--model", MODEL, "--samples", "1",
                                 "--repeats", "1", "--threads", str(threads), "--blocks", str(BLOCKS),
                                 "--memento-len", str(MEMENTO_LEN), "--impl", impl, "--length", str(length),
                                 "--features-out", str(Path(d) / f"{impl}-{length}.npz")])
                rows["capture"].append(row)
                print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as d:  # the real Qwen3 tokenizer, one trace of each length
        out = Path(d) / "collator.json"
        done = subprocess.run([sys.executable, str(HERE / "bench_collator.py"), "--threads", str(threads), "--lengths",
                               *map(str, lengths), "--blocks", str(BLOCKS), "--out", str(out)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench_collator.py: {done.stderr.strip().splitlines()[-1:]}")
        for r in json.loads(out.read_text())["results"]:
            rows["collator"].append({"length": r["tokens"], "seconds": r["collate_ms_median"] / 1e3,
                                     "largest_over_T": r["largest_over_T"]})
            print(json.dumps(rows["collator"][-1]), flush=True)
    return {"lengths": list(lengths), "threads": threads, "blocks": BLOCKS, "memento_len": MEMENTO_LEN,
            "model": MODEL, "dense_mask_max_tokens": forward.DENSE_MASK_MAX_TOKENS,
            "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows}


def series(result: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """Each measured series by name: (lengths, values)."""
    rows = result["rows"]

    def pick(part: str, field: str, **match: Any) -> tuple[list[int], list[float]]:
        got = [r for r in rows[part] if all(r.get(k) == v for k, v in match.items())]
        return [r["length"] for r in got], [float(r[field]) for r in got]

    cap_per_token = lambda impl: [  # noqa: E731
        (r["length"], r["capture_s"] / r["forward_tokens"]) for r in rows["capture"] if r["impl"] == impl]
    out = {
        "dense mask, time": pick("mask", "seconds", impl="dense"),
        "dense mask, peak memory growth": pick("mask", "peak_growth_bytes", impl="dense"),
        "interval mask, time": pick("mask", "seconds", impl="interval"),
        "interval mask, peak memory growth": pick("mask", "peak_growth_bytes", impl="interval"),
        "capture (flex), time per token": tuple(map(list, zip(*cap_per_token("flex_attention")))),
        "capture (flex), peak memory": pick("capture", "peak_bytes", impl="flex_attention"),
        "capture (flex), peak memory over the model": (
            [r["length"] for r in rows["capture"] if r["impl"] == "flex_attention"],
            [r["peak_bytes"] - r["base_bytes"] for r in rows["capture"] if r["impl"] == "flex_attention"]),
        "collator, time per sample": pick("collator", "seconds"),
    }
    return out


def quotes(result: dict[str, Any]) -> dict[str, str]:
    """The phrases README.md and docs quote from this JSON, by name (tests/project/test_published.py checks
    that each quoting file holds them verbatim)."""
    rows = result["rows"]
    at = lambda part, length, **m: next(  # noqa: E731
        r for r in rows[part] if r["length"] == length and all(r.get(k) == v for k, v in m.items()))
    longest = max(result["lengths"])
    interval, dense = at("mask", longest, impl="interval"), at("mask", longest, impl="dense")
    capture = at("capture", longest, impl="flex_attention")
    grow = {name: growth_exponent(*xy) for name, xy in series(result).items()}
    return {
        "interval_mask_longest": f"{1e3 * interval['seconds']:.1f} ms and {interval['peak_growth_bytes'] / 2**20:.1f} MiB",
        "dense_mask_longest": f"{dense['seconds']:.0f} s and {dense['peak_growth_bytes'] / 2**30:.1f} GiB",
        "capture_longest": (f"{capture['capture_s']:.0f} s with a {capture['peak_bytes'] / 2**30:.1f} GiB peak "
                            f"({(capture['peak_bytes'] - capture['base_bytes']) / 2**30:.1f} GiB over the model)"),
        "capture_memory_exponent": f"{grow['capture (flex), peak memory over the model']:.2f}",
        "capture_time_exponent": f"T^{grow['capture (flex), time per token']:.2f}",
        "dense_memory_exponent": f"T^{grow['dense mask, peak memory growth']:.2f}",
        "collator_longest": f"{1e3 * at('collator', longest)['seconds']:.2f} ms",
    }


def render(result: dict[str, Any]) -> str:
    """The Markdown tables benchmarks/RESULTS.md quotes, from the JSON alone."""
    rows = result["rows"]
    mb = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = ["| T | dense mask: time (s) | dense mask: peak growth (MiB) | interval mask: time (ms) "
             "| interval mask: peak growth (MiB) | collator (ms/sample) | collator: largest tensor / T |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in result["lengths"]:
        dense = next(r for r in rows["mask"] if r["impl"] == "dense" and r["length"] == length)
        interval = next(r for r in rows["mask"] if r["impl"] == "interval" and r["length"] == length)
        coll = next(r for r in rows["collator"] if r["length"] == length)
        lines.append(f"| {length:,} | {dense['seconds']:.2f} | {mb(dense['peak_growth_bytes'])} | "
                     f"{1e3 * interval['seconds']:.1f} | {mb(interval['peak_growth_bytes'])} | "
                     f"{1e3 * coll['seconds']:.1f} | {coll['largest_over_T']:.1f} |")
    lines += ["", "| T | mask | tokens run | capture (s) | capture (ms/token) | capture / forward | peak RSS (MiB) "
              "| peak over the model (MiB) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows["capture"]:
        lines.append(f"| {r['length']:,} | {'flex' if r['impl'] == 'flex_attention' else 'dense'} | "
                     f"{r['forward_tokens']:,} | {r['capture_s']:.2f} | {1e3 * r['capture_s'] / r['forward_tokens']:.3f} | "
                     f"{r['capture_s'] / r['forward_s']:.2f} | {mb(r['peak_bytes'])} | "
                     f"{mb(r['peak_bytes'] - r['base_bytes'])} |")
    lines += ["", "| series | growth exponent k (y ~ T^k) | lengths |", "|---|---:|---|"]
    for name, (lengths, values) in series(result).items():
        lines.append(f"| {name} | {growth_exponent(lengths, values):.2f} | "
                     f"{', '.join(f'{t // 1024}K' for t in lengths if t >= FIT_FROM)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--render", help="print the tables of this JSON and stop")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child-mask", choices=("dense", "interval"), help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_mask:
        print(json.dumps(mask_child(args.child_mask, args.length, args.threads)))
        return
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    result = measure(tuple(args.lengths), args.threads)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
