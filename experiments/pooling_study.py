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

    python experiments/pooling_study.py                       # 3,000 passcodes, layers 1 and 3 (1 thread)
    python experiments/pooling_study.py --checkpoint gpt2-init/final --out DIR
    python experiments/pooling_study.py --table-only          # rewrite summary.md from results.json

Writes results.json and summary.md to --out (default experiments/results/pooling).
"""

from __future__ import annotations

from pathlib import Path

import toy_models
from kvprobe.capture import CaptureConfig
from toy_models.leakage import MEMENTO, cell_record, measure_leakage
from published import pct, results_json, run_toy_study

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
OUT = Path(__file__).resolve().parent / "results" / "pooling"
SUMMARY = "experiments/results/pooling/summary.md"  # render() key: the committed file
# docs/decisions.md's labels for VARIANTS, in its table of layer 3
DOC_LABELS = {
    "memento_text mean (former default)": "`memento_text` mean (the former default)",
    "span mean": "span mean",
    "span last": "span last (`<|summary_end|>`)",
    "span tail_mean k=1": "span `tail_mean`, k = 1",
    "span tail_mean k=2": "span `tail_mean`, k = 2",
    "span tail_mean k=4 (default)": "span `tail_mean`, k = 4 (**default**)",
    "span tokens (all 5)": "span `tokens`, all 5",
}


def measure(checkpoint: str, samples: int, seed: int) -> dict:
    """Every variant at every (layer, offset): {"checkpoint", "samples", "rows": [one per variant x cell]}."""
    model = toy_models.load(checkpoint)
    rows = []
    for name, (site, pooling, k, vectors) in VARIANTS.items():
        spec = CaptureConfig(layers=LAYERS, sites=(site,), pooling=(pooling,), max_tokens=k, batch_size=500)
        for r in measure_leakage(model, (MEMENTO,), LAYERS, OFFSETS, n_samples=samples, seed=seed, spec=spec):
            assert (r.site, r.pooling) == (site, pooling)  # every probed cell says what it read
            rows.append({"features": name, "max_tokens": k, "vectors": vectors, "dims": vectors * 256,
                         **cell_record(r, "site", "pooling")})
        print(name, " ".join(f"L{r['layer']}{r['offset']:+d}:{100 * r['accuracy']:.1f}" for r in rows[-6:]), flush=True)
    return {"checkpoint": checkpoint, "samples": samples, "rows": rows}


def load(out: Path) -> dict:
    """The committed results.json of results directory `out`."""
    return results_json(out)


def _cells(data: dict, name: str) -> dict:
    """(layer, offset) -> row of variant `name`."""
    return {(r["layer"], r["offset"]): r for r in data["rows"] if r["features"] == name}


def summary(data: dict) -> str:
    """summary.md: one row per variant, accuracy [95%] at every (layer, offset)."""
    cells = [(l, o) for l in LAYERS for o in OFFSETS]
    lines = [f"# Features on the toy `{data['checkpoint']}` ({data['samples']} passcodes, linear probe)", "",
             "Accuracy (%) [95% bootstrap interval]; chance 10. Qwen3-8B cost: one vector is 2,048 values "
             "(4 KB in float16) per sample, site, offset and layer. Remade by `python experiments/pooling_study.py`.",
             "", "| features | vectors (toy dims) | " + " | ".join(f"layer {l} {o:+d}" for l, o in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for name, (_, _, _, vectors) in VARIANTS.items():
        got = _cells(data, name)
        lines.append(f"| {name} | {vectors} ({vectors * 256}) | " + " | ".join(pct(got[c]) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render(data: dict) -> dict[str, str]:
    """Everything written from results.json, keyed by its committed path."""
    return {SUMMARY: summary(data)}


def decisions_table(data: dict) -> str:
    """docs/decisions.md's table: direct, masked +1 and +2 at layer 3 per variant (no markers there)."""
    lines = ["| features | vectors | direct | masked +1 | masked +2 |", "|---|---|---|---|---|"]
    for name, (_, _, _, vectors) in VARIANTS.items():
        got = _cells(data, name)
        lines.append(f"| {DOC_LABELS[name]} | {vectors} | "
                     + " | ".join(f"{100 * got[3, o]['accuracy']:.1f}" for o in OFFSETS) + " |")
    return "\n".join(lines)


def quotes(data: dict) -> dict[str, str]:
    """The phrases README.md and docs/decisions.md quote from results.json (layer 3)."""
    text, last, default, tokens = (_cells(data, n) for n in ("memento_text mean (former default)", "span last",
                                                             "span tail_mean k=4 (default)", "span tokens (all 5)"))
    a = lambda r: f"{100 * r['accuracy']:.1f}"  # noqa: E731
    pair = lambda got: f"{a(got[3, 0])}% / {a(got[3, 1])}%"  # noqa: E731  direct / masked +1
    disjoint = "disjoint" if default[3, 0]["ci_high"] < tokens[3, 0]["ci_low"] else "overlapping"
    return {
        "text_mean": f"the former text-only mean reads direct {a(text[3, 0])}% / masked +1 {a(text[3, 1])}%",
        "span_last": f"token {pair(last)}",
        "default": f"the default (last 4 span tokens + mean) {pair(default)}",
        "tokens": f"span tokens {pair(tokens)}",
        "last_direct": f"already holds most of the direct memento ({100 * last[3, 0]['accuracy']:.0f}%)",
        "last_masked": f"({a(last[3, 1])}% with the last alone, {a(tokens[3, 1])}% with all five)",
        "default_direct": f"({a(default[3, 0])} against {a(tokens[3, 0])}, intervals {disjoint})",
        "decisions_table": decisions_table(data),
    }


def main() -> None:
    run_toy_study(__doc__, OUT, measure, load, render)


if __name__ == "__main__":
    main()
