"""Every result kvprobe publishes, with the script and the committed JSON it comes from (issue 26).

Each source is a script under experiments/ that measures into a results directory and
renders, from that directory's JSON alone, what it publishes:

    load(out)     -> data                 the committed JSON of results directory `out`
    render(data)  -> {target: text}       a target is a file ("experiments/results/x/summary.md",
                                          the whole text) or "FILE#marker", the text between the
                                          lines <!-- marker --> and <!-- /marker --> in FILE
    quotes(data)  -> {name: phrase}       phrases the prose quotes verbatim (optional)

`tests/project/test_published.py` checks every target and phrase against the committed JSON with
tolerance zero on printed digits, so a changed result fails CI until the prose says the new
number; `benchmarks/rerun_published.py` re-runs each script into a scratch directory at its
stated arguments (seed, samples, one thread) and compares the JSON it writes with the committed one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "SOURCES", "Source", "against", "block", "epoch_sentence", "json_name", "measure_each", "pct",
           "printed_cell", "problems", "readme_example_code", "readme_example_output", "results_json", "run_config_study",
           "run_each", "run_results", "run_toy_study", "save_json", "script_arguments", "start", "toy_study_arguments",
           "write_files"]


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
        if str(ROOT / "experiments") not in sys.path:  # the scripts import this module by name
            sys.path.insert(0, str(ROOT / "experiments"))
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
           {**dict.fromkeys(("fig13_band", "fig13_masked1", "fig13_direct", "fig13_fade", "heatmap_gap", "keep1",
                             "series"), (README, TOY)),
            **dict.fromkeys(("fig13_misses", "heatmap_misses", "keep1_gap"), (TOY,)), "series_end": (README,)},
           minutes=73),  # measured 2026-12-07 beside toy_reproduction, the test suite and CI
    Source("recipe_speed", "experiments/recipe_speed.py", "experiments/results/recipe_speed", ("--runs", "{scratch}/runs"),
           {"verdict": (README, TOY), "speed_table": (TOY,)}, minutes=110),
    Source("l2_sensitivity", "experiments/l2_sensitivity.py", "experiments/results/l2_sensitivity",
           ("--samples", "3000", "--threads", "1"),
           {"strength": (DECISIONS, README), "control": (DECISIONS,)}, minutes=1),
    Source("pooling", "experiments/pooling_study.py", "experiments/results/pooling",
           ("--samples", "3000", "--seed", "0", "--threads", "1"),
           {**dict.fromkeys(("text_mean", "span_last", "default", "tokens"), (README,)),
            **dict.fromkeys(("last_direct", "last_masked", "default_direct", "decisions_table"), (DECISIONS,))},
           minutes=4),
    Source("text_controlled", "experiments/text_controlled.py", "experiments/results/text_controlled",
           ("--samples", "3000", "--seed", "0", "--threads", "1"),
           {**dict.fromkeys(("chance", "readme_channel", "readme_identical"), (README,)),
            **dict.fromkeys(("samples", "restart", "toy_channel", "toy_identical", "toy_table"), (TOY,)),
            "text_points": (README, TOY)}, minutes=6),
    Source("recipe_study", "experiments/recipe_study.py", "experiments/results/recipe_study", ("--threads", "1"),
           {**dict.fromkeys(("toys", "readme_steps", "task_range", "readme_init", "readme_linear", "readme_learned",
                             "readme_flat", "readme_width", "readme_channel", "readme_text"), (README,)),
            **dict.fromkeys(("toy_steps", "toy_samples", "toy_chance", "toy_table", "toy_pattern", "toy_pattern_tc",
                             "toy_gpt2", "toy_gpt2_text", "toy_linear_gpt2", "toy_embed", "toy_embed_direct",
                             "toy_band", "toy_linear_wide", "toy_text", "toy_d256", "toy_learned",
                             "toy_learned_2", "toy_flat", "toy_flat_2", "toy_width", "toy_channel"), (TOY,))},
           minutes=60),
    Source("recipe_seeds", "experiments/recipe_seeds.py", "experiments/results/recipe_seeds",
           ("--runs", "{scratch}/runs"),
           {"init_steps": (README, TOY), "init_accuracy": (README, TOY), "linear_steps": (TOY,),
            "linear_accuracy": (TOY,), "embed_steps": (TOY,), "embed_accuracy": (README, TOY),
            "capacity_steps": (README, TOY), "capacity_accuracy": (TOY,)}, minutes=230),
    Source("fig13_scale", "experiments/fig13_scale.py", "experiments/results/fig13_scale",
           ("--samples", "50000", "--seed", "0", "--threads", "1"),
           {"band": (README, TOY), "direct": (TOY,), "matched": (README, TOY), "matched_direct": (TOY,)},
           minutes=125),  # final 56 (2026-12-07, beside toy_reproduction), step_002400 69 (2026-12-07, beside tests)
    Source("fig13_seeds", "experiments/fig13_seeds.py", "experiments/results/fig13_seeds", ("--threads", "1"),
           {"seeds": (TOY,)}, minutes=72),  # 2026-12-07: 28 + 30 min from kept stores (side by side, one core each) + two captures
    Source("toy_seeds", "experiments/toy_seeds.py", "experiments/results/toy_seeds", ("--runs", "{scratch}/runs"),
           {"toys": (README, TOY), "spread": (README, TOY), "readme": (README, TOY)},
           minutes=230),  # 2026-12-07: trainings 42 + 42, readings 68 + 76, README example 1.5; two side by side, one core each (seed 2's reading beside a one-worker test run for its last 10 min)
    Source("retrain_check", "experiments/retrain_check.py", "experiments/results/retrain_check",
           ("--run", "{scratch}/run"), {"verdict": (TOY,)}, minutes=9),  # 2026-12-07, beside two other jobs
    Source("reconstruction", "experiments/reconstruction.py", "experiments/results/reconstruction",
           ("--samples", "5000", "--seed", "0", "--threads", "1"), {"readme": (README,)}, minutes=13),
    Source("causal_map", "experiments/causal_map.py", "experiments/results/causal_map", ("--run", "{scratch}/run"),
           dict.fromkeys(("probe", "hurt", "top", "second", "swap", "follow"), ("docs/causal.md",)), minutes=8),
    Source("toy_controls", "experiments/toy_controls.py", "experiments/results/toy_controls",
           ("--run", "{scratch}/run"), minutes=29),
    # minutes: measured 2026-12-07 beside fig13_scale, then paper_figures (one core each)
    Source("toy_reproduction", "experiments/toy_reproduction.py", "experiments/results/toy_reproduction",
           ("--run", "{scratch}/run"), dict.fromkeys(("mlp", "linear", "sweep"), (TOY,)), minutes=85),
)


def _readme_block(marker: str, lang: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(rf"```{lang}\n(.*?)```", readme[readme.index(marker):], flags=re.S).group(1)


def readme_example_code() -> str:
    """The README's library example: the python block after its `<!-- readme-example` marker (what
    tests/project/test_readme.py runs and toy_seeds.py runs on other toys)."""
    return _readme_block("<!-- readme-example", "python")


def readme_example_output() -> list[str]:
    """The lines the README says its library example prints (the text block after its output marker)."""
    return _readme_block("<!-- readme-example-output -->", "text").strip().splitlines()


def printed_cell(line: str) -> tuple[str, list[float], bool]:
    """One line the README example prints, read back: 'layer 3 offset +1: 46.5% [45.1, 48.0] significant=True'
    -> ('layer 3 offset +1', [46.5, 45.1, 48.0], True)."""
    cell, rest = line.split(": ", 1)
    return cell, [float(x) for x in re.findall(r"\d+\.\d", rest)], rest.endswith("significant=True")


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


def results_json(out: Path, name: str = "results.json") -> Any:
    """A results directory's committed JSON (a script's `load`, where that is all it reads)."""
    return json.loads((Path(out) / name).read_text())


def pct(row: Mapping[str, Any]) -> str:
    """A cell's accuracy and 95% interval in %, as every results table prints it: 27.3 [25.5, 28.9]."""
    return f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def epoch_sentence(cells: list[Mapping[str, Any]], limit: int) -> str:
    """How MLP cells' early-stopped training ended (cells: result rows with "epochs" and "epochs_at_cap"; rows
    with a "probe" other than "mlp" are skipped): every one on its holdout, or which still improved at `limit`.
    A capped cell is named by its "figure" (where it has one), layer and offset."""
    mlp = [c for c in cells if c.get("probe", "mlp") == "mlp"]
    if not mlp:
        raise ValueError("epoch_sentence: no MLP cells among the rows")
    capped = [c for c in mlp if c["epochs_at_cap"]]
    if not capped:
        latest = max(c["epochs"] for c in mlp)
        return (f"every MLP cell stopped on its holdout before the limit of {limit} epochs "
                f"(the latest at epoch {latest})")
    where = ", ".join(f"{c['figure'] + ' ' if 'figure' in c else ''}layer {c['layer']} {c['offset']:+d}"
                      for c in capped)
    return (f"FLAGGED: {len(capped)} of {len(mlp)} MLP cells were still improving at the limit of {limit} epochs "
            f"({where})")


def script_arguments(doc: str, out: Path) -> argparse.ArgumentParser:
    """The arguments every published script takes (add its own to the parser it returns): --out (the
    results directory), --threads (1: what the committed JSON was made with), --table-only."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out, help="the results directory (default: the committed one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the committed JSON: 1)")
    ap.add_argument("--table-only", action="store_true", help="re-render the files from --out's JSON")
    return ap


def toy_study_arguments(doc: str, out: Path, samples: int = 3000) -> argparse.ArgumentParser:
    """`script_arguments` plus what a study of one toy checkpoint takes: --checkpoint, --samples, --seed."""
    ap = script_arguments(doc, out)
    ap.add_argument("--checkpoint", default="final")
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def save_json(data: Any, out: Path, name: str = "results.json") -> None:
    """A script's measurement, as the committed JSON (indent 1, a final newline)."""
    (Path(out) / name).write_text(json.dumps(data, indent=1) + "\n")


def run_toy_study(doc: str, out: Path, measure: Callable[[str, int, int], Any], load: Callable[[Path], Any],
                  render: Callable[[Any], Mapping[str, str]]) -> Any:
    """The main of a study of one toy checkpoint: its arguments (`toy_study_arguments`), the measurement
    into --out as results.json (unless --table-only), then the files rendered from it. Returns the data."""
    args = toy_study_arguments(doc, out).parse_args()
    start(args)
    if not args.table_only:
        save_json(measure(args.checkpoint, args.samples, args.seed), args.out)
    data = load(args.out)
    write_files(render(data), args.out)
    return data


def json_name(name: str) -> str:
    """The results file of one thing a script measures: 'series/step_002400' -> 'series_step_002400.json'."""
    return name.replace("/", "_") + ".json"


def measure_each(names: Iterable[str], named: bool, out: Path, measure_one: Callable[[str], dict]) -> None:
    """Measure each name into out/json_name(name); unless they were `named` on the command line, one whose
    JSON is already there is kept as it is."""
    for name in names:
        path = Path(out) / json_name(name)
        if not named and path.is_file():
            print(f"{name}: kept ({path})", flush=True)
            continue
        save_json(measure_one(name), out, path.name)


def run_each(ap: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str], named: bool,
             measure_one: Callable[[str], dict], load: Callable[[Path], Any],
             render: Callable[[Any], Mapping[str, str]]) -> None:
    """The main of a script that measures several things into one JSON each in --out (`measure_each`; fig13_scale,
    fig13_seeds, toy_seeds): --table-only with nothing measured is refused (exit 2), then each is measured, and
    every file is rendered from --out's JSON; the first (the results table) is printed."""
    if args.table_only and not any(Path(args.out).glob("*.json")):
        ap.error(f"no {Path(ap.prog).stem} results in {args.out}")
    start(args)
    if not args.table_only:
        measure_each(names, named, args.out, measure_one)
    rendered = render(load(args.out))
    write_files(rendered, args.out)
    print(next(iter(rendered.values())), end="")


def run_results(out: Path) -> dict:
    """A `kvprobe run` study's committed results.json, with its timings.json as "timings" and its
    run_config.json (the run's config, as `kvprobe run` wrote it) as "run_config"."""
    return {**results_json(out), "timings": results_json(out, "timings.json"),
            "run_config": results_json(out, "run_config.json")}


def against(row: Mapping[str, Any], paper: float) -> str:
    """'in' when the paper's value (%) lies inside the cell's 95% interval, else 'above' or 'below' it."""
    if 100 * row["ci_low"] <= paper <= 100 * row["ci_high"]:
        return "in"
    return "above" if 100 * row["accuracy"] > paper else "below"


def run_config_study(doc: str, config: Path, run: Path, out: Path, copied: tuple[str, ...],
                     render: Callable[[Any], Mapping[str, str]]) -> int:
    """The main of a study that is one `kvprobe --threads 1 run CONFIG` (resumed when --run exists): the
    report's `copied` files, the run's config and timings and its figures into --out (unless --table-only),
    then the files `render` makes from `run_results(--out)`. Returns the command's exit status."""
    from kvprobe.cli import main as kvprobe

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=run, help="the run directory (resumed)")
    ap.add_argument("--out", type=Path, default=out, help="where the results are copied and README.md written")
    ap.add_argument("--table-only", action="store_true", help="re-render the files from --out's JSON")
    args = ap.parse_args()
    if not args.table_only:
        argv = ["--threads", "1", "run", str(config), "--out", str(args.run)] + (["--resume"] if args.run.exists() else [])
        code = kvprobe(argv)
        if code:
            return code
        args.out.mkdir(parents=True, exist_ok=True)
        for name in copied:
            shutil.copyfile(args.run / "report" / name, args.out / name)
        shutil.copyfile(args.run / "config.json", args.out / "run_config.json")
        shutil.copyfile(args.run / "timings.json", args.out / "timings.json")
        shutil.copytree(args.run / "report" / "figures", args.out / "figures", dirs_exist_ok=True)
    write_files(render(run_results(args.out)), args.out)
    print(f"results: {args.out}")
    return 0


def start(args: argparse.Namespace) -> None:
    """Before measuring: thread-count-independent BLAS (kvprobe.cli.runtime), --threads, --out created."""
    import torch

    from kvprobe.cli.runtime import reproducible_blas

    reproducible_blas()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def write_files(rendered: Mapping[str, str], out: Path) -> None:
    """Write the whole-file targets of a script's `render` into `out` (marked blocks go into the prose by hand)."""
    for target, text in rendered.items():
        if "#" not in target:
            (Path(out) / Path(target).name).write_text(text)
