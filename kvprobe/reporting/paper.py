"""The paper's published numbers (SPEC sections 3 and 4) and the summary section that sets ours beside them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    from ..analysis import CellResult
from ..grid import MLP
from .words import CHANCE, _index, _num, _table, fmt_accuracy, probe_order

# Paper numbers (SPEC sections 3 and 4). Layers are "first", "last" or a 0-based index;
# accuracy None means the paper gives no number ("—"); `text` overrides the display.
PAPER_TOY: dict[str, Any] = {
    "source": "Memento paper, appendix A.4.2 (toy transformer, 4 layers)",
    "probe": MLP,
    "cells": [
        {"quantity": "direct, first layer", "offset": 0, "layer": "first", "accuracy": None},
        {"quantity": "direct, last layer", "offset": 0, "layer": "last", "accuracy": 0.985,
         "note": "the microsoft/memento blog figure 'Probing KV States'"},
        {"quantity": "masked +1, first layer", "offset": 1, "layer": "first", "accuracy": 0.131},
        {"quantity": "masked +1, last layer", "offset": 1, "layer": "last", "accuracy": 0.262,
         "note": "24.9% in the main text"},
        {"quantity": "masked +2, last layer", "offset": 2, "layer": "last", "accuracy": 0.214},
        {"quantity": "masked +7, last layer", "offset": 7, "layer": "last", "accuracy": 0.13,
         "text": "≈13 (1.3× chance)"},
    ],
    "sweep": "masked leakage stays roughly constant (17–19%) while task accuracy climbs from 77% to 95%",
}


def _paper_qwen(name: str, direct: tuple[float, float], masked: tuple[float, float]) -> dict[str, Any]:
    return {
        "source": f"Memento paper, section 6.2.2 ({name}; masked = M_3, compared with offset +1)",
        "probe": MLP,
        "cells": [
            {"quantity": "causal control, 4th layer", "offset": -1, "layer": 3, "accuracy": CHANCE,
             "text": "chance"},
            {"quantity": "causal control, last layer", "offset": -1, "layer": "last", "accuracy": CHANCE,
             "text": "chance"},
            {"quantity": "direct, 4th layer", "offset": 0, "layer": 3, "accuracy": direct[0]},
            {"quantity": "direct, last layer", "offset": 0, "layer": "last", "accuracy": direct[1]},
            {"quantity": "masked +1, 4th layer", "offset": 1, "layer": 3, "accuracy": masked[0]},
            {"quantity": "masked +1, last layer", "offset": 1, "layer": "last", "accuracy": masked[1]},
        ],
    }


PAPER_QWEN3_8B = _paper_qwen("Qwen3-8B", (0.516, 0.649), (0.108, 0.265))


PAPER_QWEN3_32B = _paper_qwen("Qwen3-32B", (0.538, 0.687), (0.128, 0.224))


def _resolve_layer(layer: int | str, layers: Sequence[int]) -> int | None:
    if not layers:
        return None
    if layer == "first":
        return min(layers)
    if layer == "last":
        return max(layers)
    return int(layer)


def _paper_section(rows: Sequence[CellResult], paper: Mapping[str, Any], condition: str, site: str) -> str:
    cells = [r for r in rows if r.condition == condition and r.site == site]
    idx = _index(cells)
    layers = sorted({r.layer for r in cells})
    probes = probe_order(cells)
    paper_probe = paper.get("probe", MLP)
    check_probe = paper_probe if paper_probe in probes else (probes[-1] if probes else None)
    header = ["quantity", "layer", "paper", *(f"ours ({p})" for p in probes)]
    if check_probe:
        header.append(f"paper value in our interval ({check_probe})")
    body = []
    for item in paper.get("cells", []):
        layer = _resolve_layer(item["layer"], layers)
        value = item.get("accuracy")
        paper_text = item.get("text") or (_num(value) + "%" if value is not None else "—")
        if item.get("note"):
            paper_text += f" ({item['note']})"
        line = [item["quantity"], "—" if layer is None else str(layer), paper_text]
        for p in probes:
            r = idx.get((condition, site, item["offset"], layer, p)) if layer is not None else None
            line.append(fmt_accuracy(r) if r else "not measured")
        if check_probe:
            r = idx.get((condition, site, item["offset"], layer, check_probe)) if layer is not None else None
            line.append("—" if r is None or value is None else ("yes" if r.ci_low <= value <= r.ci_high else "no"))
        body.append(line)
    out = [
        "## Comparison with the paper",
        "",
        f"Paper: {paper.get('source', 'unnamed source')}; paper probe: {paper_probe}. "
        f"Ours: condition `{condition}`, site `{site}`; \"first\" and \"last\" are the first and last captured layers. "
        "Paper values are percentages; \"—\" where the paper gives no number.",
        "",
        _table(header, body),
    ]
    return "\n".join(out)
