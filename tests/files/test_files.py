"""kvprobe.files: whole files or none, a full disk as one line naming the file, and "is this file ours?".

The full disk is simulated (tests/helpers/disk.py) and, in a child process, real: a file-size
limit (RLIMIT_FSIZE) makes the kernel refuse writes past it, as a full disk does.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kvprobe.errors import KVProbeError
from kvprobe.files import (
    TEMPORARY,
    Appender,
    NotOursError,
    WriteError,
    check_not_input,
    check_ours,
    remove_leftovers,
    replacing,
    together,
    write_bytes,
    write_error,
    write_text,
)
from tests.helpers.disk import full_disk, leftovers

NO_SPACE = "no space left on device"


def test_a_write_replaces_the_file_whole_with_the_usual_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two" and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text("old")
    failed = full_disk(monkeypatch, str(path))
    with pytest.raises(WriteError) as info:
        write_text(path, "new content, longer than the room left")
    assert str(info.value) == f"{path}: could not be written ({NO_SPACE}); it is left as it was"
    assert failed == [str(path)] and path.read_text() == "old" and leftovers(tmp_path) == []
    assert isinstance(info.value, KVProbeError) and isinstance(info.value, OSError)


def test_folders_made_for_a_failed_write_are_removed(tmp_path, monkeypatch):
    full_disk(monkeypatch, "*/x.npz")
    with pytest.raises(WriteError, match="x.npz"):
        with replacing(tmp_path / "new" / "deeper" / "x.npz", "wb") as f:
            np.savez_compressed(f, a=np.arange(1000))
    assert list(tmp_path.iterdir()) == []


def test_together_is_all_or_nothing(tmp_path, monkeypatch):
    first, second = tmp_path / "r" / "a.npz", tmp_path / "r" / "a.json"
    full_disk(monkeypatch, str(second))
    with pytest.raises(WriteError, match="a.json"):
        with together():
            write_bytes(first, b"x" * 100)
            write_text(second, json.dumps({"rows": list(range(100))}))
    assert not (tmp_path / "r").exists()  # nothing renamed, the folder it made removed


def test_together_renames_in_order_at_the_end_and_nests(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with together():
        write_text(a, "1")
        with together():  # joins the outer block
            write_text(b, "2")
        assert not a.exists() and not b.exists()
    assert (a.read_text(), b.read_text()) == ("1", "2") and leftovers(tmp_path) == []


def test_any_other_failure_passes_unchanged_and_leaves_nothing(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="Out of range float"):
        write_text(path, json.dumps(float("nan"), allow_nan=False))
    with pytest.raises(ValueError, match="Out of range float"):
        with replacing(path) as f:
            f.write("half")
            json.dumps(float("nan"), allow_nan=False)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_a_failed_rename_names_the_target(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty folder cannot be replaced by a file
    with pytest.raises(WriteError, match=f"{target}: could not be written"):
        write_text(target, "x")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), NO_SPACE),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), os.strerror(errno.EDQUOT).lower()),
    (RuntimeError("Can't decrement id ref count (file write failed: time = x, filename = 'a.h5', file descriptor = 3, "
                  "errno = 28, error message = 'No space left on device')"), NO_SPACE),
    (RuntimeError("Unable to create file\nmore"), "unable to create file"),
])
def test_the_reason_is_the_os_error_in_words(error, reason):
    assert str(write_error("f.h5", error)) == f"f.h5: could not be written ({reason}); it is left as it was"


def test_appended_lines_are_whole_or_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "gen" / "out.jsonl"
    lines = Appender(path)
    lines.write_line('{"a": 1}')
    full_disk(monkeypatch, str(path), room=5)
    lines.close()
    lines = Appender(path)
    with pytest.raises(WriteError, match=f"{path}.*{NO_SPACE}"):
        lines.write_line('{"b": "a line longer than the room"}')
    lines.close()
    assert path.read_text() == '{"a": 1}\n'


def test_a_first_line_that_fails_leaves_no_file_and_no_folder(tmp_path, monkeypatch):
    full_disk(monkeypatch, "*/out.jsonl", room=3)
    lines = Appender(tmp_path / "gen" / "out.jsonl")
    with pytest.raises(WriteError, match="out.jsonl"):
        lines.write_line('{"b": 2}')
    assert list(tmp_path.iterdir()) == []


def _starts_with_mark(head: bytes) -> bool:
    return head.startswith(b"MARK")


@pytest.mark.parametrize("content", [None, b"", b"MARK and then anything"])
def test_missing_empty_and_marked_files_are_ours(tmp_path, content):
    path = tmp_path / "f"
    if content is not None:
        path.write_bytes(content)
    check_ours(path, _starts_with_mark, "a marked file", "choose another")


def test_a_file_without_the_marker_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"mine": 1}\n{"cut off')
    with pytest.raises(NotOursError, match=rf"{path}: not a marked file kvprobe wrote .*: give a new --out"):
        check_ours(path, _starts_with_mark, "a marked file", "give a new --out")
    with pytest.raises(NotOursError, match="is a directory"):
        check_ours(tmp_path, _starts_with_mark, "a marked file", "give a new --out")
    assert path.read_bytes() == b'{"mine": 1}\n{"cut off'


def test_an_output_that_is_an_input_is_refused_by_any_path(tmp_path, monkeypatch):
    source = tmp_path / "gen.jsonl"
    source.write_text("x\n")
    (tmp_path / "link.jsonl").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for out in ("gen.jsonl", "link.jsonl", str(source)):
        with pytest.raises(NotOursError, match=r"--out is also an input"):
            check_not_input(out, [tmp_path / "other.jsonl", source])
    check_not_input(tmp_path / "new.jsonl", [source])  # a new file is no input


def test_leftovers_of_killed_writers_are_removed_and_no_others(tmp_path):
    """A writer killed mid-write (here: a child that exits inside the block) leaves its temporary;
    `remove_leftovers` deletes it, and keeps a running process's and another host's."""
    code = f"""
        import os
        from kvprobe.files import replacing
        with replacing({str(tmp_path / "deep" / "x.json")!r}) as f:
            f.write("half")
            f.flush()
            os._exit(9)
    """
    assert subprocess.run([sys.executable, "-c", textwrap.dedent(code)], timeout=120).returncode == 9
    (dead,) = leftovers(tmp_path)
    host = TEMPORARY.match(Path(dead).name)[2]
    live = tmp_path / f".y.json.{host}-{os.getpid()}.0123abcd.tmp"
    elsewhere = tmp_path / ".z.json.otherhost-1.0123abcd.tmp"
    live.write_text("mine, in progress")
    elsewhere.write_text("another machine's, on a shared disk")
    assert remove_leftovers(tmp_path) == [tmp_path / dead]
    assert sorted(leftovers(tmp_path)) == [live.name, elsewhere.name]


def _child(code: str, limit: int) -> subprocess.CompletedProcess:
    """Run `code` in a child whose files may not grow past `limit` bytes (EFBIG past it, as a disk full)."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_the_kernel_refusing_a_write_is_one_clean_error(tmp_path):
    code = f"""
        from kvprobe.files import WriteError, write_bytes
        try:
            write_bytes({str(tmp_path / "big.bin")!r}, b"x" * 1_000_000)
        except WriteError as e:
            print(e)
    """
    proc = _child(code, 65536)
    assert proc.returncode == 0 and proc.stdout.strip() == \
        f"{tmp_path / 'big.bin'}: could not be written ({os.strerror(errno.EFBIG).lower()}); it is left as it was"
    assert list(tmp_path.iterdir()) == []


def test_a_shard_onto_a_refusing_disk_fails_cleanly_and_the_store_resumes(tmp_path):
    """HDF5 writing onto a full disk crashed the process (exit 139, a `.tmp` left): shards are now built
    in memory and written by kvprobe.files, so the failure is one error and nothing is left."""
    code = f"""
        import numpy as np
        from kvprobe.files import WriteError
        from kvprobe.grid import FeatureKey
        from kvprobe.store import StoreWriter
        writer = StoreWriter({str(tmp_path / "s")!r}, {{"model": {{"name": "m"}}}})
        rng = np.random.default_rng(0)
        samples = {{"index": np.arange(400), "labels": np.zeros((400, 4), np.int64)}}
        features = {{FeatureKey("memento", 0, "tail_mean"): rng.normal(size=(400, 2, 512)).astype(np.float32)}}
        try:
            writer.write_shard(0, samples, features, compression="none")
        except WriteError as e:
            print(e)
    """
    proc = _child(code, 1 << 20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"{tmp_path / 's' / 'shards' / 'shard_000000.h5'}: could not be written")
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == ["config.json", "shards"]
