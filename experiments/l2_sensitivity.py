"""How much the headline cells depend on the linear probe's L2 strength, on the shipped toy.

    python experiments/l2_sensitivity.py          # 3,000 passcodes; writes experiments/results/l2_sensitivity/

Last layer: causal control (-1), direct (0) and the first masked memento (+1), memento
mode, kvprobe's default features. For each L2 in {1e-5, ..., 1e-1}: validation accuracy
of the probe refitted at that value (95% intervals), the inner-split criterion that
selection reads, and the value selection chooses (`kvprobe.analysis.sensitivity_curves`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import toy_models
from kvprobe.analysis import ProbeSettings, sensitivity_curves
from kvprobe.capture import CaptureSpec, run_capture
from kvprobe.reporting.figures import l2_sensitivity, save_figure
from kvprobe.store import KVStore
from toy_models.source import ToyPasscodeSource

OUT = Path(__file__).resolve().parent / "results" / "l2_sensitivity"
L2_VALUES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    spec = CaptureSpec(layers=(3,), offsets=(-1, 0, 1), batch_size=500, shard_size=args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        path = run_capture(toy_models.load("final"), ToyPasscodeSource(args.samples, seed=0), spec, Path(tmp) / "s",
                           progress=False)
        with KVStore(path) as store:
            curves = sensitivity_curves(store, "memento", ProbeSettings(kinds=("linear",)), l2_values=L2_VALUES)
    save_figure(l2_sensitivity(curves), OUT / "l2_sensitivity", formats=("png",))
    rows = [{"offset": c.offset, "layer": c.layer, "l2": list(c.l2), "accuracy": list(map(float, c.accuracy)),
             "ci_low": list(map(float, c.ci_low)), "ci_high": list(map(float, c.ci_high)),
             "inner_accuracy": list(map(float, c.inner_accuracy)), "chosen": c.chosen} for c in curves]
    (OUT / "results.json").write_text(json.dumps({"samples": args.samples, "curves": rows}, indent=1) + "\n")
    lines = [f"# Linear probe accuracy against L2 on the shipped toy ({args.samples} passcodes, layer 3)", "",
             "| cell | " + " | ".join(f"L2 {v:g}" for v in L2_VALUES) + " | chosen |", "|---|" + "---|" * (len(L2_VALUES) + 1)]
    for r in rows:
        cells = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for a, lo, hi in zip(r["accuracy"], r["ci_low"], r["ci_high"])]
        lines.append(f"| offset {r['offset']:+d} | " + " | ".join(cells) + f" | {r['chosen']:g} |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
