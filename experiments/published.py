"""Every result kvprobe publishes, with the script and the committed JSON it comes from (issue 26).

Each source is a script under experiments/ that measures into a results directory and
renders, from that directory's JSON alone, what it publishes:

    load(out)     -> data                 the committed JSON of results directory `out`
    render(data)  -> {target: text}       a target is a file ("experiments/results/x/summary.md",
                                          the whole text) or "FILE#marker", the text between the
                                          lines <!-- marker --> and <!-- /marker --> in FILE
    quotes(data)  -> {name: phrase}       phrases the prose quotes verbatim (optional)

`tests/test_published.py` checks every target and phrase against the committed JSON with
tolerance zero on printed digits, so a changed result fails CI until the prose says the new
number; `benchmarks/rerun_published.py` re-runs each script into a scratch directory at its
stated arguments (seed, samples, one thread) and compares the JSON it writes with the committed one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "SOURCES", "Source", "block", "problems"]


@dataclass(frozen=True)
class Source:
    """One published result: `script` writes into `results` (its --out default) with `args` ("{scratch}"
    in them: a scratch directory of the rerun, for a run directory that must start empty).

    quoted_in: which prose files quote which of the script's `quotes` (phrase name -> files).
    minutes: what one rerun costs on one thread of this project's 2-core machine (measured).
    """

    name: str
    script: str
    results: str
    args: tuple[str, ...] = ()
    quoted_in: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    minutes: float = 0.0

    def module(self) -> ModuleType:
        """The script, imported by path (experiments/ is a folder of scripts, not a package)."""
        name = f"published_{self.name}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / self.script)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up
            spec.loader.exec_module(module)
        return sys.modules[name]

    def data(self, out: Path | None = None) -> Any:
        return self.module().load(out or ROOT / self.results)


README, DECISIONS, TOY = "README.md", "docs/decisions.md", "docs/toy.md"

SOURCES: tuple[Source, ...] = (
    Source("paper_figures", "experiments/paper_figures.py", "experiments/results/paper_figures",
           ("--samples", "5000", "--seed", "0", "--threads", "1"),
           dict.fromkeys(("fig13_layer2", "fig13_masked1", "fig13_direct", "fig13_fade", "heatmap_gap", "series"),
                         (README, TOY)),
           minutes=12),
    Source("l2_sensitivity", "experiments/l2_sensitivity.py", "experiments/results/l2_sensitivity",
           ("--samples", "3000", "--threads", "1"),
           {"strength": (DECISIONS,), "control": (DECISIONS,)}, minutes=2),
    Source("pooling", "experiments/pooling_study.py", "experiments/results/pooling",
           ("--samples", "3000", "--seed", "0", "--threads", "1"),
           {**dict.fromkeys(("text_mean", "span_last", "default", "tokens"), (README,)),
            **dict.fromkeys(("last_direct", "last_masked", "default_direct", "decisions_table"), (DECISIONS,))},
           minutes=8),
    Source("text_controlled", "experiments/text_controlled.py", "experiments/results/text_controlled",
           ("--samples", "3000", "--seed", "0", "--threads", "1"),
           {**dict.fromkeys(("chance", "readme_channel", "readme_identical"), (README,)),
            **dict.fromkeys(("samples", "restart", "toy_channel", "toy_identical", "toy_table"), (TOY,)),
            "text_points": (README, TOY)}, minutes=6),
    Source("recipe_study", "experiments/recipe_study.py", "experiments/results/recipe_study", ("--threads", "1"),
           {**dict.fromkeys(("toys", "readme_steps", "task_range", "readme_init", "readme_linear", "readme_learned",
                             "readme_flat", "readme_width", "readme_channel"), (README,)),
            **dict.fromkeys(("toy_steps", "toy_samples", "toy_chance", "toy_table", "toy_pattern", "toy_pattern_tc",
                             "toy_gpt2", "toy_gpt2_text", "toy_linear_gpt2", "toy_embed", "toy_learned",
                             "toy_learned_2", "toy_flat", "toy_flat_2", "toy_width", "toy_channel"), (TOY,))},
           minutes=60),
    Source("toy_controls", "experiments/toy_controls.py", "experiments/results/toy_controls",
           ("--run", "{scratch}/run"), minutes=45),
)


def block(text: str, marker: str) -> str:
    """The text between the lines <!-- marker --> and <!-- /marker --> (KeyError if absent)."""
    start, end = f"<!-- {marker} -->\n", f"\n<!-- /{marker} -->"
    if start not in text or end not in text:
        raise KeyError(f"no <!-- {marker} --> ... <!-- /{marker} --> block")
    return text[text.index(start) + len(start):text.index(end)]


def read_target(target: str) -> str:
    """The committed text of a render target: a whole file, or one marked block of it."""
    path, _, marker = target.partition("#")
    text = (ROOT / path).read_text()
    return block(text, marker) if marker else text


def problems(source: Source) -> list[str]:
    """Where the committed prose differs from what `source` renders and quotes from its committed JSON."""
    module, data = source.module(), source.data()
    out = []
    for target, text in module.render(data).items():
        try:
            committed = read_target(target)
        except (OSError, KeyError) as e:
            out.append(f"{target}: {e}")
            continue
        if committed != text:
            out.append(f"{target} differs from what {source.script} renders from {source.results}: "
                       f"run `python {source.script} --table-only` (files) or paste render()['{target}'] (blocks)")
    phrases = module.quotes(data) if hasattr(module, "quotes") else {}
    if set(phrases) != set(source.quoted_in):
        out.append(f"{source.name}: quotes {sorted(phrases)} but the registry lists {sorted(source.quoted_in)}")
    for name, files in source.quoted_in.items():
        for path in files:
            if name in phrases and phrases[name] not in (ROOT / path).read_text():
                out.append(f"{path} should quote {name} as {phrases[name]!r} (from {source.results})")
    return out


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
