"""The toy Memento transformer of the paper's appendix A.4.2, trained and shipped.

    import toy_models
    model = toy_models.load()                       # final checkpoint, eval mode
    batch = toy_models.data.generate(1000, seed=1)  # (1000, 122) token ids + digits
    toy_models.task.task_accuracy(model)            # 0.86 on held-out sequences (the shipped `final`)

See docs/toy.md for the task, the training run and how to reproduce it.
"""

from kvprobe import lazy_exports

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

# imported on first use (torch and transformers), so `kvprobe toy --help` answers at once
__getattr__, __dir__ = lazy_exports(__name__, {
    ".checkpoint": ("CHECKPOINT_DIR", "checkpoint_names", "load", "load_tokenizer", "read_meta"),
}, modules=("data", "model", "task", "vocab"))
