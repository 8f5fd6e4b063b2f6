"""Shared CLI plumbing: the bad-input error every subcommand raises."""

from __future__ import annotations

import argparse

__all__ = ["UsageError", "add_parser"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with usage examples."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
