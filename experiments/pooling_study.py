"""Which features keep what a memento holds? Sites and poolings side by side on the toy.

The paper's toy reads its direct memento at 98.5%: its features keep the per-token
information of the memento. This study reads one checkpoint (default: the shipped
faithful `final`) with every feature choice kvprobe offers, the same linear probe on
each, and says what each costs per vector kept:

    memento_text mean    the former default: the 3 digit tokens averaged (1 vector)
    memento mean / last  the whole span <|summary_start|> .. <|summary_end|> (1 vector)
    memento tokens       all 5 span tokens concatenated (5 vectors)
    memento tail_mean k  the last k span tokens and the span mean (k + 1 vectors);
                         k = 4 is kvprobe's default, an invertible map of all 5 tokens

    python experiments/pooling_study.py                       # 3,000 passcodes, layers 1 and 3
    python experiments/pooling_study.py --checkpoint gpt2-init/final --out experiments/results/former_toy/pooling

Writes summary.md and results.json to --out (default experiments/results/pooling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import toy_models
from kvprobe.capture import CaptureSpec
from toy_models.leakage import MEMENTO, cell_record, measure_leakage

# name -> (site, pooling, max_tokens, vectors kept per layer)
VARIANTS = {
    "memento_text mean (former default)": ("memento_text", "mean", 1, 1),
    "span mean": ("memento", "mean", 1, 1),
    "span last": ("memento", "last", 1, 1),
    "span tail_mean k=1": ("memento", "tail_mean", 1, 2),
    "span tail_mean k=2": ("memento", "tail_mean", 2, 3),
    "span tail_mean k=4 (default)": ("memento", "tail_mean", 4, 5),
    "span tokens (all 5)": ("memento", "tokens", 5, 5),
}
LAYERS = (1, 3)
OFFSETS = (0, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="final")
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "pooling")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = toy_models.load(args.checkpoint)
    rows = []
    for name, (site, pooling, k, vectors) in VARIANTS.items():
        spec = CaptureSpec(layers=LAYERS, sites=(site,), pooling=(pooling,), max_tokens=k, batch_size=500)
        for r in measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=args.samples, seed=args.seed,
                                 spec=spec):
            assert (r.site, r.pooling) == (site, pooling)  # every probed cell says what it read
            rows.append({"features": name, "max_tokens": k, "vectors": vectors, "dims": vectors * 256,
                         **cell_record(r, "site", "pooling")})
        print(name, " ".join(f"L{r['layer']}{r['offset']:+d}:{100 * r['accuracy']:.1f}" for r in rows[-6:]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"checkpoint": args.checkpoint, "samples": args.samples,
                                                       "rows": rows}, indent=1) + "\n")
    cells = [(l, o) for l in LAYERS for o in OFFSETS]
    lines = [f"# Features on the toy `{args.checkpoint}` ({args.samples} passcodes, linear probe)", "",
             "Accuracy (%) [95% bootstrap interval]; chance 10. Qwen3-8B cost: one vector is 2,048 values "
             "(4 KB in float16) per sample, site, offset and layer. Remade by `python experiments/pooling_study.py`.",
             "", "| features | vectors (toy dims) | " + " | ".join(f"layer {l} {o:+d}" for l, o in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for name, (_, _, _, vectors) in VARIANTS.items():
        got = {(r["layer"], r["offset"]): r for r in rows if r["features"] == name}
        lines.append(f"| {name} | {vectors} ({vectors * 256}) | " + " | ".join(
            f"{100 * got[c]['accuracy']:.1f} [{100 * got[c]['ci_low']:.1f}, {100 * got[c]['ci_high']:.1f}]"
            for c in cells) + " |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
