"""Train the toy Memento transformer under memento attention (keep_last_n_blocks = 0 unless the config says).

    from toy_models.train import TrainConfig, train
    train(TrainConfig(steps=3000, out_dir="runs/toy"))

A run directory holds train_config.json, training_log.jsonl (one line per evaluation:
step, loss, task accuracy, wall time) and step_XXXXXX/ checkpoints. Training batches
are drawn fresh every step from a seed derived from (config seed, step), so a run
needs no dataset and resuming needs no data-loader state: after an interruption,
`train(config, resume=True)` restarts from the last checkpoint and gives the same
weights as a run that never stopped (on the same device).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import (GPT2LMHeadModel, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_wsd_schedule)

from .checkpoint import TRAIN_STATE, save_checkpoint
from .config import SCHEDULES, TrainConfig  # the options, torch-free (for `kvprobe toy train --help`); re-exported here
from .data import SEQ_LEN, generate
from .model import build_model
from .task import heldout_seed, memento_attention, task_accuracy, task_loss, train_seed

__all__ = ["RunDirError", "SCHEDULES", "TrainConfig", "latest_checkpoint", "make_optimizer", "make_scheduler", "train", "train_step", "training_batch"]

CONFIG_FILE = "train_config.json"
LOG_FILE = "training_log.jsonl"
EVAL_SET = 0  # held-out set used for the accuracy logged during training
FIXED_SET_STEP = 2**32 - 1  # train_seed step reserved for drawing a fixed training set


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, or holds a different run)."""


@lru_cache(maxsize=2)
def _fixed_set(seed: int, n: int) -> torch.Tensor:
    """The fixed training set of a run that sees `n` sequences for epochs. (n, T)"""
    return generate(n, train_seed(seed, FIXED_SET_STEP)).input_ids


def training_batch(config: TrainConfig, step: int) -> torch.Tensor:
    """Input ids of the batch at `step` (0-based). (batch_size, T)

    Fresh sequences drawn from (seed, step); with `train_set`, the step's slice of that
    epoch's permutation of the fixed set (the last partial batch of an epoch is dropped).
    """
    if config.train_set is None:
        return generate(config.batch_size, train_seed(config.seed, step)).input_ids
    per_epoch = config.train_set // config.batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(config.train_set)
    return _fixed_set(config.seed, config.train_set)[order[k * config.batch_size : (k + 1) * config.batch_size]]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's checkpoint with the highest step that has a train state, else None."""
    ckpts = sorted(p for p in Path(out_dir).glob("step_[0-9]*") if p.is_dir() and (p / TRAIN_STATE).is_file())
    return ckpts[-1] if ckpts else None


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not embeddings, biases or LayerNorms)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant or cosine decay to 0 at `config.steps`; constant with `config.decay`:
    constant, then linear decay to 0 over the last `decay_steps` (transformers' warmup-stable-decay)."""
    if config.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, config.warmup, config.steps)
    if config.decay_steps:
        return get_wsd_schedule(optimizer, config.warmup, config.decay_steps, num_training_steps=config.steps,
                                decay_type="linear")
    return get_constant_schedule_with_warmup(optimizer, config.warmup)


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device: torch.device) -> str:
    """What a run's last bits depend on, for meta.json: on CPU the model, the kernels torch dispatched to
    (e.g. AVX512), MKL's reproducibility setting and the thread count; a run is bit for bit only where these match.
    MKL_CBWR is the environment variable as this process sees it (MKL reads it once, before its first product:
    `kvprobe.cli.runtime.reproducible_blas` sets it first thing)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU {_cpu_model()} ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}), {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def _prepare_run_dir(config: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory against the resume/overwrite flags; return a checkpoint to resume from."""
    if resume and overwrite:
        raise ValueError("pass resume or overwrite, not both")
    out = Path(config.out_dir)
    saved = out / CONFIG_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not saved.is_file():
                raise RunDirError(f"{out} is not empty and holds no {CONFIG_FILE}: refusing to delete it")
            shutil.rmtree(out)
        elif resume:
            if not saved.is_file():
                raise RunDirError(f"{out} is not empty and holds no {CONFIG_FILE}: not a toy training run")
            try:  # a setting the run predates: what runs used then
                before = TrainConfig.from_run_settings(json.loads(saved.read_text()))
            except ValueError as e:
                raise RunDirError(f"cannot resume {out}: its {CONFIG_FILE} has {e}") from None
            diff = before.differing_settings(config)
            latest = latest_checkpoint(out)
            if diff and set(diff) <= {"steps", "decay"} and _extendable(config, before, latest):
                saved.write_text(json.dumps(config.run_settings(), indent=2) + "\n")  # train on: same batches and lr so far
                return latest
            if diff:
                changes = ", ".join(f"{k}: {getattr(before, k)} -> {getattr(config, k)}" for k in diff)
                raise RunDirError(f"cannot resume {out}: settings differ from the saved run ({changes})")
            return latest
        else:
            raise RunDirError(f"{out} already holds a run; resume it or overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.run_settings(), indent=2) + "\n")
    return None


def train_step(model: GPT2LMHeadModel, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               ids: torch.Tensor, attention: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """One optimizer step on a batch `ids` (B, T) under the (1, 1, T, T) training mask `attention`: the
    task loss, backward, optional clipping of the gradient norm, AdamW and scheduler steps. Returns the
    batch's loss, detached (a 0-d tensor on the model's device)."""
    loss = task_loss(model, ids, attention)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


def _extendable(config: TrainConfig, saved: TrainConfig, latest: Path | None) -> bool:
    """Whether a run saved as `saved` may resume as `config` (other steps or decay) and give what
    `config` gives from the start: a constant schedule, whose batches and learning rates up to the last
    checkpoint do not depend on where the run ends, as long as neither run's decay had begun by then
    (a cosine schedule's learning rates depend on the end)."""
    done = int(latest.name.removeprefix("step_")) if latest is not None else 0
    stable = min(config.steps - config.decay_steps, saved.steps - saved.decay_steps if saved.decay_steps else config.steps)
    return config.schedule == "constant" and done <= stable


def train(
    config: TrainConfig, resume: bool = False, overwrite: bool = False, command: str | None = None
) -> GPT2LMHeadModel:
    """Train (or resume) a toy run into `config.out_dir`; return the final model in eval mode.

    resume: continue from the run's last checkpoint (start afresh if it has none yet); under a constant
    schedule a resume may also change `steps` and `decay`, so long as the learning rate so far is the
    same, and gives the weights a run asked for them from the start gives.
    overwrite: delete an existing run directory first. Without either, an existing
    non-empty run directory is refused. `command` is recorded in each checkpoint's
    meta.json (default: this process's command line).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for but CUDA is not available")
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])  # kvprobe ..., not its install path
    ckpt = _prepare_run_dir(config, resume, overwrite)
    out = Path(config.out_dir)

    if ckpt is None:
        model = build_model(config.seed, init=config.init, tied=config.tied, n_embd=config.n_embd,
                            n_layer=config.n_layer)
    else:
        model = GPT2LMHeadModel.from_pretrained(ckpt, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    start, wall_before = 0, 0.0
    loss_sum, loss_n, accuracy, accuracy_step = 0.0, 0, None, None  # loss since the last log line
    if ckpt is not None:
        state = torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)  # RNG states stay on CPU
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start, wall_before = state["step"], state["wall_time_s"]
        loss_sum, loss_n = state["loss_sum"], state["loss_n"]
        accuracy, accuracy_step = state["task_accuracy"], state["task_accuracy_step"]
    log_path = out / LOG_FILE
    if log_path.exists():  # drop lines written after the checkpoint we resume from
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))

    loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)  # summed on device: no sync per step
    attention = memento_attention(model, config.keep_last_n_blocks)  # one (1, 1, T, T) mask shared by every batch
    hardware = describe_hardware(device)
    t0 = time.perf_counter() - wall_before
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="toy train", unit="step")
    for step in bar:
        ids = training_batch(config, step).to(device, non_blocking=True)  # (B, T)
        loss = train_step(model, optimizer, scheduler, ids, attention, config.grad_clip)
        loss_sum += loss
        loss_n += 1
        done = step + 1
        last = done == config.steps
        if done % config.eval_every == 0 or last:
            accuracy = task_accuracy(model, config.eval_samples, heldout_seed(EVAL_SET),
                                     keep_last_n_blocks=config.keep_last_n_blocks)
            accuracy, accuracy_step = round(accuracy, 6), done
            model.train()
            record = {
                "step": done,
                "loss": round(loss_sum.item() / loss_n, 6),
                "task_accuracy": accuracy,
                "lr": scheduler.get_last_lr()[0],
                "tokens": done * config.batch_size * SEQ_LEN,
                "wall_time_s": round(time.perf_counter() - t0, 3),
            }
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{accuracy:.4f}")
            loss_sum.zero_()
            loss_n = 0
        if done % config.save_every == 0 or last:
            wall = time.perf_counter() - t0
            meta = {
                "seed": config.seed,
                "step": done,
                "task_accuracy": accuracy,  # on held-out set 0, measured at task_accuracy_step
                "task_accuracy_step": accuracy_step,
                "eval_samples": config.eval_samples,
                "wall_time_s": round(wall, 3),
                "hardware": hardware,
                "transformers": transformers.__version__,
                "command": command,
                "config": asdict(config),
            }
            state = {
                "step": done,
                "wall_time_s": wall,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "loss_sum": loss_sum.item(),
                "loss_n": loss_n,
                "task_accuracy": accuracy,
                "task_accuracy_step": accuracy_step,
            }
            if device.type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(model, out / f"step_{done:06d}", meta, state)
    bar.close()
    return model.eval()
