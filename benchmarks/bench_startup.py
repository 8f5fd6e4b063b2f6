"""How long the `kvprobe` command takes to answer when it needs no model (issue 29).

Wall time of whole processes, each started fresh, as a user runs them:

    kvprobe --help                          the top-level help
    kvprobe run --help                      a subcommand's help (its options come from the config dataclasses)
    kvprobe run missing.yaml --out OUT      a refusal: the config file does not exist (exit 2, one line)

and, as the baselines on the same machine in the same run, `python -c "import torch"` (what every
one of these paid before the command imported torch only where it is needed) and `python -c pass`
(the interpreter alone). Each command runs once to warm the file cache, then `--runs` times,
round-robin over the commands so that a change of load falls on all of them alike; the table
gives the median, the fastest and the slowest run. The load average before and after is recorded:
the numbers mean something only on quiet cores.

    python benchmarks/bench_startup.py --out benchmarks/results/startup.json      # about a minute
    python benchmarks/bench_startup.py --render benchmarks/results/startup.json   # the table only

benchmarks/RESULTS.md quotes the table `render` prints (tests/project/test_published.py checks that
the two agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = 9


def kvprobe_command() -> list[str]:
    """The installed `kvprobe` script beside this interpreter, else `python -m kvprobe`."""
    script = Path(sys.executable).with_name("kvprobe")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kvprobe"]


def commands(workdir: Path) -> dict[str, list[str]]:
    """What is timed, by the name the table shows."""
    kvprobe = kvprobe_command()
    return {
        "kvprobe --help": [*kvprobe, "--help"],
        "kvprobe run --help": [*kvprobe, "run", "--help"],
        "kvprobe run missing.yaml --out OUT (refused)": [*kvprobe, "run", str(workdir / "missing.yaml"),
                                                          "--out", str(workdir / "out")],
        'python -c "import torch" (baseline)': [sys.executable, "-c", "import torch"],
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    }


def timed(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and exit status of one run of `argv`, its output discarded."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def measure(runs: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        todo = commands(Path(d))
        seconds: dict[str, list[float]] = {name: [] for name in todo}
        codes = {name: timed(argv)[1] for name, argv in todo.items()}  # warm-up, and the exit status
        for _ in range(runs):
            for name, argv in todo.items():
                seconds[name].append(timed(argv)[0])
        assert not (Path(d) / "out").exists(), "the refused run wrote its output directory"
    return {"runs": runs, "cores": os.cpu_count(), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "rows": [{"command": name, "exit": codes[name], "seconds": [round(s, 4) for s in seconds[name]]}
                     for name in todo]}


def render(result: dict[str, Any]) -> str:
    """The Markdown table benchmarks/RESULTS.md quotes, from the JSON alone."""
    lines = ["| command | exit | median (s) | fastest (s) | slowest (s) |", "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        s = row["seconds"]
        lines.append(f"| `{row['command']}` | {row['exit']} | {statistics.median(s):.2f} | {min(s):.2f} | "
                     f"{max(s):.2f} |")
    lines.append(f"\n{result['runs']} runs of each, {result['machine']}, {result['cores']} cores; load average "
                 f"{result['load_before']:.2f} before, {result['load_after']:.2f} after.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--render", help="print the table of this JSON and stop")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"timed runs of each command (default {RUNS})")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    result = measure(args.runs)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
