"""The grid's vocabulary: a cell's label and path, what each pooling keeps, what each offset is."""

from __future__ import annotations

import pytest

from kvprobe.grid import (DEFAULT_POOLING, FAMILIES, POOLINGS, SITES, TENSORS, Cell, FeatureKey, feature_path,
                          offset_role, pooled_vectors)


def test_a_cell_is_named_the_same_way_everywhere():
    cell = Cell("memento", 1, 3)
    assert cell.pooling == DEFAULT_POOLING == "tail_mean"
    assert cell.label == "memento|+1|3|tail_mean" and Cell.parse(cell.label) == cell
    assert cell.key == FeatureKey("memento", 1, "tail_mean")
    assert cell.key.path == feature_path("memento", 1, "tail_mean") == "features/memento/+1/tail_mean"
    assert Cell.parse("block_end|-1|0|mean") == Cell("block_end", -1, 0, "mean")


def test_cells_sort_by_site_then_offset_then_layer():
    cells = [Cell("memento", 2, 0), Cell("block_end", 0, 3), Cell("memento", -1, 3), Cell("memento", -1, 1)]
    assert sorted(cells) == [Cell("block_end", 0, 3), Cell("memento", -1, 1), Cell("memento", -1, 3),
                             Cell("memento", 2, 0)]


@pytest.mark.parametrize("pooling, vectors", [("mean", 1), ("last", 1), ("tokens", 4), ("tail_mean", 5)])
def test_each_pooling_keeps_its_number_of_vectors(pooling, vectors):
    assert pooled_vectors(pooling, max_tokens=4) == vectors


def test_every_pooling_has_a_size():
    assert all(pooled_vectors(p, 2) >= 1 for p in POOLINGS)


@pytest.mark.parametrize("offset, role", [(-2, "causal control"), (-1, "causal control"), (0, "direct"),
                                          (1, "masked"), (7, "masked")])
def test_offset_roles_follow_the_spec(offset, role):
    assert offset_role(offset) == role


def test_the_vocabulary():
    assert SITES == ("memento", "memento_text", "block_end") and TENSORS == ("k", "v")
    assert FAMILIES == ("linear", "mlp") and POOLINGS[0] == DEFAULT_POOLING
