"""The SFT hyperparameters, `SFTRecipe`, and the paper's (`PAPER_RECIPE`), for `kvprobe.training.sft`.

Plain data, no torch: `kvprobe sft --help` shows the paper's values without loading torch;
`kvprobe.training.sft` trains with them and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PAPER_RECIPE", "SFTRecipe"]


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
