"""Published numbers are the numbers the scripts computed: prose against the committed JSON.

`benchmarks/bench_scale.py` writes `benchmarks/results/scale_cpu.json`; its `render` makes the
tables `benchmarks/RESULTS.md` quotes and its `quotes` the phrases the README and docs quote.
A rerun that changes a number changes the JSON, and this test then fails until the prose
quotes the new one (tolerance zero on the printed digits).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("name, path", [(n, p) for n, paths in QUOTED_IN.items() for p in paths])
def test_prose_quotes_the_scale_json(scale, name, path):
    phrase = bench_scale().quotes(scale)[name]
    assert phrase in (ROOT / path).read_text(), f"{path} should quote {name} as {phrase!r} (from {SCALE_JSON.name})"


def test_every_quoted_phrase_is_checked_somewhere(scale):
    assert set(bench_scale().quotes(scale)) == set(QUOTED_IN)
