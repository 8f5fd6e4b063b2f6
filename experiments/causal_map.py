"""The toy's causal map beside its probe map (issue 16), remade by one command.

    python experiments/causal_map.py                 # runs experiments/toy_causal.yaml (~10 min on 2 cores)
    python experiments/causal_map.py --out runs/x    # where the run directory goes (default runs/toy_causal)

Runs `kvprobe run` on the config (capture, probe, causal, report) and copies what a reader
needs into experiments/results/causal_map/: summary.md (with the plain-language finding),
causal.csv, causal.json (every row) and the figure causal_map.png.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kvprobe.cli import main as kvprobe

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "toy_causal.yaml"
RESULTS = HERE / "results" / "causal_map"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy_causal", help="the run directory (resumed if it exists)")
    args = ap.parse_args()
    out = Path(args.out)
    argv = ["--threads", "1", "run", str(CONFIG), "--out", str(out)] + (["--resume"] if out.exists() else [])
    code = kvprobe(argv)
    if code:
        return code
    RESULTS.mkdir(parents=True, exist_ok=True)
    for src, name in ((out / "report" / "summary.md", "summary.md"), (out / "report" / "causal.csv", "causal.csv"),
                      (out / "causal" / "causal.json", "causal.json"),
                      (out / "report" / "figures" / "causal_map.png", "causal_map.png"),
                      (out / "report" / "figures" / "accuracy_heatmap.png", "accuracy_heatmap.png")):
        shutil.copyfile(src, RESULTS / name)
    summary = (RESULTS / "summary.md").read_text()  # the figures sit beside it here
    (RESULTS / "summary.md").write_text(summary.replace("figures/", ""))
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
