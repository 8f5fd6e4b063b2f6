"""How much the headline cells depend on the linear probe's L2 strength, on the shipped toy.

    python experiments/l2_sensitivity.py                  # 3,000 passcodes (1 thread)
    python experiments/l2_sensitivity.py --out DIR        # the same run into DIR
    python experiments/l2_sensitivity.py --table-only     # rewrite summary.md and the figure from results.json

Last layer: causal control (-1), direct (0) and the first masked memento (+1), memento
mode, kvprobe's default features. For each L2 in {1e-6, ..., 1e-1}: validation accuracy
of the probe refitted at that value (95% intervals), the inner-split criterion that
selection reads, and the value selection chooses (`kvprobe.analysis.sensitivity_curves`).
Results go to experiments/results/l2_sensitivity/.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import toy_models
from kvprobe.analysis import ProbeConfig, SensitivityCurve, sensitivity_curves
from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.reporting.figures import l2_sensitivity, save_figure
from kvprobe.store import KVStore
from toy_models.source import ToyPasscodeSource
from published import results_json, script_arguments, start, write_files

CHECKPOINT = "final"  # the shipped toy
OUT = Path(__file__).resolve().parent / "results" / "l2_sensitivity"
SUMMARY = "experiments/results/l2_sensitivity/summary.md"  # render() key: the committed file
L2_VALUES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # down to the weak bound of kvprobe.probes.L2_BOUNDS
CONDITION = "memento"


def capture_spec(samples: int) -> CaptureConfig:
    """What is captured: layer 3, offsets -1, 0, +1, the default site and pooling."""
    return CaptureConfig(layers=(3,), offsets=(-1, 0, 1), batch_size=500, shard_size=samples)


def measure(samples: int) -> dict:
    """The three curves at layer 3: {"samples", "curves": [{offset, layer, l2, accuracy, ci_low, ci_high,
    inner_accuracy (lists over l2), chosen}]}."""
    spec = capture_spec(samples)
    with tempfile.TemporaryDirectory() as tmp:
        path = run_capture(toy_models.load(CHECKPOINT), ToyPasscodeSource(samples, seed=0), spec, Path(tmp) / "s",
                           progress=False)
        with KVStore(path) as store:
            curves = sensitivity_curves(store, CONDITION, ProbeConfig(families=("linear",)), l2_values=L2_VALUES)
    rows = [{"offset": c.offset, "layer": c.layer, "l2": list(c.l2), "accuracy": list(map(float, c.accuracy)),
             "ci_low": list(map(float, c.ci_low)), "ci_high": list(map(float, c.ci_high)),
             "inner_accuracy": list(map(float, c.inner_accuracy)), "chosen": c.chosen} for c in curves]
    return {"samples": samples, "curves": rows}


def load(out: Path) -> dict:
    """The committed results.json of results directory `out`."""
    return results_json(out)


def summary(data: dict) -> str:
    """summary.md: one row per cell, accuracy [95%] at each L2, and the chosen value."""
    l2 = data["curves"][0]["l2"]
    lines = [f"# Linear probe accuracy against L2 on the toy `{CHECKPOINT}` ({data['samples']} passcodes, layer 3)", "",
             "| cell | " + " | ".join(f"L2 {v:g}" for v in l2) + " | chosen |", "|---|" + "---|" * (len(l2) + 1)]
    for r in data["curves"]:
        cells = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                 for a, lo, hi in zip(r["accuracy"], r["ci_low"], r["ci_high"])]
        lines.append(f"| offset {r['offset']:+d} | " + " | ".join(cells) + f" | {r['chosen']:g} |")
    return "\n".join(lines) + "\n"


def render(data: dict) -> dict[str, str]:
    """Everything written from results.json, keyed by its committed path."""
    return {SUMMARY: summary(data)}


def quotes(data: dict) -> dict[str, str]:
    """The phrase docs/decisions.md quotes from results.json."""
    curve = {r["offset"]: r for r in data["curves"]}
    at = lambda offset, l2: f"{100 * curve[offset]['accuracy'][curve[offset]['l2'].index(l2)]:.1f}%"  # noqa: E731
    control = [100 * a for a in curve[-1]["accuracy"]]
    return {
        "strength": (f"reads {at(0, 1e-6)} at L2 1e-6, {at(0, 1e-4)} at 1e-4 and {at(0, 1e-1)} at 1e-1, the first "
                     f"masked memento {at(1, 1e-6)}, {at(1, 1e-4)} and {at(1, 1e-1)};"),
        "control": f"the causal control stays at {min(control):.1f}–{max(control):.1f}% at every strength",
    }


def curves(data: dict) -> list[SensitivityCurve]:
    """results.json's curves as `sensitivity_curves` returned them (the default site and pooling)."""
    spec = capture_spec(data["samples"])
    return [SensitivityCurve(condition=CONDITION, site=spec.sites[0], offset=r["offset"], layer=r["layer"],
                             probe="linear", l2=r["l2"], accuracy=r["accuracy"], ci_low=r["ci_low"],
                             ci_high=r["ci_high"], inner_accuracy=r["inner_accuracy"], chosen=r["chosen"],
                             pooling=spec.pooling[0]) for r in data["curves"]]


def main() -> None:
    ap = script_arguments(__doc__, OUT)
    ap.add_argument("--samples", type=int, default=3000)
    args = ap.parse_args()
    start(args)
    if not args.table_only:
        (args.out / "results.json").write_text(json.dumps(measure(args.samples), indent=1) + "\n")
    data = load(args.out)
    write_files(render(data), args.out)
    save_figure(l2_sensitivity(curves(data)), args.out / "l2_sensitivity", formats=("png",))
    print(summary(data), end="")


if __name__ == "__main__":
    main()
