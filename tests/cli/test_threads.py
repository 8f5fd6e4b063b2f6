"""The CLI's process settings: default torch threads (the cores other jobs are not using), the allocator."""

from __future__ import annotations

import io

import pytest


@pytest.mark.parametrize("cores,load,expected", [(2, 0.1, 2), (2, 1.3, 1), (2, 4.0, 1), (16, 3.2, 13), (1, 0.0, 1)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, cores, load, expected):
    from kvprobe.cli import common

    monkeypatch.delenv("KVPROBE_THREADS", raising=False)  # the suite pins it (conftest)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(common, "_busy_cores", lambda: load)
    assert common.default_threads() == expected


def test_busy_cores_ignore_a_finished_jobs_lingering_load(monkeypatch):
    from kvprobe.cli import common

    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.6, 1.2, 1.0))
    runnable = iter(["1.60 1.20 1.00 1/300 99\n"] * 5)  # only this process is runnable now
    monkeypatch.setattr("builtins.open", lambda *a, **k: io.StringIO(next(runnable)))
    assert common._busy_cores() == 0.0
    runnable = iter(["1.60 1.20 1.00 3/300 99\n"] * 5)  # two other threads are running
    assert common._busy_cores() == 1.6


def test_threads_default_is_applied(monkeypatch, capsys):
    import torch

    from kvprobe.cli import common, main

    before = torch.get_num_threads()
    try:
        for busy, expected in ((lambda: 1, 1), (lambda: 2, 2)):
            monkeypatch.setattr(common, "default_threads", busy)
            assert main(["layout"]) == 0
            assert torch.get_num_threads() == expected
        assert main(["--threads", "1", "layout"]) == 0 and torch.get_num_threads() == 1  # the flag wins
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_kvprobe_threads_pins_the_default(monkeypatch):
    from kvprobe.cli import common
    from kvprobe.cli.common import UsageError

    monkeypatch.setattr(common, "_busy_cores", lambda: 0.0)
    monkeypatch.setenv("KVPROBE_THREADS", "3")
    assert common.default_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KVPROBE_THREADS", bad)
        with pytest.raises(UsageError, match="KVPROBE_THREADS must be a whole number"):
            common.default_threads()
    monkeypatch.delenv("KVPROBE_THREADS")
    assert common.default_threads() >= 1


def test_a_bad_kvprobe_threads_is_refused_in_one_line_before_anything_runs(monkeypatch, tmp_path, capsys):
    from kvprobe.cli import main

    monkeypatch.setenv("KVPROBE_THREADS", "two")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvprobe: error: KVPROBE_THREADS must be a whole number >= 1, got 'two'"]
    assert not out.exists()


def test_keep_freed_memory_sets_glibc_and_can_be_turned_off(monkeypatch):
    """On glibc the CLI's allocator setting takes effect; $KVPROBE_MALLOC=default leaves it alone."""
    import platform

    from kvprobe.cli.runtime import keep_freed_memory

    monkeypatch.setenv("KVPROBE_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("KVPROBE_MALLOC")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
