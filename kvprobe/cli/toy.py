"""`kvprobe toy train` and `kvprobe toy eval`: the toy Memento transformer (toy_models)."""

from __future__ import annotations

import argparse
import shlex
import sys

from .common import UsageError, add_parser

__all__ = ["register"]


def _train(args: argparse.Namespace) -> int:
    from toy_models.train import RunDirError, TrainConfig, train

    try:
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            seed=args.seed,
            eval_every=args.eval_every,
            save_every=args.save_every,
            eval_samples=args.eval_samples,
            device=args.device,
            out_dir=args.out,
            threads=args.threads,
        )
        command = shlex.join(["kvprobe", *sys.argv[1:]]) if sys.argv[1:2] == ["toy"] else None
        model = train(config, resume=args.resume, overwrite=args.overwrite, command=command)
    except (RunDirError, ValueError) as e:
        raise UsageError(str(e)) from None
    from toy_models.checkpoint import read_meta
    from toy_models.train import latest_checkpoint

    last = latest_checkpoint(args.out)
    meta = read_meta(last) if last is not None else {}
    print(f"{last}: step {meta.get('step')}, task accuracy {meta.get('task_accuracy')}, {meta.get('wall_time_s')} s")
    del model
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from toy_models.checkpoint import load
    from toy_models.task import heldout_seed, task_accuracy

    if args.samples <= 0:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    if args.heldout_set < 0:
        raise UsageError(f"--heldout-set must be >= 0, got {args.heldout_set}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    for name in args.checkpoints:
        try:
            model = load(name).to(args.device)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        acc = task_accuracy(model, args.samples, heldout_seed(args.heldout_set))
        print(f"{name}\ttask accuracy {acc:.4f} ({args.samples} held-out sequences, set {args.heldout_set})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    toy = add_parser(sub, "toy", "train or evaluate the toy Memento transformer",
                     "  kvprobe toy eval final --samples 2000\n  kvprobe toy train --steps 6000 --device cuda --out runs/toy")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    p = add_parser(
        toy_sub,
        "train",
        "train the toy model under memento attention (keep_last_n_blocks=0)",
        "  kvprobe toy train --out runs/toy --device cuda\n"
        "  kvprobe toy train --out runs/toy --resume\n"
        "  kvprobe toy train --steps 20 --batch-size 8 --out /tmp/toy --overwrite",
    )
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per step (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps before cosine decay (default 200)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="model init and training data seed (default 0)")
    p.add_argument("--eval-every", type=int, default=100, help="log loss and task accuracy every N steps")
    p.add_argument("--save-every", type=int, default=500, help="write a checkpoint every N steps")
    p.add_argument("--eval-samples", type=int, default=2000, help="held-out sequences per evaluation")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="run directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
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
