"""Recovery from damage and interruption: resume repairs a damaged store, `kvprobe verify` finds any
flipped byte, a run kvprobe wrote can be overwritten (a foreign folder cannot), a fuzz of config
fields never gives a traceback, probe results do not depend on the thread count, and kill -9 while
probing then resume gives the uninterrupted run. Offline: sockets refuse to connect (`no_network`).
"""

from __future__ import annotations

import json
import os
import signal
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

from tests.helpers.cli_support import FAST, assert_refused, cli, write_config
from tests.helpers.sandbox import DAMAGE, SHARD0, SHARD1, STORE

pytestmark = pytest.mark.usefixtures("no_network")  # offline, from the sandbox's first run on


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
    resume: tests/capture/test_capture.py.)"""
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
