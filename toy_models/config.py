"""The toy's options, plain data without torch: `TrainConfig` (a training run) and `InitScheme` (the
weights' first draw), so `kvprobe toy train --help` lists them at once. `toy_models.train` and
`toy_models.model` use them and re-export them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

__all__ = ["DEFAULT_WHEN_ADDED", "SCHEDULES", "InitScheme", "TrainConfig"]

SCHEDULES = ("constant", "cosine")
# what a saved run that lacks a field used, where that differs from the field's default today (issue 30
# untied the head and decays the learning rate at the end by default)
DEFAULT_WHEN_ADDED = {"tied": True, "decay": 0}
RUNTIME = ("device", "out_dir", "threads")  # where and how fast a run goes: not among its settings


@dataclass(frozen=True)
class InitScheme:
    """How the toy's weights are first drawn (LayerNorms are always 1 / 0).

    embedding: token and position embeddings ~ N(0, embedding**2); "gpt2" = 0.02
    linear:    attention and MLP weights. "gpt2": transformers' GPT-2 init, N(0, 0.02)
               with the residual projections scaled by 1/sqrt(2 * n_layer), biases 0;
               "pytorch": what torch.nn.Linear draws, U(+-1/sqrt(fan_in)) for weights
               and biases; a number s: N(0, s**2), biases 0.

    PyTorch's defaults (`PYTORCH_INIT`: embeddings N(0, 1), linear U(+-1/sqrt(fan_in)))
    give the paper's toy pattern; GPT-2's (`GPT2_INIT`) give mementos that keep little
    of their block (docs/toy.md, "What sets the leak").
    """

    embedding: float | str = 1.0
    linear: float | str = "pytorch"

    def __post_init__(self) -> None:
        for name in ("embedding", "linear"):
            v = getattr(self, name)
            allowed = ("gpt2", "pytorch") if name == "linear" else ("gpt2",)
            if isinstance(v, str) and v not in allowed or not isinstance(v, (str, int, float)) or (
                not isinstance(v, str) and not (math.isfinite(v) and v > 0)
            ):
                raise ValueError(f"init {name} must be a positive number or one of {allowed}, got {v!r}")

    def name(self) -> str:
        return f"embed-{self.embedding}_linear-{self.linear}"


def _opt(default: Any, help: str) -> Any:
    """A TrainConfig field with the help text `kvprobe toy train` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Hyperparameters and bookkeeping of one training run.

    The defaults are the shipped toy's recipe (docs/toy.md, "What sets the leak" and "How fast
    a recipe learns"): PyTorch-default initialisation, an untied output head, no gradient
    clipping, batch 64, learning rate 1e-3 constant for 70% of the steps and then linearly to
    0, no weight decay, fresh sequences every step. The toy shipped before issue 30
    (`tied-clip`) tied its head, clipped at 1.0 and kept the learning rate constant to the end.
    """

    steps: int = _opt(3000, "optimizer steps")
    batch_size: int = _opt(64, "sequences per step")
    lr: float = _opt(1e-3, "peak AdamW learning rate")
    warmup: int = _opt(0, "linear warmup steps; then constant, or cosine decay to 0 at the last step")
    schedule: str = _opt("constant", "learning-rate schedule after warmup: constant or cosine")
    decay: float = _opt(0.3, "with the constant schedule, the last fraction of the steps decays the learning rate "
                              "linearly to 0 (0: constant to the end)")
    weight_decay: float = _opt(0.0, "AdamW weight decay on matrices (not biases, LayerNorms, embeddings)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    grad_clip: float | None = _opt(None, "max gradient norm, or none")
    init_embedding: float | str = _opt(1.0, "std of the embeddings' N(0, std), or gpt2 (0.02)")
    init_linear: float | str = _opt("pytorch", "linear weights: pytorch U(+-1/sqrt(fan_in)), gpt2, or a std")
    tied: bool = _opt(False, "tie the output head to the token embedding")
    n_embd: int = _opt(128, "model width (heads of 32 dims, MLP 4x): the capacity study")
    n_layer: int = _opt(4, "transformer layers: the capacity study")
    train_set: int | None = _opt(None, "a fixed set of this many sequences seen for epochs, or none: fresh every step")
    keep_last_n_blocks: int = _opt(0, "the training mask's keep N: the last N finished blocks stay visible (0: the paper's)")
    seed: int = _opt(0, "model init and training data seed")
    eval_every: int = _opt(50, "log loss and task accuracy every N steps")
    save_every: int = _opt(50, "write a checkpoint every N steps")
    eval_samples: int = _opt(1000, "held-out sequences per logged evaluation")
    device: str = _opt("cpu", "torch device, e.g. cpu or cuda")
    out_dir: str = "runs/toy"
    threads: int | None = None  # torch CPU threads; None leaves torch's default

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "save_every", "eval_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("warmup and weight_decay must be >= 0 and lr > 0")
        if not 0 <= self.decay < 1 or self.decay_steps > self.steps - self.warmup:
            raise ValueError(f"decay must be a fraction in [0, 1) of the steps after warmup, got {self.decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.train_set is not None and self.train_set < self.batch_size:
            raise ValueError(f"train_set must hold at least one batch ({self.batch_size}), got {self.train_set}")
        if self.n_embd < 32 or self.n_embd % 32 or self.n_layer < 1:
            raise ValueError(f"n_embd must be a positive multiple of 32 and n_layer >= 1, got {self.n_embd}, {self.n_layer}")
        if self.keep_last_n_blocks < 0:
            raise ValueError(f"keep_last_n_blocks must be >= 0, got {self.keep_last_n_blocks}")
        if not 0 <= self.seed < 2**30:
            raise ValueError(f"seed must be in [0, 2**30), got {self.seed}")
        self.init  # validates the init fields

    @property
    def decay_steps(self) -> int:
        """How many of the last steps decay the learning rate (the constant schedule's; cosine decays them all)."""
        return round(self.decay * self.steps) if self.schedule == "constant" else 0

    @property
    def init(self) -> InitScheme:
        """The initialisation scheme the init_* fields describe."""
        return InitScheme(embedding=self.init_embedding, linear=self.init_linear)

    @classmethod
    def from_run_settings(cls, saved: Mapping[str, Any]) -> TrainConfig:
        """The config a saved run's settings (its train_config.json, written from `run_settings`) describe: a
        setting the run predates takes what runs used then (`DEFAULT_WHEN_ADDED`), as a resume reads it; a
        setting this version lacks (a run from a later one) is a ValueError, not dropped."""
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"settings this version lacks ({', '.join(unknown)})")
        return cls(**{**DEFAULT_WHEN_ADDED, **saved})

    def differing_settings(self, other: TrainConfig) -> list[str]:
        """The settings (fields but `RUNTIME`) on which `other` differs from this config, sorted."""
        return sorted(f.name for f in fields(self) if f.name not in RUNTIME and getattr(self, f.name) != getattr(other, f.name))

    def run_settings(self) -> dict[str, Any]:
        """The settings that define the run's results (not where or how fast it runs). keep_last_n_blocks
        and decay are left out at 0, what every run made before the options used, so the records written from these
        settings (a checkpoint's meta.json, recipe_study's committed JSON) stay as they were; a resume
        reads a setting its saved run lacks as the default anyway (train._prepare_run_dir)."""
        settings = {k: v for k, v in asdict(self).items() if k not in RUNTIME}
        for name in ("keep_last_n_blocks", "decay"):  # options added later: left out at 0, as runs before them
            if settings[name] == 0:
                del settings[name]
        return settings
