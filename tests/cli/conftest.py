"""Fixtures of the bad-input and recovery tests: a finished tiny run, a sandbox around a copy of
it, and `no_network` (a module that uses it: `pytestmark = pytest.mark.usefixtures("no_network")`)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.helpers.cli_support import FAST, cli_quiet, write_config
from tests.helpers.sandbox import NETWORK, STORE


@pytest.fixture(scope="module")
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
                             "--set", "model.checkpoint=series/step_000450")
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
