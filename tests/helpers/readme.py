"""The README's library example output, as the README quotes it: read by test_readme and test_published."""

from __future__ import annotations

import re

from tests.helpers.paths import ROOT


def quoted_output() -> list[str]:
    """The lines the README says the example prints (the text block after its output marker)."""
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("<!-- readme-example-output -->")
    return re.search(r"```text\n(.*?)```", readme[marker:], flags=re.S).group(1).strip().splitlines()


MACHINE_TOLERANCE = 0.3
"""Percentage points a printed number may move by between machines: float rounding differs between
machines and BLAS modes (the same code, packages and seed read the direct cell 99.8 on this machine, 99.6
with MKL_CBWR=AUTO,STRICT)."""


def parsed(line: str) -> tuple[str, list[float], bool]:
    """'layer 3 offset +1: 46.5% [45.1, 48.0] significant=True' -> ('layer 3 offset +1', [46.5, 45.1, 48.0], True)."""
    cell, rest = line.split(": ", 1)
    return cell, [float(x) for x in re.findall(r"\d+\.\d", rest)], rest.endswith("significant=True")
