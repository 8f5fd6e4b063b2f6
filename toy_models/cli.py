"""`kvprobe toy train` and `kvprobe toy eval`: the toy's commands, a plugin of the `kvprobe` command.

Registered as the entry point `toy` of the group `kvprobe.cli` (pyproject.toml): `kvprobe`
calls `register(subparsers)` to add the `toy` command, so kvprobe itself never imports the toy.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from kvprobe.cli.common import UsageError, add_parser

__all__ = ["register"]


def _number_or_word(words: tuple[str, ...], kind: type = float):
    """argparse type: a number, or one of `words` ('none' becomes None)."""

    def parse(text: str):
        if text.lower() in words:
            return None if text.lower() == "none" else text.lower()
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or one of {', '.join(words)}, got {text!r}") from None

    return parse


# TrainConfig fields whose values are not plain ints or floats; every other field maps
# to an option of its own type, with TrainConfig's default (one declaration).
_OPTION_TYPES = {
    "init_embedding": _number_or_word(("gpt2",)),
    "init_linear": _number_or_word(("gpt2", "pytorch")),
    "grad_clip": _number_or_word(("none",)),
    "train_set": _number_or_word(("none",), int),
    "schedule": str,
    "device": str,
}
_NOT_OPTIONS = ("out_dir", "threads")  # --out, and the global --threads


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .config import TrainConfig

    try:
        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _NOT_OPTIONS}
        config = TrainConfig(**values, out_dir=args.out, threads=args.threads)
    except ValueError as e:  # refused before torch loads
        raise UsageError(str(e)) from None
    from .train import RunDirError, train

    try:
        command = shlex.join(["kvprobe", *sys.argv[1:]]) if sys.argv[1:2] == ["toy"] else None
        model = train(config, resume=args.resume, overwrite=args.overwrite, command=command)
    except (RunDirError, ValueError) as e:
        raise UsageError(str(e)) from None
    from .checkpoint import read_meta
    from .train import latest_checkpoint

    last = latest_checkpoint(args.out)
    meta = read_meta(last) if last is not None else {}
    print(f"{last}: step {meta.get('step')}, task accuracy {meta.get('task_accuracy')}, {meta.get('wall_time_s')} s")
    del model
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, its default and help taken from the dataclass."""
    from dataclasses import MISSING, fields

    from .config import TrainConfig  # torch-free: --help lists the options at once

    for f in fields(TrainConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        helptext = f"{f.metadata.get('help', f.name)} (default {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            p.add_argument(flag, type=_OPTION_TYPES.get(f.name, type(default)), default=default, help=helptext,
                           dest=f.name)


def _eval(args: argparse.Namespace) -> int:
    if args.samples <= 0:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    if args.heldout_set < 0:
        raise UsageError(f"--heldout-set must be >= 0, got {args.heldout_set}")
    import torch

    from .checkpoint import load, read_meta
    from .task import heldout_seed, task_accuracy

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    for name in args.checkpoints:
        try:
            model = load(name).to(args.device)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        keep = read_meta(name).get("config", {}).get("keep_last_n_blocks", 0)  # the mask it was trained under
        acc = task_accuracy(model, args.samples, heldout_seed(args.heldout_set), keep_last_n_blocks=keep)
        mask = f", keep {keep}" if keep else ""
        print(f"{name}\ttask accuracy {acc:.4f} ({args.samples} held-out sequences, set {args.heldout_set}{mask})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    toy = add_parser(sub, "toy", "train or evaluate the toy Memento transformer",
                     "  kvprobe toy eval final --samples 2000\n  kvprobe toy train --steps 6000 --device cuda --out runs/toy")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    p = add_parser(
        toy_sub,
        "train",
        "train the toy model under memento attention (keep_last_n_blocks=0 unless --keep-last-n-blocks)",
        "  kvprobe toy train --out runs/toy --device cuda\n"
        "  kvprobe toy train --out runs/toy --resume\n"
        "  kvprobe toy train --steps 20 --batch-size 8 --out /tmp/toy --overwrite",
    )
    _add_train_options(p)
    p.add_argument("--out", required=True, help="run directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (under a constant schedule, also to more --steps or a final --decay)")
    mode.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.set_defaults(func=_train)

    p = add_parser(
        toy_sub,
        "eval",
        "print the task accuracy of toy checkpoints on held-out sequences",
        "  kvprobe toy eval\n  kvprobe toy eval series/step_001000 runs/toy/step_003000 --samples 5000",
    )
    p.add_argument("checkpoints", nargs="*", default=["final"], metavar="CHECKPOINT",
                   help="shipped name (final, series/step_XXXXXX) or checkpoint directory (default final)")
    p.add_argument("--samples", type=int, default=1000, help="held-out sequences (default 1000)")
    p.add_argument("--heldout-set", type=int, default=1,
                   help="index of the held-out set (default 1; training logs use set 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_eval)
