"""Commands that plugins add to `kvprobe`: the entry-point group `kvprobe.cli`.

An entry point NAME = "package.module:register" in the group adds the command NAME:
`register(subparsers)` adds its parser (with `set_defaults(func=...)`), as the built-in
command modules do. The toy registers `toy` (toy_models.cli), so kvprobe never imports the
toy. A command kvprobe expects but no installed plugin provides, or whose plugin fails to
load, is still listed and answers any call with one line, exit 2 (`register_plugin`).
"""

from __future__ import annotations

import argparse
from importlib.metadata import EntryPoint, entry_points

from .common import UsageError

__all__ = ["ENTRY_POINT_GROUP", "plugin_commands", "register_plugin", "register_others"]

ENTRY_POINT_GROUP = "kvprobe.cli"


def plugin_commands() -> dict[str, EntryPoint]:
    """The installed entry points of `kvprobe.cli`, by command name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_plugin(sub: argparse._SubParsersAction, name: str, help: str, provider: str) -> None:
    """Add the command `name` from its plugin; without the plugin (or when it fails to load), a
    stand-in that takes any arguments and refuses them in one line naming `provider`."""
    found = plugin_commands().get(name)
    if found is None:
        problem = (f"kvprobe {name} comes from a plugin that is not installed ({provider}, entry point {name!r} "
                   f"in the group {ENTRY_POINT_GROUP!r}); install it, or reinstall kvprobe (pip install -e .)")
    else:
        try:
            found.load()(sub)
            return
        except Exception as e:  # a broken plugin must not break the other commands
            if name in sub.choices:
                raise
            problem = f"kvprobe {name}: its plugin ({found.value}) failed to load: {type(e).__name__}: {e}"
    _stand_in(sub, name, f"{help} (not available: its plugin, {provider}, is not installed or failed to load)",
              problem)


def register_others(sub: argparse._SubParsersAction) -> None:
    """Every installed plugin command not added yet (a name taken by a built-in command is left out)."""
    for name, found in plugin_commands().items():
        if name not in sub.choices:
            register_plugin(sub, name, f"(from the plugin {found.value})", found.value)


def _stand_in(sub: argparse._SubParsersAction, name: str, help: str, problem: str) -> None:
    # no option prefix and no --help: every word after the command lands in `words`, so that
    # `kvprobe toy train --steps 3` reaches the one-line refusal instead of argparse's usage error
    p = sub.add_parser(name, help=help, description=help, add_help=False, prefix_chars="\0")
    p.add_argument("words", nargs="*")

    def refuse(args: argparse.Namespace) -> int:
        raise UsageError(problem)

    p.set_defaults(func=refuse)
