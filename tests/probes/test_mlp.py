"""MLP probe training on the CPU: subnormal floats are flushed while it trains, and that changes no bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

import kvprobe.probes.mlp as mlp
from kvprobe.probes import MLPConfig, fit_mlp_probes, flush_denormals

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("before", [False, True])
def test_flush_denormals_sets_and_puts_back(before):
    torch.set_flush_denormal(before)
    try:
        assert mlp.flushing_denormals() is before
        with flush_denormals():
            assert mlp.flushing_denormals()
            assert torch.tensor([1e-39]).mul(1.0).item() == 0.0
        assert mlp.flushing_denormals() is before
    finally:
        torch.set_flush_denormal(False)


def test_training_flushes_and_then_restores(monkeypatch):
    seen = []
    x, y = torch.randn(1, 64, 8), torch.randint(0, 10, (1, 64, 2))
    fit_mlp_probes(x, y, 10, MLPConfig(hidden=(16,), max_epochs=2, holdout_fraction=0), 0,
                   on_epoch=lambda e, m: seen.append(mlp.flushing_denormals()))
    assert seen == [True, True] and not mlp.flushing_denormals()


def test_a_memorising_probe_is_bit_identical_with_and_without_flushing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 512, 16, generator=g), torch.randint(0, 10, (1, 512, 2), generator=g)  # random labels
    config = MLPConfig(hidden=(128,), lr=3e-2, max_epochs=300, holdout_fraction=0, l2=0, batch_size=64)
    flushed, _ = fit_mlp_probes(x, y, 10, config, 0)
    monkeypatch.setattr(mlp, "flush_denormals", contextlib.nullcontext)
    plain, _ = fit_mlp_probes(x, y, 10, config, 0)
    with torch.no_grad():
        p = torch.softmax(plain(x), dim=-1)
    assert bool((p < SMALLEST_NORMAL).any())  # the regime that made CPU epochs ~100x slower was reached
    assert all(torch.equal(a, b) for a, b in zip(flushed.parameters(), plain.parameters()))
