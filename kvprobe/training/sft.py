"""Two-stage supervised fine-tuning of a Memento model on transformers' `Trainer`.

The Memento paper trains in two stages on the same kind of data (traces in the token
format of SPEC section 1):

    stage 1  full causal attention: the model learns the format (blocks, mementos,
             markers) while it can still see every block
    stage 2  memento attention: completed blocks are hidden from later tokens, so the
             model learns to reason forward from the mementos alone (SPEC section 2)

The pieces, each in its own module:

    encode.py     `TraceEncoder`: a trace -> one row (ids, layout, loss start), cut to
                  `max_length` tokens as the paper does ("Sequences are tokenized to a
                  maximum length of 32,768 tokens"; ``overlength="drop"`` drops instead)
    tokenized.py  `tokenize_traces`: every trace tokenised once into a cached HF `datasets`
                  table, built by the main process and memory-mapped by every rank
    collate.py    `MementoCollator`: padded ids and labels; stage 2 adds position ids and the
                  memento mask as O(B x T) tables, never a T x T tensor
    trainer.py    `MementoTrainer`: builds the mask from the tables on the model's device

Attention (`stage_attn_implementation`). Stage 1 runs ``flash_attention_2`` when the
``flash_attn`` package is installed and CUDA is present, else ``sdpa``, with a 2D padding
mask. Stage 2 needs the memento mask, which the flash-attention paths ignore: on CUDA it
runs ``flex_attention`` with the interval-built `BlockMask` (milliseconds and O(T) memory
at 32K tokens; rows padded to a multiple of its 128-token tiles); on CPU ``sdpa`` (or
``eager`` if the model already uses it) with the dense additive mask, which is refused above
`DENSE_MASK_MAX_TOKENS` (8,192) tokens with one line naming the memory it would take.

Loss, as the paper's ("on all completion tokens"): every token from ``<think>`` on, the
assistant turn, is a target: block contents, delimiters, mementos, ``</think>``, the answer
and the EOS token. The prompt (the problem, any chat-template text) is context only
(``loss_on_think=False`` starts the targets at the first ``<|block_start|>``;
``loss_on_prompt=True`` trains on the prompt too). The hyperparameters default to the
paper's (`SFTRecipe`). With a ``prompt_template`` (e.g. `QWEN3_CHAT_TEMPLATE`) the trace's prompt is
wrapped in the chat format before rendering, so training matches what a served model
sees; kvprobe's capture wraps it the same way (`data.chat_template`, `kvprobe.data.chat`:
the fork's template by default for ChatML tokenizers).

Launch (every process runs the same command; the configs are in experiments/launch/):

    kvprobe sft --model Qwen/Qwen3-1.7B --traces traces.jsonl --out runs/sft
    accelerate launch --config_file experiments/launch/fsdp_qwen3.yaml -m kvprobe sft \\
        --model /ckpt/Qwen3-8B --traces traces.jsonl --out runs/sft --dtype float32 \\
        --training-arg use_liger_kernel=true
    accelerate launch --config_file experiments/launch/zero3.yaml -m kvprobe sft \\
        --model /ckpt/Qwen3-8B --traces traces.jsonl --out runs/sft --dtype float32 \\
        --training-arg use_liger_kernel=true

Full SFT of an 8B model needs its weights, gradients and optimiser states sharded (FSDP or
ZeRO-3): 98-131 GB in all; at 32K-token rows the logits at the loss add 30-50 GB per GPU
unless a fused loss (Liger) avoids them. See docs/real_models.md for the arithmetic.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from ..data.traces import Trace, add_memento_tokens
from ..errors import KVProbeError
from ..memento.forward import (
    DENSE_MASK_IMPLEMENTATIONS,
    DENSE_MASK_MAX_TOKENS,
    FLEX_IMPLEMENTATIONS,
    UnsupportedAttentionError,
    check_implementation,
    dense_mask_bytes,
)
from ..memento.masks import MaskConfig
from .collate import MementoCollator, _check_stage
from .config import PAPER_RECIPE, SFTRecipe  # the hyperparameters, torch-free; re-exported here
from .encode import IGNORE_INDEX, EncodedTrace, Overlength, OverlengthError, TraceEncoder
from .tokenized import TokenizedTraces, tokenize_traces

__all__ = [
    "IGNORE_INDEX",
    "PAPER_RECIPE",
    "QWEN3_CHAT_TEMPLATE",
    "EncodedTrace",
    "MementoCollator",
    "OverlengthError",
    "SFTError",
    "SFTRecipe",
    "StageResult",
    "TokenizedTraces",
    "TraceEncoder",
    "accumulation_for",
    "check_stage_options",
    "exit_if_launched",
    "select_traces",
    "stage_attn_implementation",
    "tokenize_traces",
    "train_stage",
    "two_stage_sft",
]

log = logging.getLogger(__name__)

FLEX_TILE = 128  # FlexAttention's BlockMask tile: stage-2 rows are padded to a multiple of it

# Qwen3's chat format for one user turn and the assistant's reply (no system prompt, as
# the fork's memento_nosys.jinja); `render` adds the newline and <think> after it.
QWEN3_CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant"


class SFTError(KVProbeError, ValueError):
    """An SFT option kvprobe refuses, in one line. `option` is the keyword of `train_stage`, or, with
    `training_arg`, the keyword meant for transformers' `TrainingArguments`; `problem` says what is wrong."""

    def __init__(self, option: str, problem: str, training_arg: bool = False) -> None:
        super().__init__(f"{f'training argument {option!r}' if training_arg else option} {problem}")
        self.option, self.problem, self.training_arg = option, problem, training_arg


# the least value of each numeric option (None, where allowed, is not checked)
_AT_LEAST = {"max_length": 2, "tokenize_workers": 1, "per_device_train_batch_size": 1, "global_batch_size": 1,
             "gradient_accumulation_steps": 1, "save_steps": 1, "logging_steps": 1, "warmup_steps": 0,
             "weight_decay": 0, "max_grad_norm": 0, "seed": 0}
_ABOVE_ZERO = ("learning_rate", "num_train_epochs")
_SET_BY_STAGE = ("output_dir", "remove_unused_columns")  # TrainingArguments fields train_stage fills in itself


def _option_problem(name: str, value: Any) -> str | None:
    """What is wrong with the value of a numeric option (None: nothing, or not a numeric option)."""
    numeric = name in _AT_LEAST or name in _ABOVE_ZERO or name in ("max_steps", "adam_beta1", "adam_beta2")
    if not numeric or (value is None and name in ("max_length", "tokenize_workers", "gradient_accumulation_steps")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        return f"must be a number, got {value!r}"
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        return f"must be >= {_AT_LEAST[name]}, got {value!r}"
    if name in _ABOVE_ZERO and value <= 0:
        return f"must be > 0, got {value!r}"
    if name == "max_steps" and value != -1 and value < 1:
        return f"must be -1 (the epochs decide) or >= 1, got {value!r}"
    if name.startswith("adam_beta") and not 0 <= value < 1:
        return f"must be in [0, 1), got {value!r}"
    if name == "seed" and value >= 2**32:
        return f"must be below 2**32, got {value!r}"
    return None


def check_stage_options(options: Mapping[str, Any], training_args: Mapping[str, Any] | None = None) -> None:
    """Refuse (SFTError), before any model or trace loads, what `train_stage` would fail on later:
    a numeric option out of range (`options`, its keywords), and an extra keyword (`training_args`)
    that is neither a `TrainingArguments` field nor a keyword of `train_stage`, that one of
    `options` already sets, or that train_stage fills in itself (output_dir, remove_unused_columns)."""
    from transformers import TrainingArguments

    known = set(getattr(TrainingArguments, "__dataclass_fields__", {})) | set(inspect.signature(train_stage).parameters)
    for key, value in (training_args or {}).items():
        if key in options:
            raise SFTError(key, "is set already (kvprobe sft: by its own flag)", training_arg=True)
        if key in _SET_BY_STAGE:
            raise SFTError(key, "is train_stage's own to set (kvprobe sft: the output directory is --out)",
                           training_arg=True)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SFTError(key, f"is not a field of transformers' TrainingArguments{hint}", training_arg=True)
    for extra, given in ((False, options), (True, training_args or {})):
        for name, value in given.items():
            problem = _option_problem(name, value)
            if problem is not None:
                raise SFTError(name, problem, training_arg=extra)


def accumulation_for(global_batch_size: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation steps that make per_device x world_size x steps the global batch (at least 1)."""
    if min(global_batch_size, per_device, world_size) < 1:
        raise ValueError(f"batch sizes must be >= 1, got global {global_batch_size}, per device {per_device}, "
                         f"world size {world_size}")
    return max(1, round(global_batch_size / (per_device * world_size)))


def stage_attn_implementation(stage: int, current: str | None = None) -> str:
    """The attention implementation a stage trains with.

    Stage 1: ``flash_attention_2`` when flash_attn is installed and CUDA is present, else
    ``sdpa``. Stage 2: ``flex_attention`` on CUDA (the block-sparse memento mask, any length);
    on CPU the model's `current` implementation if it reads a dense 4D mask (``eager``/``sdpa``),
    else ``sdpa`` (CPU FlexAttention has no backward pass).
    """
    _check_stage(stage)
    if stage == 1:
        return "flash_attention_2" if find_spec("flash_attn") is not None and torch.cuda.is_available() else "sdpa"
    if torch.cuda.is_available():
        return "flex_attention"
    return current if current in DENSE_MASK_IMPLEMENTATIONS else "sdpa"


def select_traces(traces: Sequence[Trace], collator: MementoCollator) -> tuple[list[Trace], list[str]]:
    """Split traces into those the collator can train on (valid Memento structure, and within
    `max_length` or truncated to it) and the ids of those it cannot."""
    kept: list[Trace] = []
    dropped: list[str] = []
    for t, row in zip(traces, collator.encoder.encode_or_reason(traces)):
        if isinstance(row, EncodedTrace):
            kept.append(t)
        else:
            dropped.append(t.trace_id)
    return kept, dropped


@dataclass
class StageResult:
    """One finished stage: the losses logged, the trainer, which traces were used."""

    stage: int
    output_dir: Path
    losses: list[float]  # training loss at each logging step
    world_size: int  # processes that trained together (torchrun / accelerate)
    steps: int  # optimizer steps taken
    n_traces: int
    dropped: dict[str, str]  # id -> why the trace was left out (too long with overlength="drop", ...)
    trainer: Any
    train_output: Any
    truncated: list[str]  # ids of the traces cut to max_length
    tokenized: Path  # the tokenised table's cache directory
    tokenized_reused: bool  # this process found the table built (by an earlier run or the main process)


def _bf16_default() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _fsdp_checkpoints_activations() -> bool:
    """True when an accelerate launch config turns FSDP's activation checkpointing on and FSDP
    will apply (accelerate uses FSDP on GPUs only; a CPU launch falls back to DDP)."""
    def flag(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    return flag("ACCELERATE_USE_FSDP") and flag("FSDP_ACTIVATION_CHECKPOINTING") and torch.cuda.is_available()


def _refuse_long_dense(impl: str, rows: TokenizedTraces, model: Any) -> None:
    """Stage 2 with a dense mask: refuse, before training, rows above DENSE_MASK_MAX_TOKENS."""
    longest = rows.max_tokens
    if impl in DENSE_MASK_IMPLEMENTATIONS and longest > DENSE_MASK_MAX_TOKENS:
        gib = dense_mask_bytes(1, longest, model.dtype) / 2**30
        raise UnsupportedAttentionError(
            f"stage 2 with {impl!r} attention builds a dense (B, 1, T, T) memento mask and the longest row has "
            f"{longest} tokens ({gib:.1f} GiB per row, limit {DENSE_MASK_MAX_TOKENS} tokens): train stage 2 with "
            f"attn_implementation='flex_attention' on a GPU, or lower max_length")


def _stage_collator(
    model: Any, tokenizer: Any, stage: int, attn_implementation: str | None, mask: MaskConfig, max_length: int | None,
    prompt_template: str | None, append_eos: bool, loss_on_prompt: bool, loss_on_think: bool, overlength: Overlength,
) -> tuple[str, MementoCollator]:
    """The stage's attention implementation (the model switched to it) and the collator that feeds it."""
    _check_stage(stage)
    current = getattr(model.config, "_attn_implementation", None)
    impl = attn_implementation or stage_attn_implementation(stage, current)
    if stage == 2:
        check_implementation(impl, DENSE_MASK_IMPLEMENTATIONS + FLEX_IMPLEMENTATIONS,
                             "stage 2 needs an attention implementation that reads a 4D mask")
    collator = MementoCollator(tokenizer, stage, mask, max_length, prompt_template, append_eos, loss_on_prompt,
                               FLEX_TILE if stage == 2 and impl in FLEX_IMPLEMENTATIONS else None, loss_on_think,
                               overlength)
    if impl != current:
        model.set_attn_implementation(impl)
    return impl, collator


def _training_arguments(
    output_dir: Path, recipe: dict[str, Any], training_args: dict[str, Any], *, gradient_checkpointing: bool,
    bf16: bool | None, save: bool, per_device_train_batch_size: int, gradient_accumulation_steps: int | None,
    global_batch_size: int,
) -> Any:
    """The `TrainingArguments` of a stage: the recipe's hyperparameters, the launch's defaults, and any other
    keyword (`training_args`, completed in place with those defaults)."""
    from transformers import TrainingArguments

    # transformers 5 renamed gradient checkpointing; use whichever name this version has
    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if _fsdp_checkpoints_activations() and gradient_checkpointing:
        log.info("FSDP checkpoints each wrapped layer's activations (launch config): the Trainer's own "
                 "gradient checkpointing is off (the two may not both be on)")
        gradient_checkpointing = False
    training_args.setdefault(ckpt, gradient_checkpointing)
    training_args.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", 1))  # processes a launcher started
    # launched as several processes without CUDA, Trainer only runs distributed (DDP over
    # gloo) when told it is on CPU; otherwise every process trains alone on all the data
    if not torch.cuda.is_available() and world > 1:
        training_args.setdefault("use_cpu", True)
    # every parameter of a causal LM gets a gradient; skip DDP's extra graph traversal
    training_args.setdefault("ddp_find_unused_parameters", False)
    if gradient_accumulation_steps is None:
        gradient_accumulation_steps = accumulation_for(global_batch_size, per_device_train_batch_size, world)
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=per_device_train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            bf16=_bf16_default() if bf16 is None else bf16,
            report_to=training_args.pop("report_to", "none"),
            save_strategy=training_args.pop("save_strategy", "steps" if save else "no"),
            remove_unused_columns=False,  # the rows carry layout columns the collator reads
            **recipe,
            **training_args,
        )
    except ValueError as e:  # a value of a training argument that transformers refuses (lr_scheduler_type=...)
        raise SFTError("TrainingArguments", f"refuses the options: {str(e).splitlines()[0]}") from None


def _tokenized_rows(args: Any, traces: Sequence[Trace], collator: MementoCollator, cache: Path,
                    tokenize_workers: int | None) -> TokenizedTraces:
    """The traces tokenised into the table at `cache`; ValueError if none is left to train on."""
    with args.main_process_first(desc="tokenising traces"):  # one build per node; the other ranks map it
        rows = tokenize_traces(traces, collator.encoder, cache, num_proc=tokenize_workers)
    if not len(rows):
        first = next(iter(rows.dropped.values()), "")
        raise ValueError(f"no trace left to train on ({len(rows.dropped)} dropped; the first: {first})")
    return rows


def _train(model: Any, tokenizer: Any, args: Any, collator: MementoCollator, rows: TokenizedTraces,
           mask: MaskConfig, callbacks: Sequence[Any] | None) -> tuple[Any, Any]:
    """Train with `MementoTrainer` (the model's KV cache off meanwhile): (the trainer, its train output)."""
    from .trainer import MementoTrainer

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache while training
    try:
        trainer = MementoTrainer(model=model, args=args, data_collator=collator, train_dataset=rows.rows,
                                 processing_class=tokenizer, callbacks=list(callbacks or []), memento_mask=mask)
        train_output = trainer.train()
    finally:
        model.config.use_cache = use_cache
    return trainer, train_output


def train_stage(
    model: Any, tokenizer: Any, traces: Sequence[Trace], stage: Literal[1, 2], output_dir: str | Path, *,
    mask: MaskConfig = MaskConfig(), max_length: int | None = None, overlength: Overlength = "truncate",
    prompt_template: str | None = None, append_eos: bool = True, loss_on_prompt: bool = False,
    loss_on_think: bool = PAPER_RECIPE.loss_on_think, cache_dir: str | Path | None = None,
    tokenize_workers: int | None = None,
    learning_rate: float = PAPER_RECIPE.learning_rate, num_train_epochs: float = PAPER_RECIPE.num_train_epochs,
    max_steps: int = -1, per_device_train_batch_size: int = 1, gradient_accumulation_steps: int | None = None,
    global_batch_size: int = PAPER_RECIPE.global_batch_size, warmup_steps: float = PAPER_RECIPE.warmup_steps,
    lr_scheduler_type: str = PAPER_RECIPE.lr_scheduler_type, weight_decay: float = PAPER_RECIPE.weight_decay,
    adam_beta1: float = PAPER_RECIPE.adam_beta1, adam_beta2: float = PAPER_RECIPE.adam_beta2,
    max_grad_norm: float = PAPER_RECIPE.max_grad_norm, bf16: bool | None = None,
    gradient_checkpointing: bool = PAPER_RECIPE.gradient_checkpointing, logging_steps: int = 10,
    save: bool = True, save_steps: int = PAPER_RECIPE.save_steps, seed: int = PAPER_RECIPE.seed,
    attn_implementation: str | None = None, callbacks: Sequence[Any] | None = None, **training_args: Any,
) -> StageResult:
    """Fine-tune `model` on `traces` for one stage with `MementoTrainer`.

    Stage 1 switches the model to `stage_attn_implementation(1)` (flash-attention 2 when
    available, else sdpa) and trains with plain causal attention; stage 2 switches it to
    flex_attention on CUDA, else eager/sdpa, and trains under `mask` (memento attention;
    a dense mask is refused above `DENSE_MASK_MAX_TOKENS` tokens). `attn_implementation`
    overrides the choice (stage 2 refuses one that ignores 4D masks).

    The traces are tokenised once into ``cache_dir`` (default ``output_dir/tokenized``) by the
    main process, and every rank maps that table (`tokenize_traces`; `tokenize_workers`
    processes tokenise). Traces longer than `max_length` tokens are truncated to it, or
    dropped with ``overlength="drop"``; both lists are in the result. With `save`, the whole
    model and the tokenizer are written to `output_dir` at the end (under FSDP too).
    bf16 defaults to on where CUDA supports it. Any other keyword goes to
    `TrainingArguments` (save_strategy, fsdp, deepspeed, ...). Under torchrun/accelerate
    every process calls this with the same arguments; `Trainer` handles the distribution.

    The defaults are the paper's recipe (`SFTRecipe`): gradient accumulation, unless given,
    makes up `global_batch_size` over the processes (`accumulation_for`), and a checkpoint is
    saved every `save_steps` steps (``save_strategy="no"`` to save none).
    """
    recipe = dict(learning_rate=learning_rate, num_train_epochs=num_train_epochs, max_steps=max_steps,
                  warmup_steps=warmup_steps, lr_scheduler_type=lr_scheduler_type, weight_decay=weight_decay,
                  adam_beta1=adam_beta1, adam_beta2=adam_beta2, max_grad_norm=max_grad_norm,
                  logging_steps=logging_steps, seed=seed, save_steps=save_steps)
    batch = dict(per_device_train_batch_size=per_device_train_batch_size, global_batch_size=global_batch_size,
                 gradient_accumulation_steps=gradient_accumulation_steps)
    check_stage_options({**recipe, **batch, "max_length": max_length, "tokenize_workers": tokenize_workers},
                        training_args)  # before the model is touched
    impl, collator = _stage_collator(model, tokenizer, stage, attn_implementation, mask, max_length,
                                     prompt_template, append_eos, loss_on_prompt, loss_on_think, overlength)
    output_dir = Path(output_dir)
    args = _training_arguments(output_dir, recipe, training_args, gradient_checkpointing=gradient_checkpointing,
                               bf16=bf16, save=save, **batch)
    cache = Path(cache_dir) if cache_dir is not None else output_dir / "tokenized"
    rows = _tokenized_rows(args, traces, collator, cache, tokenize_workers)
    if stage == 2:
        _refuse_long_dense(impl, rows, model)
    trainer, train_output = _train(model, tokenizer, args, collator, rows, mask, callbacks)
    if save:
        trainer.save_model(str(output_dir))  # every rank joins (FSDP gathers); the main process writes
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return StageResult(stage, output_dir, losses, args.world_size, trainer.state.global_step, len(rows),
                       rows.dropped, trainer, train_output, rows.truncated, rows.path, rows.reused)


def two_stage_sft(
    model: Any,
    tokenizer: Any,
    traces: Sequence[Trace],
    output_dir: str | Path,
    *,
    traces_stage2: Sequence[Trace] | None = None,
    mask: MaskConfig = MaskConfig(),
    add_tokens: bool = True,
    stage1: Mapping[str, Any] | None = None,
    stage2: Mapping[str, Any] | None = None,
    **common: Any,
) -> tuple[StageResult, StageResult]:
    """Stage 1 (causal) then stage 2 (memento attention) on the same model.

    With `add_tokens`, the Memento markers missing from the tokenizer are added first and
    their embeddings initialised (`kvprobe.data.traces.add_memento_tokens`). Stage 1 writes to
    ``output_dir/stage1``, stage 2 to ``output_dir/stage2`` (the final model).
    `traces_stage2` defaults to `traces`. `common` keywords go to both `train_stage`
    calls, `stage1`/`stage2` to one (they win over `common`). Both stages share one
    tokenised table, ``output_dir/tokenized`` unless `cache_dir` is given in `common`.
    """
    if add_tokens:
        add_memento_tokens(tokenizer, model)
    output_dir = Path(output_dir)
    common.setdefault("cache_dir", output_dir / "tokenized")
    first = train_stage(model, tokenizer, traces, 1, output_dir / "stage1", mask=mask,
                        **{**common, **(stage1 or {})})
    second = train_stage(model, tokenizer, traces if traces_stage2 is None else traces_stage2, 2,
                         output_dir / "stage2", mask=mask, **{**common, **(stage2 or {})})
    return first, second


def exit_if_launched() -> None:
    """Under a launcher (torchrun, accelerate), end this rank's process here; call it last,
    once the model is saved. Does nothing when no process group is open.

    The Trainer leaves its process group open, held by DDP's reducer. Freeing the reducer
    joins gloo's worker threads while holding the GIL, and a worker still releasing its last
    all-gather needs the GIL to drop that work's tensors: a deadlock, seen in CI under load
    (py-spy: the main thread in ~ProcessGroupGloo -> std::thread::join, a worker in
    ~AsyncAllgatherWork -> gil_scoped_acquire; pytorch/pytorch#75097 and #179291 describe the
    family). Interpreter teardown with the group still alive can abort a rank instead. So a
    launched rank closes the group (local, no collective), flushes its output and leaves with
    `os._exit(0)`: nothing is left to free, the model and tokenizer are already on disk.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
