"""Mask checks shared by the mask tests (tests/memento/): every MaskConfig option, the brute-force
reference as a function of a config, and equality checks that name the first mismatch.

    from tests.helpers.masks import ALL_CONFIGS, assert_mask_equal, config_id, reference
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kvprobe.memento.masks import MaskConfig
from tests.helpers.models import decode
from tests.helpers.reference_mask import reference_allow_batch

KEEPS = (-1, 0, 1, 2, 3)
BASE_CONFIGS = [MaskConfig(k, d, r, e) for k, d, r, e in itertools.product(KEEPS, (False, True), (False, True), (False, True))]
# the fork's two options, only where they change anything: restart with keep N > 0; keep 0
FORK_OPTIONS = ([MaskConfig(k, d, True, e, restart_sees_kept_blocks=True)
                 for k, d, e in itertools.product((1, 2, 3), (False, True), (False, True))]
                + [MaskConfig(0, d, r, e, keep_last_block_for_answer=True)
                   for d, r, e in itertools.product((False, True), (False, True), (False, True))])
ALL_CONFIGS = BASE_CONFIGS + FORK_OPTIONS


def config_id(cfg: MaskConfig) -> str:
    delims = "Hidden" if cfg.mask_delimiters else "Visible"
    return (f"keep{cfg.keep_last_n_blocks}-delims{delims}-restart{int(cfg.restart_mode)}"
            + ("-evictAtSE" if cfg.evict_before_summary_end else "")
            + ("-seesKept" if cfg.restart_sees_kept_blocks else "")
            + ("-keepsLastBlock" if cfg.keep_last_block_for_answer else ""))


def reference(layouts, T, cfg: MaskConfig, window: int | None = None) -> torch.Tensor:
    return reference_allow_batch(layouts, T, cfg.keep_last_n_blocks, cfg.mask_delimiters, cfg.restart_mode,
                                 cfg.evict_before_summary_end, cfg.restart_sees_kept_blocks,
                                 cfg.keep_last_block_for_answer, window)


def describe_mismatch(got: torch.Tensor, want: torch.Tensor, input_ids: torch.Tensor) -> str:
    b, _, q, k = (got != want).nonzero()[0].tolist()
    return (
        f"row {b}: {decode(input_ids[b])}\n"
        f"first mismatch at query {q}, key {k}: allow_matrix={bool(got[b, 0, q, k])}, "
        f"reference={bool(want[b, 0, q, k])}"
    )


def assert_mask_equal(got, want, input_ids, attention_mask=None):
    """Equal masks; with attention_mask (B, T), only the rows of real queries are compared
    (a padding query's row is unspecified: nothing real ever reads its output)."""
    assert got.shape == want.shape and got.dtype == torch.bool
    if attention_mask is not None:
        padding_query = ~attention_mask.bool()[:, None, :, None]
        got, want = got & ~padding_query, want & ~padding_query
    if not torch.equal(got, want):
        pytest.fail(describe_mismatch(got, want, input_ids))


# a hand-computed example (test_masks.py checks it cell by cell)
#          0 1  2 3 4  5  6 7  8  9 10 11 12 13 14
EXAMPLE = "p BS a b BE SS m SE BS c BE SS n SE q"
T_EX = 15


BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices")


def assert_block_masks_equal(ours, ref, T):
    for name in BLOCK_MASK_FIELDS:
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.seq_lengths == ref.seq_lengths == (T, T)
