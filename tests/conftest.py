"""Shared fixtures: the synthetic vocabulary's marker ids and tiny random models.

Helper modules live beside this file (models.py, strategies.py, reference_mask.py); test
files import them by name, e.g. ``from models import tiny_gpt2, SPECIAL, encode``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import torch

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS), str(_TESTS.parent)):  # `import models` and `import tests.models` both work
    if _path not in sys.path:
        sys.path.insert(0, _path)

from models import PAD_ID, SPECIAL, VOCAB_SIZE, encode, tiny_gpt2, tiny_qwen3  # noqa: E402

# the tests are small; more threads only contend on a shared machine. KVPROBE_THREADS pins the
# CLI's default too (otherwise it follows the machine's load), so every in-process run uses 1.
torch.set_num_threads(1)
os.environ.setdefault("KVPROBE_THREADS", "1")
# what the CLI sets at start-up, here before any product: in-process CLI calls share this MKL
from kvprobe.cli.runtime import reproducible_blas  # noqa: E402

reproducible_blas()

MODEL_FACTORIES = {"gpt2": tiny_gpt2, "qwen3": tiny_qwen3}


@pytest.fixture
def special():
    """SpecialTokens of the synthetic vocabulary (ids 1..6; 0 is padding, 7.. ordinary)."""
    return SPECIAL


@pytest.fixture
def vocab_size() -> int:
    return VOCAB_SIZE


@pytest.fixture
def pad_id() -> int:
    return PAD_ID


@pytest.fixture
def enc():
    """`encode`: readable text such as "p <think> BS a BE SS m SE" -> token ids."""
    return encode


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_factory(request):
    """Each tiny model family in turn: call it as factory(attn_implementation, seed=...)."""
    return MODEL_FACTORIES[request.param]
