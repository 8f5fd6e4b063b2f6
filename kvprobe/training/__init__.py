"""Training Memento models: the two-stage SFT of `training.sft` (transformers' Trainer)."""
