"""The toy Memento transformer of the paper's appendix A.4.2, trained and shipped.

    import toy_models
    model = toy_models.load()                       # final checkpoint, eval mode
    batch = toy_models.data.generate(1000, seed=1)  # (1000, 122) token ids + digits
    toy_models.task.task_accuracy(model)            # 0.86 on held-out sequences (the shipped `final`)

See docs/toy.md for the task, the training run and how to reproduce it.
"""

from . import data, model, task, vocab
from .checkpoint import CHECKPOINT_DIR, checkpoint_names, load, load_tokenizer, read_meta

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_names",
    "data",
    "load",
    "load_tokenizer",
    "model",
    "read_meta",
    "task",
    "vocab",
]
