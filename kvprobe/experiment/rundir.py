"""An experiment directory: refuse to overwrite, resume only the same config, record timings.

    OUT/.kvprobe               marker: kvprobe made this directory (--overwrite deletes only such)
    OUT/config.json            resolved config, seed, versions (written first)
    OUT/model.json             the captured model's identity (name, parameter hash)
    OUT/stores/CONDITION/      KV stores (resumable shard by shard)
    OUT/probes/CONDITION.json  probe results per cell (+ .npz per-sample scores)
    OUT/probes/CONDITION.fit.json  what they were fitted from: the store and the probe settings
    OUT/sweep/sweep.json       leakage across training checkpoints (toy)
    OUT/report/                results.json/csv, summary.md, figures (PNG + PDF)
    OUT/timings.json           wall time of each stage
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig, parse_config
from ..files import remove_leftovers, together, write_text
from ..store import INDEX_FILE, KVStore, StoreError, is_store, verify_store
from .errors import ExperimentError

RUN_PACKAGES = ("kvprobe", "torch", "transformers", "h5py", "numpy", "scikit-learn")
MARKER = ".kvprobe"
MODEL_FILE = "model.json"

__all__ = ["MARKER", "check_fitted", "check_out_dir", "check_store", "fit_record", "open_run", "open_run_store",
           "prepare_out_dir", "probe_fingerprint", "record_model", "record_timing", "store_dir", "verify_run"]


def _writable_parent(out: Path) -> None:
    """Refuse an output path whose nearest existing ancestor is not a writable directory."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExperimentError(f"{out}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExperimentError(f"{out}: cannot be created, {parent} is not writable")


def check_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing directory unless resume or overwrite is asked, and a resume
    with another config than the run it continues. Touches nothing."""
    resolved = cfg.to_dict()
    record = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"{out}: exists and is not a directory")
    if not out.exists():
        _writable_parent(out)
    elif not os.access(out, os.W_OK | os.X_OK):
        raise ExperimentError(f"{out}: not writable")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not (out / MARKER).is_file():
                raise ExperimentError(f"{out}: not a directory kvprobe wrote (no {MARKER} marker); refusing to "
                                      "delete it with --overwrite (choose another --out or delete it yourself)")
            return
        if not resume:
            raise ExperimentError(f"{out}: output directory already exists (use --resume to continue it or --overwrite)")
        elif record.is_file():
            previous = _as_today(_read_record(record).get("config"))
            if previous != resolved:
                diff = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
                raise ExperimentError(f"{out}: was run with another config (sections differ: {', '.join(diff)}); "
                                 "use a new --out or --overwrite")
            _check_resumed(out, cfg)
        else:
            raise ExperimentError(f"{out}: exists but holds no kvprobe run (no config.json)")


def _as_today(recorded: dict | None) -> dict | None:
    """A run's recorded config under today's key names (a run recorded before a key was renamed still
    resumes); as recorded where it no longer parses (the comparison then names what differs)."""
    if recorded is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the user did not write the record
            return parse_config(recorded).to_dict()
    except ConfigError:
        return recorded


def prepare_out_dir(out: Path, cfg: ExperimentConfig, *, resume: bool, overwrite: bool, stage: str) -> Path:
    """Create (or reopen with resume) an experiment directory holding the resolved config.

    Checks as `check_out_dir` does; with overwrite an existing directory is deleted, with resume the
    temporaries of writers killed mid-write are (`kvprobe.files.remove_leftovers`).
    """
    check_out_dir(out, cfg, resume=resume, overwrite=overwrite)
    resolved = cfg.to_dict()
    record = out / "config.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if resume and out.exists():
        remove_leftovers(out)  # of writers killed mid-write
    with together():  # the directory, its marker and its record, or nothing
        if not (out / MARKER).is_file():
            write_text(out / MARKER, f"kvprobe {stage} directory; `--overwrite` may delete it\n")
        if not record.is_file():
            import torch

            from ..capture.run import package_versions  # torch: only where a run starts, not where one is opened

            # threads: what torch used here; probe results do not depend on it (tested), capture neither
            write_text(record, json.dumps({"config": resolved, "seed": cfg.seed,
                                           "versions": package_versions(RUN_PACKAGES),
                                           "threads": torch.get_num_threads(),
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return out


def record_timing(out: Path, stage: str, seconds: float) -> None:
    """Add one stage's wall time to out/timings.json: a resumed run adds what it spent to what the
    interrupted one recorded, so a stage that was already done keeps its time (it adds about 0)."""
    path = out / "timings.json"
    try:
        timings = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # a damaged timings file is rewritten
        timings = {}
    timings[stage] = round(float(timings.get(stage, 0.0)) + seconds, 2)
    write_text(path, json.dumps(timings, indent=2) + "\n")


def store_dir(out: Path, condition: str) -> Path:
    return out / "stores" / condition


def _read_record(record: Path) -> dict[str, Any]:
    """A run's config.json as a mapping with its `config`; a damaged one is bad input."""
    try:
        data = json.loads(record.read_text())
    except UnicodeDecodeError:
        raise ExperimentError(f"{record}: not a kvprobe run record (not UTF-8 text)") from None
    except ValueError as e:
        raise ExperimentError(f"{record}: damaged run record (malformed JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ExperimentError(f"{record}: damaged run record (no 'config' mapping)")
    return data


def open_run(path: str | os.PathLike) -> tuple[Path, ExperimentConfig]:
    """An existing run directory and its config, for the stages that continue a run."""
    path = Path(path)
    record = path / "config.json"
    if is_store(path) or (path / INDEX_FILE).exists():
        raise ExperimentError(f"{path}: a KV store, not a run directory; give the run directory that holds "
                              f"stores/ (e.g. {path.parent.parent})")
    if not record.is_file():
        raise ExperimentError(f"{path}: not a kvprobe run directory (no config.json); run `kvprobe capture` or "
                              "`kvprobe run` first")
    try:
        return path, parse_config(_read_record(record)["config"], str(record))
    except ConfigError as e:
        raise ExperimentError(f"damaged run record: {e}") from None


def record_model(out: Path, identity: dict[str, Any]) -> None:
    """Write the captured model's identity to OUT/model.json, or refuse one that differs from it."""
    path = out / MODEL_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if isinstance(before, dict) and before.get("param_hash") != identity["param_hash"]:
            raise ExperimentError(f"{path}: this run was captured from another model ({_who(before)}); the model "
                                  f"now is {_who(identity)}: use a new --out")
        if isinstance(before, dict):
            return
    write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def _who(identity: dict[str, Any]) -> str:
    return f"{identity.get('name')!r}, parameter hash {str(identity.get('param_hash'))[:12]}"


def check_store(out: Path, cfg: ExperimentConfig, condition: str, store: KVStore) -> None:
    """Refuse a store that this run did not capture: another model (name, parameter hash),
    other samples (count, seed) or another capture spec than the run's config asks for."""
    _check_captured(out, cfg, condition, store.config)


def _check_captured(out: Path, cfg: ExperimentConfig, condition: str, config: dict[str, Any]) -> None:
    """`check_store` on a store's recorded config (its config.json, or its index's copy)."""
    model = config.get("model", {})
    where = store_dir(out, condition)
    fix = f"re-capture it (delete it, then `kvprobe run CONFIG --out {out} --resume`) or probe the run it came from"
    if model.get("name") != cfg.model.checkpoint:
        raise ExperimentError(f"{where}: captured from model {_who(model)}, but this run's model is "
                              f"{cfg.model.checkpoint!r}; {fix}")
    recorded = out / MODEL_FILE
    if recorded.is_file():
        try:
            expected = json.loads(recorded.read_text()).get("param_hash")
        except (ValueError, AttributeError):
            raise ExperimentError(f"{recorded}: damaged model record (malformed JSON)") from None
        if model.get("param_hash") != expected:
            raise ExperimentError(f"{where}: captured from model {_who(model)}, but this run captured parameter hash "
                                  f"{str(expected)[:12]}; {fix}")
    source = config.get("source", {})
    for field, expected in (("n_samples", cfg.data.n_samples), ("seed", cfg.seed)):
        if field in source and source[field] != expected:
            raise ExperimentError(f"{where}: captured from other samples than this run's ({field} {source[field]}, "
                                  f"the run's {expected}); {fix}")
    want = cfg.capture_spec(condition).to_dict()
    have = dict(config.get("capture", {}))
    if want.get("target_block") is None:  # the run's spec follows its source; the store records the block
        have.pop("target_block", None)
        want.pop("target_block", None)
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ExperimentError(f"{where}: captured with another capture spec than this run's condition "
                              f"{condition!r} (fields differ: {', '.join(diff)}); {fix}")


def _check_resumed(out: Path, cfg: ExperimentConfig) -> None:
    """Before a resume writes anything: every store already there (whole, damaged or unfinished) must
    be this run's capture (`check_store`), and saved probe results fitted on it with this config's
    settings (`check_fitted`); a resume repairs damage, but never mixes another config's work in."""
    for cond in cfg.conditions:
        record = store_dir(out, cond) / "config.json"
        if not record.is_file():
            continue
        config = _json_record(record, "store record", f"delete {record.parent} and resume (`kvprobe run CONFIG "
                                                      f"--out {out} --resume`) to capture it again")
        _check_captured(out, cfg, cond, config)
        check_fitted(out, cfg, cond, config)


def _json_record(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON mapping kvprobe wrote (`what`, e.g. "store record"); unreadable or damaged is bad input naming
    the file and `fix`."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ExperimentError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except ValueError:  # malformed JSON or not UTF-8
        data = None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: damaged {what} (malformed JSON); {fix}")
    return data


def fit_record(out: Path, condition: str) -> Path:
    """Where a condition's probe results record what they were fitted from (`probe_fingerprint`)."""
    return out / "probes" / f"{condition}.fit.json"


def probe_fingerprint(cfg: ExperimentConfig, condition: str, store_config: dict[str, Any]) -> dict[str, Any]:
    """What a condition's probe results are fitted from: the store (its model, capture spec and samples)
    and each probe family's settings (the device aside), as JSON. Saved beside the results and compared
    before they are read back (`check_fitted`)."""
    settings = {}
    for family in cfg.probe.families:
        settings[family] = dataclasses.asdict(cfg.probe_settings(family, condition))
        settings[family].pop("device", None)
    fingerprint = {"store": {k: store_config.get(k) for k in ("model", "capture", "source")},
                   "families": list(cfg.probe.families), "probe": settings}
    return json.loads(json.dumps(fingerprint, default=str))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys -> leaves ({'a': {'b': 1}} -> {'a.b': 1})."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def check_fitted(out: Path, cfg: ExperimentConfig, condition: str, store_config: dict[str, Any]) -> None:
    """Refuse saved probe results of `condition` that their record (`fit_record`) says were fitted on
    another store or with other settings than `cfg` asks for. A field the record lacks (results from an
    older kvprobe) is not compared."""
    record, results = fit_record(out, condition), out / "probes" / f"{condition}.json"
    if not (record.is_file() and results.is_file()):
        return
    redo = f"refit them with `kvprobe probe {out} --redo`"
    saved = _json_record(record, "probe-fit record", redo)
    now, missing = _flat(probe_fingerprint(cfg, condition, store_config)), object()
    diff = sorted(k for k, v in _flat(saved).items() if now.get(k, missing) != v)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ExperimentError(f"{results}: fitted with other settings or on another store than this run's config "
                              f"asks for (fields differ: {', '.join(diff[:3])}{more}); {redo}")


def verify_run(path: str | os.PathLike) -> dict[Path, list[str]]:
    """Every store of a run directory (or one store), checked byte for byte: store path ->
    problems ([] when whole). A path that holds no store is bad input."""
    path = Path(path)
    if not path.is_dir():
        raise ExperimentError(f"{path}: no such run directory or store")
    if is_store(path):
        stores = [path]
    else:
        stores = sorted(p.parent for p in path.glob("stores/*/config.json")) + \
            sorted(p.parent for p in path.glob("sweep/*/config.json"))
        stores = [s for s in stores if is_store(s)]
    if not stores:
        raise ExperimentError(f"{path}: holds no KV store (neither a store nor a run directory with stores/)")
    return {s: verify_store(s) for s in stores}


def open_run_store(out: Path, cfg: ExperimentConfig, cond: str) -> KVStore:
    """A condition's store, opened (its shards present and of their recorded sizes, its index as
    recorded) and checked to be this run's capture (`check_store`); else bad input naming the
    shard, index or store and the repair."""
    where = store_dir(out, cond)
    try:
        store = KVStore(where)
    except StoreError as e:
        hint = " (run `kvprobe capture` first)" if not where.exists() else ""
        raise ExperimentError(f"{e}{hint}") from None
    try:
        check_store(out, cfg, cond, store)
    except ExperimentError:
        store.close()
        raise
    return store
