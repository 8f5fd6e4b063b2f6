"""Re-run every published result and compare the JSON it writes with the committed one (issue 26).

    python benchmarks/rerun_published.py                     # every source of experiments/published.py
    python benchmarks/rerun_published.py --only paper_figures
    python benchmarks/rerun_published.py --list              # sources, their arguments and cost

Each script of `experiments/published.SOURCES` runs in a fresh process with its stated
arguments (seed, samples, one thread) into a scratch --out directory; every JSON file it
writes there must equal the committed file of the same name (numbers to the last digit),
except wall-clock keys and files (IGNORED, IGNORED_FILES). The fast check of the prose against the committed
JSON is tests/project/test_published.py; this is the slow half: that the committed JSON is what the
code computes today. Exit status 1 when any source differs, with the first differences.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from published import ROOT, SOURCES, Source  # noqa: E402

IGNORED = {"seconds", "timings", "elapsed", "wall_time_s"}  # wall-clock keys: never compared
IGNORED_FILES = {"timings.json"}  # wall-clock files


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two JSON values differ (exact: floats to the last digit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b)) if k not in IGNORED]
        return out + [d for k in sorted(set(a) & set(b)) if k not in IGNORED
                      for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} against committed {b!r}"]


def rerun(source: Source) -> list[str]:
    """Run the script into a scratch directory; the differences of each JSON it wrote from the committed one."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as scratch:
        args = [a.replace("{scratch}", scratch) for a in source.args]
        subprocess.run([sys.executable, source.script, *args, "--out", tmp], cwd=ROOT, check=True)
        out = []
        written = sorted(Path(tmp).glob("*.json"))
        if not written:
            return [f"{source.script} wrote no JSON into --out"]
        for path in (p for p in written if p.name not in IGNORED_FILES):
            committed = ROOT / source.results / path.name
            if not committed.is_file():
                out.append(f"{path.name}: not committed under {source.results}")
                continue
            out += [f"{path.name}{d}" for d in differences(json.loads(path.read_text()),
                                                            json.loads(committed.read_text()))]
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=[s.name for s in SOURCES])
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    chosen = [s for s in SOURCES if not args.only or s.name in args.only]
    if args.list:
        for s in chosen:
            print(f"{s.name}: python {s.script} {' '.join(s.args)}  (about {s.minutes:g} min on one thread)")
        return 0
    failed = False
    for s in chosen:
        t = time.perf_counter()
        diffs = rerun(s)
        status = "same" if not diffs else f"{len(diffs)} differences"
        print(f"{s.name}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
        for d in diffs[:10]:
            print(f"  {d}")
        failed |= bool(diffs)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
