"""GPU verification (issue 13): run every GPU path once and record what it measures.

Four steps, each in its own subprocess under `timeout`, within an 8-minute budget:

    pytest  `python -m pytest -m gpu -q`: every gpu-marked test (tests/test_gpu.py, tests/test_toy.py)
    flex    FlexAttention vs the dense mask on the Qwen3-8B architecture (random bf16 weights):
            captured features at 4K and 16K tokens, the flex capture at 32K, peak GPU memory
            (each run is a `benchmarks/bench_long.py` subprocess, so its peak memory is its own)
    qwen3   the same architecture under the dense mask: capture throughput (tokens/s) against
            the bare masked forward in the same process, at 4K and 16K tokens
    toy     the toy reproduction's capture (samples/s) and probe grid (seconds) on the GPU,
            on the shipped checkpoint `toy_models.load("final")` and a small sample count

Every figure goes into one JSON file (`--out`), and a summary table is printed. Nothing is
downloaded: the Qwen3 models are built from `Qwen3Config` with random weights.

    python benchmarks/gpu_check.py --out gpu_check.json                     # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-dry-run --steps qwen3 toy --out /tmp/dry.json   # CPU, tiny sizes

Without CUDA (and without --cpu-dry-run) every step is reported "skipped: no CUDA" and the
script exits 0. Exit status 1: a step failed, timed out, or one of its checks did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA = "kvprobe-gpu-check/1"
STEPS = ("pytest", "flex", "qwen3", "toy")
BUDGET_S = {"cuda": 480, "cpu-dry-run": 900}  # the issue's 8 minutes; the dry run on a busy 2-core CPU is slower
TIMEOUT_S = {  # seconds per step; each mode's steps sum to at most its budget
    "cuda": {"pytest": 120, "flex": 190, "qwen3": 100, "toy": 60},
    "cpu-dry-run": {"pytest": 150, "flex": 420, "qwen3": 150, "toy": 150},
}
MIN_STEP_S = 20  # a step with less time left than this is skipped, not started
# Sizes per mode; the dry run keeps the logic and shrinks every number. rel_tol bounds the relative L2
# difference of flex and dense features: bf16 keeps 8 mantissa bits and the two sum in different orders,
# so rounding grows with depth; a wrong mask moves memento features by 30% or more (tests/test_gpu.py).
SIZES = {
    "cuda": dict(device="cuda", dtype="bfloat16", flex_model="qwen3-8b", compare_lengths=(4096, 16384),
                 long_length=32768, qwen3_model="qwen3-8b", qwen3_samples={4096: 4, 16384: 2}, repeats=2,
                 toy_samples=5_000, probe_layers=None, probe_offsets=None, mlp_epochs=30, rel_tol=0.05),
    "cpu-dry-run": dict(device="cpu", dtype="float32", flex_model="tiny", compare_lengths=(512,), long_length=1024,
                        qwen3_model="tiny", qwen3_samples={512: 2, 1024: 1}, repeats=1, toy_samples=400,
                        probe_layers=(3,), probe_offsets=(-1, 0), mlp_epochs=2, rel_tol=1e-4),
}
TOY_SPEC = dict(layers=(0, 1, 2, 3), offsets=tuple(range(-1, 9)), pooling=("mean",), batch_size=256, shard_size=5000,
                dtype="float16")  # experiments/toy_reproduction.yaml
QWEN3_SITES = ("memento", "block_end")  # as experiments/qwen3_8b_memento.yaml


# ----------------------------------------------------------------------------- the parent


def environment() -> dict[str, Any]:
    """Versions, the device and the git commit: what a reader needs to place the figures."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    for name in ("transformers", "h5py", "accelerate", "pydantic", "vllm"):  # pydantic: only the CLI needs it
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                   device_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    env["git_commit"], env["git_dirty"] = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
    return env


def child_env(threads: int) -> dict[str, str]:
    """The environment of every subprocess: the repo importable without `pip install`, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def timed_run(cmd: list[str], timeout_s: int, env: dict[str, str]) -> tuple[int, str, str, float]:
    """Run `cmd` under coreutils `timeout` (which kills its whole process group); (rc, stdout, stderr, wall s)."""
    t = time.perf_counter()
    done = subprocess.run(["timeout", "--kill-after=10", str(timeout_s), *cmd], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - t


def status_of(rc: int, stderr: str, timeout_s: int) -> str:
    """'ok', 'timeout after N s' or 'failed (rc N): <last stderr line>'."""
    if rc in (0, 124, 137):
        return "ok" if rc == 0 else f"timeout after {timeout_s} s"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"failed (rc {rc}): {last[-1][:300] if last else 'no output'}"


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts, skip reasons, failures and collection errors from `pytest -q -rfEs` output."""
    counts: dict[str, int] = {}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    last = summary[-1] if summary else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", last):
        counts["errors" if what.startswith("error") else what] = int(n)
    skips = [m.group(1).strip() for m in re.finditer(r"^SKIPPED \[\d+\] (.*)$", output, re.M)]
    failed = [m.group(1).strip() for m in re.finditer(r"^(?:FAILED|ERROR) (.*)$", output, re.M)]
    # the issue allows skips only for a named missing package (and, on one GPU, the two-GPU test)
    allowed = re.compile(r"not installed|needs 2 GPUs|No module named|could not import", re.I)
    return {"counts": counts, "skip_reasons": skips, "failed": failed,
            "unexpected_skips": [s for s in skips if not allowed.search(s)]}


def run_pytest_step(mode: str, timeout_s: int, env: dict[str, str]) -> dict[str, Any]:
    """Step 1: the gpu-marked tests. The dry run collects only tests/test_gpu.py (it skips without CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]  # a module that fails to import must not hide the GPU tests
    if mode == "cpu-dry-run":
        cmd.append("tests/test_gpu.py")
    rc, out, err, wall = timed_run(cmd, timeout_s, env)
    figures = parse_pytest(out)
    figures["tail"] = out.strip().splitlines()[-15:]
    checks = {"no_failures": not figures["failed"] and not figures["counts"].get("failed")
              and not figures["counts"].get("errors")}
    if mode == "cuda":
        checks["no_unexpected_skips"] = not figures["unexpected_skips"]
    return {"status": status_of(rc, out, timeout_s), "wall_s": round(wall, 1), "figures": figures,
            "checks": checks}


def run_child_step(step: str, mode: str, timeout_s: int, env: dict[str, str], threads: int) -> dict[str, Any]:
    """Steps 2-4: this script again as `--child STEP`; it saves its figures as it goes, so a timeout keeps them."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "step.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--step-out", str(out),
               "--threads", str(threads)] + (["--cpu-dry-run"] if mode == "cpu-dry-run" else [])
        rc, stdout, stderr, wall = timed_run(cmd, timeout_s, env)
        saved = json.loads(out.read_text()) if out.exists() else {"figures": {}, "checks": {}}
    result = {"status": status_of(rc, stderr, timeout_s), "wall_s": round(wall, 1), **saved}
    if rc != 0:
        result["stderr_tail"] = stderr.strip().splitlines()[-20:]
    return result


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected step in order, each with its own timeout, inside the overall budget."""
    import torch

    mode = "cpu-dry-run" if args.cpu_dry_run else ("cuda" if torch.cuda.is_available() else "no-cuda")
    timeouts = dict(TIMEOUT_S.get(mode, TIMEOUT_S["cuda"]))
    for item in args.timeout:
        name, _, secs = item.partition("=")
        if name not in STEPS or not secs.isdigit():
            raise SystemExit(f"--timeout {item!r}: expected STEP=SECONDS with STEP one of {STEPS}")
        timeouts[name] = int(secs)
    budget = args.budget or BUDGET_S.get(mode, BUDGET_S["cuda"])
    report: dict[str, Any] = {"schema": SCHEMA, "mode": mode, "started": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "budget_s": budget, "environment": environment(), "steps": {}}
    env, t0 = child_env(args.threads), time.perf_counter()
    for step in STEPS:
        left = int(budget - (time.perf_counter() - t0))
        if step not in args.steps:
            result = {"status": "skipped: not selected"}
        elif mode == "no-cuda":
            result = {"status": "skipped: no CUDA"}
        elif left < MIN_STEP_S:
            result = {"status": f"skipped: out of time budget ({left} s left)"}
        else:
            limit = min(timeouts[step], left)
            print(f"[gpu_check] {step}: running (timeout {limit} s)", flush=True)
            result = (run_pytest_step(mode, limit, env) if step == "pytest"
                      else run_child_step(step, mode, limit, env, args.threads))
            result["timeout_s"] = limit
            print(f"[gpu_check] {step}: {result['status']} in {result['wall_s']} s", flush=True)
        report["steps"][step] = result
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


# ----------------------------------------------------------------------------- the steps (in the child)


def sync_for(device: str) -> Callable[[], None]:
    """A synchronise call that makes wall-clock timing honest on CUDA (a no-op on CPU)."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def peak_bytes(device: str) -> int:
    """Peak allocated CUDA memory since the last reset, or this process's peak resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def block_len_for(length: int, block_len: int = 480, memento_len: int = 32) -> int:
    """bench_long.py's block length: 480 tokens, shorter on short traces so that each has at least 6 blocks."""
    return max(8, min(block_len, (length - 40) // 6 - memento_len - 4))


def patch_identity() -> Callable[..., dict[str, Any]]:
    """Take the parameter hash out of timed captures; returns the real `model_identity`.

    `run_capture` records `model_identity`, a SHA-256 over every parameter, once per call: on Qwen3-8B
    that is 16.4 GB copied to the host and hashed, a fixed cost per capture that per-sample figures over
    a few samples must not carry (step 3 times one real hash on its own). The stores here are temporary.
    """
    import kvprobe.capture.run as run

    real = run.model_identity

    def identity(m: Any, name: str | None = None) -> dict[str, Any]:
        return {"name": name or type(m).__name__, "class": type(m).__name__, "dtype": str(m.dtype).removeprefix(
            "torch."), "n_params": sum(p.numel() for p in m.parameters()), "param_hash": "not computed (gpu_check)"}

    run.model_identity = identity
    return real


def bench_long_child(argv: list[str]) -> None:
    """One `bench_long.py --impl ...` run, in its own process, with the per-capture parameter hash off.

    Its capture spec gets pooling 'mean' explicitly: bench_long.py reads the features back with
    `store.features(layer, offset)`, whose pooling is 'mean', whatever the spec's default pooling.
    """
    import bench_long
    import kvprobe.capture as capture

    spec = capture.CaptureSpec
    capture.CaptureSpec = lambda **kw: spec(**{"pooling": ("mean",), **kw})  # bench_long imports it at call time
    patch_identity()
    sys.argv = [str(HERE / "bench_long.py"), *argv]
    bench_long.main()


BENCH_LONG = ("import sys; sys.path[:0] = [{here!r}, {root!r}]; import gpu_check; "
              "gpu_check.bench_long_child(sys.argv[1:])")


def step_flex(sz: dict[str, Any], threads: int, save: Callable[..., None]) -> None:
    """Step 2: bench_long.py runs (sdpa and flex at each compared length, flex alone at the long one)."""
    import numpy as np

    runs = [(t, impl) for t in sz["compare_lengths"] for impl in ("sdpa", "flex_attention")]
    runs.append((sz["long_length"], "flex_attention"))
    rows, comparisons, checks, feats = [], [], {}, {}  # feats[(length, impl)]: the captured features
    with tempfile.TemporaryDirectory() as d:
        for length, impl in runs:
            out = Path(d) / f"{impl}-{length}.npz"
            cmd = [sys.executable, "-c", BENCH_LONG.format(here=str(HERE), root=str(ROOT)), "--device", sz["device"],
                   "--model", sz["flex_model"], "--dtype", sz["dtype"], "--samples", "1", "--repeats", "1",
                   "--threads", str(threads), "--impl", impl, "--length", str(length), "--features-out", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), cwd=ROOT)
            if done.returncode != 0:
                err = [line for line in done.stderr.strip().splitlines() if line.strip()]
                rows.append({"impl": impl, "length": length, "error": err[-1][:300] if err else "no output"})
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["tokens_per_s_capture"] = length / row["capture_s"]
                rows.append(row)
                feats[(length, impl)] = dict(np.load(out))
            checks[f"{impl}_{length}_ran"] = done.returncode == 0
            if impl == "flex_attention" and (length, "sdpa") in feats and (length, impl) in feats:
                a, b = feats[(length, "sdpa")], feats[(length, impl)]
                rel = {k: float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a}
                cmp = {"length": length, "max_rel_l2": max(rel.values()), "rel_l2": rel,
                       "max_abs_diff": max(float(np.abs(b[k] - a[k]).max()) for k in a),
                       "max_abs_feature": max(float(np.abs(a[k]).max()) for k in a), "rel_tol": sz["rel_tol"]}
                comparisons.append(cmp)
                checks[f"flex_equals_dense_{length}"] = cmp["max_rel_l2"] <= sz["rel_tol"]
            save(figures={"model": sz["flex_model"], "dtype": sz["dtype"], "device": sz["device"],
                          "peak_kind": "cuda max_memory_allocated" if sz["device"] == "cuda" else "cpu peak RSS",
                          "runs": rows, "flex_vs_dense": comparisons}, checks=checks)


def step_qwen3(sz: dict[str, Any], threads: int, save: Callable[..., None]) -> None:
    """Step 3: the Qwen3-8B architecture (random weights, dense mask): capture vs bare forward, tokens/s."""
    import torch

    import bench_long
    from kvprobe.capture import CaptureSpec, run_capture
    from kvprobe.memento.forward import masked_forward

    device, dtype = sz["device"], getattr(torch, sz["dtype"])
    name, sync = sz["qwen3_model"], sync_for(sz["device"])
    _, _, n_layers, *_, vocab = bench_long.MODELS[name]
    t = time.perf_counter()
    model = bench_long.build_model(name, "sdpa", device, dtype, max(sz["qwen3_samples"]))
    sync()
    n_params, real_identity = sum(p.numel() for p in model.parameters()), patch_identity()
    figures: dict[str, Any] = {"model": name, "dtype": sz["dtype"], "device": device, "rows": [], "n_params": n_params,
                               "build_s": time.perf_counter() - t}
    for length, n in sz["qwen3_samples"].items():
        source = bench_long.LongTraceSource(n, length, block_len_for(length), 32, vocab)
        layers = (3, n_layers - 1) if n_layers > 4 else (0, n_layers - 1)  # the paper's 4th and last on Qwen3-8B
        spec = CaptureSpec(layers=layers, offsets=(-1, 0, 1, 2), sites=QWEN3_SITES,
                           pooling=("mean",), batch_size=1, shard_size=n, dtype="float16")
        batches = [source.samples(i, i + 1) for i in range(n)]

        def bare() -> float:
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    masked_forward(model, b.input_ids.to(device), layouts=b.layouts, config=spec.mask, logits_to_keep=1)
            sync()
            return time.perf_counter() - start

        bare()  # warm-up: kernels, allocator caches
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fwd, cap = [], []
        with tempfile.TemporaryDirectory() as d:
            for r in range(sz["repeats"]):  # interleaved, best of
                fwd.append(bare())
                sync()
                start = time.perf_counter()
                run_capture(model, source, spec, Path(d) / f"s{r}", progress=False)
                sync()
                cap.append(time.perf_counter() - start)
        f, c = min(fwd), min(cap)
        figures["rows"].append({"length": length, "samples": n, "n_blocks": source.layout.n_blocks,
                                "forward_s_per_sample": f / n, "capture_s_per_sample": c / n,
                                "forward_tokens_per_s": n * length / f, "capture_tokens_per_s": n * length / c,
                                "capture_over_forward": c / f, "peak_bytes": peak_bytes(device)})
        # the target of bench_capture.py; on the dry run's tiny model the store's fixed costs dominate
        checks = {"capture_over_forward_le_1.10": all(r["capture_over_forward"] <= 1.10 for r in figures["rows"])}
        save(figures=figures, checks=checks if device == "cuda" else {})
    t = time.perf_counter()  # last, so that a timeout here keeps the rows
    real_identity(model)
    figures["param_hash_s"] = time.perf_counter() - t
    save(figures=figures, checks=checks if device == "cuda" else {})


def step_toy(sz: dict[str, Any], threads: int, save: Callable[..., None]) -> None:
    """Step 4: the toy reproduction's capture and probe grid on the shipped checkpoint."""
    import torch

    import toy_models
    from kvprobe.analysis import ProbeSettings, probe_store
    from kvprobe.capture import CaptureSpec, run_capture
    from kvprobe.memento.forward import masked_forward
    from kvprobe.probes.mlp import MLPConfig
    from kvprobe.store import KVStore
    from toy_models.source import ToyPasscodeSource

    device, sync, n = sz["device"], sync_for(sz["device"]), sz["toy_samples"]
    model = toy_models.load("final").to(device)
    spec = CaptureSpec(**TOY_SPEC)
    warm = ToyPasscodeSource(256, seed=1).samples(0, 256)
    with torch.inference_mode():
        masked_forward(model, warm.input_ids.to(device), layouts=warm.layouts, config=spec.mask)
    figures: dict[str, Any] = {"checkpoint": "final", "device": device, "samples": n,
                               "capture": {k: list(v) if isinstance(v, tuple) else v for k, v in TOY_SPEC.items()}}
    with tempfile.TemporaryDirectory() as d:
        sync()
        t = time.perf_counter()
        path = run_capture(model, ToyPasscodeSource(n, seed=0), spec, Path(d) / "memento", progress=False)
        sync()
        figures["capture_s"] = time.perf_counter() - t
        figures["capture_samples_per_s"] = n / figures["capture_s"]
        save(figures=figures, checks={})
        with KVStore(path) as store:
            common = dict(n_boot=200, pooling="mean", device=device)
            linear = ProbeSettings(kinds=("linear",), layers=sz["probe_layers"], offsets=sz["probe_offsets"], **common)
            t = time.perf_counter()  # the grid with its shuffled-label control; probe_layers None: all 40 cells
            grid = probe_store(store, "memento", linear, progress=False)
            figures["probe_grid_s"] = time.perf_counter() - t
            figures["probe_grid_cells"] = len(grid.rows)
            mlp = ProbeSettings(kinds=("mlp",), seeds=1, shuffled_control=False, layers=(0, 3), offsets=(1,),
                                mlp=MLPConfig(max_epochs=sz["mlp_epochs"]), **common)  # the paper's 2 MLP cells
            t = time.perf_counter()
            mlp_grid = probe_store(store, "memento", mlp, progress=False)
            figures["mlp_s"] = time.perf_counter() - t
    acc = {f"layer{r.layer}_offset{r.offset:+d}": r.accuracy for r in grid.rows if r.layer == 3}
    figures["linear_accuracy_layer3"] = acc
    figures["mlp_accuracy_offset+1"] = {f"layer{r.layer}": r.accuracy for r in mlp_grid.rows}
    checks = {"control_near_chance": abs(acc["layer3_offset-1"] - 0.1) < 0.1}  # chance is 10%
    if n >= 5000:  # a few hundred dry-run samples are too few to require the direct signal
        checks["direct_above_chance"] = acc["layer3_offset+0"] > 0.2
    save(figures=figures, checks=checks)


CHILD_STEPS = {"flex": step_flex, "qwen3": step_qwen3, "toy": step_toy}


def run_child(args: argparse.Namespace) -> None:
    """The `--child STEP` process: one step, saving {figures, checks} to --step-out after each measurement."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path[:0] = [str(HERE), str(ROOT)]  # bench_long, kvprobe and toy_models without `pip install`
    sz = dict(SIZES["cpu-dry-run" if args.cpu_dry_run else "cuda"])

    def save(figures: dict[str, Any], checks: dict[str, bool]) -> None:
        tmp = Path(args.step_out + ".tmp")
        tmp.write_text(json.dumps({"figures": figures, "checks": checks}, indent=1, default=float))
        tmp.replace(args.step_out)

    CHILD_STEPS[args.child](sz, args.threads, save)


# ----------------------------------------------------------------------------- the summary


def summary(report: dict[str, Any]) -> str:
    """The printed table: one line per step, then one line per measured figure."""
    mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
    env = report["environment"]
    lines = [f"GPU check ({report['mode']}) on {env.get('device_name', 'CPU')}, torch {env['torch']}, "
             f"{report.get('wall_s', 0)} s of {report['budget_s']} s", "",
             "| step | status | wall (s) | checks |", "|---|---|---:|---|"]
    for step, r in report["steps"].items():
        checks = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r.get("checks", {}).items())
        lines.append(f"| {step} | {r['status']} | {r.get('wall_s', '')} | {checks} |")
    lines += ["", "| step | figure | value |", "|---|---|---|"]
    s = report["steps"]
    pt = s["pytest"].get("figures")
    if pt:
        lines.append(f"| pytest | counts | {pt['counts']} |")
        lines += [f"| pytest | skipped | {reason} |" for reason in pt["skip_reasons"][:8]]
    fx = s["flex"].get("figures")
    for r in (fx or {}).get("runs", []):
        mask = "dense" if r["impl"] == "sdpa" else "flex"
        lines.append(f"| flex | {mask} T={r['length']:,} | " + (f"failed: {r['error']}" if "error" in r else
                     f"forward {r['forward_s']:.3f} s, capture {r['capture_s']:.3f} s, "
                     f"{r['tokens_per_s_capture']:,.0f} tok/s, peak {mb(r['peak_bytes'])}") + " |")
    for c in (fx or {}).get("flex_vs_dense", []):
        lines.append(f"| flex | vs dense T={c['length']:,} | rel L2 {c['max_rel_l2']:.2e} (tol {c['rel_tol']}), "
                     f"max abs diff {c['max_abs_diff']:.2e} of {c['max_abs_feature']:.2e} |")
    q = s["qwen3"].get("figures")
    if q and q.get("param_hash_s") is not None:
        lines.append(f"| qwen3 | {q['model']}: one parameter hash (per run_capture call) | {q['param_hash_s']:.2f} s |")
    for r in (q or {}).get("rows", []):
        lines.append(f"| qwen3 | {q['model']} T={r['length']:,} x{r['samples']} | forward "
                     f"{r['forward_tokens_per_s']:,.0f} tok/s ({r['forward_s_per_sample']:.3f} s/sample), capture "
                     f"{r['capture_tokens_per_s']:,.0f} tok/s, ratio {r['capture_over_forward']:.2f}, "
                     f"peak {mb(r['peak_bytes'])} |")
    t = s["toy"].get("figures") or {}
    if "capture_s" in t:
        lines.append(f"| toy | capture {t['samples']:,} samples | {t['capture_samples_per_s']:,.0f} samples/s |")
    if "linear_accuracy_layer3" in t:
        lines += [f"| toy | linear grid, {t['probe_grid_cells']} cells + shuffled | {t['probe_grid_s']:.1f} s |",
                  f"| toy | MLP, 2 cells, 1 seed | {t['mlp_s']:.1f} s |"]
        lines.append("| toy | linear accuracy, layer 3 | " + ", ".join(
            f"{k.split('_')[1]} {100 * v:.1f}%" for k, v in t["linear_accuracy_layer3"].items()) + " |")
    return "\n".join(lines)


def passed(report: dict[str, Any]) -> bool:
    """True when no step failed or timed out and every recorded check holds (skips count as passing)."""
    return all((r["status"] == "ok" or r["status"].startswith("skipped")) and all(r.get("checks", {}).values())
               for r in report["steps"].values())


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the parent runs the steps, writes the JSON and prints the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report (default: ./gpu_check.json)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the steps on CPU with tiny sizes")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS", help="override a step's timeout")
    ap.add_argument("--budget", type=int, default=None, help="seconds for all steps (default 480; dry run 900)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every step")
    ap.add_argument("--child", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--step-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    report = run_all(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print(f"{summary(report)}\n\nwrote {args.out}")
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
