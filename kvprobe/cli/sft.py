"""`kvprobe sft`: the two-stage Memento SFT of a base or reasoning model (transformers' Trainer).

A thin command over `kvprobe.training.sft` (docs/real_models.md): load a checkpoint, add the
Memento markers, run stage 1 (full attention), stage 2 (memento attention) or both. Launch
several processes with an accelerate config of experiments/launch/ (FSDP or ZeRO-3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.config import PAPER_RECIPE
from .common import Deprecated, UsageError, add_mask_args, add_parser, key_values, mask_from_args

__all__ = ["register"]

# train_stage's keywords and the flags that set them, so that a refusal names the flag
_FLAGS = {"max_length": "--max-length", "tokenize_workers": "--tokenize-workers", "learning_rate": "--lr",
          "num_train_epochs": "--epochs", "max_steps": "--max-steps", "per_device_train_batch_size": "--batch-size",
          "global_batch_size": "--global-batch-size", "gradient_accumulation_steps": "--grad-accum",
          "save_steps": "--save-steps", "seed": "--seed"}


def _check_options(options: dict, training_args: dict) -> None:
    """`check_stage_options` before anything loads, its refusal naming the flag."""
    from ..training.sft import SFTError, check_stage_options

    try:
        check_stage_options(options, training_args)
    except SFTError as e:
        flag = f"--training-arg {e.option}" if e.training_arg else _FLAGS.get(e.option, e.option)
        raise UsageError(f"{flag} {e.problem}") from None


def _sft(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.traces import TraceError, add_memento_tokens, read_jsonl
    from ..experiment.kinds import refusing_damaged_weights
    from ..experiment.resolve import hub_access
    from ..memento.forward import UnsupportedAttentionError
    from ..training.sft import (
        QWEN3_CHAT_TEMPLATE,
        SFTError,
        exit_if_launched,
        stage_attn_implementation,
        train_stage,
    )

    mask = mask_from_args(args)
    training_args = key_values(args.training_arg, "--training-arg", example="save_strategy=no")
    out = Path(args.out)
    options = dict(mask=mask, max_length=args.max_length, overlength=args.overlength,
                   cache_dir=Path(args.tokenized_cache) if args.tokenized_cache else out / "tokenized",
                   tokenize_workers=args.tokenize_workers,
                   prompt_template=QWEN3_CHAT_TEMPLATE if args.chat_template == "qwen3" else None,
                   learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
                   per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                   global_batch_size=args.global_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                   save_steps=args.save_steps, loss_on_think=args.loss_on_think, seed=args.seed)
    _check_options(options, training_args)  # before the traces and the model load
    first_stage = int(args.stages[0])
    try:
        traces = read_jsonl(args.traces)
        with hub_access(args.allow_download), refusing_damaged_weights(args.model):  # offline unless asked
            tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=not args.allow_download)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                         attn_implementation=stage_attn_implementation(first_stage),
                                                         local_files_only=not args.allow_download)
    except (TraceError, OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    add_memento_tokens(tokenizer, model)
    for stage in map(int, args.stages):
        try:
            result = train_stage(model, tokenizer, traces, stage,
                                 out / f"stage{stage}" if len(args.stages) > 1 else out, **options, **training_args)
        except (UnsupportedAttentionError, SFTError) as e:  # e.g. stage 2's dense mask refused for long rows
            raise UsageError(str(e).splitlines()[0]) from None
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        if result.trainer.is_world_process_zero():
            print(f"stage {stage}: {result.n_traces} traces ({len(result.dropped)} dropped as too long), "
                  f"{result.steps} steps on {result.world_size} process(es), {len(result.truncated)} truncated to "
                  f"{args.max_length} tokens, final logged loss {last}, model in {result.output_dir}")
    exit_if_launched()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "sft", "two-stage Memento SFT of a base or reasoning model (transformers' Trainer)",
                   "  kvprobe sft --model Qwen/Qwen3-1.7B --traces traces.jsonl --out runs/sft\n"
                   "  accelerate launch --config_file experiments/launch/fsdp_qwen3.yaml -m kvprobe sft "
                   "--model /ckpt/Qwen3-8B --traces traces.jsonl --out runs/sft --dtype float32")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (a base or reasoning model)")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a hub id's files from the network (default: local files and the local cache only)")
    p.add_argument("--traces", required=True, help="Memento pipeline JSONL (kvprobe.data.traces.read_jsonl)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output directory: OUT/stage1 and OUT/stage2 (one stage: OUT itself)")
    out.add_argument("--output-dir", dest="out", action=Deprecated, use="--out", help=argparse.SUPPRESS)
    p.add_argument("--stages", default="12", choices=("1", "2", "12"), help="which stages to run (default both)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights dtype")
    p.add_argument("--max-length", type=int, default=PAPER_RECIPE.max_length,
                   help="longest row in tokens (the paper's 32768); longer traces are cut to it (see --overlength)")
    p.add_argument("--overlength", choices=("truncate", "drop"), default="truncate",
                   help="a trace longer than --max-length: cut to it (the paper's) or left out")
    p.add_argument("--tokenized-cache", default=None, metavar="DIR",
                   help="where the tokenised traces are cached, built once and shared by the ranks "
                        "(default OUT/tokenized)")
    p.add_argument("--tokenize-workers", type=int, default=None, metavar="N",
                   help="processes that tokenise the traces (default: one, the tokenizer's own threads)")
    p.add_argument("--chat-template", choices=("qwen3", "none"), default="qwen3",
                   help="wrap prompts in Qwen3's chat format (default) or not")
    # defaults: the paper's recipe (kvprobe.training.sft.SFTRecipe, appendix A.2.1)
    p.add_argument("--lr", type=float, default=PAPER_RECIPE.learning_rate)
    p.add_argument("--epochs", type=float, default=PAPER_RECIPE.num_train_epochs, help="per stage")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=1, help="per device")
    p.add_argument("--global-batch-size", type=int, default=PAPER_RECIPE.global_batch_size,
                   help="gradient accumulation makes it up over the processes (unless --grad-accum is given)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (overrides the global batch)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=PAPER_RECIPE.gradient_checkpointing)
    p.add_argument("--save-steps", type=int, default=PAPER_RECIPE.save_steps, help="a checkpoint every N steps")
    p.add_argument("--loss-on-think", action=argparse.BooleanOptionalAction, default=PAPER_RECIPE.loss_on_think,
                   help="train on <think>, the assistant turn's first token (the paper's)")
    add_mask_args(p, restart=False)  # restart mode is an inference-time ablation, not a training mask
    p.add_argument("--seed", type=int, default=PAPER_RECIPE.seed)
    p.add_argument("--training-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainingArguments field (a YAML value, e.g. save_strategy=no or "
                        "lr_scheduler_kwargs={min_lr: 1e-6}), repeatable")
    p.set_defaults(func=_sft)
