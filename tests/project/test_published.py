"""Published numbers are the numbers the scripts computed: prose against the committed JSON.

Every source of `experiments/published.py` (the toy's results under experiments/results/)
renders its files and the README's marked blocks from its committed JSON, and the phrases the
prose quotes; each must equal what is committed. `benchmarks/bench_scale.py` writes `benchmarks/results/scale_cpu.json`; its `render` makes the
tables `benchmarks/RESULTS.md` quotes and its `quotes` the phrases the README and docs quote;
`benchmarks/bench_startup.py` renders the CLI startup table of `benchmarks/results/startup.json` the same way.
A rerun that changes a number changes the JSON, and this test then fails until the prose
quotes the new one (tolerance zero on the printed digits).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from kvprobe.data.passcodes import PasscodeConfig
from tests.helpers.paths import ROOT
from tests.helpers.published import PUBLISHED

SCALE_JSON = ROOT / "benchmarks" / "results" / "scale_cpu.json"
# which file quotes which phrase of `bench_scale.quotes`
RESULTS = "benchmarks/RESULTS.md"
QUOTED_IN = {
    "interval_mask_longest": ["README.md", "docs/decisions.md", "docs/real_models.md", RESULTS],
    "dense_mask_longest": ["README.md", "docs/decisions.md", RESULTS],
    "capture_longest": ["README.md", RESULTS],
    "capture_memory_exponent": ["README.md", RESULTS],
    "capture_time_exponent": [RESULTS],
    "dense_memory_exponent": [RESULTS],
    "collator_longest": ["docs/real_models.md", RESULTS],
}


@pytest.mark.parametrize("source", PUBLISHED.SOURCES, ids=lambda s: s.name)
def test_published_results_are_rendered_from_their_json(source):
    assert not PUBLISHED.problems(source), "\n".join(PUBLISHED.problems(source))


def test_every_results_directory_has_a_source():
    dirs = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "experiments" / "results").glob("*/*.json")}
    assert dirs <= {s.results for s in PUBLISHED.SOURCES}, dirs - {s.results for s in PUBLISHED.SOURCES}


def bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scale():
    return json.loads(SCALE_JSON.read_text())


def test_results_md_quotes_the_scale_tables_verbatim(scale):
    tables = bench_scale().render(scale)
    assert tables in (ROOT / "benchmarks" / "RESULTS.md").read_text(), (
        "benchmarks/RESULTS.md does not hold bench_scale.py's tables for the committed JSON; paste the output of "
        "`python benchmarks/bench_scale.py --render benchmarks/results/scale_cpu.json`")


def test_results_md_quotes_the_startup_table_verbatim():
    """benchmarks/bench_startup.py's table for benchmarks/results/startup.json, as RESULTS.md quotes it."""
    spec = importlib.util.spec_from_file_location("bench_startup", ROOT / "benchmarks" / "bench_startup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.render(json.loads((ROOT / "benchmarks" / "results" / "startup.json").read_text()))
    assert table in (ROOT / "benchmarks" / "RESULTS.md").read_text(), (
        "benchmarks/RESULTS.md does not hold bench_startup.py's table for the committed JSON; paste the output of "
        "`python benchmarks/bench_startup.py --render benchmarks/results/startup.json`")


@pytest.mark.parametrize("name, path", [(n, p) for n, paths in QUOTED_IN.items() for p in paths])
def test_prose_quotes_the_scale_json(scale, name, path):
    phrase = bench_scale().quotes(scale)[name]
    assert phrase in (ROOT / path).read_text(), f"{path} should quote {name} as {phrase!r} (from {SCALE_JSON.name})"


def test_every_quoted_phrase_is_checked_somewhere(scale):
    assert set(bench_scale().quotes(scale)) == set(QUOTED_IN)


def test_an_mlp_cell_reads_the_same_whichever_cells_share_its_run():
    """fig13_scale fits seed 0 on 18 cells at once; toy_reproduction fits 2 of them with 3 seeds and a
    shuffled-label control, on a store of the same passcodes. The README says seed 0 reads the same in both
    (kvprobe.probes.mlp.group_generators): rerun both on one machine if this fails after a rerun of one."""
    sources = {s.name: s for s in PUBLISHED.SOURCES}
    fig13, repro = sources["fig13_scale"].data()["final"], sources["toy_reproduction"].data()
    for layer in (0, 3):
        cell = next(c for c in fig13["cells"] if (c["layer"], c["offset"]) == (layer, 1))
        row = next(r for r in repro["rows"] if (r["condition"], r["site"], r["probe"], r["layer"], r["offset"])
                   == ("memento", "memento", "mlp", layer, 1))
        assert cell["n_train"] == row["n_train"] and fig13["seed"] == 0
        assert cell["accuracy"] == row["accuracy_seeds"][0], f"layer {layer}: {cell['accuracy']} vs {row}"


def test_every_published_source_chooses_the_strength_by_todays_rule():
    """No published script keeps the strength choice from before the tie rule (a PROBE with
    extend_ties=False), and no experiment config turns it off: their numbers are read as docs/probes.md says."""
    pinned = {s.name for s in PUBLISHED.SOURCES if getattr(getattr(s.module(), "PROBE", None), "extend_ties", True)
              is False}
    assert not pinned
    configs = [p for p in (ROOT / "experiments").glob("*.y*ml")] + [p for p in (ROOT / "experiments").glob("*.toml")]
    assert not [p.name for p in configs if "extend_ties" in p.read_text()]  # a config run keeps the default


def test_fig13_scale_publishes_final_and_the_checkpoint_at_the_papers_task_accuracy():
    """The default run reads `final` and the shipped checkpoint nearest the paper's toy's last task accuracy
    (94.7%): both are committed, nothing else, and every record is the same read (samples, seed, limit)."""
    from toy_models.checkpoint import read_meta

    module = next(s for s in PUBLISHED.SOURCES if s.name == "fig13_scale").module()
    data = module.load()
    matched = module.matched_checkpoint()
    assert list(data) == ["final", matched] and matched.startswith("series/")
    assert abs(100 * read_meta(matched)["task_accuracy"] - 94.7) < 1  # the series has a checkpoint that close
    assert len({(r["samples"], r["seed"], r["epoch_limit"]) for r in data.values()}) == 1


def test_fig13_seeds_refits_exactly_fig13_scales_misses_and_its_seed_0_reads_the_same():
    """fig13_seeds takes the cells fig13_scale's committed reading puts outside the band (all of them, no
    other), and its seed 0 is fig13_scale's fit to the last bit (a cell's MLP reading does not depend on
    the seeds fitted beside it): rerun both on one machine if this fails after a rerun of one."""
    sources = {s.name: s for s in PUBLISHED.SOURCES}
    module, scale, seeds = sources["fig13_scale"].module(), sources["fig13_scale"].data(), sources["fig13_seeds"].data()
    assert list(seeds) == list(scale)
    for checkpoint, record in seeds.items():
        assert [(c["layer"], c["offset"]) for c in record["cells"]] == module.missed_cells(scale[checkpoint])
        for c in record["cells"]:
            one = next(x for x in scale[checkpoint]["cells"] if (x["layer"], x["offset"]) == (c["layer"], c["offset"]))
            assert len(c["accuracy_seeds"]) == 3 and c["accuracy_seeds"][0] == one["accuracy"], (checkpoint, c)


def test_toy_seeds_reads_each_toy_as_fig13_scale_reads_final_and_its_seed_0_is_the_readme_example():
    """Every toy of toy_seeds is the shipped recipe with its seed (the committed config), read on the 18 Fig. 13
    cells with fig13_scale's settings; its seed 0 is fig13_scale's `final`, and the README example it read
    there prints what the README quotes (to test_readme's tolerance between machines)."""
    from tests.helpers.readme import MACHINE_TOLERANCE, parsed as _parsed, quoted_output as _quoted_output

    sources = {s.name: s for s in PUBLISHED.SOURCES}
    module, data, final = (sources["toy_seeds"].module(), sources["toy_seeds"].data(),
                           sources["fig13_scale"].data()["final"])
    assert list(data) == list(module.SEEDS) and data[0]["cells"] == final["cells"]
    for seed, record in data.items():
        assert (record["samples"], record["seed"], record["epoch_limit"]) == (final["samples"], final["seed"],
                                                                                final["epoch_limit"])
        assert len(record["cells"]) == len(module.FIG13)
        if seed:
            assert record["train_config"] == module.recipe(seed).run_settings()
    quoted = {cell: (numbers, significant) for cell, numbers, significant in map(_parsed, _quoted_output())}
    read = data[0]["readme_example"]
    assert list(read) == list(quoted)
    for cell, (numbers, significant) in quoted.items():
        mine = read[cell]
        assert mine["significant"] == significant, cell
        assert all(abs(a - b) <= MACHINE_TOLERANCE
                   for a, b in zip((mine["accuracy"], mine["ci_low"], mine["ci_high"]), numbers)), cell


def test_a_default_recipe_study_run_makes_exactly_the_published_recipes():
    """`python experiments/recipe_study.py` (no --only) trains and measures the recipes whose JSON is
    committed, no more: a recipe configured for the asking (ON_REQUEST) is not published, and every
    published one is in the default run (a rerun cannot publish 17 toys where the prose describes 15)."""
    study = next(s for s in PUBLISHED.SOURCES if s.name == "recipe_study").module()
    committed = {p.stem for p in (ROOT / study.OUT.relative_to(ROOT)).glob("*.json")}
    assert set(study.default_recipes()) == committed
    assert set(study.ON_REQUEST) <= set(study.RECIPES) and not set(study.ON_REQUEST) & committed


# Numbers the swept prose may state without a JSON of ours behind them, each with where it comes from:
# the paper (SPEC section 4 and the blog figures), what a recipe or study sets, what follows from the
# model's shape or the passcodes by arithmetic (computed here), or an external measurement cited by issue.
PAPER = {"26.2%", "24.9%", "13.1%", "19%", "77%", "95%", "66.1%", "50.8%"}  # and "95% interval", a convention
RECIPE_SETTINGS = {
    "0.1", "0.999",  # weight decay 0.1, Adam beta2 0.999; embeddings N(0, 0.1)
    "0.02", "0.3",  # embeddings N(0, 0.02) and N(0, 0.3)
    "6.4",  # the fixed-set recipe's epochs at 400 steps (400 x 64 / 4,000)
    "60%",  # the task accuracy recipe_seeds.py matches recipes at (TARGET)
    "2.5",  # issue 30's band for the blog heatmap's mean |difference| (paper_figures.HEATMAP_BAND)
}
DERIVED = {
    f"{1 / math.sqrt(3 * 512):.3f}", f"{1 / math.sqrt(3 * 128):.3f}",  # PyTorch's default init's sd, 1/sqrt(3 fan_in)
    "10%",  # chance for one digit
    f"{100 * PasscodeConfig(digit_sum=22).chance():.2f}%",  # the text-controlled passcodes' exact chance
}
EXTERNAL = {"1.8": "issue 26: an independent build of the toy's architecture, matched against the blog"}
KEPT_AS_MADE: dict[str, str] = {}  # number -> the committed file that holds it (made before a change, labelled so)


def _unsourced(text: str) -> list[str]:
    """The numbers in `text` (a decimal or a percentage) that no published block or quote accounts for."""
    text = re.sub(r"<!-- ([\w-]+) -->\n.*?\n<!-- /\1 -->", "", text, flags=re.S)  # rendered blocks
    for source in PUBLISHED.SOURCES:
        module = source.module()
        for phrase in (module.quotes(source.data()) if hasattr(module, "quotes") else {}).values():
            text = text.replace(phrase, "")
    text = text.replace("95% interval", "")
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?%?", text)
    return [n for n in numbers if ("." in n or n.endswith("%"))
            and n not in PAPER | RECIPE_SETTINGS | DERIVED and n not in EXTERNAL and n not in KEPT_AS_MADE]


SWEPT = {  # prose sections whose every number must come from a source (the rest of the docs: not yet)
    "README.md": ("## Results on the toy", "## Performance"),
    "docs/toy.md": ("## Against the published figures", "## Resume, refusal, logs"),
}


@pytest.mark.parametrize("path", sorted(SWEPT))
def test_the_results_prose_states_no_number_without_its_source(path):
    text = (ROOT / path).read_text()
    start, end = SWEPT[path]
    section = text[text.index(start):text.index(end)]
    assert _unsourced(section) == [], f"numbers in {path} ({start}) with no JSON, quote or listed source"


def test_numbers_kept_as_made_are_in_the_files_cited_for_them():
    for number, path in KEPT_AS_MADE.items():
        assert number.rstrip("%") in (ROOT / path).read_text(), f"{number} is not in {path}, which the README cites"


def test_the_sweep_can_fail():
    assert _unsourced("the toy reads 41.3% at +1, against 26.2% (95% interval)") == ["41.3%"]
