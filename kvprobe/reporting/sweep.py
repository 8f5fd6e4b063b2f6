"""Leakage across training checkpoints: the sweep's points, its sentence and its section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # reports read results; they need neither torch nor the probes
    pass
from .words import CHANCE, _num, _pct, _pp, _table


def sweep_points(sweep: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Checkpoints in training order: sorted by step when every point has one, else as given."""
    if all(p.get("step") is not None for p in sweep):
        return sorted(sweep, key=lambda p: float(p["step"]))
    return list(sweep)


def _where(point: Mapping[str, Any]) -> str:
    step = point.get("step")
    return f"step {step}" if step is not None else f"checkpoint {point.get('checkpoint', '?')}"


def sweep_sentence(sweep: Sequence[Mapping[str, Any]]) -> str:
    """Plain words, computed from the data: does masked leakage stay constant while task accuracy changes?"""
    points = sweep_points(sweep)
    if not points:
        return "No checkpoints in the sweep."
    if len(points) == 1:
        p = points[0]
        return (f"Only one checkpoint ({_where(p)}): masked accuracy {_pct(p['masked_accuracy'])}, "
                f"task accuracy {_pct(p['task_accuracy'])}; no trend can be judged.")
    acc = [float(p["masked_accuracy"]) for p in points]
    lo_i, hi_i = min(range(len(acc)), key=acc.__getitem__), max(range(len(acc)), key=acc.__getitem__)
    text = (f"Across {len(points)} checkpoints ({_where(points[0])} to {_where(points[-1])}), "
            f"masked probe accuracy ranges from {_pct(acc[lo_i])} ({_where(points[lo_i])}) "
            f"to {_pct(acc[hi_i])} ({_where(points[hi_i])}), a spread of {100 * (acc[hi_i] - acc[lo_i]):.1f} pp, "
            f"and moves {_pp(acc[-1] - acc[0])} pp from the first to the last checkpoint.")
    task0, task1 = float(points[0]["task_accuracy"]), float(points[-1]["task_accuracy"])
    if task1 == task0:
        task_text = f"task accuracy stays at {_pct(task0)}"
    else:
        task_text = f"task accuracy {'rises' if task1 > task0 else 'falls'} from {_pct(task0)} to {_pct(task1)}"
    has_ci = all(p.get("masked_ci_low") is not None and p.get("masked_ci_high") is not None for p in points)
    if not has_ci:
        return text + f" Meanwhile {task_text}. Without intervals, whether leakage is constant cannot be judged."
    lows = [float(p["masked_ci_low"]) for p in points]
    highs = [float(p["masked_ci_high"]) for p in points]
    common_low, common_high = max(lows), min(highs)
    above = sum(lo > CHANCE for lo in lows)
    if common_low <= common_high:
        text += (f" All {len(points)} intervals (95%) overlap (each contains {_pct(common_low)}–{_pct(common_high)}), "
                 f"so within the resolution of these intervals masked leakage stays roughly constant across "
                 f"training while {task_text}.")
    else:
        a = points[lows.index(common_low)]
        b = points[highs.index(common_high)]
        direction = "rises" if acc[-1] > acc[0] else "falls" if acc[-1] < acc[0] else "varies"
        text += (f" Not all 95% intervals overlap: {_where(a)} "
                 f"({_pct(a['masked_accuracy'])} [{_num(a['masked_ci_low'])}, {_num(a['masked_ci_high'])}]) and "
                 f"{_where(b)} ({_pct(b['masked_accuracy'])} [{_num(b['masked_ci_low'])}, "
                 f"{_num(b['masked_ci_high'])}]) are disjoint, so masked leakage changes across training "
                 f"(it {direction} from first to last checkpoint) while {task_text}.")
    text += f" The masked interval lies above chance at {above} of {len(points)} checkpoints."
    return text


def _sweep_section(sweep: Sequence[Mapping[str, Any]], paper: Mapping[str, Any] | None) -> str:
    points = sweep_points(sweep)
    has_direct = any(p.get("direct_accuracy") is not None for p in points)
    header = ["checkpoint", "step", "task accuracy", "masked accuracy [95%]"]
    header += ["direct accuracy"] if has_direct else []
    body = []
    for p in points:
        lo, hi = p.get("masked_ci_low"), p.get("masked_ci_high")
        masked = _pct(p["masked_accuracy"])
        if lo is not None and hi is not None:
            masked += f" [{_num(lo)}, {_num(hi)}]"
        step = p.get("step")
        line = [str(p.get("checkpoint", "—")), "—" if step is None else str(step), _pct(p["task_accuracy"]), masked]
        if has_direct:
            line.append(_pct(p.get("direct_accuracy")))
        body.append(line)
    layers = {p.get("layer") for p in points}
    where = f" Accuracies are at layer {layers.pop()}." if len(layers) == 1 and None not in layers else ""
    masked_offsets = {p.get("masked_offset", 1) for p in points}  # sweeps written before it was recorded: +1
    which = "masked " + ", ".join(f"{o:+d}" for o in sorted(masked_offsets))
    out = ["## Leakage across training checkpoints", "",
           f"One line per checkpoint; masked accuracy is the {which} probe with its 95% interval.{where}", "",
           _table(header, body), "", sweep_sentence(points)]
    if paper and paper.get("sweep"):
        out += ["", f"Paper: {paper['sweep']}."]
    return "\n".join(out)
