"""Runs and stores checked before use, configs refused before any work: one table, one contract.

Every case runs `kvprobe` in-process on the sandbox of tests/cli/conftest.py (the tiny config,
a copy of a finished tiny run) after the damage or edit it names, and must exit 2 with exactly
one line on stderr naming the problem, leave no output behind and change nothing that was there:

- saved results never outlive their store: `probe`, `report` and `--resume` open the store they
  stand on (shards present and of their recorded sizes, the index as recorded) and check that the
  saved probe results were fitted on it with the run's settings (`probes/CONDITION.fit.json`);
- a resume never mixes in another config's work: a run record edited after the run (or a store
  copied in) is refused before anything is written, not reported as if it had been run so;
- `kvprobe verify` checks the index's bytes too (`kvstore.json`);
- configs: strict types, duplicate keys, fields the model or data kind does not read, and every
  checkpoint a sweep names, all before any capture (`--dry-run` included).

The repairs these messages point to, and the notes for stores written before the index was
recorded, are tested below the table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.cli_support import FAST, assert_refused_untouched, cli, sandbox_args
from tests.helpers.sandbox import SHARD0, SHARD1, STORE, edit_json, swap_store, truncate

pytestmark = pytest.mark.usefixtures("no_network")  # offline, from the sandbox's first run on

INDEX, INDEX_RECORD = STORE / "kvstore.h5", STORE / "kvstore.json"
FIT = Path("probes") / "memento.fit.json"


def _record(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit the run record's config (config.json), as a user editing a finished run would."""
    return lambda run: edit_json(run / "config.json", lambda d: change(d["config"]))


def _rename_in_index(run: Path) -> None:
    """Change one byte of the index's text that opening it does not read (its `schema` attribute)."""
    data = (run / INDEX).read_bytes()
    at = data.index(b"kvprobe.kvstore")
    (run / INDEX).write_bytes(data[:at] + b"kvprobe.kvstorf" + data[at + 15:])


def _rows(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit every row of the saved probe results (memento.json)."""
    return lambda run: edit_json(run / "probes" / "memento.json", lambda d: [change(r) for r in d["rows"]])


def _sweep(points: str) -> Callable[[Path], None]:
    """A run whose record asks for a sweep of `final`, with sweep/sweep.json holding `points`."""
    def setup(run: Path) -> None:
        _record(lambda c: c["sweep"].update(checkpoints=["final"]))(run)
        (run / "sweep").mkdir()
        (run / "sweep" / "sweep.json").write_text(points)
    return setup


def _old_results(run: Path) -> None:
    """Probe results saved before fit records were kept, fitted on 400 samples (the store holds 300)."""
    (run / FIT).unlink()
    _rows(lambda r: r.update(n_train=r["n_train"] + 100))(run)


POINT = {"checkpoint": "final", "task_accuracy": 0.9, "masked_accuracy": 0.2, "masked_offset": 1}

DAMAGE: dict[str, Callable[[Path], None]] = {
    "shard-deleted": lambda run: (run / SHARD1).unlink(),
    "shard-truncated": lambda run: truncate(run / SHARD0),
    "shard-header": lambda run: (run / SHARD1).write_bytes(b"garbage!" + (run / SHARD1).read_bytes()[8:]),
    "store-deleted": lambda run: shutil.rmtree(run / STORE),
    "index-truncated": lambda run: truncate(run / INDEX, 1000),
    "index-grown": lambda run: (run / INDEX).write_bytes((run / INDEX).read_bytes() + b"\0" * 16),
    "index-renamed": _rename_in_index,
    "index-record-malformed": lambda run: (run / INDEX_RECORD).write_text('{"bytes": '),
    "store-swapped": swap_store,
    "store-record-malformed": lambda run: (run / STORE / "config.json").write_text('{"model": '),
    "model-record": lambda run: edit_json(run / "model.json", lambda d: d.update(param_hash="0" * 64)),
    "record-n-samples": _record(lambda c: c["data"].update(n_samples=400)),
    "record-max-tokens": _record(lambda c: c["capture"].update(max_tokens=2)),
    "record-n-boot": _record(lambda c: c["probe"].update(n_boot=300)),
    "record-families": _record(lambda c: c["probe"].update(families=["linear", "mlp"])),
    "fit-record-malformed": lambda run: (run / FIT).write_text("{"),
    "old-results-other-samples": _old_results,
    "sweep-malformed": _sweep('[{"checkpoint": '),
    "sweep-not-points": _sweep('[1, 2]'),
    "sweep-other-layer": _sweep(json.dumps([{**POINT, "layer": 2}])),
}

# (id, argv, needles the error line must name, damage to the run copy or None).
# In argv {dir} is the sandbox, {cfg} the tiny config, {run} the copied run, {out} an output dir.
C = "{cfg}"
RESUME = ["run", C, "--out", "{run}", "--resume"]
DRY = ["capture", C, "--dry-run"]
RUN = ["run", C, "--out", "{out}"]
CASES = [
    # saved results stand on a whole store: probe and report open it first
    ("probe-shard-deleted", ["probe", "{run}"], ["shard_000001.h5", "missing", "--resume"], "shard-deleted"),
    ("report-shard-deleted", ["report", "{run}"], ["shard_000001.h5", "missing", "--resume"], "shard-deleted"),
    ("probe-shard-truncated", ["probe", "{run}"], ["shard_000000.h5", "truncated", "--resume"], "shard-truncated"),
    ("report-shard-header", ["report", "{run}"], ["shard_000001.h5", "not an HDF5 file"], "shard-header"),
    ("report-store-deleted", ["report", "{run}"], ["stores/memento", "kvprobe capture"], "store-deleted"),
    ("report-index-truncated", ["report", "{run}"], ["kvstore.h5", "damaged index", "--resume"], "index-truncated"),
    ("probe-index-grown", ["probe", "{run}"], ["kvstore.h5", "14,328 recorded", "--resume"], "index-grown"),
    ("probe-index-record-malformed", ["probe", "{run}"], ["kvstore.json", "damaged checksum record", "--resume"],
     "index-record-malformed"),
    ("report-store-swapped", ["report", "{run}"], ["stores/memento", "series/step_000450"], "store-swapped"),
    # ... and were fitted on it, with the run's settings
    ("probe-record-n-boot", ["probe", "{run}"], ["memento.json", "probe.linear.n_boot", "--redo"], "record-n-boot"),
    ("report-record-n-boot", ["report", "{run}"], ["memento.json", "probe.linear.n_boot"], "record-n-boot"),
    ("probe-record-families", ["probe", "{run}"], ["memento.json", "families"], "record-families"),
    ("probe-record-n-samples", ["probe", "{run}"], ["stores/memento", "other samples", "n_samples 300"],
     "record-n-samples"),
    ("probe-fit-record-malformed", ["probe", "{run}"], ["memento.fit.json", "damaged", "--redo"],
     "fit-record-malformed"),
    ("probe-old-results-other-samples", ["probe", "{run}"], ["memento.json", "fitted on 400 samples", "holds 300"],
     "old-results-other-samples"),
    # a resume with a run record edited after the run (the config given matches the record)
    ("resume-record-n-samples", RESUME + ["--set", "data.n_samples=400"],
     ["stores/memento", "other samples", "n_samples 300", "400"], "record-n-samples"),
    ("capture-resume-record-n-samples", ["capture", C, "--out", "{run}", "--resume", "--set", "data.n_samples=400"],
     ["stores/memento", "other samples"], "record-n-samples"),
    ("resume-record-max-tokens", RESUME + ["--set", "capture.max_tokens=2"], ["stores/memento", "max_tokens"],
     "record-max-tokens"),
    ("resume-record-n-boot", RESUME + ["--set", "probe.n_boot=300"], ["memento.json", "probe.linear.n_boot"],
     "record-n-boot"),
    ("resume-store-swapped", RESUME, ["stores/memento", "series/step_000450"], "store-swapped"),
    ("resume-model-record", RESUME, ["stores/memento", "parameter hash"], "model-record"),
    ("resume-store-record-malformed", RESUME, ["stores/memento/config.json", "damaged store record"],
     "store-record-malformed"),
    ("resume-fit-record-malformed", RESUME, ["memento.fit.json", "damaged"], "fit-record-malformed"),
    # verify: the index's own bytes
    ("verify-index-renamed", ["verify", "{run}"], ["kvstore.h5", "checksum mismatch"], "index-renamed"),
    ("verify-index-grown", ["verify", "{run}"], ["kvstore.h5", "recorded"], "index-grown"),
    ("verify-index-record-malformed", ["verify", "{run}"], ["kvstore.json", "damaged checksum record"],
     "index-record-malformed"),
    # saved sweep results
    ("report-sweep-malformed", ["report", "{run}"], ["sweep.json", "damaged sweep results"], "sweep-malformed"),
    ("report-sweep-not-points", ["report", "{run}"], ["sweep.json", "damaged sweep results"], "sweep-not-points"),
    ("report-sweep-other-layer", ["report", "{run}"], ["sweep.json", "layer 2", "layer 3"], "sweep-other-layer"),
    # every name a config gives, before any work
    ("sweep-not-a-checkpoint", RUN + ["--set", "sweep.checkpoints=[final,no_such_step]"],
     ["sweep.checkpoints", "no_such_step"]),
    ("sweep-not-a-checkpoint-dry-run", DRY + ["--set", "sweep.checkpoints=[no_such_step]"],
     ["sweep.checkpoints", "no_such_step"]),
    ("sweep-not-a-checkpoint-capture", ["capture", C, "--out", "{out}", "--set", "sweep.checkpoints=[nope]"],
     ["sweep.checkpoints", "nope"]),
    # strict types
    ("seed-true", DRY + ["--set", "seed=true"], ["'seed'", "integer", "bool"]),
    ("seed-quoted", ["capture", "{dir}/quoted.yaml", "--dry-run"], ["quoted.yaml", "'seed'", "str"]),
    ("n-samples-float", DRY + ["--set", "data.n_samples=300.0"], ["data.n_samples", "integer", "float"]),
    ("layer-true", DRY + ["--set", "capture.layers=[0,true]"], ["capture.layers.1", "bool"]),
    ("restart-mode-1", DRY + ["--set", "conditions.memento.restart_mode=1"],
     ["conditions.memento.restart_mode", "boolean"]),
    ("l2-true", DRY + ["--set", "probe.linear_l2_grid=[true]"], ["probe.linear_l2_grid.0", "bool"]),
    # duplicate keys
    ("duplicate-key", ["capture", "{dir}/dup.yaml", "--dry-run"], ["dup.yaml", "duplicate key 'seed'", "line 3"]),
    ("duplicate-key-nested", ["run", "{dir}/dupnested.yaml", "--out", "{out}"],
     ["dupnested.yaml", "duplicate key 'layers'"]),
    ("duplicate-key-json", ["capture", "{dir}/dup.json", "--dry-run"], ["dup.json", "duplicate key 'seed'"]),
    ("duplicate-key-in-set", ["capture", C, "--dry-run", "--set", "capture={layers: [0], layers: [1]}"],
     ["--set", "duplicate key 'layers'"]),
    ("yaml-impossible-date", ["capture", "{dir}/date.yaml", "--dry-run"], ["date.yaml", "malformed YAML"]),
    # fields the model or data kind does not read
    ("toy-data-traces", DRY + ["--set", "data.traces={dir}/prompts.jsonl"], ["data.traces", "data.kind 'traces'"]),
    ("toy-data-tokenizer", DRY + ["--set", "data.tokenizer=gpt2"], ["data.tokenizer"]),
    ("toy-data-template", DRY + ["--set", "data.template='Code {passcode}.'"], ["data.template"]),
    ("toy-data-where", DRY + ["--set", "data.where=end"], ["data.where"]),
    ("traces-digit-sum", DRY + ["--set", "data.kind=traces", "--set", "data.digit_sum=22"],
     ["data.digit_sum", "data.kind 'toy'"]),
    ("toy-model-allow-download", DRY + ["--set", "model.allow_download=true"], ["model.allow_download", "hf"]),
    ("toy-model-trust-remote-code", RUN + ["--set", "model.trust_remote_code=true"], ["model.trust_remote_code"]),
]


@pytest.fixture
def configs(sandbox) -> Path:
    """The sandbox, with configs that are wrong in ways only the file shows."""
    (sandbox / "quoted.yaml").write_text((sandbox / "tiny.yaml").read_text().replace("seed: 0", "seed: '0'"))
    (sandbox / "dup.yaml").write_text("name: tiny\nseed: 0\nseed: 1\n")
    (sandbox / "dupnested.yaml").write_text("capture:\n  layers: [0]\n  offsets: [0, 1]\n  layers: [3]\n")
    (sandbox / "dup.json").write_text('{"seed": 0, "name": "tiny", "seed": 1}')
    (sandbox / "date.yaml").write_text("name: 2024-13-45\n")
    return sandbox


@pytest.mark.parametrize("argv, needles, damage",
                         [pytest.param(c[1], c[2], c[3] if len(c) > 3 else None, id=c[0]) for c in CASES])
def test_bad_runs_and_configs_are_refused_in_one_line_and_change_nothing(capsys, configs, argv, needles, damage):
    if damage:
        DAMAGE[damage](configs / "run")
    assert_refused_untouched(capsys, configs, sandbox_args(argv, configs), *needles)


def test_the_table_is_large_and_every_damage_is_used():
    assert len(CASES) >= 30
    assert {c[3] for c in CASES if len(c) > 3} == set(DAMAGE)
    assert len({c[0] for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- repairs and notes


def test_a_finished_run_records_its_index_and_what_its_probes_were_fitted_from(sandbox):
    run = sandbox / "run"
    record = json.loads((run / INDEX_RECORD).read_text())
    assert record["bytes"] == (run / INDEX).stat().st_size and len(record["sha256"]) == 64
    fitted = json.loads((run / FIT).read_text())
    assert fitted["families"] == ["linear"] and fitted["store"]["source"]["n_samples"] == 300
    assert fitted["probe"]["linear"]["n_boot"] == FAST["probe"]["n_boot"]


def test_resume_rewrites_a_damaged_index_and_its_record(capsys, sandbox):
    run = sandbox / "run"
    _rename_in_index(run)
    code, _, err = cli(capsys, "run", sandbox / "tiny.yaml", "--out", run, "--resume")
    assert code == 0, err
    code, out, err = cli(capsys, "verify", run)
    assert code == 0 and "every byte of 1 store(s) matches its checksum" in out, err


def test_stores_written_before_the_index_was_recorded_still_verify_with_a_note(capsys, sandbox):
    run = sandbox / "run"
    (run / INDEX_RECORD).unlink()
    code, out, err = cli(capsys, "verify", run)
    assert code == 0, err
    assert "1 store(s) predate index checksums" in out and "every byte of 0 store(s)" in out
    code, _, err = cli(capsys, "probe", run)  # and are read as before
    assert code == 0, err


def test_results_saved_before_fit_records_are_still_read(capsys, sandbox):
    (sandbox / "run" / FIT).unlink()
    code, out, err = cli(capsys, "report", sandbox / "run")
    assert code == 0, err
    assert "linear probe accuracy" in out


def test_redo_refits_results_the_run_record_no_longer_matches(capsys, sandbox):
    """The way out the refusal names: `kvprobe probe RUN --redo` fits again with the record's settings."""
    run = sandbox / "run"
    DAMAGE["record-n-boot"](run)
    code, _, err = cli(capsys, "probe", run, "--redo")
    assert code == 0, err
    assert json.loads((run / FIT).read_text())["probe"]["linear"]["n_boot"] == 300
    assert cli(capsys, "report", run)[0] == 0


def test_yaml_configs_read_exponents_as_numbers_and_merge_keys_as_yaml_does(tmp_path):
    from kvprobe.config import load_config

    path = tmp_path / "study.yaml"
    path.write_text("data: {n_samples: 300, target_block: 1}\nprobe: {linear_l2_grid: [1e-3, 1.0e-2], n_boot: 200}\n")
    cfg = load_config(path)
    assert cfg.probe.linear_l2_grid == (1e-3, 1e-2) and cfg.data.n_samples == 300
    path.write_text("conditions:\n  memento: &m {keep_last_n_blocks: 0}\n  keep1:\n    <<: *m\n"
                    "    keep_last_n_blocks: 1\n")
    assert load_config(path).conditions["keep1"].keep_last_n_blocks == 1  # a merged key overridden: no duplicate
