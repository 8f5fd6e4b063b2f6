"""Shared fixtures for every test folder: the synthetic vocabulary's marker ids and tiny random models.

Helpers are the package tests/helpers/ (tiny models, stores, CLI runs, reference masks, ...);
tests import them as ``from tests.helpers.models import tiny_gpt2, SPECIAL, encode``. tests/ is a
package, so pytest puts the repository root on sys.path: nothing here touches it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.models import PAD_ID, SPECIAL, VOCAB_SIZE, encode, tiny_gpt2, tiny_qwen3

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
