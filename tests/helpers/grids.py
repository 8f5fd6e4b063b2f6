"""Synthetic probe results for the report tests: plausible rows for every cell of a toy-sized grid.

    rows = make_grid()                 # three conditions, two sites, two probes, 9 offsets x 4 layers
    diffs = make_diffs(rows)           # the paired differences of the standard pairs
    sweep = make_sweep()               # a checkpoint sweep (masked and task accuracy per step)

Masked +1 accuracy per layer is the paper's toy numbers; every row is Holm-corrected with the rest.
"""

from __future__ import annotations

import dataclasses

from kvprobe.analysis import CellResult, DiffResult, apply_holm

__all__ = ["CONDITION_DROP", "HALF_WIDTH", "LAYERS", "MASKED_PLUS_ONE", "OFFSETS", "make_cell", "make_diffs",
           "make_grid", "make_sweep"]

LAYERS = (0, 1, 2, 3)
OFFSETS = (-1, 0, 1, 2, 3, 4, 5, 6, 7)
HALF_WIDTH = 0.02  # synthetic 95% interval half-width
# masked +1 accuracy per layer (the paper's toy numbers at the first and last layer)
MASKED_PLUS_ONE = {0: 0.131, 1: 0.18, 2: 0.23, 3: 0.262}
CONDITION_DROP = {"memento": 0.0, "restart-delims-visible": 0.04, "restart": 0.08}


def _accuracy(condition: str, site: str, offset: int, layer: int, probe: str) -> float:
    """A plausible cell: chance at -1, high at 0, masked decaying with distance, smaller without channels."""
    if offset < 0:
        return 0.1 + 0.002 * (layer % 4)
    if offset == 0:
        return min(0.95, 0.70 + 0.05 * layer)
    base = MASKED_PLUS_ONE[layer] - (0.0 if offset == 1 else 0.048 + 0.005 * (offset - 2))
    value = base - CONDITION_DROP[condition] - (0.01 if site == "block_end" else 0.0)
    value -= 0.0 if probe == "mlp" else 0.005
    return max(0.1, round(value, 4))


def make_cell(condition: str, site: str, offset: int, layer: int, probe: str, **changes) -> CellResult:
    acc = _accuracy(condition, site, offset, layer, probe)
    cell = CellResult(
        condition=condition, site=site, offset=offset, layer=layer, probe=probe,
        accuracy=acc, accuracy_std=0.004 if probe == "mlp" else 0.0,
        accuracy_seeds=[acc - 0.003, acc, acc + 0.003] if probe == "mlp" else [acc],
        digit_accuracy=[acc + 0.001 * (k - 2) for k in range(5)],
        ci_low=acc - HALF_WIDTH, ci_high=acc + HALF_WIDTH,
        wilson_low=acc - HALF_WIDTH - 0.002, wilson_high=acc + HALF_WIDTH + 0.002,
        bits=max(0.0, (acc - 0.1) * 2), bits_low=max(0.0, (acc - 0.1) * 2) - 0.01, bits_high=(acc - 0.1) * 2 + 0.01,
        p_value=1e-8 if acc - HALF_WIDTH > 0.1 else 0.4,
        shuffled_accuracy=0.1, selectivity=acc - 0.1,
        train_accuracy=min(1.0, acc + 0.05), n_train=4000, n_val=1000,
    )
    return dataclasses.replace(cell, **changes)


def make_grid(conditions=("memento", "restart-delims-visible", "restart"), offsets=OFFSETS, layers=LAYERS,
              probes=("linear", "mlp"), block_end=True) -> list[CellResult]:
    rows = []
    for condition in conditions:
        sites = ("memento", "block_end") if block_end and condition != "restart" else ("memento",)
        for site in sites:
            for probe in probes:
                for offset in offsets:
                    for layer in layers:
                        rows.append(make_cell(condition, site, offset, layer, probe))
    apply_holm(rows)
    return rows


def make_diffs(rows: list[CellResult]) -> list[DiffResult]:
    index = {(r.condition, r.site, r.offset, r.layer, r.probe): r for r in rows}
    out = []
    for a, b in (("memento", "restart-delims-visible"), ("memento", "restart"), ("restart-delims-visible", "restart")):
        for (cond, site, offset, layer, probe), ra in index.items():
            rb = index.get((b, site, offset, layer, probe))
            if cond != a or rb is None:
                continue
            diff = ra.accuracy - rb.accuracy
            out.append(DiffResult(a, b, site, offset, layer, probe, diff, diff - 0.015, diff + 0.015))
    return out


def make_sweep(masked=(0.18, 0.175, 0.185, 0.18, 0.182), task=(0.77, 0.85, 0.9, 0.93, 0.95)) -> list[dict]:
    return [
        {"checkpoint": f"ckpt-{i}", "step": 1000 * (i + 1), "task_accuracy": t, "masked_accuracy": m,
         "masked_ci_low": m - 0.015, "masked_ci_high": m + 0.015, "direct_accuracy": 0.9}
        for i, (m, t) in enumerate(zip(masked, task))
    ]
