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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory", "reproducible_blas"]

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
