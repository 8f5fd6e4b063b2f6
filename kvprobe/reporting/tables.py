"""The report's data files: results.json, results.csv, diffs.csv and summary.md."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    from ..analysis import CellResult, DiffResult
from ..files import replacing, together, write_text
from ..grid import offset_role
from .summary import render_summary
from .sweep import Sweep, sweep_points
from .words import CHANCE, interval_verdict

REPORT_FORMAT = 1
"""Version of the layout of results.json."""


_LIST_PREFIX = {"digit_accuracy": "digit", "accuracy_seeds": "seed_accuracy"}


def _row_columns(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flat column names in field order; list fields expand to prefix_0 .. prefix_{n-1} (longest list)."""
    columns: list[str] = []
    for d in dicts:
        for key, value in d.items():
            names = ([f"{_LIST_PREFIX.get(key, key)}_{i}" for i in range(len(value))]
                     if isinstance(value, list) else [key])
            columns += [n for n in names if n not in columns]
    return columns


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, list):
            flat.update({f"{_LIST_PREFIX.get(key, key)}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _write_csv(path: Path, dicts: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with replacing(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: _csv_value(d.get(k)) for k in columns})


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null (strict JSON); numpy scalars, arrays and paths become plain values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _diff_dict(d: DiffResult) -> dict[str, Any]:
    out = d.to_dict()
    out["role"] = offset_role(d.offset)
    out["interval"] = interval_verdict(d.ci_low, d.ci_high)
    return out


def write_tables(
    rows: list[CellResult],
    diffs: list[DiffResult],
    out_dir: str | Path,
    *,
    sweep: Sweep | None = None,
    paper: dict | None = None,
    metadata: dict | None = None,
    figures: Sequence[str] = (),
    condition: str | None = None,
) -> dict[str, Path]:
    """Write results.json, results.csv, diffs.csv, sweep.csv (when a sweep is given) and summary.md.

    Returns {file name: path}. Accuracies are fractions in the data files; `metadata` (any
    JSON-able dict: model, store paths, settings) is stored in results.json and its scalar
    entries head summary.md. The files are written together: all of them, or (on a failure) none.
    """
    out = Path(out_dir)
    row_dicts = [r.to_dict() for r in rows]
    sweep_dicts = None if sweep is None else [p.to_dict() for p in sweep_points(sweep)]
    diff_dicts = [_diff_dict(d) for d in diffs]
    paths = {name: out / name for name in ("results.json", "results.csv", "diffs.csv", "summary.md")}
    document = {
        "format": "kvprobe.report",
        "format_version": REPORT_FORMAT,
        "chance": CHANCE,
        "metadata": metadata or {},
        "paper": paper,
        "rows": row_dicts,
        "diffs": diff_dicts,
        "sweep": sweep_dicts,
    }
    diff_columns = ["a", "b", "site", "offset", "role", "layer", "probe", "difference", "ci_low", "ci_high", "interval"]
    with together():
        write_text(paths["results.json"], json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n")
        _write_csv(paths["results.csv"], [_flatten(d) for d in row_dicts], _row_columns(row_dicts))
        _write_csv(paths["diffs.csv"], diff_dicts, diff_columns)
        if sweep is not None:
            paths["sweep.csv"] = out / "sweep.csv"
            _write_csv(paths["sweep.csv"], [_flatten(s) for s in sweep_dicts], _row_columns(sweep_dicts))
        write_text(paths["summary.md"], render_summary(rows, diffs, sweep=sweep, paper=paper, metadata=metadata,
                                                       figures=figures, condition=condition))
    return paths
