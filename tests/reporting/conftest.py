"""The report tests' synthetic grid (tests.helpers.grids), built once per module."""

from __future__ import annotations

import pytest

from kvprobe.analysis import CellResult, DiffResult
from tests.helpers.grids import make_diffs, make_grid


@pytest.fixture(scope="module")
def grid() -> list[CellResult]:
    return make_grid()


@pytest.fixture(scope="module")
def diffs(grid) -> list[DiffResult]:
    return make_diffs(grid)
