"""Leakage across training checkpoints: the sweep's points, its sentence and its section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .words import CHANCE, _num, _pct, _pp, _table

__all__ = ["SweepPoint", "sweep_points", "sweep_sentence"]


@dataclass(frozen=True)
class SweepPoint:
    """One checkpoint of a sweep across training: its task accuracy and, at one layer, the
    linear probe's accuracy [95% interval] at the masked offset it follows (and the direct
    and causal-control cells when captured). Accuracies are fractions."""

    checkpoint: str
    task_accuracy: float
    masked_accuracy: float
    step: int | None = None
    layer: int | None = None
    masked_offset: int = 1  # sweeps written before it was recorded followed +1
    masked_ci_low: float | None = None
    masked_ci_high: float | None = None
    direct_accuracy: float | None = None
    direct_ci_low: float | None = None
    direct_ci_high: float | None = None
    control_accuracy: float | None = None
    control_ci_low: float | None = None
    control_ci_high: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other offsets' cells, as written

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepPoint":
        """A point from its JSON form (`to_dict`); fields it does not know are kept in `extra`."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [f for f in ("checkpoint", "task_accuracy", "masked_accuracy") if f not in d]
        if missing:
            raise ValueError(f"sweep point {d.get('checkpoint', '?')!r} lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known and k != "extra"})

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**d, **self.extra}


Sweep = Sequence["SweepPoint | Mapping[str, Any]"]


def sweep_points(sweep: Sweep) -> list[SweepPoint]:
    """Typed checkpoints in training order (sorted by step when every point has one, else as given);
    JSON points (dicts) are read with `SweepPoint.from_dict`."""
    points = [p if isinstance(p, SweepPoint) else SweepPoint.from_dict(dict(p)) for p in sweep]
    if all(p.step is not None for p in points):
        return sorted(points, key=lambda p: float(p.step))
    return points


def _where(point: SweepPoint) -> str:
    return f"step {point.step}" if point.step is not None else f"checkpoint {point.checkpoint}"


def sweep_sentence(sweep: Sweep) -> str:
    """Plain words, computed from the data: does masked leakage stay constant while task accuracy changes?"""
    points = sweep_points(sweep)
    if not points:
        return "No checkpoints in the sweep."
    if len(points) == 1:
        p = points[0]
        return (f"Only one checkpoint ({_where(p)}): masked accuracy {_pct(p.masked_accuracy)}, "
                f"task accuracy {_pct(p.task_accuracy)}; no trend can be judged.")
    acc = [float(p.masked_accuracy) for p in points]
    lo_i, hi_i = min(range(len(acc)), key=acc.__getitem__), max(range(len(acc)), key=acc.__getitem__)
    text = (f"Across {len(points)} checkpoints ({_where(points[0])} to {_where(points[-1])}), "
            f"masked probe accuracy ranges from {_pct(acc[lo_i])} ({_where(points[lo_i])}) "
            f"to {_pct(acc[hi_i])} ({_where(points[hi_i])}), a spread of {100 * (acc[hi_i] - acc[lo_i]):.1f} pp, "
            f"and moves {_pp(acc[-1] - acc[0])} pp from the first to the last checkpoint.")
    task0, task1 = float(points[0].task_accuracy), float(points[-1].task_accuracy)
    if task1 == task0:
        task_text = f"task accuracy stays at {_pct(task0)}"
    else:
        task_text = f"task accuracy {'rises' if task1 > task0 else 'falls'} from {_pct(task0)} to {_pct(task1)}"
    has_ci = all(p.masked_ci_low is not None and p.masked_ci_high is not None for p in points)
    if not has_ci:
        return text + f" Meanwhile {task_text}. Without intervals, whether leakage is constant cannot be judged."
    lows = [float(p.masked_ci_low) for p in points]
    highs = [float(p.masked_ci_high) for p in points]
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
                 f"({_pct(a.masked_accuracy)} [{_num(a.masked_ci_low)}, {_num(a.masked_ci_high)}]) and "
                 f"{_where(b)} ({_pct(b.masked_accuracy)} [{_num(b.masked_ci_low)}, "
                 f"{_num(b.masked_ci_high)}]) are disjoint, so masked leakage changes across training "
                 f"(it {direction} from first to last checkpoint) while {task_text}.")
    text += f" The masked interval lies above chance at {above} of {len(points)} checkpoints."
    return text


def _sweep_section(sweep: Sweep, paper: Mapping[str, Any] | None) -> str:
    points = sweep_points(sweep)
    has_direct = any(p.direct_accuracy is not None for p in points)
    header = ["checkpoint", "step", "task accuracy", "masked accuracy [95%]"]
    header += ["direct accuracy"] if has_direct else []
    body = []
    for p in points:
        lo, hi = p.masked_ci_low, p.masked_ci_high
        masked = _pct(p.masked_accuracy)
        if lo is not None and hi is not None:
            masked += f" [{_num(lo)}, {_num(hi)}]"
        step = p.step
        line = [str(p.checkpoint), "—" if step is None else str(step), _pct(p.task_accuracy), masked]
        if has_direct:
            line.append(_pct(p.direct_accuracy))
        body.append(line)
    layers = {p.layer for p in points}
    where = f" Accuracies are at layer {layers.pop()}." if len(layers) == 1 and None not in layers else ""
    masked_offsets = {p.masked_offset for p in points}  # sweeps written before it was recorded: +1
    which = "masked " + ", ".join(f"{o:+d}" for o in sorted(masked_offsets))
    out = ["## Leakage across training checkpoints", "",
           f"One line per checkpoint; masked accuracy is the {which} probe with its 95% interval.{where}", "",
           _table(header, body), "", sweep_sentence(points)]
    if paper and paper.get("sweep"):
        out += ["", f"Paper: {paper['sweep']}."]
    return "\n".join(out)
