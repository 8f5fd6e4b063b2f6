"""Where things are, for every test: the repository root and the folders tests read from.

    from tests.helpers.paths import ROOT, FIXTURES
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # tests/helpers/paths.py -> the repository root
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"  # data files the tests read (traces, an OpenMementos sample)
EXPERIMENTS = ROOT / "experiments"
BENCHMARKS = ROOT / "benchmarks"
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
