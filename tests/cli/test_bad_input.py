"""Bad input and damaged files, the way a new user meets them: one table, one contract.

Every case runs `kvprobe` in-process on a sandbox (the tiny config, broken configs, a
directory kvprobe did not write, and a copy of a finished tiny run, damaged as the case
says) and must exit 2 with exactly one line on stderr naming the problem, leave no output
behind and change nothing that was there. Nothing may reach the network: sockets refuse
to connect for the whole module. The sandbox, the tiny run and the damage are in
tests/helpers/sandbox.py; repair (resume), verify (`kvprobe verify`), a fuzz of config
fields, thread counts and kill -9 are in test_recovery.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.cli_support import assert_refused, assert_refused_untouched, cli, sandbox_args
from tests.helpers.sandbox import DAMAGE, SHARD1

pytestmark = pytest.mark.usefixtures("no_network")  # offline, from the sandbox's first run on


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
    ("probe-store-swapped", ["probe", "{run}"], ["stores/memento", "series/step_000450", "'final'"], "store-swapped"),
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


@pytest.mark.parametrize("argv, needles, damage",
                         [pytest.param(c[1], c[2], c[3] if len(c) > 3 else None, id=c[0]) for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(capsys, sandbox, argv, needles, damage):
    if damage:
        DAMAGE[damage](sandbox / "run")
    assert_refused_untouched(capsys, sandbox, sandbox_args(argv, sandbox), *needles)


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
