"""The toy's causal map beside its probe map (issue 16), remade by one command.

    python experiments/causal_map.py                 # runs experiments/toy_causal.yaml (~10 min on 2 cores)
    python experiments/causal_map.py --run runs/x    # where the run directory goes (default runs/toy_causal)

Runs `kvprobe --threads 1 run` on the config (capture, probe, causal, report) and copies what a
reader needs into --out (experiments/results/causal_map/): summary.md (with the plain-language
finding), results.json, causal.csv, causal.json (every row) and the figures. `render` gives the
README's causal finding from causal.json (the report's own sentence).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kvprobe.cli import main as kvprobe

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "toy_causal.yaml"
RESULTS = HERE / "results" / "causal_map"


def load(out: Path = RESULTS) -> dict:
    """causal.json of results directory `out`, as the CausalResult the report was written from (its rows;
    the per-sample arrays are not committed)."""
    import json

    from kvprobe.causal.run import CausalResult, CausalRow

    data = json.loads((Path(out) / "causal.json").read_text())
    results = json.loads((Path(out) / "results.json").read_text()) if (Path(out) / "results.json").is_file() else None
    return {"causal": CausalResult([CausalRow(**r) for r in data["rows"]], {}, data["spec"], data.get("reader")),
            "results": results}


def _row(data: dict, intervention: str, offset: int, layer: int):
    return next(r for r in data["causal"].rows if (r.intervention, r.offset, r.layer) == (intervention, offset, layer))


def quotes(data: dict) -> dict[str, str]:
    """The phrases docs/causal.md quotes from causal.json and results.json."""
    rows = data["causal"].rows
    abl = sorted((r for r in rows if r.intervention == "ablation"), key=lambda r: -r.delta_loss_memento)
    swp = [r for r in rows if r.intervention == "interchange"]
    hurt = sum(r.delta_loss_memento_low > 0 for r in abl)
    top, second = abl[0], abl[1]
    probe = [100 * r["accuracy"] for r in data["results"]["rows"]
             if r["probe"] == "linear" and r["offset"] > 0 and r["layer"] >= 2]
    follow = {layer: _row(data, "interchange", 0, layer) for layer in (1, 2)}
    return {
        "probe": f"passcode at {min(probe):.0f}-{max(probe):.0f}% (with no other difference between samples",
        "hurt": f"(the text kept) raises the loss on later memento tokens in {hurt} of {len(abl)} cells:",
        "top": (f"most at offset {top.offset:+d}, layer {top.layer}, {top.delta_loss_memento:+.2f} nats with "
                f"{100 * top.flip_memento:.1f}% of greedy task predictions changed"),
        "second": (f"at offset {second.offset:+d}, layer {second.layer}, {second.delta_loss_memento:+.2f} nats "
                   f"({100 * second.flip_memento:.1f}% changed)"),
        "swap": f"by at most {max(abs(r.delta_loss_memento) for r in swp):.4f} nats in any cell",
        "follow": (f"decode the donor's digits {100 * follow[1].follow_donor:.1f}% of the time (the base's "
                   f"{100 * follow[1].follow_base:.1f}%; chance 10%), its layer-2 K/V {100 * follow[2].follow_donor:.1f}% "
                   f"({100 * follow[2].follow_base:.1f}%)"),
    }


def render(data: dict) -> dict[str, str]:
    """The README's causal finding (between <!-- causal-finding --> markers): the report's own sentence."""
    from kvprobe.reporting.causal import causal_finding

    return {"README.md#causal-finding": causal_finding(data["causal"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/toy_causal"), help="the run directory (resumed)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results are copied")
    args = ap.parse_args()
    run, out = args.run, args.out
    argv = ["--threads", "1", "run", str(CONFIG), "--out", str(run)] + (["--resume"] if run.exists() else [])
    code = kvprobe(argv)
    if code:
        return code
    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((run / "report" / "summary.md", "summary.md"), (run / "report" / "results.json", "results.json"),
                      (run / "report" / "causal.csv", "causal.csv"), (run / "causal" / "causal.json", "causal.json"),
                      (run / "report" / "figures" / "causal_map.png", "causal_map.png"),
                      (run / "report" / "figures" / "accuracy_heatmap.png", "accuracy_heatmap.png")):
        shutil.copyfile(src, out / name)
    summary = (out / "summary.md").read_text()  # the figures sit beside it here
    (out / "summary.md").write_text(summary.replace("figures/", ""))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
