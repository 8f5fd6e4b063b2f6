"""Two-stage supervised fine-tuning of a Memento model on transformers' `Trainer`.

The Memento paper trains in two stages on the same kind of data (traces in the token
format of SPEC section 1):

    stage 1  full causal attention: the model learns the format (blocks, mementos,
             markers) while it can still see every block
    stage 2  memento attention: completed blocks are hidden from later tokens, so the
             model learns to reason forward from the mementos alone (SPEC section 2)

Stage 1 runs with ``attn_implementation="flash_attention_2"`` when the ``flash_attn``
package is installed and CUDA is present, else ``sdpa``; it gets a plain 2D padding
mask. Stage 2 needs a custom 4D mask, which the flash-attention paths ignore, so it runs
with ``sdpa`` (or ``eager`` if the model already uses it) and the collator supplies the
dense additive memento mask from `kvprobe.memento.forward.memento_inputs` plus position ids.

`MementoCollator` turns `Trace` objects into a padded batch (right padding):

    input_ids       (B, T) long     tokens of `render(trace)` (`tokenize_trace`), plus EOS
    labels          (B, T) long     the input ids, -100 on the prompt and on padding
    attention_mask  stage 1: (B, T) long, 1 on real tokens
                    stage 2: (B, 1, T, T) float in the model's dtype, 0 where a query may
                             attend a key under the memento mask, dtype-min elsewhere
    position_ids    stage 2 only: (B, T) long, 0.. on each row

Loss, as the paper's ("on all completion tokens"): every token from ``<think>`` on, the
assistant turn, is a target: block contents, delimiters, mementos, ``</think>``, the answer
and the EOS token. The prompt (the problem, any chat-template text) is context only
(``loss_on_think=False`` starts the targets at the first ``<|block_start|>``;
``loss_on_prompt=True`` trains on the prompt too). The hyperparameters default to the
paper's (`SFTRecipe`). With a ``prompt_template`` (e.g. `QWEN3_CHAT_TEMPLATE`) the trace's prompt is
wrapped in the chat format before rendering, so training matches what a served model
sees; kvprobe's capture wraps it the same way (`data.chat_template`, `kvprobe.data.chat`:
the fork's template by default for ChatML tokenizers).

The dense mask costs B x T x T values per batch (2 bytes each in bf16: 0.5 GB per
16K-token trace), and sdpa with a custom mask uses the memory-efficient kernel rather
than flash attention. Long traces therefore want batch size 1 with gradient accumulation.

Launch (one GPU, or DDP/FSDP through torchrun/accelerate; `Trainer` does the rest):

    kvprobe sft --model Qwen/Qwen3-8B --traces traces.jsonl --output-dir runs/sft
    torchrun --nproc-per-node 8 -m kvprobe sft --model ... --traces ... --output-dir ...
    accelerate launch --config_file fsdp.yaml -m kvprobe sft --model ... --traces ... --output-dir ...

See docs/real_models.md.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from ..memento.forward import DENSE_MASK_IMPLEMENTATIONS, check_implementation, memento_inputs
from ..memento.layout import Layout, SpecialTokens, parse_layout
from ..memento.masks import MaskConfig
from ..data.traces import Trace, TraceError, add_memento_tokens, tokenize_trace

__all__ = [
    "PAPER_RECIPE",
    "QWEN3_CHAT_TEMPLATE",
    "MementoCollator",
    "SFTRecipe",
    "accumulation_for",
    "exit_if_launched",
    "StageResult",
    "select_traces",
    "stage_attn_implementation",
    "train_stage",
    "two_stage_sft",
]

# Qwen3's chat format for one user turn and the assistant's reply (no system prompt, as
# the fork's memento_nosys.jinja); `render` adds the newline and <think> after it.
QWEN3_CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant"

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTRecipe:
    """The SFT hyperparameters, defaulting to the paper's (section 4 and appendix A.2.1, quoted
    beside each field; "We use the same hyperparameters for all models and stages").

    Not modelled: "Checkpoints are saved at regular intervals and evaluated on AIME24 to select
    the best checkpoint for Stage 2" — kvprobe saves every `save_steps` and runs stage 2 from
    the last stage-1 weights; to select, evaluate the saved checkpoints and start stage 2 from
    the chosen one (`kvprobe sft --stages 2 --model CHECKPOINT`).
    """

    learning_rate: float = 8e-5  # "learning rate 8 x 10^-5"
    lr_scheduler_type: str = "cosine"  # "with cosine schedule
    warmup_steps: float = 0.05  # and 5% warmup" (a float below 1 is a fraction of the steps)
    num_train_epochs: float = 5.0  # "5 epochs per stage"
    weight_decay: float = 0.0  # "AdamW optimizer (beta1=0.9, beta2=0.999, no weight decay)"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # "gradient clipping at 1.0"
    global_batch_size: int = 512  # "global batch size 512": gradient accumulation makes it up
    gradient_checkpointing: bool = True  # "gradient checkpointing"
    seed: int = 42  # "and seed 42"
    save_steps: int = 50  # "Checkpoints are saved every 50 steps (100 for Qwen3-32B)"
    max_length: int = 32768  # "Sequences are tokenized to a maximum length of 32,768 tokens"
    # "Loss is computed on all completion tokens (prompt tokens are masked via labels=-100)"; the
    # completion, the assistant turn, opens with <think>, so <think> is a target
    loss_on_think: bool = True


PAPER_RECIPE = SFTRecipe()


def accumulation_for(global_batch_size: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation steps that make per_device x world_size x steps the global batch (at least 1)."""
    if min(global_batch_size, per_device, world_size) < 1:
        raise ValueError(f"batch sizes must be >= 1, got global {global_batch_size}, per device {per_device}, "
                         f"world size {world_size}")
    return max(1, round(global_batch_size / (per_device * world_size)))


def stage_attn_implementation(stage: int, current: str | None = None) -> str:
    """The attention implementation a stage trains with.

    Stage 1: ``flash_attention_2`` when flash_attn is installed and CUDA is present,
    else ``sdpa``. Stage 2: the model's `current` implementation if it reads a dense 4D
    mask (``eager``/``sdpa``), else ``sdpa``.
    """
    _check_stage(stage)
    if stage == 1:
        return "flash_attention_2" if find_spec("flash_attn") is not None and torch.cuda.is_available() else "sdpa"
    return current if current in DENSE_MASK_IMPLEMENTATIONS else "sdpa"


def _check_stage(stage: int) -> None:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (causal attention) or 2 (memento attention), got {stage!r}")


@dataclass
class MementoCollator:
    """Tokenize, pad and mask a batch of traces for one SFT stage (see the module docstring).

    tokenizer:       a fast tokenizer holding the six Memento markers
    stage:           1 (causal, 2D padding mask) or 2 (4D memento mask + position ids)
    model:           the model being trained; stage 2 reads its dtype and attention
                     implementation (must be eager or sdpa) to build the mask
    mask:            the memento mask of stage 2 (default: hide every completed block)
    max_length:      a longer trace raises ValueError (filter first with `select_traces`)
    prompt_template: a format string with ``{prompt}`` wrapped around each trace's prompt
    append_eos:      end each sequence with the tokenizer's EOS token (learn to stop)
    loss_on_think:   train on <think> (and what follows it), the assistant turn's first token
                     (the paper's; False: targets start at the first <|block_start|>)
    loss_on_prompt:  also train on the prompt tokens
    pad_to_multiple_of: round the padded length up (tensor-core friendly shapes)
    """

    tokenizer: Any
    stage: int
    model: Any = None
    mask: MaskConfig = field(default_factory=MaskConfig)
    max_length: int | None = None
    prompt_template: str | None = None
    append_eos: bool = True
    loss_on_prompt: bool = False
    pad_to_multiple_of: int | None = None
    loss_on_think: bool = PAPER_RECIPE.loss_on_think

    def __post_init__(self) -> None:
        _check_stage(self.stage)
        if self.stage == 2 and self.model is None:
            raise ValueError("the stage-2 collator needs the model (its dtype and attention implementation)")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if self.append_eos and eos is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        self.eos_id: int | None = eos if self.append_eos else None
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)

    def prepare(self, trace: Trace) -> Trace:
        """The trace as it is rendered for training (prompt wrapped in the template, if any)."""
        if self.prompt_template is None:
            return trace
        prompt = self.prompt_template.format(prompt=trace.prompt)
        return Trace(trace.trace_id, prompt, trace.blocks, trace.summaries, trace.answer)

    def encode(self, trace: Trace) -> tuple[list[int], Layout]:
        """Token ids of one trace (with EOS) and their layout; ValueError if longer than max_length."""
        ids_t, layout = tokenize_trace(self.prepare(trace), self.tokenizer, self.special)
        ids = ids_t.tolist()
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
            layout = parse_layout(ids, self.special)
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"trace {trace.trace_id!r} has {len(ids)} tokens, more than max_length="
                             f"{self.max_length} (drop long traces first with select_traces)")
        return ids, layout

    def labels_for(self, ids: list[int], layout: Layout) -> list[int]:
        """Targets of one unpadded row: the ids, with the prompt set to -100 unless loss_on_prompt
        (from <think> on, the assistant turn, it is a target with loss_on_think)."""
        labels = list(ids)
        if not self.loss_on_prompt:
            thinks = [p for p in layout.prompt if ids[p] == self.special.think]
            stop = thinks[-1] if self.loss_on_think and thinks else layout.prompt.stop
            for p in range(layout.prompt.start, stop):
                labels[p] = IGNORE_INDEX
        return labels

    def __call__(self, features: Sequence[Trace | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        traces = [f["trace"] if isinstance(f, Mapping) else f for f in features]
        if not traces or not all(isinstance(t, Trace) for t in traces):
            raise TypeError("MementoCollator takes a non-empty list of Trace (or {'trace': Trace}) features")
        rows = [self.encode(t) for t in traces]
        T = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            T = math.ceil(T / self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, (ids, layout) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            labels[b, :n] = torch.tensor(self.labels_for(ids, layout))
            attention_mask[b, :n] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
        if self.stage == 1:
            batch["attention_mask"] = attention_mask
            return batch
        # right padding: each row's layout (parsed at offset 0) indexes the padded row as is
        batch.update(memento_inputs(self.model, input_ids, [lay for _, lay in rows], self.mask, attention_mask))
        return batch


def select_traces(traces: Sequence[Trace], collator: MementoCollator) -> tuple[list[Trace], list[str]]:
    """Split traces into those that fit `collator.max_length` (and tokenize into valid
    Memento structure) and the ids of those that do not."""
    kept: list[Trace] = []
    dropped: list[str] = []
    for t in traces:
        try:
            collator.encode(t)
        except (ValueError, TraceError):
            dropped.append(t.trace_id)
            continue
        kept.append(t)
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
    dropped: list[str]  # ids of traces left out (too long for max_length)
    trainer: Any
    train_output: Any


def _bf16_default() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_stage(
    model: Any,
    tokenizer: Any,
    traces: Sequence[Trace],
    stage: Literal[1, 2],
    output_dir: str | Path,
    *,
    mask: MaskConfig = MaskConfig(),
    max_length: int | None = None,
    prompt_template: str | None = None,
    append_eos: bool = True,
    loss_on_prompt: bool = False,
    loss_on_think: bool = PAPER_RECIPE.loss_on_think,
    learning_rate: float = PAPER_RECIPE.learning_rate,
    num_train_epochs: float = PAPER_RECIPE.num_train_epochs,
    max_steps: int = -1,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int | None = None,
    global_batch_size: int = PAPER_RECIPE.global_batch_size,
    warmup_steps: float = PAPER_RECIPE.warmup_steps,
    lr_scheduler_type: str = PAPER_RECIPE.lr_scheduler_type,
    weight_decay: float = PAPER_RECIPE.weight_decay,
    adam_beta1: float = PAPER_RECIPE.adam_beta1,
    adam_beta2: float = PAPER_RECIPE.adam_beta2,
    max_grad_norm: float = PAPER_RECIPE.max_grad_norm,
    bf16: bool | None = None,
    gradient_checkpointing: bool = PAPER_RECIPE.gradient_checkpointing,
    logging_steps: int = 10,
    save: bool = True,
    save_steps: int = PAPER_RECIPE.save_steps,
    seed: int = PAPER_RECIPE.seed,
    attn_implementation: str | None = None,
    callbacks: Sequence[Any] | None = None,
    **training_args: Any,
) -> StageResult:
    """Fine-tune `model` on `traces` for one stage with transformers' `Trainer`.

    Stage 1 switches the model to `stage_attn_implementation(1)` (flash-attention 2 when
    available, else sdpa) and trains with plain causal attention; stage 2 switches it to
    eager/sdpa and trains under `mask` (memento attention). `attn_implementation`
    overrides the choice (stage 2 refuses one that ignores 4D masks). Traces longer than
    `max_length` tokens are dropped (their ids are in the result). With `save`, the model
    and tokenizer are written to `output_dir` at the end. bf16 defaults to on where CUDA
    supports it. Any other keyword goes to `TrainingArguments` (fsdp, deepspeed,
    save_strategy, ...). Under torchrun/accelerate every process calls this with the
    same arguments; `Trainer` handles the distribution.

    The defaults are the paper's recipe (`SFTRecipe`): gradient accumulation, unless given,
    makes up `global_batch_size` over the processes (`accumulation_for`), and a checkpoint is
    saved every `save_steps` steps (``save_strategy="no"`` to save none).
    """
    from transformers import Trainer, TrainingArguments

    _check_stage(stage)
    current = getattr(model.config, "_attn_implementation", None)
    impl = attn_implementation or stage_attn_implementation(stage, current)
    if stage == 2:
        check_implementation(impl, DENSE_MASK_IMPLEMENTATIONS, "stage 2 needs an attention implementation that "
                                                               "reads a 4D mask")
    if impl != current:
        model.set_attn_implementation(impl)

    collator = MementoCollator(tokenizer, stage, model if stage == 2 else None, mask, max_length,
                               prompt_template, append_eos, loss_on_prompt, loss_on_think=loss_on_think)
    kept, dropped = select_traces(traces, collator) if max_length is not None else (list(traces), [])
    if not kept:
        raise ValueError(f"no trace left to train on ({len(dropped)} dropped as longer than max_length={max_length})")

    output_dir = Path(output_dir)
    # transformers 5 renamed gradient checkpointing; use whichever name this version has
    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
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
    args = TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler_type,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        max_grad_norm=max_grad_norm,
        bf16=_bf16_default() if bf16 is None else bf16,
        logging_steps=logging_steps,
        seed=seed,
        report_to=training_args.pop("report_to", "none"),
        save_strategy=training_args.pop("save_strategy", "steps" if save else "no"),
        save_steps=save_steps,
        remove_unused_columns=False,  # the features are Trace objects, not model columns
        **training_args,
    )
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache while training
    try:
        trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=kept,
                          processing_class=tokenizer, callbacks=list(callbacks or []))
        train_output = trainer.train()
    finally:
        model.config.use_cache = use_cache
    if save:
        trainer.save_model(str(output_dir))  # main process only; tokenizer via processing_class
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return StageResult(stage, output_dir, losses, args.world_size, trainer.state.global_step, len(kept), dropped,
                       trainer, train_output)


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
    calls, `stage1`/`stage2` to one (they win over `common`).
    """
    if add_tokens:
        add_memento_tokens(tokenizer, model)
    output_dir = Path(output_dir)
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
