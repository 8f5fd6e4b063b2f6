"""Writing files so that nothing is lost and nothing is half-written: every file kvprobe writes goes through here.

    write_text(path, text)                      # or write_bytes(path, data)
    with replacing(path, "wb") as f:            # a file object, for np.savez, csv, savefig
        np.savez_compressed(f, **arrays)
    with together():                            # several files: all of them, or none
        write_text(path.with_suffix(".npz"), ...)
        write_text(path.with_suffix(".json"), ...)

Each file is written to a temporary file beside it (`.NAME.HOST-PID.RANDOM.tmp`), flushed, fsynced
and renamed over the target, so a reader sees the old file or the new one, never a part. On
any failure, a full disk included, the temporary is removed, as are the folders the write
created, and an OSError (or h5py's RuntimeError) becomes a `WriteError` naming the target:
one line, e.g. `runs/x/report/summary.md: could not be written (no space left on device); it is
left as it was`.
Inside `together()` nothing is renamed until the block ends, so a failure leaves every target
as it was. A process killed mid-write leaves its temporary behind (the target is intact);
`remove_leftovers`, run when a run or store is resumed, deletes those of processes gone.

Before replacing, appending to or repairing a file the user named, `check_ours` refuses one
kvprobe did not write (its first bytes carry no kvprobe marker), and `check_not_input`
refuses an output that is one of the command's inputs. What kvprobe reads as YAML (config files,
`--set` values) goes through `UniqueKeyLoader`, which refuses a key given twice.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

import yaml

from .errors import KVProbeError

__all__ = ["Appender", "DuplicateKeyError", "NotOursError", "UniqueKeyLoader", "WriteError", "check_not_input", "check_ours", "remove_leftovers", "replacing",
           "together", "write_bytes", "write_error", "write_text"]

HEAD_BYTES = 1 << 16  # how much of a file's start `check_ours` reads for its marker
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"  # in temporary names: whose they are
TEMPORARY = re.compile(r"^\.(.+)\.([A-Za-z0-9]+)-(\d+)\.[0-9a-f]{8}\.tmp$")  # name, host, pid


class WriteError(KVProbeError, OSError):
    """A file could not be written (full disk, permissions, ...); nothing was changed. One line naming the file."""


class NotOursError(KVProbeError, ValueError):
    """A file kvprobe would replace, append to or repair is not one kvprobe wrote, or is an input."""


def _reason(e: BaseException) -> str:
    """What went wrong, in words: the OS error's text (also when h5py only quotes its errno)."""
    code = getattr(e, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(e))
        code = int(found[1]) if found else None
    text = os.strerror(code) if code else (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:1].lower() + text[1:]


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError:
    """The one-line error for a failed write of `path`."""
    return WriteError(f"{path}: could not be written ({_reason(e)}); it is left as it was")


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, (OSError, RuntimeError)) and not isinstance(e, KVProbeError)


class _Group:
    """The files of one `together()` block: temporaries waiting to be renamed, and the folders made for them."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, target), renamed in this order
        self.made: list[Path] = []  # folders created for the targets, outermost first

    def temporary(self, path: Path) -> Path:
        """A new temporary file's name beside `path` (its folders created); staged to replace `path`."""
        _make_folders(path, self.made)
        tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self.staged.append((tmp, path))
        return tmp

    def drop(self, tmp: Path) -> None:
        """Remove one temporary (a failed write)."""
        self.staged = [(t, p) for t, p in self.staged if t != tmp]
        _remove(tmp)

    def commit(self) -> None:
        """Rename every temporary over its target, then make the renames durable."""
        while self.staged:
            tmp, path = self.staged[0]
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from e
            self.staged.pop(0)
            _sync_folder(path.parent)

    def discard(self) -> None:
        """Remove every temporary and the folders made for them (those left empty)."""
        for tmp, _ in self.staged:
            _remove(tmp)
        self.staged = []
        _remove_folders(self.made)


def _make_folders(path: Path, made: list[Path]) -> None:
    """Create the missing folders above `path`, outermost first, adding each to `made`."""
    try:
        for folder in [p for p in (path.parent, *path.parent.parents) if not p.exists()][::-1]:
            folder.mkdir()
            made.append(folder)
    except OSError as e:
        raise write_error(path, e) from e


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders a failed write made (innermost first), those left empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            pass
    made.clear()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a power cut (where the filesystem allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_current: ContextVar[_Group | None] = ContextVar("kvprobe_files_group", default=None)


@contextmanager
def together() -> Iterator[None]:
    """Files written inside the block are put in place together when it ends; if anything fails
    they are all left as they were. Nested blocks join the outermost one."""
    if _current.get() is not None:
        yield
        return
    group = _Group()
    token = _current.set(group)
    try:
        yield
        group.commit()
    except BaseException:
        group.discard()
        raise
    finally:
        _current.reset(token)


@contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", *, newline: str | None = None) -> Iterator[IO[Any]]:
    """A file object ("w": UTF-8 text, "wb": bytes) whose content replaces `path` once the block
    ends (inside `together()`, once that block ends). A failure removes it; an OSError or
    RuntimeError becomes a `WriteError` naming `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with together():
        group = _current.get()
        assert group is not None
        tmp = group.temporary(path)
        try:
            with open(tmp, mode.replace("w", "x"), encoding="utf-8" if mode == "w" else None, newline=newline) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            group.drop(tmp)
            if _is_write_failure(e):
                raise write_error(path, e) from e
            raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically (see `replacing`)."""
    with replacing(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically (see `replacing`)."""
    with replacing(path) as f:
        f.write(text)


class Appender:
    """Appends lines to a file, each whole or not at all: a failed append (a full disk) is cut back
    off, fsynced lines stay, and the failure is a `WriteError` naming the file. The file and its
    folders are created at the first line, and removed again if that line fails."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file: Any = None  # unbuffered: each write goes straight to the OS
        self.made: list[Path] = []  # folders created for the file
        self.created = False

    def write_line(self, line: str) -> None:
        """Append `line` and a newline (UTF-8), flushed to disk."""
        data = memoryview((line + "\n").encode("utf-8"))
        if self.file is None:
            self.created = not self.path.exists()
            _make_folders(self.path, self.made)
            try:
                self.file = open(self.path, "ab", buffering=0)
            except OSError as e:
                _remove_folders(self.made)
                raise write_error(self.path, e) from e
        end = self.file.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self.file.write(data):]
            os.fsync(self.file.fileno())
        except OSError as e:
            self._cut_back(end)
            raise write_error(self.path, e) from e

    def _cut_back(self, end: int) -> None:
        """Undo a failed append: the file back to `end` bytes; a file (and folders) this appender made and
        that holds nothing is removed."""
        try:
            self.file.truncate(end)
        except OSError:
            pass
        if self.created and end == 0:
            self.close()
            _remove(self.path)
            _remove_folders(self.made)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def remove_leftovers(root: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that writers killed mid-write left under `root`: those of this host's
    processes that are gone (another host's, or a running process's, are kept). Returns them."""
    removed = []
    for path in Path(root).rglob(".*.tmp"):
        found = TEMPORARY.match(path.name)
        if found and found[2] == _HOST and not _running(int(found[3])):
            _remove(path)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def check_ours(path: str | os.PathLike, ours: Callable[[bytes], bool], what: str, way_out: str) -> None:
    """Refuse (`NotOursError`) to replace, append to or repair `path` unless it is missing, empty, or
    `ours(its first bytes)` recognises `what` kvprobe wrote there. The refusal names the file and `way_out`."""
    path = Path(path)
    if path.is_dir():
        raise NotOursError(f"{path}: is a directory, not {what}; {way_out}")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except FileNotFoundError:
        return
    if head and not ours(head):
        raise NotOursError(f"{path}: not {what} kvprobe wrote (no kvprobe marker at its start); refusing to change "
                           f"it: {way_out}")


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse (`NotOursError`) an output `out` that is one of `inputs` (the same file by any path)."""
    for source in inputs:
        try:
            same = os.path.samefile(out, source)
        except OSError:  # either is missing: not the same file
            continue
        if same:
            raise NotOursError(f"{out}: {flag} is also an input ({source}); writing it would lose that input: "
                               "choose another output path")


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives one key twice (PyYAML would silently keep the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping, naming it and both lines.
    `<<: *base` merge keys may still be overridden key by key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first given at line {seen[key]})")
                seen[key] = line
            except TypeError:  # an unhashable key: the safe loader refuses it itself
                continue
        return super().construct_mapping(node, deep=deep)
