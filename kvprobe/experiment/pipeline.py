"""The experiment pipeline: capture -> probe -> causal -> sweep -> report, from one config.

`kvprobe run`, `probe`, `report` and `demo` are thin commands over these functions, and
a study in Python calls them the same way:

    cfg = load_config("experiments/toy_reproduction.yaml")
    out, plans = start_run(cfg, Path("runs/repro"), resume=False, overwrite=False)
    grids = run_pipeline(cfg, out, plans, resume=False)
    print(leakage_table(grids))

An experiment directory (`rundir`) holds every stage's output, so an interrupted run
resumes at the first unfinished piece.

Significance is corrected in one place, `holm_corrected`: every table printed (`leakage_table`)
or written (`stage_report`) reads its rows through it, so `kvprobe probe`, `run`, `report`
and `demo` star the same cells of a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..analysis import (
    GridResult,
    apply_holm,
    compare,
    load_grid,
    merge_grids,
    probe_store,
    save_grid,
)
from ..config import ExperimentConfig
from ..files import together, write_text
from ..grid import LINEAR, MEMENTO
from ..reporting.sweep import SweepPoint
from ..reporting.words import epoch_limit_flag
from ..store import REPAIR, KVStore, verify_store
from .capture import Plans, capture_all, plan_all, sweep_kind
from .causal import saved_causal, stage_causal
from .reconstruct import saved_reconstruction, stage_reconstruct
from .errors import ExperimentError
from .resolve import load_model, make_source
from .rundir import (
    check_fitted,
    check_out_dir,
    fit_record,
    open_run_store,
    prepare_out_dir,
    probe_fingerprint,
    record_timing,
    store_dir,
)

__all__ = ["holm_corrected", "leakage_table", "run_pipeline", "stage_probe", "stage_report", "stage_sweep",
           "stage_track", "start_run"]


def stage_probe(cfg: ExperimentConfig, out: Path, *, progress: bool = True) -> dict[str, GridResult]:
    """Probe every condition's store; conditions already probed are read back. Either way the store is
    checked first (`open_run_store`), and saved results must have been fitted on it with this config's
    settings (`check_fitted`): results never outlive the store they stand on."""
    grids = {}
    for i, cond in enumerate(cfg.conditions, 1):
        path = out / "probes" / cond
        with open_run_store(out, cfg, cond) as store:
            if path.with_suffix(".json").is_file():
                check_fitted(out, cfg, cond, store.config)
                grids[cond] = _saved_grid(path, len(store))
                continue
            damaged = verify_store(store.path)  # every byte, before any fit (a damaged chunk would fail mid-way)
            if damaged:
                raise ExperimentError(f"{damaged[0]}; {REPAIR}")
            try:
                label = f"probe {cond} ({i}/{len(cfg.conditions)})"
                parts = [probe_store(store, cond, cfg.probe_settings(family, cond), progress=progress, label=label)
                         for family in cfg.probe.families]
            except ValueError as e:
                raise ExperimentError(f"probe: {e}") from None
            fingerprint = probe_fingerprint(cfg, cond, store.config)
        grids[cond] = merge_grids(parts)
        with together():  # the record of what they were fitted from, and the results
            write_text(fit_record(out, cond), json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
            save_grid(grids[cond], path)
    return grids


def _saved_grid(path: Path, n_samples: int) -> GridResult:
    """A condition's saved probe results, fitted on a store of `n_samples`; damaged or partial ones, or
    ones fitted on another number of samples, are bad input naming the file."""
    redo = f"refit them with `kvprobe probe {path.parent.parent} --redo`"
    for suffix in (".json", ".npz"):
        if not path.with_suffix(suffix).is_file():
            raise ExperimentError(f"{path.with_suffix(suffix)}: missing probe results; {redo}")
    import zipfile

    try:
        grid = load_grid(path)
    except (ValueError, KeyError, TypeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ExperimentError(f"{path}.json/.npz: damaged probe results ({type(e).__name__}: {e}); {redo}") from None
    fitted = {r.n_train + r.n_val for r in grid.rows}
    if fitted - {n_samples}:
        raise ExperimentError(f"{path}.json: fitted on {min(fitted - {n_samples})} samples, but the store holds "
                              f"{n_samples}; {redo}")
    return grid


def stage_sweep(cfg: ExperimentConfig, out: Path, *, progress: bool = True) -> list[SweepPoint]:
    """Capture and linearly probe each sweep checkpoint; finished checkpoints are read back."""
    if not cfg.sweep.checkpoints:
        return []
    kind = sweep_kind(cfg)
    from ..capture import run_capture

    sweep_dir = out / "sweep"
    results_file = sweep_dir / "sweep.json"
    spec, settings = cfg.sweep_specs()  # the one layer the sweep reports: nothing else is captured or probed
    layer = spec.layers[0]
    masked = cfg.sweep.masked_offset()
    done = _saved_sweep(results_file, layer, masked)
    source = make_source(cfg, cfg.sweep.n_samples)  # the same samples for every checkpoint
    rows = []
    for name in cfg.sweep.checkpoints:
        if name in done:
            rows.append(done[name])
            continue
        try:
            model = load_model(cfg.model.model_copy(update={"checkpoint": name}))
        except ExperimentError as e:
            raise ExperimentError(f"sweep.checkpoints: {str(e).removeprefix('model.checkpoint: ')}") from None
        store_path = sweep_dir / name.replace("/", "_")
        run_capture(model, source, spec, store_path, mode="resume" if store_path.exists() else "create",
                    model_name=name, progress=progress)
        with KVStore(store_path) as store:
            grid = probe_store(store, name, settings, progress=False)
        row: dict[str, Any] = {"checkpoint": name, "step": kind.checkpoint_step(name),
                               "task_accuracy": kind.task_accuracy(model, cfg.sweep.task_samples)}
        for r in grid.rows:
            tag = {-1: "control", 0: "direct", masked: "masked"}.get(r.offset, f"offset{r.offset:+d}")
            row[f"{tag}_accuracy"] = r.accuracy
            row[f"{tag}_ci_low"], row[f"{tag}_ci_high"] = r.ci_low, r.ci_high
        row["layer"], row["masked_offset"] = layer, masked
        rows.append(SweepPoint.from_dict(row))
        write_text(results_file, json.dumps([p.to_dict() for p in rows], indent=1))
    return rows


def _saved_sweep(path: Path, layer: int, masked: int) -> dict[str, SweepPoint]:
    """The sweep points already done, by checkpoint; damaged ones, or ones that followed another layer
    or masked offset than the config's, are bad input naming the file."""
    if not path.is_file():
        return {}
    redo = f"delete it and resume (`kvprobe run CONFIG --out {path.parent.parent} --resume`) to sweep again"
    try:
        points = [SweepPoint.from_dict(d) for d in json.loads(path.read_text())]
    except (ValueError, TypeError, AttributeError) as e:  # malformed JSON, not UTF-8, not a list of points
        raise ExperimentError(f"{path}: damaged sweep results ({e}); {redo}") from None
    for p in points:  # a sweep written before points recorded their layer has layer None
        if p.layer not in (None, layer) or p.masked_offset != masked:
            raise ExperimentError(f"{path}: checkpoint {p.checkpoint!r} was swept at layer {p.layer}, offset "
                                  f"{p.masked_offset}; this run's config follows layer {layer}, offset {masked}; "
                                  f"{redo}")
    return {p.checkpoint: p for p in points}


def holm_corrected(grids: Mapping[str, GridResult]) -> dict[str, GridResult]:
    """A run's grids (condition -> grid) with every row's `p_holm` and `significant` set by one Holm
    correction over the whole family; the grids passed in are left as they are (rows are copied).

    The family is every cell of every condition, site, probe kind, layer and offset, the causal
    controls included: the one the report states ("corrected over all N cells"). Every leakage
    table printed or written goes through here, so the same grids get the same stars whichever
    command shows them."""
    out = {cond: replace(g, rows=[replace(r) for r in g.rows]) for cond, g in grids.items()}
    apply_holm([r for g in out.values() for r in g.rows])
    return out


def token_ids_fed(out: Path, cfg: ExperimentConfig) -> str | None:
    """Which token ids the capture fed, from the first store's source description (None: no traces there)."""
    config = store_dir(out, next(iter(cfg.conditions))) / "config.json"
    if not config.is_file():
        return None
    traces = json.loads(config.read_text()).get("source", {}).get("traces")
    if not isinstance(traces, dict):
        return None
    n, served = traces.get("n"), traces.get("served_ids_fed", 0)
    return (f"served ids for {served} of {n} traces, kvprobe's tokenization for the rest "
            f"(data.token_ids: {traces.get('token_ids', 'served')}; {traces.get('served_ids', 0)} traces carried served ids)")


def run_record(out: Path) -> dict[str, Any]:
    """The packages the run used (OUT/config.json) and the captured model's identity (OUT/model.json),
    where recorded and readable, for the report's metadata."""
    found: dict[str, Any] = {}
    for key, name in (("versions", "config.json"), ("model identity", "model.json")):
        try:
            record = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        value = record.get("versions") if key == "versions" and isinstance(record, dict) else record
        if isinstance(value, dict):
            found[key] = value
    return found


def stage_report(cfg: ExperimentConfig, out: Path, grids: dict[str, GridResult], sweep: list[SweepPoint]) -> list[Path]:
    """Tables and figures from probe results (cells Holm-corrected by `holm_corrected`); always rewritten (cheap)."""
    from .. import reporting as report

    rows = [r for g in holm_corrected(grids).values() for r in g.rows]
    diffs = []
    for a, b in cfg.comparisons():
        if a in grids and b in grids:
            diffs.extend(compare(grids[a], grids[b], n_boot=cfg.probe.n_boot))
    apply_holm(diffs)  # the differences are a family of their own
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    meta = {"name": cfg.name, "config": cfg.to_dict(), "timings": timings, **run_record(out)}
    fed = token_ids_fed(out, cfg)
    if fed is not None:
        meta["token ids"] = fed
    paper = report.PAPER_TOY if cfg.report.paper == "toy" else None
    causal = saved_causal(out)
    beside = (causal, cfg.causal_condition()) if causal is not None else None  # on index.html, by the probe map
    paths = list(report.write_report(rows, diffs, out / "report", sweep=sweep or None, paper=paper, metadata=meta,
                                     causal=beside).values())
    if causal is not None:  # the causal map beside the probe map
        from ..reporting.causal import write_causal

        paths += [p for p in write_causal(causal, rows, out / "report", condition=cfg.causal_condition())
                  if p not in paths]
    reconstruction = saved_reconstruction(out)
    if reconstruction is not None:  # what survives an erased block, in bits
        from ..reporting.reconstruction import write_reconstruction

        paths += [p for p in write_reconstruction(reconstruction, out / "report") if p not in paths]
    return paths


def leakage_table(grids: dict[str, GridResult], probe: str = LINEAR, site: str = MEMENTO) -> str:
    """A compact text table: probe accuracy (%) by layer (rows) and offset (columns), per condition.

    `*` marks a Holm-significant cell, corrected (`holm_corrected`) over every cell of `grids`, not
    only the ones shown: the family of the run's report."""
    grids = holm_corrected(grids)
    n_cells = sum(len(g.rows) for g in grids.values())
    lines = []
    for cond, grid in grids.items():
        cells = {(r.layer, r.offset): r for r in grid.rows if r.probe == probe and r.site == site}
        if not cells:
            continue
        layers = sorted({k[0] for k in cells})
        offsets = sorted({k[1] for k in cells})
        chance = next(iter(cells.values())).chance  # 10%, or constrained passcodes' own baseline
        lines.append(f"{cond}: {probe} probe accuracy (%), chance {100 * chance:.4g}; "
                     f"* = significant after Holm over all {n_cells} cells")
        lines.append("layer " + "".join(f"{o:>+8d}" for o in offsets))
        for layer in layers:
            vals = []
            for o in offsets:
                r = cells.get((layer, o))
                vals.append(f"{100 * r.accuracy:7.1f}{'*' if r.significant else ' '}" if r else " " * 8)
            lines.append(f"{layer:>5} " + "".join(vals))
        weak = [r for r in cells.values() if r.l2_at_weak_bound]
        if weak:
            where = ", ".join(f"layer {r.layer} {r.offset:+d}" for r in sorted(weak, key=lambda r: (r.layer, r.offset)))
            lines.append(f"FLAGGED: the probe chose the weakest strength it could try ({min(r.l2 for r in weak):g}) "
                         f"at {where}: the leak there may be higher")
        lines.append("")
    flag = epoch_limit_flag(r for g in grids.values() for r in g.rows)  # MLP cells, whichever table is shown
    return "\n".join(lines + ([flag, ""] if flag else []))


def start_run(cfg: ExperimentConfig, out: Path, *, resume: bool, overwrite: bool) -> tuple[Path, Plans]:
    """Validate everything (output directory, model, samples, capture plans), then create OUT."""
    check_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    plans = plan_all(cfg)
    print(plans.summary())
    return prepare_out_dir(out, cfg, resume=resume, overwrite=overwrite, stage="run"), plans


def stage_track(cfg: ExperimentConfig, out: Path, grids: dict[str, GridResult], figures: Sequence[Path] = (), *,
                log_to: tuple[str, ...] = (), online: bool = False) -> list[Path]:
    """Log the config, every cell (Holm-corrected) and the report's PNG figures to each tracker of `log_to`
    (`reporting.tracking`), each into a fresh sub-run under OUT/tracking; returns where they wrote."""
    if not log_to:
        return []
    from ..reporting.tracking import track_run

    rows = [r for g in holm_corrected(grids).values() for r in g.rows]
    return track_run(log_to, out / "tracking", name=cfg.name, config=cfg.to_dict(), rows=rows, figures=figures,
                     online=online)


def run_pipeline(cfg: ExperimentConfig, out: Path, plans: Plans, *, resume: bool, progress: bool = True,
                 log_to: tuple[str, ...] = (), online: bool = False) -> dict[str, GridResult]:
    """Every stage in order: capture, probe, causal (with a `causal` section), reconstruct (with
    `reconstruct.layers`), sweep, report, then the
    trackers of `log_to` (`stage_track`). Returns the probe grids, Holm-corrected as the report's family
    (`holm_corrected`)."""
    t = time.perf_counter()
    capture_all(cfg, out, plans, mode="resume" if resume else "create", progress=progress)
    record_timing(out, "capture", time.perf_counter() - t)
    t = time.perf_counter()
    grids = holm_corrected(stage_probe(cfg, out, progress=progress))
    record_timing(out, "probe", time.perf_counter() - t)
    if cfg.causal_spec() is not None:
        t = time.perf_counter()
        stage_causal(cfg, out, plans.model, grids, progress=progress)
        record_timing(out, "causal", time.perf_counter() - t)
    if cfg.reconstruct.layers is not None:
        t = time.perf_counter()
        stage_reconstruct(cfg, out, progress=progress)
        record_timing(out, "reconstruct", time.perf_counter() - t)
    t = time.perf_counter()
    sweep = stage_sweep(cfg, out, progress=progress)
    if cfg.sweep.checkpoints:
        record_timing(out, "sweep", time.perf_counter() - t)
    t = time.perf_counter()
    paths = stage_report(cfg, out, grids, sweep)
    record_timing(out, "report", time.perf_counter() - t)
    stage_track(cfg, out, grids, paths, log_to=log_to, online=online)
    return grids
