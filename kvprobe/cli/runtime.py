"""The command line's process-wide settings: freed memory kept for reuse, and MKL's products
made independent of the thread count.

`keep_freed_memory`: glibc hands every block above its mmap threshold (adaptive, at most
32 MB) straight back to the operating system when it is freed, so each batch-sized
tensor that follows (a toy batch's MLP activations are 60 MB) is mapped and page-faulted
in again, one 4 KB page at a time. On the project's 2-core machine that costs about a
quarter of a toy forward pass (`benchmarks/RESULTS.md`, "Freed memory"). Raising the
threshold to 1 GB and keeping 256 MB of slack at the top of the heap lets freed blocks be
reused instead. Blocks of 1 GB and more (model weights, whole feature matrices) are still
mapped and returned as before. The command line calls it once at start-up (a script that
wants the same can call it: it changes the whole process, so the library never does).
Nothing happens where the C library is not glibc.

`reproducible_blas`: kvprobe's probes do not depend on `--threads` (the preconditioner
factors each matrix on one thread), but on some CPUs (AVX-512 Xeons, seen here) MKL's
products round differently with another thread count, which moved a probe's validation
bits in the fourth digit. MKL's strict conditional numerical reproducibility
(`MKL_CBWR=AUTO,STRICT`: the fastest code path, results independent of the thread count)
removes that. MKL reads it at its first call, so the command line sets it at start-up; a
value the user set wins. Where torch does not use MKL it changes nothing.

`when_imported`: the command line loads torch and transformers only in the commands that use
them (so `--help` and a refusal answer at once), yet their settings (torch's threads,
transformers' progress bars off) must be in force before either does any work. It runs an
action on the module right after the module is first imported, or at once if it already is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["keep_freed_memory", "reproducible_blas", "when_imported"]

_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # bytes: blocks at least this large are still mapped and unmapped
TOP_PAD = 256 << 20  # bytes of slack kept at the top of the heap when it shrinks


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 1 GB for reuse; True if it took effect.

    Set $KVPROBE_MALLOC=default to leave the allocator as it is."""
    if os.environ.get("KVPROBE_MALLOC", "").strip().lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TOP_PAD, TOP_PAD))


def reproducible_blas() -> str:
    """Ask MKL for results independent of the thread count (strict CNR); returns the setting in force.
    Call it before torch's first product in the process: MKL reads it once."""
    return os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


_PENDING: dict[str, Callable[[ModuleType], Any]] = {}  # module name -> what to do once it is imported


def when_imported(name: str, action: Callable[[ModuleType], Any]) -> None:
    """Run `action(module)` on the top-level module `name` right after its first import, or now if it is
    imported already. A later call for the same module, before the import, replaces the action."""
    if name in sys.modules:
        action(sys.modules[name])
        return
    if name not in _PENDING:
        sys.meta_path.insert(0, _AfterImport(name))
    _PENDING[name] = action


class _AfterImport(importlib.abc.MetaPathFinder):
    """An import hook for one module: finds it as the other finders do, and runs its pending action
    once the module's own code has run (and only then: a bare `find_spec` imports nothing)."""

    def __init__(self, name: str) -> None:
        self.name, self.finding = name, False

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.name or self.finding:
            return None
        self.finding = True  # the other finders find it
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _PENDING.pop(self.name)(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader only
        return spec
