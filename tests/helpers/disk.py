"""A disk that fills up: kvprobe's writes of chosen files fail the way a full disk fails them.

    failed = full_disk(monkeypatch, "*/probes/memento.npz")   # fnmatch on the target's path
    ... run a command ...
    assert failed == [".../probes/memento.npz"]

Every file kvprobe writes is opened by `kvprobe.files` (a temporary beside the target, or an
append), so replacing that module's `open` reaches every writer: the first `room` bytes land,
the write that goes past them raises OSError(ENOSPC), as the OS does.
`leftovers(root)` lists what a failed write must not leave: temporaries of either naming.
"""

from __future__ import annotations

import builtins
import errno
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import kvprobe.files

TEMPORARY = kvprobe.files.TEMPORARY  # `.NAME.HOST-PID.RANDOM.tmp`


class _Filling:
    """A file object whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, file: Any, room: int, target: str, failed: list[str]) -> None:
        self._file, self._room, self._target, self._failed = file, room, target, failed

    def write(self, data: Any) -> int:
        size = len(data)
        if size > self._room:
            if self._room:
                self._file.write(data[: self._room])
                self._file.flush()
            self._room = 0
            self._failed.append(self._target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._file.write(data)

    def __enter__(self) -> "_Filling":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def full_disk(monkeypatch, pattern: str, room: int = 16) -> list[str]:
    """Make kvprobe's writes of files whose path matches `pattern` fail as on a full disk, after
    `room` bytes; returns the list of target paths that failed (filled in as they fail)."""
    failed: list[str] = []

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        path = Path(file)
        name = TEMPORARY.match(path.name)
        target = str(path.with_name(name[1]) if name else path)
        if "r" not in mode and fnmatch(target, pattern):
            return _Filling(f, room, target, failed)
        return f

    monkeypatch.setattr(kvprobe.files, "open", open_, raising=False)
    return failed


def leftovers(root: Path) -> list[str]:
    """Temporary files under root: kvprobe.files' and the older `*.tmp` names."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)
