"""`kvprobe toy train` and `kvprobe toy eval`: the toy Memento transformer's commands.

They live with the toy (toy_models.cli) and reach `kvprobe` through the entry point `toy` of
the group `kvprobe.cli` (pyproject.toml), as the toy's model kind does through
`kvprobe.model_kinds`; kvprobe never imports the toy. This module keeps the command's place
in `kvprobe --help`, and without the plugin `kvprobe toy ...` is refused in one line (exit 2).
"""

from __future__ import annotations

import argparse

from .plugins import register_plugin

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    register_plugin(sub, "toy", "train or evaluate the toy Memento transformer", provider="toy_models")
