"""`kvprobe export` (issue 31): a run's stores or one store, as a `datasets` dataset or safetensors files; every
refusal is one line, exit 2, with nothing written; --push-to-hub needs the network opt-in as well, and the
network is never reached here (the upload goes to a stand-in hub client).

The export itself, array for array: tests/export/test_export.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvprobe.cli.export import FORMATS, NETWORK_OPT_IN
from kvprobe.export import FORMATS as LIBRARY_FORMATS
from kvprobe.export import load_export
from kvprobe.store import KVStore
from tests.helpers.cli_support import assert_refused, cli, snapshot
from tests.helpers.sandbox import NETWORK
from tests.helpers.stores import write_synthetic_store

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture
def run(tmp_path):
    """A run directory with two conditions' stores (synthetic, written in-process)."""
    root = tmp_path / "run"
    write_synthetic_store(root / "stores" / "memento", n=40, shard_size=25)
    write_synthetic_store(root / "stores" / "full", n=40, shard_size=25, seed=3)
    (root / "stores" / "notes").mkdir()  # not a store: not a condition
    return root


def assert_exported(out, store):
    with KVStore(store) as s, load_export(out) as x:
        assert (x.passcodes, x.keys, x.layers) == (s.passcodes, s.keys, s.layers)
        np.testing.assert_array_equal(x.labels, s.labels)
        for key in s.keys:
            np.testing.assert_array_equal(x.features(1, key.offset, key.site, key.pooling),
                                          s.features(1, key.offset, key.site, key.pooling))


def test_the_command_names_the_library_formats():
    assert FORMATS == LIBRARY_FORMATS


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_exports_every_condition(capsys, run, tmp_path, fmt):
    code, out, err = cli(capsys, "export", run, "--format", fmt, "--out", tmp_path / "out", "--quiet")
    assert (code, err) == (0, ""), err
    assert "exported full, memento" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["full", "memento"]
    for name in ("full", "memento"):
        assert_exported(tmp_path / "out" / name, run / "stores" / name)
    assert NETWORK == []


def test_one_condition_or_one_store(capsys, run, tmp_path):
    code, _, err = cli(capsys, "export", run, "--condition", "full", "--format", "safetensors", "--out", tmp_path / "a")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["full"]
    assert "export (safetensors)" in err  # the progress bar, without --quiet
    code, _, err = cli(capsys, "export", run / "stores" / "memento", "--format", "datasets", "--out", tmp_path / "b",
                       "--quiet")
    assert code == 0, err
    assert_exported(tmp_path / "b", run / "stores" / "memento")


@pytest.mark.parametrize("case, argv, needles", [
    ("unknown-format", ["{run}", "--format", "parquet"], ["--format", "'parquet'", "datasets, safetensors"]),
    ("unknown-condition", ["{run}", "--format", "datasets", "--condition", "nope"],
     ["--condition", "'nope'", "full, memento"]),
    ("condition-of-a-store", ["{run}/stores/full", "--format", "datasets", "--condition", "full"],
     ["--condition", "single store"]),
    ("missing-path", ["{run}/missing", "--format", "datasets"], ["missing", "no such run directory or store"]),
    ("not-a-run", ["{run}/stores/notes", "--format", "datasets"], ["notes", "holds no KV store"]),
    ("push-without-opt-in", ["{run}", "--format", "datasets", "--push-to-hub", "me/kv"],
     ["--push-to-hub", f"{NETWORK_OPT_IN}=1"]),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, monkeypatch, run, tmp_path, case, argv, needles):
    monkeypatch.delenv(NETWORK_OPT_IN, raising=False)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "export", *[a.format(run=run) for a in argv], "--out", tmp_path / "deep" / "out")
    assert_refused(code, err, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_store_is_refused(capsys, run, tmp_path, fmt):
    shard = run / "stores" / "full" / "shards" / "shard_000001.h5"
    shard.write_bytes(shard.read_bytes()[:500])
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "export", run, "--format", fmt, "--out", tmp_path / "out")
    assert_refused(code, err, "shard_000001.h5", "truncated")
    assert snapshot(tmp_path) == before


def test_an_existing_output_is_refused(capsys, run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    before = snapshot(tmp_path)
    for out in ("out", "file"):
        code, _, err = cli(capsys, "export", run, "--format", "datasets", "--out", tmp_path / out)
        assert_refused(code, err, f"{out}: --out already exists")
    code, _, err = cli(capsys, "export", run, "--format", "datasets", "--out", run)  # its own input
    assert_refused(code, err, "--out already exists")
    assert snapshot(tmp_path) == before


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be pushed."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], sorted(os.listdir(kwargs["folder_path"]))))


def test_push_to_hub_needs_the_flag_and_the_opt_in(capsys, monkeypatch, run, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    monkeypatch.setenv(NETWORK_OPT_IN, "1")
    code, _, err = cli(capsys, "export", run, "--format", "datasets", "--out", tmp_path / "x", "--push-to-hub", "kv")
    assert_refused(code, err, "--push-to-hub", "'kv'", "OWNER/NAME")
    assert not (tmp_path / "x").exists()
    code, out, err = cli(capsys, "export", run, "--format", "safetensors", "--out", tmp_path / "out", "--quiet")
    assert code == 0 and FakeHub.calls == []  # the opt-in alone pushes nothing
    code, out, err = cli(capsys, "export", run, "--format", "safetensors", "--out", tmp_path / "pushed",
                         "--push-to-hub", "me/kv", "--quiet")
    assert code == 0, err
    assert FakeHub.calls == [("create_repo", "me/kv", {"repo_type": "dataset", "exist_ok": True}),
                             ("upload_folder", "me/kv", ["full", "memento"])]
    assert "pushed" in out and NETWORK == []


def test_help_names_the_formats_and_the_opt_in(capsys):
    code, out, _ = cli(capsys, "export", "--help")
    assert code == 0 and "datasets or safetensors" in out and NETWORK_OPT_IN in out


def test_datasets_format_without_datasets_names_the_extra(capsys, monkeypatch, run, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as when not installed
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "export", run, "--format", "datasets", "--out", tmp_path / "out", "--quiet")
    assert_refused(code, err, "kvprobe export needs datasets", "pip install 'kvprobe[train]'")
    assert snapshot(tmp_path) == before
