"""The README's library example output, as the README quotes it: read by test_readme and test_published
(what the README quotes and how a printed line is read back are experiments/published.py's)."""

from __future__ import annotations

from tests.helpers.published import PUBLISHED

quoted_output = PUBLISHED.readme_example_output
parsed = PUBLISHED.printed_cell

MACHINE_TOLERANCE = 0.3
"""Percentage points a printed number may move by between machines: float rounding differs between
machines and BLAS modes (the same code, packages and seed read the direct cell 99.8 on this machine, 99.6
with MKL_CBWR=AUTO,STRICT)."""
