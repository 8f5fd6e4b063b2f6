"""GPU check (issues 13 and 25): run every GPU path once, each step under its own time budget; one JSON.

Six steps, in this order, each in its own subprocess (its own process group, killed at its budget;
seconds on a GPU in brackets, 420 s in all):

    flex32k  [150] first: one 32K-token trace captured on the Qwen3-8B architecture (random bf16
             weights) loaded with attn_implementation="flex_attention", through `run_capture` (the
             BlockMask that `memento_inputs` builds); the captured blocks are the last ones, so the
             forward runs the whole trace. The BlockMask's build time and memory on its own, the
             capture cold (with FlexAttention's compile) and warm, peak GPU memory
    pytest   [100] the gpu-marked tests, in the test files that hold them (`-m gpu`, one process)
    flex     [110] FlexAttention against the dense mask on the same architecture, in one process: the
             capture at 4K and 8K tokens (the dense mask's limit) under sdpa, then under flex;
             relative L2 of the features (bf16: at most 5%)
    qwen3    [70]  the dense-mask capture against the bare masked forward on the same architecture,
             tokens/s, at 4K and 8K tokens; one parameter hash on its own
    toy      [45]  the toy reproduction's capture (samples/s) and probe grid (seconds) on the shipped
             checkpoint
    vllm     [90]  vLLM's offline engine on a tiny Qwen3 written here (config and tokenizer files, random
             weights: load_format="dummy"): kvprobe's `generate_offline` where the Memento overlay is
             installed, else stock `vllm.LLM`, generation throughput. Skipped, with the reason, where
             vLLM is not importable (the GPU image has none)

A step whose modules are missing is skipped with their names; a step that overruns its budget is
reported as timed out with the figures it saved so far, and the check goes on. The JSON report is
written after every step (`--out`, default `$OUT/gpu_check.json` where OUT is set), so a check cut
off from outside still leaves what it measured. Nothing is downloaded: the models are built from
their configs with random weights.

This file runs the steps (budgets, process groups, the report and its summary); the steps themselves
are in gpu_steps.py, the models and long traces they share with bench_long.py in shapes.py.

    bash benchmarks/gpu_check.sh                                     # on a GPU machine (installs the wheels)
    python benchmarks/gpu_check.py --rehearse --out /tmp/check.json   # the same steps on CPU, tiny sizes

Without CUDA and without --rehearse every step reports "skipped: no CUDA" and the exit status is 0.
Exit status 1: a step failed or timed out, or one of its checks did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # gpu_steps and shapes, where this file is loaded by path (tests/project/test_gpu_check.py)
    sys.path.insert(0, str(HERE))

from gpu_steps import CHILD_STEPS, SIZES, last_line  # noqa: E402

SCHEMA = "kvprobe-gpu-check/2"
STEPS = ("flex32k", "pytest", "flex", "qwen3", "toy", "vllm")
MODES = ("cuda", "rehearse")
BUDGET_S = {"cuda": 420, "rehearse": 1500}  # all steps together; the device call adds the install and the start
STEP_BUDGET_S = {  # each step's own limit, in seconds
    "cuda": {"flex32k": 150, "pytest": 100, "flex": 110, "qwen3": 70, "toy": 45, "vllm": 90},
    "rehearse": {"flex32k": 420, "pytest": 240, "flex": 240, "qwen3": 180, "toy": 180, "vllm": 120},
}
MIN_STEP_S = 20  # a step with less of the overall budget left than this is skipped, not started
# The modules each step imports beyond torch and transformers (and their own dependencies): a step
# whose modules are not installed is skipped, naming them. The GPU image has all but vllm.
NEEDS = {
    "flex32k": ("h5py",), "flex": ("h5py",), "vllm": ("vllm",), "qwen3": ("h5py",),
    "toy": ("h5py", "scipy", "sklearn"), "pytest": ("pytest", "h5py", "scipy", "sklearn"),
}
VERSIONS = ("transformers", "h5py", "numpy", "scipy", "scikit-learn", "accelerate", "pydantic", "pydantic-core",
            "typing-extensions", "pytest", "vllm", "kvprobe")


class Interrupted(Exception):
    """SIGTERM reached the check: stop the running step, write the report, exit."""


# ----------------------------------------------------------------------------- the parent


def environment() -> dict[str, Any]:
    """Versions (and where each package came from), the device, the git commit: what places the figures."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                           "host": platform.node(), "versions": {}}
    manifest = Path(os.environ.get("GPU_WHEELS", ROOT / ".gpuwheels")) / "manifest.json"
    carried = list(json.loads(manifest.read_text())["packages"]) if manifest.exists() else []
    for name in dict.fromkeys([*VERSIONS, *carried]):  # and every package the wheel folder carries
        try:
            dist = metadata.distribution(name)
            env["versions"][name] = f"{dist.version} ({Path(str(dist.locate_file(''))).resolve()})"
        except metadata.PackageNotFoundError:
            env["versions"][name] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                   device_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    env["git_commit"], env["git_dirty"] = git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    return env


def git(*args: str) -> str | None:
    """`git ARGS` in the repository, or None where git or the repository's .git is absent (a copied tree)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def child_env(threads: int) -> dict[str, str]:
    """Every subprocess's environment: the repository importable without `pip install`, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def timed_run(cmd: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int, str, str, float]:
    """Run `cmd` in its own process group; at `timeout_s` the group is killed (rc 124).

    Returns (rc, stdout, stderr, wall seconds). Output goes to files, not pipes, so that a process
    the command leaves behind (vLLM's engine core) cannot hold the step open; whatever is left of
    the group when the command ends is killed. On SIGTERM (Interrupted) the group is killed too.
    """
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            kill_group(proc)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), wall


def kill_group(proc: subprocess.Popen) -> None:
    """End what is left of `proc`'s process group: SIGTERM, then SIGKILL to whatever is there 10 s later."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not group_alive(proc):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.1)


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of `proc`'s group is left (the leader is reaped once it has exited)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True



def status_of(rc: int, stderr: str, timeout_s: int) -> str:
    """'ok', 'timeout after N s' or 'failed (rc N): <last stderr line>'."""
    if rc in (0, 124, 137):
        return "ok" if rc == 0 else f"timeout after {timeout_s} s"
    return f"failed (rc {rc}): {last_line(stderr)}"


def missing_modules(step: str) -> list[str]:
    """The modules of NEEDS[step] that cannot be found here (checked without importing them)."""
    out = []
    for name in NEEDS[step]:
        try:
            found = util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def skip_reason(step: str, mode: str) -> str | None:
    """Why `step` cannot run in `mode` here, or None."""
    if mode == "no-cuda":
        return "no CUDA"
    missing = missing_modules(step)
    if missing:
        return f"needs {', '.join(missing)} (not installed)"
    if step == "vllm" and mode != "cuda":
        return "vLLM's engine needs CUDA (this run is on CPU)"
    return None


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts, skip reasons, failures and collection errors from `pytest -q -rfEs` output."""
    counts: dict[str, int] = {}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    last = summary[-1] if summary else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", last):
        counts["errors" if what.startswith("error") else what] = int(n)
    skips = [m.group(1).strip() for m in re.finditer(r"^SKIPPED \[\d+\] (.*)$", output, re.M)]
    failed = [m.group(1).strip() for m in re.finditer(r"^(?:FAILED|ERROR) (.*)$", output, re.M)]
    # on a GPU the issue allows skips only for a named missing package (and, on one GPU, the two-GPU test)
    allowed = re.compile(r"not installed|needs 2 GPUs|No module named|could not import", re.I)
    return {"counts": counts, "skip_reasons": skips, "failed": failed,
            "unexpected_skips": [s for s in skips if not allowed.search(s)]}


def gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests: the pytest step collects these alone."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_pytest_step(mode: str, timeout_s: int, env: dict[str, str], log: Callable[[str, str], None]) -> dict:
    """The gpu-marked tests, in one process (`-o addopts=` drops the ini's xdist workers)."""
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=",
           "--continue-on-collection-errors", *files]
    rc, out, err, wall = timed_run(cmd, timeout_s, env)
    log("pytest", out + err)
    figures = parse_pytest(out)
    figures["files"] = files
    figures["tail"] = out.strip().splitlines()[-15:]
    counts = figures["counts"]
    checks = {"no_failures": not figures["failed"] and not counts.get("failed") and not counts.get("errors"),
              "collected_tests": sum(counts.get(k, 0) for k in ("passed", "failed", "skipped")) > 0}
    if mode == "cuda":
        checks["no_unexpected_skips"] = not figures["unexpected_skips"]
    # pytest's exit 1 means failed tests, which the checks carry; anything else is the step failing
    status = status_of(0 if rc == 1 else rc, err or out, timeout_s)
    return {"status": status, "wall_s": round(wall, 1), "figures": figures, "checks": checks}


def run_child_step(step: str, mode: str, timeout_s: int, env: dict[str, str], threads: int,
                   log: Callable[[str, str], None]) -> dict[str, Any]:
    """A measuring step: this script again as `--child STEP`; it saves its figures as it goes, so a
    timeout keeps them, and it may report a skip (a module that is there but cannot be imported)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "step.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--mode", mode, "--step-out", str(out),
               "--threads", str(threads)]
        rc, stdout, stderr, wall = timed_run(cmd, timeout_s, env)
        saved = json.loads(out.read_text()) if out.exists() else {"figures": {}, "checks": {}}
    log(step, stdout + stderr)
    if "skip" in saved and rc == 0:
        return {"status": f"skipped: {saved['skip']}", "wall_s": round(wall, 1)}
    result = {"status": status_of(rc, stderr, timeout_s), "wall_s": round(wall, 1), **saved}
    if rc != 0:
        result["stderr_tail"] = stderr.strip().splitlines()[-20:]
    return result


def run_all(args: argparse.Namespace, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every selected step in order, each with its own time budget, inside the overall budget.
    `write(report)` is called after every step."""
    import torch

    mode = "rehearse" if args.rehearse else ("cuda" if torch.cuda.is_available() else "no-cuda")
    budgets = dict(STEP_BUDGET_S.get(mode, STEP_BUDGET_S["cuda"]))
    for item in args.timeout:
        name, _, secs = item.partition("=")
        if name not in STEPS or not secs.isdigit():
            raise SystemExit(f"gpu_check: --timeout {item!r}: expected STEP=SECONDS with STEP one of "
                             f"{', '.join(STEPS)}")
        budgets[name] = int(secs)
    budget = args.budget or BUDGET_S.get(mode, BUDGET_S["cuda"])
    report: dict[str, Any] = {"schema": SCHEMA, "mode": mode, "started": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "budget_s": budget, "step_budget_s": budgets, "environment": environment(),
        "steps": {s: {"status": "not started"} for s in STEPS}}
    write(report)
    env, t0 = child_env(args.threads), time.perf_counter()
    logfile = Path(args.out).with_name(Path(args.out).stem + "_steps.log")
    logfile.write_text("")

    def log(step: str, text: str) -> None:
        with logfile.open("a") as f:
            f.write(f"===== {step} =====\n{text}\n")

    for step in STEPS:
        left = int(budget - (time.perf_counter() - t0))
        why = "not selected" if step not in args.steps else skip_reason(step, mode)
        if why is None and left < MIN_STEP_S:
            why = f"out of the overall time budget ({left} s left of {budget} s)"
        if why is not None:
            result: dict[str, Any] = {"status": f"skipped: {why}"}
        else:
            limit = min(budgets[step], left)
            print(f"[gpu_check] {step}: running (budget {limit} s)", flush=True)
            try:
                result = (run_pytest_step(mode, limit, env, log) if step == "pytest"
                          else run_child_step(step, mode, limit, env, args.threads, log))
            except Interrupted as e:
                log(step, str(e))
                report["steps"][step] = {"status": "interrupted (SIGTERM)", "budget_s": limit}
                report["wall_s"] = round(time.perf_counter() - t0, 1)
                write(report)
                raise
            result["budget_s"] = limit
        print(f"[gpu_check] {step}: {result['status']}" + (f" in {result['wall_s']} s" if "wall_s" in result else ""),
              flush=True)
        report["steps"][step] = result
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        write(report)
    return report




def run_child(args: argparse.Namespace) -> None:
    """The `--child STEP` process: one step, saving {figures, checks} (or {skip}) to --step-out as it goes."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path[:0] = [str(ROOT)]  # kvprobe and toy_models without `pip install`

    def write(data: dict[str, Any]) -> None:
        tmp = Path(args.step_out + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float))
        tmp.replace(args.step_out)

    def save(figures: dict[str, Any], checks: dict[str, bool]) -> None:
        write({"figures": figures, "checks": checks})

    CHILD_STEPS[args.child](dict(SIZES[args.mode]), save, lambda reason: write({"skip": reason}))


# ----------------------------------------------------------------------------- the summary


def summary(report: dict[str, Any]) -> str:
    """The printed table: one line per step, then one line per measured figure."""
    mb = lambda b: f"{b / 2**20:,.0f} MiB" if b is not None else "n/a"  # noqa: E731
    over = lambda r: f" ({mb(r['peak_over_weights_bytes'])} over the weights)" if r.get(  # noqa: E731
        "peak_over_weights_bytes") is not None else " (process peak RSS)"
    env = report["environment"]
    lines = [f"GPU check ({report['mode']}) on {env.get('device_name', 'CPU')}, torch {env['torch']}, "
             f"{report.get('wall_s', 0)} s of {report['budget_s']} s", "",
             "| step | status | wall (s) | budget (s) | checks |", "|---|---|---:|---:|---|"]
    for step, r in report["steps"].items():
        checks = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r.get("checks", {}).items())
        lines.append(f"| {step} | {r['status']} | {r.get('wall_s', '')} | {r.get('budget_s', '')} | {checks} |")
    lines += ["", "| step | figure | value |", "|---|---|---|"]
    s = report["steps"]
    f32 = s["flex32k"].get("figures") or {}
    if "forward_tokens" in f32:
        lines.append(f"| flex32k | {f32['model']} T={f32['length']:,}, {f32['n_blocks']} blocks | forward runs "
                     f"{f32['forward_tokens']:,} tokens; model built in {f32['build_s']:.1f} s |")
    for label in ("mask_cold", "mask_warm"):
        if label in f32:
            m = f32[label]
            lines.append(f"| flex32k | {label.replace('_', ' ')} | {m['type']} in {1000 * m['build_s']:.1f} ms, "
                         f"peak {mb(m['peak_bytes'])} |")
    for label in ("capture_cold", "capture_warm"):
        if label in f32:
            c = f32[label]
            lines.append(f"| flex32k | {label.replace('_', ' ')} | {c['s']:.2f} s, {c['tokens_per_s']:,.0f} tok/s, "
                         f"peak {mb(c['peak_bytes'])}" + over(c) + " |")
    fx = s["flex"].get("figures") or {}
    for r in fx.get("runs", []):
        lines.append(f"| flex | {'dense' if r['impl'] == 'sdpa' else 'flex'} T={r['length']:,} | capture "
                     f"{r['capture_s']:.3f} s (first {r['first_s']:.2f} s), {r['tokens_per_s']:,.0f} tok/s, "
                     f"peak {mb(r['peak_bytes'])}" + over(r) + " |")
    for c in fx.get("flex_vs_dense", []):
        lines.append(f"| flex | vs dense T={c['length']:,} | rel L2 {c['max_rel_l2']:.2e} (tol {c['rel_tol']}) |")
    vl = s["vllm"].get("figures") or {}
    if "overlay" in vl:
        lines.append(f"| vllm | vLLM {vl['vllm']}, Memento overlay | {vl['overlay']} |")
    if "tokens_per_s" in vl:
        lines.append(f"| vllm | {vl['prompts']} prompts x {vl['max_tokens']} tokens, dummy weights | "
                     f"engine up in {vl['engine_start_s']:.1f} s, {vl['tokens_per_s']:,.0f} tok/s |")
    if "generate_offline_s" in vl:
        lines.append(f"| vllm | generate_offline, {vl['generations']} prompts | {vl['generate_offline_s']:.1f} s |")
    q = s["qwen3"].get("figures") or {}
    for r in q.get("rows", []):
        lines.append(f"| qwen3 | {q['model']} T={r['forward_tokens']:,} x{r['samples']} | forward "
                     f"{r['forward_tokens_per_s']:,.0f} tok/s, capture {r['capture_tokens_per_s']:,.0f} tok/s, "
                     f"ratio {r['capture_over_forward']:.2f}, peak {mb(r['peak_bytes'])}" + over(r) + " |")
    if "param_hash_s" in q:
        lines.append(f"| qwen3 | one parameter hash (per run_capture call) | {q['param_hash_s']:.2f} s |")
    t = s["toy"].get("figures") or {}
    if "capture_s" in t:
        lines.append(f"| toy | capture {t['samples']:,} samples | {t['capture_samples_per_s']:,.0f} samples/s |")
    if "linear_accuracy_layer3" in t:
        lines += [f"| toy | linear grid, {t['probe_grid_cells']} cells + shuffled | {t['probe_grid_s']:.1f} s |",
                  f"| toy | MLP, 2 cells, 1 seed | {t['mlp_s']:.1f} s |",
                  "| toy | linear accuracy, layer 3 | " + ", ".join(
                      f"{k.split('_')[1]} {100 * v:.1f}%" for k, v in t["linear_accuracy_layer3"].items()) + " |"]
    pt = s["pytest"].get("figures")
    if pt:
        lines.append(f"| pytest | {', '.join(pt['files'])} | {pt['counts']} |")
        lines += [f"| pytest | skipped | {reason} |" for reason in pt["skip_reasons"][:8]]
    return "\n".join(lines)


def passed(report: dict[str, Any]) -> bool:
    """True when no step failed or timed out and every recorded check holds (skips count as passing)."""
    return all((r["status"] == "ok" or r["status"].startswith("skipped")) and all(r.get("checks", {}).values())
               for r in report["steps"].values())


def default_out() -> str:
    """$OUT/gpu_check.json where the device tool's output folder is set, else ./gpu_check.json."""
    return str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; the parent runs the steps, writes the JSON and prints the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the JSON report (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument("--rehearse", action="store_true", help="run the steps on CPU with tiny sizes (no GPU needed)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS", help="override a step's budget")
    ap.add_argument("--budget", type=int, default=None,
                    help=f"seconds for all steps (default {BUDGET_S['cuda']}; rehearsal {BUDGET_S['rehearse']})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every step")
    ap.add_argument("--child", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--step-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    args.out = args.out or default_out()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict[str, Any]) -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=float))
        tmp.replace(out)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        report = run_all(args, write)
    except Interrupted:
        print(f"[gpu_check] interrupted; wrote {out}", flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{summary(report)}\n\nwrote {out}")
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
