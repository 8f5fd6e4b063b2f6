"""The one error an experiment raises for bad input."""

from __future__ import annotations

from ..errors import KVProbeError

__all__ = ["ExperimentError"]


class ExperimentError(KVProbeError, ValueError):
    """Bad input to an experiment (a config field, a file, a run directory), in one line.

    The `kvprobe` command prints it and exits 2; library users catch it like any ValueError.
    """
