"""Bad input and damaged files, the way a new user meets them: one table, one contract.

Every case runs `kvprobe` in-process on a sandbox (the tiny config, broken configs, a
directory kvprobe did not write, and a copy of a finished tiny run, damaged as the case
says) and must exit 2 with exactly one line on stderr naming the problem, leave no output
behind and change nothing that was there. Nothing may reach the network: sockets refuse
to connect for the whole module. Below the table: the store checks that repair (resume)
and verify (`kvprobe verify`), a fuzz of config fields, thread counts, and kill -9.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_support import TINY, assert_refused, cli, cli_quiet, snapshot, write_config

# TINY with one fixed probe strength (no inner split): the same stages, a few seconds
FAST = {**TINY, "probe": {**TINY["probe"], "linear_l2_grid": [0.001]}}
STORE = Path("stores") / "memento"
SHARD0, SHARD1 = STORE / "shards" / "shard_000000.h5", STORE / "shards" / "shard_000001.h5"


NETWORK: list = []  # every attempt to reach the network (a name lookup or a connection)


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """Offline by construction: lookups and connections fail and are recorded; the cases
    check that none was tried (libraries may swallow the failure, the record stays)."""
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost")):
            return real_connect(self, address)
        NETWORK.append(address)
        raise OSError(101, "Network is unreachable (tests)")

    def lookup(host, *args, **kwargs):
        if host in ("127.0.0.1", "localhost", None):
            return real_lookup(host, *args, **kwargs)
        NETWORK.append(host)
        raise OSError(-2, "Name or service not known (tests)")

    socket.socket.connect, socket.getaddrinfo = connect, lookup
    yield
    socket.socket.connect, socket.getaddrinfo = real_connect, real_lookup


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished `kvprobe run` of the fast tiny config (read-only: cases work on copies)."""
    root = tmp_path_factory.mktemp("tiny")
    code, _, err = cli_quiet("run", write_config(root / "tiny.yaml", FAST), "--out", root / "run")
    assert code == 0, err
    return root / "run"


@pytest.fixture(scope="module")
def other_store(tmp_path_factory) -> Path:
    """The same capture from another training checkpoint (a store that belongs to another run)."""
    root = tmp_path_factory.mktemp("other")
    code, _, err = cli_quiet("capture", write_config(root / "tiny.yaml", FAST), "--out", root / "run",
                             "--set", "model.checkpoint=series/step_000950")
    assert code == 0, err
    return root / "run" / STORE


@pytest.fixture
def sandbox(tmp_path, tiny_run, other_store) -> Path:
    write_config(tmp_path / "tiny.yaml", FAST)
    (tmp_path / "bad.yaml").write_text("capture:\n  layers: [0, 1\n  offsets: [0]\n")
    (tmp_path / "bad.toml").write_text("[capture\nlayers = [0, 1]\n")
    (tmp_path / "study.ini").write_text("[capture]\nlayers = 0\n")
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- capture\n- probe\n")
    (tmp_path / "adir.yaml").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a run\n")
    (tmp_path / "noweights").mkdir()  # a transformers model directory without its weights
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_id": "p0", "prompt": "2+2?"}) + "\n")
    (tmp_path / "generations.jsonl").write_text('{"prompt_id": "p0", "text": \n')
    placeholder = {"task_id": "t1", "sentences": ["a.", "b.", "c."], "blocks": [[0, 1], [2, 2]],
                   "block_summaries": ["ab", "Summarization failed"], "original_problem": "P?"}
    (tmp_path / "placeholder.jsonl").write_text(json.dumps(placeholder) + "\n")
    bad_ids = {"task_id": "t2", "sentences": ["a.", "b."], "blocks": [[0, 0], [1, 1]],
               "block_summaries": ["a", "b"], "problem": "P?", "token_ids": "not ids"}
    (tmp_path / "badids.jsonl").write_text(json.dumps(bad_ids) + "\n")
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(other_store, tmp_path / "other_store")
    return tmp_path


# ----------------------------------------------------------------------------- damage


def truncate(path: Path, size: int = 2000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_feature_byte(shard: Path) -> None:
    """Flip one bit inside the first stored chunk of a feature dataset (the data, not metadata)."""
    with h5py.File(shard, "r") as f:
        info = f["features/memento/+0/tail_mean"].id.get_chunk_info(0)
    data = bytearray(shard.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def unprobed(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """A store damage, with the probe results removed so that probing must read the store."""
    def setup(run: Path) -> None:
        shutil.rmtree(run / "probes")
        damage(run)
    return setup


def swap_store(run: Path) -> None:
    shutil.rmtree(run / STORE)
    shutil.copytree(run.parent / "other_store", run / STORE)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "shard-truncated": unprobed(lambda run: truncate(run / SHARD0)),
    "shard-deleted": unprobed(lambda run: (run / SHARD1).unlink()),
    "shard-flipped": unprobed(lambda run: flip_feature_byte(run / SHARD0)),
    "shard-header": unprobed(lambda run: (run / SHARD1).write_bytes(b"garbage!" + (run / SHARD1).read_bytes()[8:])),
    "index-truncated": unprobed(lambda run: truncate(run / STORE / "kvstore.h5", 1000)),
    "store-deleted": unprobed(lambda run: shutil.rmtree(run / STORE)),
    "store-swapped": unprobed(swap_store),
    "model-record": unprobed(lambda run: edit_json(run / "model.json", lambda d: d.update(param_hash="0" * 64))),
    "spec-changed": unprobed(lambda run: edit_json(run / "config.json",
                                                   lambda d: d["config"]["capture"].update(max_tokens=2))),
    "samples-changed": unprobed(lambda run: edit_json(run / "config.json",
                                                      lambda d: d["config"]["data"].update(n_samples=400))),
    "config-malformed": lambda run: (run / "config.json").write_text('{"config": {'),
    "config-no-key": lambda run: (run / "config.json").write_text('{"seed": 0}'),
    "config-invalid": lambda run: edit_json(run / "config.json", lambda d: d["config"]["capture"].update(bogus=1)),
    "config-binary": lambda run: (run / "config.json").write_bytes(b"\xff\xfe\x00garbage"),
    "npz-deleted": lambda run: (run / "probes" / "memento.npz").unlink(),
    "npz-truncated": lambda run: truncate(run / "probes" / "memento.npz", 100),
    "json-malformed": lambda run: (run / "probes" / "memento.json").write_text('{"rows": ['),
}

# (id, argv, needles the error line must name, damage to the run copy or None).
# In argv {dir} is the sandbox, {cfg} the tiny config, {run} the copied run, {out} an output dir.
C = "{cfg}"
CAPTURE = ["capture", C, "--out", "{out}"]
DRY = ["capture", C, "--dry-run"]
CASES = [
    # configs: files
    ("missing-config", ["capture", "{dir}/missing.yaml", "--out", "{out}"], ["missing.yaml", "no such config file"]),
    ("missing-config-run", ["run", "{dir}/missing.yaml", "--out", "{out}"], ["missing.yaml"]),
    ("config-is-a-directory", ["run", "{dir}/adir.yaml", "--out", "{out}"], ["adir.yaml", "no such config file"]),
    ("malformed-yaml", ["capture", "{dir}/bad.yaml", "--out", "{out}"], ["bad.yaml", "malformed YAML"]),
    ("malformed-toml", ["capture", "{dir}/bad.toml", "--out", "{out}"], ["bad.toml", "malformed TOML"]),
    ("unknown-format", ["capture", "{dir}/study.ini", "--out", "{out}"], ["study.ini", ".ini"]),
    ("not-utf8-config", ["run", "{dir}/latin.yaml", "--out", "{out}"], ["latin.yaml", "UTF-8"]),
    ("config-is-a-list", ["run", "{dir}/list.yaml", "--out", "{out}"], ["list.yaml", "mapping"]),
    # configs: fields
    ("unknown-field", CAPTURE + ["--set", "capture.bogus=1"], ["capture.bogus"]),
    ("unknown-field-run", ["run", C, "--out", "{out}", "--set", "probe.bogus=1"], ["probe.bogus"]),
    ("unknown-section", CAPTURE + ["--set", "bogus.x=1"], ["'bogus'"]),
    ("wrong-type", CAPTURE + ["--set", "capture.layers=[0,x]"], ["capture.layers.1", "integer"]),
    ("wrong-choice", CAPTURE + ["--set", "capture.sites=[nowhere]"], ["capture.sites.0"]),
    ("set-without-equals", CAPTURE + ["--set", "capture.layers"], ["--set", "capture.layers", "FIELD=VALUE"]),
    ("set-into-a-value", CAPTURE + ["--set", "seed.x=1"], ["'seed'", "is a value"]),
    ("set-deep-into-a-value", CAPTURE + ["--set", "data.n_samples.x.y=1"], ["data.n_samples", "is a value"]),
    ("set-empty-field", CAPTURE + ["--set", "capture..layers=[0]"], ["empty field"]),
    ("too-few-samples", CAPTURE + ["--set", "data.n_samples=1"], ["data.n_samples"]),
    ("val-fraction", CAPTURE + ["--set", "probe.val_fraction=2"], ["probe.val_fraction"]),
    ("shard-size-0", CAPTURE + ["--set", "capture.shard_size=0"], ["capture.shard_size"]),
    ("batch-size-0", CAPTURE + ["--set", "capture.batch_size=0"], ["capture.batch_size"]),
    ("storage-dtype", CAPTURE + ["--set", "capture.dtype=int8"], ["capture.dtype"]),
    ("pooling", CAPTURE + ["--set", "capture.pooling=[bogus]"], ["capture.pooling.0"]),
    ("no-conditions", CAPTURE + ["--set", "conditions={}"], ["conditions"]),
    ("comparison-unknown", CAPTURE + ["--set", "report.comparisons=[[memento,nope]]"], ["report.comparisons"]),
    ("model-kind", CAPTURE + ["--set", "model.kind=nope"], ["model.kind"]),
    ("digit-sum", CAPTURE + ["--set", "data.digit_sum=99"], ["data.digit_sum"]),
    ("chat-template-on-toy", CAPTURE + ["--set", "data.chat_template=memento"], ["data.chat_template", "traces"]),
    ("answer-block-with-keep-1", CAPTURE + ["--set", "conditions.memento.keep_last_n_blocks=1", "--set",
                                            "conditions.memento.keep_last_block_for_answer=true"],
     ["condition 'memento'", "keep_last_block_for_answer", "keep_last_n_blocks=0"]),
    ("probe-seeds-0", CAPTURE + ["--set", "probe.seeds=0"], ["probe.seeds"]),
    ("n-boot", CAPTURE + ["--set", "probe.n_boot=5"], ["probe.n_boot"]),
    ("sweep-offsets", CAPTURE + ["--set", "sweep.offsets=[0]"], ["sweep.offsets"]),
    ("cuda-missing", CAPTURE + ["--set", "model.device=cuda"], ["model.device", "CUDA"]),
    # capture plans: checked against the model and the samples before anything is written
    ("rank-outside-world", CAPTURE + ["--rank", "3", "--world-size", "2"], ["--rank 3", "--world-size 2"]),
    ("unknown-layer", CAPTURE + ["--set", "capture.layers=[0,9]"], ["layer 9", "4 layers"]),
    ("unknown-layer-run", ["run", C, "--out", "{out}", "--set", "capture.layers=[0,9]"], ["layer 9", "4 layers"]),
    ("offset-beyond-mementos", CAPTURE + ["--set", "capture.offsets=[0,9]"], ["offset +9"]),
    ("target-block-beyond", CAPTURE + ["--set", "data.target_block=9"], ["target", "9"]),
    ("probe-layer-not-captured", DRY + ["--set", "probe.layers=[2]"], ["probe.layers"]),
    ("probe-pooling-not-captured", DRY + ["--set", "probe.pooling=last"], ["probe.pooling"]),
    ("toy-checkpoint-in-config", CAPTURE + ["--set", "model.checkpoint=no_such_checkpoint"],
     ["model.checkpoint", "no_such_checkpoint"]),
    ("toy-checkpoint-name", ["toy", "eval", "no_such_checkpoint", "--samples", "10"], ["no_such_checkpoint"]),
    # models and data: offline, and only what the model can read
    ("toy-with-traces", CAPTURE + ["--set", "data.kind=traces"], ["data.kind", "traces", "toy", "tokenizer"]),
    ("hub-id-offline", CAPTURE + ["--set", "model.kind=hf", "--set", "data.kind=traces", "--set",
                                  "model.checkpoint=nobody/no-such-model", "--set", "data.traces={dir}/prompts.jsonl"],
     ["nobody/no-such-model", "offline"]),
    ("hf-model-without-weights", ["capture", C, "--dry-run", "--set", "model.kind=hf", "--set",
                                  "data.kind=traces", "--set", "model.checkpoint={dir}/noweights"],
     ["model.checkpoint", "noweights"]),
    # output directories
    ("out-under-a-file", ["run", C, "--out", "{dir}/notes/readme.txt/out"], ["readme.txt", "not a directory"]),
    ("out-is-a-file", ["run", C, "--out", "{dir}/notes/readme.txt"], ["readme.txt", "not a directory"]),
    ("overwrite-foreign-run", ["run", C, "--out", "{dir}/notes", "--overwrite"], ["notes", ".kvprobe", "refusing"]),
    ("overwrite-foreign-capture", ["capture", C, "--out", "{dir}/notes", "--overwrite"],
     ["notes", ".kvprobe"]),
    ("overwrite-foreign-demo", ["demo", "--out", "{dir}/notes", "--overwrite", "--quiet"], ["notes", ".kvprobe"]),
    ("exists-without-resume", ["run", C, "--out", "{run}"], ["run", "already exists", "--resume"]),
    ("resume-another-config", ["run", C, "--out", "{run}", "--resume", "--set", "data.n_samples=400"],
     ["another config", "data"]),
    ("resume-damaged-record", ["run", C, "--out", "{run}", "--resume"], ["config.json", "malformed JSON"],
     "config-malformed"),
    ("threads-0", ["--threads", "0", "probe", "{run}"], ["--threads"]),
    ("demo-negative-samples", ["demo", "--samples", "-5", "--out", "{out}"], ["--samples", "-5"]),
    ("demo-one-sample", ["demo", "--samples", "1", "--out", "{out}"], ["--samples", "500"]),
    # run directories
    ("probe-not-a-run", ["probe", "{dir}/notes"], ["notes", "not a kvprobe run directory"]),
    ("report-not-a-run", ["report", "{dir}/notes"], ["notes", "not a kvprobe run directory"]),
    ("probe-missing-dir", ["probe", "{dir}/nowhere"], ["nowhere", "not a kvprobe run directory"]),
    ("probe-a-store", ["probe", "{run}/stores/memento"], ["stores/memento", "a KV store, not a run directory"]),
    ("probe-record-malformed", ["probe", "{run}"], ["config.json", "malformed JSON"], "config-malformed"),
    ("report-record-malformed", ["report", "{run}"], ["config.json", "malformed JSON"], "config-malformed"),
    ("probe-record-without-config", ["probe", "{run}"], ["config.json", "'config'"], "config-no-key"),
    ("probe-record-invalid", ["probe", "{run}"], ["config.json", "capture.bogus"], "config-invalid"),
    ("probe-record-binary", ["probe", "{run}"], ["config.json", "UTF-8"], "config-binary"),
    ("report-npz-deleted", ["report", "{run}"], ["memento.npz", "missing", "--redo"], "npz-deleted"),
    ("report-npz-truncated", ["report", "{run}"], ["memento", "damaged probe results", "--redo"], "npz-truncated"),
    ("report-json-malformed", ["report", "{run}"], ["memento", "damaged probe results"], "json-malformed"),
    # stores: damaged, missing, or not this run's
    ("probe-shard-truncated", ["probe", "{run}"], ["shard_000000.h5", "truncated", "--resume"], "shard-truncated"),
    ("probe-shard-deleted", ["probe", "{run}"], ["shard_000001.h5", "missing", "--resume"], "shard-deleted"),
    ("probe-shard-flipped", ["probe", "{run}"], ["shard_000000.h5", "checksum mismatch", "--resume"], "shard-flipped"),
    ("probe-shard-header", ["probe", "{run}"], ["shard_000001.h5", "not an HDF5 file"], "shard-header"),
    ("probe-index-truncated", ["probe", "{run}"], ["kvstore.h5", "damaged index", "--resume"], "index-truncated"),
    ("probe-store-deleted", ["probe", "{run}"], ["stores/memento", "kvprobe capture"], "store-deleted"),
    ("probe-store-swapped", ["probe", "{run}"], ["stores/memento", "series/step_000950", "'final'"], "store-swapped"),
    ("probe-model-record", ["probe", "{run}"], ["stores/memento", "parameter hash"], "model-record"),
    ("probe-spec-changed", ["probe", "{run}"], ["stores/memento", "capture spec", "max_tokens"], "spec-changed"),
    ("probe-samples-changed", ["probe", "{run}"], ["stores/memento", "other samples", "n_samples 300"],
     "samples-changed"),
    ("verify-shard-flipped", ["verify", "{run}"], ["shard_000000.h5", "checksum mismatch"], "shard-flipped"),
    ("verify-shard-deleted", ["verify", "{run}"], ["shard_000001.h5", "missing"], "shard-deleted"),
    ("verify-shard-truncated", ["verify", "{run}/stores/memento"], ["shard_000000.h5", "truncated"], "shard-truncated"),
    ("verify-index-truncated", ["verify", "{run}"], ["kvstore.h5", "damaged index"], "index-truncated"),
    ("verify-not-a-run", ["verify", "{dir}/notes"], ["notes", "holds no KV store"]),
    ("verify-missing", ["verify", "{dir}/nowhere"], ["nowhere", "no such run directory"]),
    # serving and traces
    ("generate-unreachable", ["generate", "--prompts", "{dir}/prompts.jsonl", "--out", "{out}/gen.jsonl", "--base-url",
                              "http://127.0.0.1:9/v1", "--max-attempts", "1", "--no-progress"], ["p0"]),
    ("sft-placeholder-summary", ["sft", "--model", "{dir}/noweights", "--traces", "{dir}/placeholder.jsonl",
                                 "--out", "{out}"], ["placeholder.jsonl:1", "Summarization failed"]),
    ("sft-served-ids-malformed", ["sft", "--model", "{dir}/noweights", "--traces", "{dir}/badids.jsonl",
                                  "--out", "{out}"], ["badids.jsonl:1", "'token_ids' must be a list of integers"]),
    ("serve-restart-delims-visible", ["serve", "--model-path", "{dir}/noweights", "--restart-mode",
                                      "--no-mask-delimiters", "--print"], ["restart-delims-visible", "kvprobe-only"]),
    ("export-malformed", ["export-traces", "--generations", "{dir}/generations.jsonl", "--out", "{out}/t.jsonl"],
     ["generations.jsonl:1", "not a JSON line"]),
]


def _args(argv: list[str], sandbox: Path) -> list[str]:
    where = {"{dir}": sandbox, "{cfg}": sandbox / "tiny.yaml", "{run}": sandbox / "run", "{out}": sandbox / "out"}
    out = []
    for a in argv:
        for name, path in where.items():
            a = a.replace(name, str(path))
        out.append(a)
    return out


@pytest.mark.parametrize("argv, needles, damage",
                         [pytest.param(c[1], c[2], c[3] if len(c) > 3 else None, id=c[0]) for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(capsys, sandbox, argv, needles, damage):
    if damage:
        DAMAGE[damage](sandbox / "run")
    before = snapshot(sandbox)
    NETWORK.clear()
    code, _, err = cli(capsys, *_args(argv, sandbox))
    assert not NETWORK, f"tried to reach the network: {NETWORK}"
    assert "Traceback" not in err, err
    assert_refused(code, err, *needles)
    assert not (sandbox / "out").exists(), sorted(str(p) for p in (sandbox / "out").rglob("*"))
    assert snapshot(sandbox) == before


def test_the_table_is_large_and_every_damage_is_used():
    assert len(CASES) >= 60
    assert {c[3] for c in CASES if len(c) > 3} == set(DAMAGE)
    assert len({c[0] for c in CASES}) == len(CASES)


def test_unreadable_files_are_bad_input(capsys, sandbox, monkeypatch):
    """Permissions (simulated: this suite may run as root, whom chmod does not stop)."""
    real_read_text = Path.read_text

    def denied(self, *a, **k):
        if self.name in ("tiny.yaml", "config.json"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = cli(capsys, "run", sandbox / "tiny.yaml", "--out", sandbox / "out")
    assert_refused(code, err, "tiny.yaml", "Permission denied")
    code, _, err = cli(capsys, "probe", sandbox / "run")
    assert_refused(code, err, "config.json", "Permission denied")
    assert not (sandbox / "out").exists()


def test_read_only_parent_is_refused_before_any_work(capsys, sandbox, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == sandbox / "notes" else real_access(p, mode))
    code, _, err = cli(capsys, "run", sandbox / "tiny.yaml", "--out", sandbox / "notes" / "out")
    assert_refused(code, err, "notes", "not writable")
    assert not (sandbox / "notes" / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_unreadable_shard_is_refused(capsys, sandbox):
    shutil.rmtree(sandbox / "run" / "probes")
    (sandbox / "run" / SHARD1).chmod(0)
    code, _, err = cli(capsys, "probe", sandbox / "run")
    assert_refused(code, err, "shard_000001.h5", "unreadable")


# ----------------------------------------------------------------------------- repair, verify, overwrite


def _store_arrays(store: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(store / "kvstore.h5", "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _same_store(a: Path, b: Path) -> None:
    x, y = _store_arrays(a), _store_arrays(b)
    assert x.keys() == y.keys()
    for name in x:
        assert np.array_equal(x[name], y[name]), name


@pytest.mark.parametrize("damage, command", [("shard-truncated", "run"), ("shard-flipped", "capture"),
                                             ("shard-deleted", "capture"), ("index-truncated", "capture")])
def test_resume_recaptures_what_is_damaged(capsys, sandbox, tiny_run, damage, command):
    run = sandbox / "run"
    DAMAGE[damage](run)
    config = sandbox / "tiny.yaml"
    argv = ["run", config] if command == "run" else ["capture", config]
    code, out, err = cli(capsys, *argv, "--out", run, "--resume")
    assert code == 0, err
    assert "capturing the damaged shard(s) again" in out
    _same_store(run / STORE, tiny_run / STORE)
    if command == "run":  # probed again from the repaired store: the same results
        assert json.loads((run / "probes" / "memento.json").read_text()) == \
            json.loads((tiny_run / "probes" / "memento.json").read_text())
    code, out, _ = cli(capsys, "verify", run)
    assert code == 0 and "every byte of 1 store(s) matches its checksum" in out


def test_verify_a_whole_run_and_one_store(capsys, sandbox):
    code, out, err = cli(capsys, "verify", sandbox / "run")
    assert code == 0, err
    assert f"ok       {sandbox / 'run' / STORE}  (2 shard(s)" in out
    code, out, _ = cli(capsys, "verify", sandbox / "run" / STORE)
    assert code == 0 and "every byte of 1 store(s)" in out


@pytest.mark.parametrize("shard", [SHARD0, SHARD1])
def test_verify_finds_a_flipped_byte_anywhere_in_a_shard(capsys, sandbox, shard):
    """Not only in a feature chunk: a bit flipped at any position of the file."""
    path = sandbox / "run" / shard
    data = bytearray(path.read_bytes())
    for position in (0, len(data) // 3, len(data) - 1):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        code, out, err = cli(capsys, "verify", sandbox / "run")
        assert_refused(code, err, shard.name)
        assert "DAMAGED" in out
    path.write_bytes(bytes(data))
    assert cli(capsys, "verify", sandbox / "run")[0] == 0


def test_a_run_written_by_kvprobe_can_be_overwritten(capsys, sandbox):
    run = sandbox / "run"
    assert (run / ".kvprobe").is_file()
    (run / "probes" / "stale.txt").write_text("from before\n")
    code, _, err = cli(capsys, "capture", sandbox / "tiny.yaml", "--out", run, "--overwrite")
    assert code == 0, err
    assert not (run / "probes").exists() and (run / ".kvprobe").is_file()


def test_a_store_writer_refuses_to_overwrite_a_foreign_directory(tmp_path):
    from kvprobe.store import StoreError, StoreWriter

    (tmp_path / "mine.txt").write_text("keep me\n")
    with pytest.raises(StoreError, match="not a kvprobe store"):
        StoreWriter(tmp_path, {"model": {}}, mode="overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep me\n"


# ----------------------------------------------------------------------------- fuzz

FIELDS = ["seed", "name", "data.n_samples", "data.target_block", "data.digit_sum", "data.where", "data.kind",
          "capture.layers", "capture.offsets", "capture.sites", "capture.pooling", "capture.max_tokens",
          "capture.batch_size", "capture.shard_size", "capture.dtype", "capture.compression", "capture.tensors",
          "probe.families", "probe.layers", "probe.offsets", "probe.pooling", "probe.val_fraction", "probe.seeds",
          "probe.linear_l2_grid", "probe.linear", "probe.linear.l2", "probe.linear_l2", "probe.mlp.hidden",
          "probe.sites", "probe.shuffled_control", "report.comparisons", "report.paper", "sweep.offsets",
          "sweep.checkpoints", "model.checkpoint", "model.dtype", "model.kind", "conditions",
          "conditions.memento.keep_last_n_blocks", "conditions.memento.restart_mode"]
VALUES = st.one_of(
    st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(), st.none(),
    st.sampled_from(["memento", "last", "x", "", "toy", "-1", "[0, 1]", "{a: 1}", "tail_mean", "[[memento, x]]"]),
    st.lists(st.integers(-2, 9), max_size=3),
)


@settings(max_examples=int(os.environ.get("KVPROBE_FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_fuzzed_config_fields_exit_0_or_2_never_a_traceback(capsys, tmp_path, sets):
    """Any values in up to three fields: a valid plan (0) or one clean line (2), and never a
    file written. KVPROBE_FUZZ_EXAMPLES=1000 fuzzes deeper."""
    config = tmp_path / "tiny.yaml"
    if not config.exists():
        write_config(config, {**FAST, "data": {**FAST["data"], "n_samples": 20}})
    args = []
    for field, value in sets:
        args += ["--set", f"{field}={yaml.safe_dump(value).strip().removesuffix('...').strip()}"]
    code, _, err = cli(capsys, "capture", config, "--dry-run", *args)
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert_refused(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


# ----------------------------------------------------------------------------- threads, kill -9


def test_probe_results_do_not_depend_on_the_thread_count(capsys, sandbox, tiny_run):
    """The tiny run was probed on 1 thread (the suite's setting); refit on 3."""
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = cli(capsys, "--threads", "3", "probe", sandbox / "run", "--redo")
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    a = np.load(tiny_run / "probes" / "memento.npz")
    b = np.load(sandbox / "run" / "probes" / "memento.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert json.loads((tiny_run / "probes" / "memento.json").read_text()) == \
        json.loads((sandbox / "run" / "probes" / "memento.json").read_text())
    assert json.loads((tiny_run / "config.json").read_text())["threads"] == 1


def _kill_when(argv: list[str], ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Run `kvprobe ARGV` in a child and SIGKILL it as soon as `ready()` holds."""
    child = subprocess.Popen([sys.executable, "-m", "kvprobe", "--threads", "1", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        while not ready():
            assert child.poll() is None, "the child finished before the kill point"
            assert time.monotonic() - start < timeout, "the kill point never came"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()


def test_kill_9_while_probing_then_resume_gives_the_uninterrupted_run(capsys, tmp_path, tiny_run):
    """Killed while probing (the store is complete, the probe results are not), then resumed:
    the same store and the same probe results. (Kill -9 in the middle of a capture, then
    resume: tests/test_capture.py.)"""
    config = write_config(tmp_path / "tiny.yaml", FAST)
    run = tmp_path / "run"
    _kill_when(["run", str(config), "--out", str(run)], lambda: (run / STORE / "kvstore.h5").is_file())
    assert not (run / "report").exists()  # it died before finishing
    code, _, err = cli(capsys, "run", config, "--out", run, "--resume")
    assert code == 0, err
    _same_store(run / STORE, tiny_run / STORE)
    assert json.loads((run / "probes" / "memento.json").read_text()) == \
        json.loads((tiny_run / "probes" / "memento.json").read_text())
    assert not list(run.rglob("*.tmp"))
