"""kvprobe.memento.masks against a brute-force reference written from SPEC section 2."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from kvprobe.memento.layout import parse_batch, parse_layout
from kvprobe.memento.masks import MaskConfig, additive_mask, allow_matrix, flex_block_mask, flex_mask_mod
from tests.helpers.masks import (ALL_CONFIGS, BASE_CONFIGS, EXAMPLE, T_EX, assert_block_masks_equal, assert_mask_equal,
                                 config_id, reference)
from tests.helpers.models import SPECIAL, encode
from tests.helpers.strategies import padded_batches

# --------------------------------------------------------------------------- a hand-computed example (EXAMPLE)


def expected_from_hidden(hidden: dict[int, set[int]]) -> torch.Tensor:
    """Causal (T_EX x T_EX) matrix with hidden[q] removed from row q."""
    allow = torch.ones(T_EX, T_EX, dtype=torch.bool).tril()
    for q, keys in hidden.items():
        for k in keys:
            allow[q, k] = False
    return allow[None, None]


def rows(qs, keys) -> dict[int, set[int]]:
    return {q: set(keys) for q in qs}


HAND_COMPUTED = [
    # plain memento mask: block 0's content hidden after SE_0 = 7, block 1's after SE_1 = 13
    (MaskConfig(0), {**rows(range(8, 14), {2, 3}), 14: {2, 3, 9}}),
    # delimiters hidden with the content
    (MaskConfig(0, True), {**rows(range(8, 14), {1, 2, 3, 4}), 14: {1, 2, 3, 4, 8, 9, 10}}),
    # keep 1: only block 0 is hidden, and only once block 1 is completed too
    (MaskConfig(1), {14: {2, 3}}),
    (MaskConfig(2), {}),
    (MaskConfig(-1), {}),
    # restart: memento tokens lose every block up to their own, as well as the base rule
    (MaskConfig(0, False, True), {**rows(range(5, 8), {2, 3}), **rows(range(8, 11), {2, 3}),
                                  **rows(range(11, 14), {2, 3, 9}), 14: {2, 3, 9}}),
    (MaskConfig(0, True, True), {**rows(range(5, 8), {1, 2, 3, 4}), **rows(range(8, 11), {1, 2, 3, 4}),
                                 **rows(range(11, 14), {1, 2, 3, 4, 8, 9, 10}), 14: {1, 2, 3, 4, 8, 9, 10}}),
    # restart with masking otherwise off: only memento rows lose anything
    (MaskConfig(-1, False, True), {**rows(range(5, 8), {2, 3}), **rows(range(11, 14), {2, 3, 9})}),
    # restart with keep 1: M_1 still loses block 0, which the base rule alone would keep
    (MaskConfig(1, False, True), {**rows(range(5, 8), {2, 3}), **rows(range(11, 14), {2, 3, 9}), 14: {2, 3}}),
    # ... but the fork re-prefills M_1 while block 1 is kept: it loses block 0 only, M_0 nothing
    (MaskConfig(1, False, True, restart_sees_kept_blocks=True), {**rows(range(11, 14), {2, 3}), 14: {2, 3}}),
    # the fork's keep_last_block_for_answer: block 0 goes at block 1's start (8), block 1 never
    (MaskConfig(0, keep_last_block_for_answer=True), rows(range(8, 15), {2, 3})),
    # ... and in restart mode M_0 is re-prefilled then, blind to block 0; M_1 keeps its block
    (MaskConfig(0, True, True, keep_last_block_for_answer=True), {**rows(range(5, 8), {1, 2, 3, 4}),
                                                                  **rows(range(8, 15), {1, 2, 3, 4})}),
]


@pytest.mark.parametrize("cfg, hidden", HAND_COMPUTED, ids=[config_id(c) for c, _ in HAND_COMPUTED])
def test_hand_computed_example(cfg, hidden):
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    want = expected_from_hidden(hidden)
    ids = torch.tensor([encode(EXAMPLE)])
    # the reference is checked too: it is only as good as its agreement with hand computation
    assert_mask_equal(reference([lay], T_EX, cfg), want, ids)
    assert_mask_equal(allow_matrix([lay], T_EX, cfg), want, ids)


def test_fillers_between_block_end_and_summary_are_never_hidden():
    #        0  1 2  3 4  5 6  7 8
    text = "BS a BE f SS m SE g h"
    lay = parse_layout(encode(text), SPECIAL)
    allow = allow_matrix([lay], 9, MaskConfig(0, True, True))[0, 0]
    assert allow[8].tolist() == [False, False, False, True, True, True, True, True, True]
    # restart: the memento cannot see the block, but the filler (not part of M_0) can
    assert allow[4, :5].tolist() == [False, False, False, True, True]
    assert allow[3, :4].tolist() == [True, True, True, True]


def test_unfinished_block_is_never_hidden_by_the_base_rule():
    #        0  1 2  3  4  5 6  7 8  9
    text = "BS a BE SS SE BS b BE SS m"
    lay = parse_layout(encode(text), SPECIAL, allow_unfinished=True)
    allow = allow_matrix([lay], 10, MaskConfig(0))[0, 0]
    assert allow[9].tolist() == [True, False, True, True, True, True, True, True, True, True]
    restart = allow_matrix([lay], 10, MaskConfig(0, False, True))[0, 0]
    assert restart[9].tolist() == [True, False, True, True, True, True, False, True, True, True]


# --------------------------------------------------------------------------- property: every option


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
@settings(max_examples=25, deadline=None)
@given(batch=padded_batches(allow_unfinished=True))
def test_allow_matrix_matches_reference(cfg, batch):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    T = batch.input_ids.shape[1]
    assert_mask_equal(allow_matrix(layouts, T, cfg), reference(layouts, T, cfg), batch.input_ids, batch.attention_mask)


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS))
def test_flex_mask_mod_evaluated_densely_equals_allow_matrix(batch, cfg):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    dense = create_mask(flex_mask_mod(layouts, T, cfg), B, 1, T, T, device="cpu")
    assert_mask_equal(dense, allow_matrix(layouts, T, cfg), batch.input_ids)


@pytest.mark.parametrize("cfg", [MaskConfig(0), MaskConfig(1, True, True)], ids=config_id)
def test_flex_block_mask_attention_equals_dense_attention(cfg):
    from torch.nn.attention.flex_attention import flex_attention

    ids = torch.tensor([encode("p q " + EXAMPLE + " </think> A"), encode("_ _ _ " + EXAMPLE + " r")])
    mask = (ids != 0).long()
    layouts = parse_batch(ids, SPECIAL, mask)
    B, T = ids.shape
    block_mask = flex_block_mask(layouts, T, cfg, block_size=8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, T, 8, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(q, k, v, block_mask=block_mask)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allow_matrix(layouts, T, cfg))
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- structural properties


@settings(max_examples=60, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS))
def test_diagonal_allowed_for_real_tokens_and_padding_isolated(batch, cfg):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    allow = allow_matrix(layouts, T, cfg)[:, 0]
    real = batch.attention_mask.bool()
    assert allow.diagonal(dim1=1, dim2=2).all()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert not (allow & ~causal).any(), "a key after its query is allowed"
    for b in range(B):
        # real queries never see padding keys; a padding query sees no padding key but its own
        # (its row is not empty, so softmax stays finite; what real keys it sees is unspecified)
        assert not allow[b][real[b]][:, ~real[b]].any()
        pad_rows_on_pad_keys = allow[b][~real[b]][:, ~real[b]]
        n_pad = int((~real[b]).sum())
        assert torch.equal(pad_rows_on_pad_keys, torch.eye(n_pad, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(allow_unfinished=True))
def test_keep_minus_one_without_restart_is_plain_causal(batch):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    allow = allow_matrix(layouts, T, MaskConfig(-1, True, False))[:, 0]
    real = batch.attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b in range(B):
        want = causal & real[b][None, :] & real[b][:, None]
        assert torch.equal(allow[b][real[b]], want[real[b]])


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), delims=st.booleans(), restart=st.booleans())
def test_keeping_more_blocks_never_hides_more(batch, delims, restart):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    T = batch.input_ids.shape[1]
    masks = [allow_matrix(layouts, T, MaskConfig(k, delims, restart)) for k in (0, 1, 2, 3)]
    for fewer, more in zip(masks, masks[1:]):
        assert not (fewer & ~more).any()
    # and hiding delimiters too never shows more
    if delims:
        for k in (0, 1, 2, 3):
            assert not (masks[k] & ~allow_matrix(layouts, T, MaskConfig(k, False, restart))).any()


def test_summary_prompt_and_answer_keys_never_hidden():
    text = "p <think> " + EXAMPLE + " </think> A B"
    lay = parse_layout(encode(text), SPECIAL)
    T = lay.length
    never_hidden = set(lay.prompt) | set(lay.answer) | {lay.think_end}
    for b in lay.blocks:
        never_hidden |= set(b.memento)
    for cfg in ALL_CONFIGS:
        allow = allow_matrix([lay], T, cfg)[0, 0]
        for k in never_hidden:
            assert allow[k:, k].all(), f"{config_id(cfg)}: key {k} hidden from some later query"


# --------------------------------------------------------------------------- additive mask and config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_additive_mask_is_zero_or_dtype_min(dtype):
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    allow = allow_matrix([lay], T_EX, MaskConfig(0, True, True))
    mask = additive_mask(allow, dtype)
    assert mask.dtype == dtype and mask.shape == allow.shape
    assert torch.equal(mask[allow], torch.zeros(int(allow.sum()), dtype=dtype))
    assert (mask[~allow] == torch.finfo(dtype).min).all()
    assert (~allow).any()


def test_additive_mask_refuses_non_boolean_input():
    with pytest.raises(TypeError, match="bool"):
        additive_mask(torch.ones(1, 1, 2, 2), torch.float32)


def test_mask_config_validation_and_names():
    with pytest.raises(ValueError, match="keep_last_n_blocks"):
        MaskConfig(-2)
    with pytest.raises(ValueError, match="keep_last_block_for_answer works with keep_last_n_blocks=0 only"):
        MaskConfig(1, keep_last_block_for_answer=True)
    assert MaskConfig(-1).name == "causal"
    assert MaskConfig(0).name == "memento"
    # the fork's restart evicts the delimiters too: restart mode hides them unless told otherwise
    assert MaskConfig(restart_mode=True) == MaskConfig(0, True, True)
    assert MaskConfig(0, True, True).name == "restart"  # the report's word for the fork's restart
    assert MaskConfig(0, False, True).name == "restart-delims-visible"  # a kvprobe-only control
    assert MaskConfig(1, mask_delimiters=True).name == "memento-keep1-delims-hidden"
    assert MaskConfig(0, evict_before_summary_end=True).name == "memento-evict-at-se"
    assert MaskConfig(-1, True, True, True).name == "restart-keepall"  # nothing is evicted: no timing to name
    assert MaskConfig(2, restart_mode=True, restart_sees_kept_blocks=True).name == "restart-keep2-sees-kept"
    assert MaskConfig(0, keep_last_block_for_answer=True).name == "memento-keeps-last-block"
    assert MaskConfig(1, True, True, True).name == "restart-keep1"  # restart's <|summary_end|> never sees its block
    assert len({c.name for c in BASE_CONFIGS if c.keep_last_n_blocks >= 0}) == 24


def test_the_forks_timing_hides_a_block_from_its_own_summary_end():
    """SPEC section 2: the fork evicts as soon as <|summary_end|> is sampled, before its KV."""
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    base = allow_matrix([lay], T_EX, MaskConfig(0))[0, 0]
    fork = allow_matrix([lay], T_EX, MaskConfig(0, evict_before_summary_end=True))[0, 0]
    assert base[7, 2] and base[7, 3] and not fork[7, 2] and not fork[7, 3]  # SE of block 0 and its content a, b
    assert fork[7, 4] and fork[7, 6]  # its delimiter (visible) and its own memento stay
    changed = (base != fork).nonzero().tolist()
    assert changed == [[7, 2], [7, 3], [13, 9]]  # SE_0 and SE_1 lose their own block, nothing else changes


def test_layout_longer_than_the_batch_is_refused():
    lay = parse_layout(encode(EXAMPLE), SPECIAL)
    with pytest.raises(ValueError, match="beyond"):
        allow_matrix([lay], T_EX - 1, MaskConfig(0))


def test_mask_config_names_are_equal_exactly_when_masks_are():
    """One name per mask: configs share a name iff their masks agree (on sequences that tell them apart)."""
    texts = [EXAMPLE + " BS x BE SS o SE BS y BE SS z SE </think> A", "p BS a BE f SS m SE g BS b BE SS n SE"]
    layouts = [parse_layout(encode(t), SPECIAL) for t in texts]
    T = max(lay.length for lay in layouts)
    masks: dict[str, torch.Tensor] = {}
    for cfg in ALL_CONFIGS:
        mask = allow_matrix(layouts, T, cfg)
        if cfg.name in masks:
            assert torch.equal(masks[cfg.name], mask), f"{cfg.name}: one name, two masks"
        masks[cfg.name] = mask
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(masks[a], masks[b]), f"{a} and {b}: two names, one mask"


def test_padding_query_attends_only_itself():
    from tests.helpers.models import SPECIAL

    from kvprobe.memento.layout import parse_batch

    ids = torch.tensor([[7, 8, 0, 0]])
    layouts = parse_batch(ids, SPECIAL, torch.tensor([[1, 1, 0, 0]]))
    allow = allow_matrix(layouts, 4)[0, 0]
    assert allow[2].tolist() == [False, False, True, False]
    assert allow[3].tolist() == [False, False, False, True]


@pytest.mark.parametrize("block_size", [2, 8, 16])
@pytest.mark.parametrize("cfg", [MaskConfig(0), MaskConfig(1, True, True), MaskConfig(-1)], ids=config_id)
def test_flex_block_mask_equals_torch_create_block_mask(cfg, block_size):
    """The interval-built block mask is torch's own (dense-evaluated) one: same partial and full tiles, same order."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = torch.tensor([encode("p q " + EXAMPLE + " </think> A"), encode("_ _ _ " + EXAMPLE + " r")])
    layouts = parse_batch(ids, SPECIAL, (ids != 0).long())
    B, T = ids.shape
    assert T % block_size or block_size == 2  # a ragged last tile is covered
    ours = flex_block_mask(layouts, T, cfg, block_size=block_size)
    ref = create_block_mask(flex_mask_mod(layouts, T, cfg), B, None, T, T, device="cpu", BLOCK_SIZE=block_size)
    assert_block_masks_equal(ours, ref, T)
    assert int(ours.kv_num_blocks.sum()) > 0
    if block_size == 2:  # small tiles: some are entirely allowed, so "full" tiles are covered too
        assert int(ours.full_kv_num_blocks.sum()) > 0


@settings(max_examples=60, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS),
       block_size=st.sampled_from([1, 2, 3, 4, 8]))
def test_interval_block_mask_equals_create_block_mask_for_every_option(batch, cfg, block_size):
    """Random layouts (left and right padding, unfinished blocks), every mask option, tiles that do and do
    not divide T: the interval construction equals torch's dense evaluation of the same predicate."""
    from torch.nn.attention.flex_attention import create_block_mask

    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    ours = flex_block_mask(layouts, T, cfg, block_size=block_size)
    ref = create_block_mask(flex_mask_mod(layouts, T, cfg), B, None, T, T, device="cpu", BLOCK_SIZE=block_size)
    assert_block_masks_equal(ours, ref, T)


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(allow_unfinished=True), cfg=st.sampled_from(ALL_CONFIGS),
       block_size=st.sampled_from([1, 2, 4]))
def test_interval_block_mask_tiles_equal_the_brute_force_reference(batch, cfg, block_size):
    """Independent of the predicate: a tile is full exactly where the SPEC reference allows every entry
    (real queries), and has some entry exactly where the reference allows one."""
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    B, T = batch.input_ids.shape
    if T % block_size:
        return  # ragged tiles are covered against create_block_mask above
    ref = reference(layouts, T, cfg)[:, 0]  # (B, T, T)
    real = batch.attention_mask.bool()
    ref = ref | (~real[:, :, None] & torch.eye(T, dtype=torch.bool))  # a padding query sees itself (unspecified there)
    ref = ref & (real[:, :, None] | torch.eye(T, dtype=torch.bool))
    n = T // block_size
    tiles = ref.view(B, n, block_size, n, block_size)
    every, some = tiles.all(4).all(2), tiles.any(4).any(2)
    ours = flex_block_mask(layouts, T, cfg, block_size=block_size)
    dense = ours.to_dense()[:, 0].bool()  # (B, n, n): tiles listed as partial or full
    full = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            for j in ours.full_kv_indices[b, 0, i, : ours.full_kv_num_blocks[b, 0, i]].tolist():
                full[b, i, j] = True
    assert torch.equal(full, every)
    assert torch.equal(dense, some)


def test_chunk_rows_is_accepted_with_a_deprecation_warning():
    ids = torch.tensor([encode("p q " + EXAMPLE)])
    layouts = parse_batch(ids, SPECIAL)
    with pytest.warns(DeprecationWarning, match="chunk_rows is ignored"):
        old = flex_block_mask(layouts, ids.shape[1], MaskConfig(0), "cpu", 8, 2048)
    assert_block_masks_equal(old, flex_block_mask(layouts, ids.shape[1], MaskConfig(0), block_size=8), ids.shape[1])


def test_interval_block_mask_cost_does_not_grow_with_t_squared():
    """At 32K tokens and 50 blocks the tables and the interval grid stay small: the whole build allocates
    O(T + tiles^2 + blocks^2), not the 1G entries of the dense mask (a torch allocation hook counts bytes)."""
    from kvprobe.memento.budget import LargestTensor
    from kvprobe.memento.masks import block_mask_from_tables, mask_tables

    T, n_blocks = 32768, 50
    ids = [1]
    per = (T - 2) // n_blocks
    for _ in range(n_blocks):
        ids += [3] + [9] * (per - 10) + [4, 5] + [9] * 6 + [6]
    ids += [2] + [9] * (T - len(ids) - 1)
    lay = parse_layout(ids, SPECIAL)
    tables = mask_tables([lay], T, MaskConfig(0))
    with LargestTensor() as seen:
        mask = block_mask_from_tables(tables)
    assert seen.nbytes < 4 * 2**20, f"a {seen.nbytes / 2**20:.0f} MiB tensor was made"
    assert mask.shape == (1, 1, T, T)
    assert int(mask.kv_num_blocks.sum()) > 0


def test_the_reference_generator_refuses_the_forks_timing():
    """It compacts after <|summary_end|>'s KV is computed; the fork's timing is a mask option only."""
    from kvprobe.memento.generate import generate_with_compaction

    with pytest.raises(ValueError, match="evict_before_summary_end"):
        generate_with_compaction(None, [1], SPECIAL, MaskConfig(0, evict_before_summary_end=True), max_new_tokens=1)


def test_eviction_timing_is_named_for_every_mask():
    from kvprobe.reporting.words import eviction_timing

    said = {m.name: eviction_timing(m.name) for m in (
        MaskConfig(0), MaskConfig(0, evict_before_summary_end=True), MaskConfig(-1), MaskConfig(restart_mode=True),
        MaskConfig(1, restart_mode=True, restart_sees_kept_blocks=True), MaskConfig(0, keep_last_block_for_answer=True))}
    assert "kvprobe's base rule" in said["memento"]
    assert "from its own <|summary_end|> on (the fork's served timing)" in said["memento-evict-at-se"]
    assert said["causal"] == "nothing is evicted"
    assert "kept blocks stay visible" in said["restart-keep1-sees-kept"]
    assert "keep_last_block_for_answer" in said["memento-keeps-last-block"]
    assert not any(text.startswith("unknown") for text in said.values())
