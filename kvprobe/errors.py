"""The one base of kvprobe's bad-input errors, and the warning for a name kvprobe renamed.

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

import functools
import sys
import warnings
from typing import Any, Callable, TypeVar

__all__ = ["KVProbeError", "KVProbeWarning", "renamed", "renamed_fields"]


class KVProbeError(Exception):
    """Input kvprobe refuses: a config, store, trace, layout, attention setup or length. The message is
    one line that names the problem."""


class KVProbeWarning(UserWarning):
    """Something kvprobe does that its user should know of, e.g. running a checkpoint's own code. The
    command line prints it as one line, `kvprobe: warning: ...`."""


def renamed(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that still hands out the objects of `module` under their old `names`
    (old -> new), for one release, each time with a DeprecationWarning naming both.

        __getattr__ = renamed(__name__, {"CaptureSpec": "CaptureConfig"})
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{name} is deprecated; use {names[name]} (kvprobe renamed it; the old name goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], names[name])

    return __getattr__


_T = TypeVar("_T", bound=type)


def renamed_fields(**renames: str) -> Callable[[_T], _T]:
    """A dataclass decorator keeping old field names for one release (old="new"): the constructor
    takes `old=` and reads `.old`, each with a DeprecationWarning naming both; giving both is a TypeError."""
    def wrap(cls: _T) -> _T:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: give {new}= only ({old}= is its deprecated name)")
                    warnings.warn(f"{cls.__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        def old_name(old: str, new: str) -> property:
            def get(self: Any) -> Any:
                warnings.warn(f"{cls.__name__}.{old} is deprecated; use .{new}", DeprecationWarning, stacklevel=2)
                return getattr(self, new)
            return property(get, doc=f"Deprecated name of `{new}`.")

        cls.__init__ = __init__  # type: ignore[misc]
        for old, new in renames.items():
            setattr(cls, old, old_name(old, new))
        return cls
    return wrap
