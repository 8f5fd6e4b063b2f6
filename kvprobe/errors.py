"""The one base of kvprobe's bad-input errors.

    try:
        run_capture(model, source, spec, "runs/x")
    except KVProbeError as e:      # a config, store, trace, layout, mask or length kvprobe refuses
        print(e)                   # one line naming the problem

Every error kvprobe raises for input it refuses derives from `KVProbeError` and from the
built-in type it always was (`ValueError`), so existing `except ValueError` code keeps
working. The command line turns any of them into one line on stderr and exit status 2;
anything else is kvprobe's own failure (a traceback, exit 1).
"""

from __future__ import annotations

__all__ = ["KVProbeError"]


class KVProbeError(Exception):
    """Input kvprobe refuses: a config, store, trace, layout, attention setup or length. The message is
    one line that names the problem."""
