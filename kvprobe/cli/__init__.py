"""The `kvprobe` command. Each stage's subcommands live in their own module here.

Exit codes: 0 success, 2 bad input (one line naming the offending field or file),
1 internal failure. `main` is the one error boundary: bad input is a `UsageError` or any
`kvprobe.errors.KVProbeError` (config, store, trace, layout, attention, length, experiment), and a file the user named that
cannot be read or written (missing, permissions, not text) is bad input too; anything
else is kvprobe's own bug and shows its traceback. The library never imports this package.

Start-up: building the parser loads no model library (the options come from torch-free dataclasses),
and each command imports what it needs once its input is checked, so `--help` of any command and
a refusal that needs no model answer at once (tests/cli/test_startup.py; benchmarks/bench_startup.py
times them). torch's threads and transformers' quiet progress bars are set as each library loads
(`runtime.when_imported`).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Sequence

from ..errors import KVProbeError
from . import capture, common, demo, export, layout, plugins, reconstruct, run, serve, sft, toy, verify
from .common import UsageError, one_line_deprecations
from .runtime import keep_freed_memory, reproducible_blas, when_imported

# every subcommand module defines register(subparsers); add new ones here (`toy` adds the toy
# plugin's command); commands of other plugins (entry-point group `kvprobe.cli`) follow them
SUBCOMMAND_MODULES = (demo, layout, toy, capture, run, reconstruct, verify, export, serve, sft)

BAD_INPUT = (UsageError, KVProbeError)  # every refusal of input: one line, exit 2
# the packages of the extras (pyproject.toml), so a command that needs one names the extra to install
EXTRA_OF = {"httpx": "serve", "accelerate": "train", "datasets": "train", "transformer_lens": "lens",
            "nnsight": "nnsight", "vllm": "gpu", "flash_attn": "gpu", "liger_kernel": "gpu", "nbclient": "notebook",
            "nbformat": "notebook", "jupytext": "notebook", "tensorboard": "track", "wandb": "track"}

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvprobe",
        description="Measure KV-cache leakage in block-masked (Memento) transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"kvprobe {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: the cores not already busy with other jobs, "
                             "from the load average; at least 1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMAND_MODULES:
        module.register(sub)
    plugins.register_others(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with one_line_deprecations():  # an old option's name: `kvprobe: warning: ...`, one line
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    if args.threads is not None and args.threads < 1:
        print(f"kvprobe: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    keep_freed_memory()  # batch-sized tensors reuse freed memory instead of page-faulting it in again
    reproducible_blas()  # MKL's products independent of --threads (before torch's first product)
    try:
        threads = args.threads if args.threads is not None else common.default_threads()
        # a command imports torch and transformers only if it needs them (--help and refusals answer at
        # once); their settings take effect as they load, before either does any work
        when_imported("torch", lambda torch: torch.set_num_threads(threads))
        when_imported("transformers", _no_progress_bars)
        return int(args.func(args) or 0)
    except BAD_INPUT as e:
        return _refuse(str(e))
    except UnicodeDecodeError as e:
        return _refuse(f"a file is not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:  # the user's files and directories: missing, permissions, full disk, ...
        if e.filename is not None:
            return _refuse(f"{e.filename}: {e.strerror or e}")
        return _refuse(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except ModuleNotFoundError as e:  # a package of an extra the install left out, or kvprobe's own bug
        extra = EXTRA_OF.get((e.name or "").partition(".")[0])
        if extra is None:
            return _internal()
        return _refuse(f"kvprobe {args.command} needs {e.name}, which comes with the '{extra}' extra: "
                       f"pip install 'kvprobe[{extra}]'")
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("kvprobe: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal failure: show where, exit 1
        return _internal()


def _no_progress_bars(transformers: ModuleType) -> None:
    """Weight-loading bars would break one-line error output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _refuse(message: str) -> int:
    """Bad input: one line on stderr, exit 2."""
    print(f"kvprobe: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _internal() -> int:
    """kvprobe's own failure: the traceback, then one line saying so, exit 1."""
    import traceback

    traceback.print_exc()
    print("kvprobe: internal error (the traceback above says where); please report it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
