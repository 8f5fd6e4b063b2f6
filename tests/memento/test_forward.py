"""kvprobe.memento.forward.masked_forward on tiny random GPT-2 and Qwen3 models.

GPT-2: learned positions, multi-head attention. Qwen3: RoPE, q/k RMS norm, grouped-query
attention (4 query heads, 2 KV heads). Both fp32 on CPU, random seeded weights.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvprobe.memento.forward import UnsupportedAttentionError, masked_forward, memento_inputs
from kvprobe.memento.layout import parse_batch, parse_layout
from kvprobe.memento.masks import MaskConfig, additive_mask, allow_matrix
from tests.helpers.models import ORDINARY_IDS, PAD_ID, SPECIAL, encode, tiny_gpt2, tiny_qwen3
from tests.helpers.strategies import memento_sequences, padded_batches

FAMILIES = {"gpt2": tiny_gpt2, "qwen3": tiny_qwen3}
IMPLS = ("eager", "sdpa")
ATOL = 1e-5  # fp32 eager vs sdpa differ by ~3e-6 on logits of magnitude ~4

MEMENTO = MaskConfig(0)
LEAK_FREE = MaskConfig(0, mask_delimiters=True, restart_mode=True)
CONFIGS = [MaskConfig(-1), MEMENTO, MaskConfig(1), MaskConfig(0, True), MaskConfig(0, False, True), LEAK_FREE]
CONFIG_IDS = [c.name for c in CONFIGS]

#          0 1 2       3  4 5 6 7  8  9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24       25 26
SEQUENCE = "p q <think> BS a b c BE SS x SE BS d e  BE SS y  z  SE BS g  BE SS w  SE </think> A  B"


@functools.cache
def model(family: str, impl: str):
    """One tiny model per (family, implementation); same seed, so eager and sdpa share weights."""
    return FAMILIES[family](impl, seed=0)


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([encode(text)])


@torch.no_grad()
def logits(family: str, impl: str, input_ids, cfg: MaskConfig, attention_mask=None) -> torch.Tensor:
    out = masked_forward(
        model(family, impl), input_ids, special=SPECIAL, config=cfg, attention_mask=attention_mask
    )
    return out.logits


def test_tiny_models_are_what_the_tests_claim():
    gpt2, qwen3 = model("gpt2", "eager"), model("qwen3", "sdpa")
    assert gpt2.config._attn_implementation == "eager" and qwen3.config._attn_implementation == "sdpa"
    attn = qwen3.model.layers[0].self_attn
    assert qwen3.config.num_key_value_heads < qwen3.config.num_attention_heads
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert max(SPECIAL.__dict__.values()) < gpt2.config.vocab_size
    # same seed, same weights under either implementation
    assert torch.equal(model("gpt2", "eager").lm_head.weight, model("gpt2", "sdpa").lm_head.weight)


def test_model_factory_fixture(model_factory, special, vocab_size):
    """The conftest factories: seeded, vocabulary size honoured, markers inside the vocabulary."""
    a, b, c = model_factory("sdpa", seed=3), model_factory("eager", seed=3), model_factory("sdpa", seed=4)
    assert a.config.vocab_size == vocab_size and max(special.__dict__.values()) < vocab_size
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    bigger = model_factory("eager", vocab_size=vocab_size + 16)
    assert bigger.get_output_embeddings().weight.shape[0] == vocab_size + 16
    assert not a.training


# --------------------------------------------------------------------------- eager == sdpa


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family, cfg):
    ids = ids_of(SEQUENCE)
    torch.testing.assert_close(logits(family, "eager", ids, cfg), logits(family, "sdpa", ids, cfg), atol=ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(max_rows=2), family=st.sampled_from(list(FAMILIES)), cfg=st.sampled_from(CONFIGS))
def test_eager_and_sdpa_agree_on_random_padded_batches(batch, family, cfg):
    real = batch.attention_mask.bool()
    eager = logits(family, "eager", batch.input_ids, cfg, batch.attention_mask)
    sdpa = logits(family, "sdpa", batch.input_ids, cfg, batch.attention_mask)
    torch.testing.assert_close(eager[real], sdpa[real], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- against plain causal


def causal_prefix(allow: torch.Tensor) -> torch.Tensor:
    """(T,) bool: position q and every position before it have a plain causal mask row.

    Only there must the outputs equal a causal forward: a query whose own row is causal
    still reads the keys of earlier tokens, whose states differ if their rows differ.
    """
    T = allow.shape[-1]
    row_is_causal = (allow == torch.ones(T, T, dtype=torch.bool).tril()).all(-1)
    return row_is_causal.cumprod(0).bool()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=CONFIG_IDS[1:])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_causal_exactly_where_the_mask_is_causal(family, impl, cfg):
    ids = ids_of(SEQUENCE)
    T = ids.shape[1]
    allow = allow_matrix(parse_batch(ids, SPECIAL), T, cfg)[0, 0]
    same = causal_prefix(allow)
    assert same.any() and not same.all(), "the example must have both kinds of positions"
    if not cfg.restart_mode:
        # with the base rule alone the hidden set only grows with q: a causal row means a causal prefix
        row_is_causal = (allow == torch.ones(T, T, dtype=torch.bool).tril()).all(-1)
        assert torch.equal(row_is_causal, same)
    masked = logits(family, impl, ids, cfg)[0]
    with torch.no_grad():
        causal = model(family, impl)(input_ids=ids).logits[0]
    torch.testing.assert_close(masked[same], causal[same], atol=ATOL, rtol=0)
    differ = (masked[~same] - causal[~same]).abs().amax(-1)
    assert (differ > 1e-3).all(), f"masking changed nothing at some positions: {differ}"


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_minus_one_is_plain_causal(family):
    ids = ids_of(SEQUENCE)
    masked = logits(family, "sdpa", ids, MaskConfig(-1, mask_delimiters=True))
    with torch.no_grad():
        causal = model(family, "sdpa")(input_ids=ids).logits
    torch.testing.assert_close(masked, causal, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- an independent reference


@torch.no_grad()
def visible_subsequence_logits(family: str, ids: torch.Tensor, allow: torch.Tensor, q: int) -> torch.Tensor:
    """Logits at q from running the model on only the keys q may see, at their original positions."""
    keep = allow[q].nonzero().flatten()
    out = model(family, "eager")(input_ids=ids[:, keep], position_ids=keep[None])
    return out.logits[0, -1]


def self_consistent(allow: torch.Tensor, q: int) -> bool:
    """Every key q sees, sees exactly what q sees before it: then a compacted run is exact."""
    keys = allow[q].nonzero().flatten().tolist()
    return all(torch.equal(allow[k, : k + 1], allow[q, : k + 1]) for k in keys)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_leak_free_mask_equals_running_on_the_visible_tokens_only(family, impl):
    """Restart mode with delimiters hidden (and no tokens between <|block_end|> and
    <|summary_start|>) is a text-only mask: each position's output must equal a plain
    causal run over the tokens it may see, keeping their original position ids. This is
    the dense-vs-compacted contract of SPEC section 2, with an independent reference."""
    text = "p q <think> BS a b c BE SS x SE f BS d e BE SS y z SE BS g BE SS SE </think> A"
    ids = ids_of(text)
    T = ids.shape[1]
    allow = allow_matrix(parse_batch(ids, SPECIAL), T, LEAK_FREE)[0, 0]
    assert all(self_consistent(allow, q) for q in range(T))
    masked = logits(family, impl, ids, LEAK_FREE)[0]
    for q in range(T):
        torch.testing.assert_close(masked[q], visible_subsequence_logits(family, ids, allow, q), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_memento_mask_is_not_a_visible_tokens_run(family):
    """The plain memento mask keeps the implicit channel: after SE_0, a position's output is
    NOT what the visible tokens alone give (the mementos' states saw the hidden block)."""
    ids = ids_of(SEQUENCE)
    T = ids.shape[1]
    allow = allow_matrix(parse_batch(ids, SPECIAL), T, MEMENTO)[0, 0]
    masked = logits(family, "eager", ids, MEMENTO)[0]
    se0 = 10
    for q in range(T):
        compacted = visible_subsequence_logits(family, ids, allow, q)
        if q <= se0:
            assert self_consistent(allow, q)
            torch.testing.assert_close(masked[q], compacted, atol=ATOL, rtol=0)
        else:
            assert not self_consistent(allow, q)
            assert (masked[q] - compacted).abs().max() > 1e-3


# --------------------------------------------------------------------------- padded batches


PADDED_ROWS = [
    "p q <think> BS a b c BE SS x SE BS d BE SS y z SE </think> A",
    "p <think> BS a BE SS SE BS b c BE SS m SE",
    "p",
]


def padded(rows: list[str], side: str, extra: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    seqs = [encode(r) for r in rows]
    T = max(map(len, seqs)) + extra
    ids = torch.full((len(seqs), T), PAD_ID)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        off = T - len(s) if side == "left" else 0
        ids[b, off : off + len(s)] = torch.tensor(s)
        mask[b, off : off + len(s)] = 1
        offsets.append(off)
    return ids, mask, offsets


@pytest.mark.parametrize("cfg", [MEMENTO, LEAK_FREE, MaskConfig(1, True)], ids=lambda c: c.name)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_the_sequence_run_alone(family, impl, side, cfg):
    ids, mask, offsets = padded(PADDED_ROWS, side)
    batch = logits(family, impl, ids, cfg, mask)
    for b, (row, off) in enumerate(zip(PADDED_ROWS, offsets)):
        alone = logits(family, impl, ids_of(row), cfg)[0]
        torch.testing.assert_close(batch[b, off : off + alone.shape[0]], alone, atol=ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    batch=padded_batches(min_rows=2, max_rows=3),
    family=st.sampled_from(list(FAMILIES)),
    cfg=st.sampled_from(CONFIGS),
)
def test_random_padded_rows_equal_the_sequence_run_alone(batch, family, cfg):
    out = logits(family, "sdpa", batch.input_ids, cfg, batch.attention_mask)
    for b, (sample, off) in enumerate(zip(batch.samples, batch.offsets)):
        alone = logits(family, "sdpa", torch.tensor([sample.ids]), cfg)[0]
        torch.testing.assert_close(out[b, off : off + len(sample)], alone, atol=ATOL, rtol=0)


def test_left_padding_without_position_ids_would_be_wrong():
    """Guard for the test above: GPT-2's learned positions make padding offsets matter, so
    a forward that forgot to shift position ids on left-padded rows would be caught."""
    ids, mask, offsets = padded(PADDED_ROWS, "left")
    layouts = parse_batch(ids, SPECIAL, mask)
    m = model("gpt2", "sdpa")
    float_mask = additive_mask(allow_matrix(layouts, ids.shape[1], MEMENTO), m.dtype)
    with torch.no_grad():
        unshifted = m(input_ids=ids, attention_mask=float_mask).logits  # position ids 0..T-1
    alone = logits("gpt2", "sdpa", ids_of(PADDED_ROWS[1]), MEMENTO)[0]
    off = offsets[1]
    assert (unshifted[1, off : off + alone.shape[0]] - alone).abs().max() > 1e-3


def test_layouts_can_be_given_instead_of_special_tokens():
    ids, mask, _ = padded(PADDED_ROWS, "left")
    layouts = parse_batch(ids, SPECIAL, mask)
    m = model("qwen3", "sdpa")
    with torch.no_grad():
        given_layouts = masked_forward(m, ids, layouts=layouts, config=MEMENTO, attention_mask=mask).logits
    torch.testing.assert_close(given_layouts, logits("qwen3", "sdpa", ids, MEMENTO, mask), atol=0, rtol=0)
    with pytest.raises(ValueError, match="layouts"):
        masked_forward(m, ids, layouts=layouts[:1], attention_mask=mask)
    with pytest.raises(ValueError, match="special"):
        masked_forward(m, ids, attention_mask=mask)


# --------------------------------------------------------------------------- mask form and refusals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memento_inputs_give_a_float_mask_in_the_model_dtype(dtype):
    m = tiny_qwen3("eager", dtype=dtype)
    ids, mask, offsets = padded(PADDED_ROWS, "left")
    layouts = parse_batch(ids, SPECIAL, mask)
    kwargs = memento_inputs(m, ids, layouts, MEMENTO, mask)
    assert kwargs["attention_mask"].dtype == dtype
    allow = allow_matrix(layouts, ids.shape[1], MEMENTO)
    assert torch.equal(kwargs["attention_mask"] == 0, allow)
    assert kwargs["position_ids"][1, offsets[1]:].tolist() == list(range(ids.shape[1] - offsets[1]))


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "paged_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_attention_implementation_is_refused(family, impl):
    m = FAMILIES[family]("sdpa")
    # constructing with attn_implementation="flash_attention_2" needs the flash-attn package
    # (transformers raises ImportError without it), so fake the configured implementation
    m.config._attn_implementation = impl
    assert m.config._attn_implementation == impl
    with pytest.raises(UnsupportedAttentionError) as info:
        masked_forward(m, ids_of(SEQUENCE), special=SPECIAL)
    assert "sdpa" in str(info.value) and impl in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_boolean_mask_is_misread_by_eager_which_is_why_we_pass_floats(family):
    """SPEC pitfall: a boolean 4D mask is honoured by sdpa but added as +1/0 by eager."""
    ids = ids_of(SEQUENCE)
    T = ids.shape[1]
    allow = allow_matrix(parse_batch(ids, SPECIAL), T, MEMENTO)
    right = logits(family, "eager", ids, MEMENTO)
    with torch.no_grad():
        eager_bool = model(family, "eager")(input_ids=ids, attention_mask=allow).logits
        sdpa_bool = model(family, "sdpa")(input_ids=ids, attention_mask=allow).logits
    # sdpa reads the boolean mask correctly; eager does not
    torch.testing.assert_close(sdpa_bool, right, atol=ATOL, rtol=0)
    assert (eager_bool - right).abs().max() > 1e-2
    # eager + boolean even loses causality: the first position sees the future
    changed = ids.clone()
    changed[0, -1] = ORDINARY_IDS[0] if changed[0, -1] != ORDINARY_IDS[0] else ORDINARY_IDS[1]
    with torch.no_grad():
        eager_bool_changed = model(family, "eager")(input_ids=changed, attention_mask=allow).logits
    assert (eager_bool_changed[0, 0] - eager_bool[0, 0]).abs().max() > 1e-4
    assert torch.equal(logits(family, "eager", changed, MEMENTO)[0, 0], right[0, 0])


# --------------------------------------------------------------------------- leak-free invariance


def replace_content(ids: list[int], positions, shift: int = 1) -> list[int]:
    """A copy with the tokens at `positions` replaced by other ordinary tokens."""
    out = list(ids)
    n = len(ORDINARY_IDS)
    for p in positions:
        out[p] = ORDINARY_IDS[(ORDINARY_IDS.index(out[p]) + shift) % n]
    return out


@torch.no_grad()
def run(family: str, impl: str, ids: list[int], cfg: MaskConfig):
    input_ids = torch.tensor([ids])
    out = masked_forward(model(family, impl), input_ids, special=SPECIAL, config=cfg, output_hidden_states=True)
    return out.logits[0], [h[0] for h in out.hidden_states]


def assert_leak_free(family, impl, ids, block: int, cfg=LEAK_FREE):
    """Changing block `block`'s content leaves every output after its <|summary_end|> exactly
    unchanged, and changes the outputs inside the block."""
    lay = parse_layout(ids, SPECIAL)
    blk = lay.blocks[block]
    assert len(blk.content) > 0
    changed = replace_content(ids, blk.content)
    logits_a, hidden_a = run(family, impl, ids, cfg)
    logits_b, hidden_b = run(family, impl, changed, cfg)
    after = slice(blk.summary_end + 1, None)
    # exact: hidden keys get weight exp(min - max) == 0.0, so their values add exactly 0
    assert torch.equal(logits_a[after], logits_b[after])
    for layer, (ha, hb) in enumerate(zip(hidden_a, hidden_b)):
        assert torch.equal(ha[after], hb[after]), f"hidden state {layer} changed after the block"
    inside = slice(blk.content.start, blk.content.stop)
    assert ((logits_a[inside] - logits_b[inside]).abs().amax(-1) > 1e-4).all()
    return logits_a, logits_b


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [0, 1, 2])
def test_leak_free_mask_hides_a_block_exactly(family, impl, block):
    assert_leak_free(family, impl, encode(SEQUENCE), block)


LEAKY = [
    pytest.param(MEMENTO, id="memento"),
    pytest.param(MaskConfig(0, mask_delimiters=True), id="memento-delims-hidden"),
    # restart with visible delimiters: <|block_end|>'s KV saw the block (SPEC section 2)
    pytest.param(MaskConfig(0, mask_delimiters=False, restart_mode=True), id="restart-delims-visible"),
]


@pytest.mark.parametrize("cfg", LEAKY)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [0, 1])
def test_other_masks_leak_the_hidden_block(family, block, cfg):
    """The control: with the implicit channel open, every position after the block changes."""
    ids = encode(SEQUENCE)
    blk = parse_layout(ids, SPECIAL).blocks[block]
    logits_a, _ = run(family, "eager", ids, cfg)
    logits_b, _ = run(family, "eager", replace_content(ids, blk.content), cfg)
    after = slice(blk.summary_end + 1, None)
    assert ((logits_a[after] - logits_b[after]).abs().amax(-1) > 0).all()
    assert (logits_a[after] - logits_b[after]).abs().max() > 1e-4


def test_filler_between_block_end_and_summary_start_is_a_leak_too():
    """A token between <|block_end|> and <|summary_start|> saw the block and stays visible,
    so the leak-free guarantee needs those two markers adjacent (as real traces have them)."""
    text = "p <think> BS a b BE n SS x SE BS c BE SS y SE"
    ids = encode(text)
    blk = parse_layout(ids, SPECIAL).blocks[0]
    logits_a, _ = run("qwen3", "eager", ids, LEAK_FREE)
    logits_b, _ = run("qwen3", "eager", replace_content(ids, blk.content), LEAK_FREE)
    assert (logits_a[blk.summary_end + 1 :] - logits_b[blk.summary_end + 1 :]).abs().max() > 1e-4


@settings(max_examples=40, deadline=None)
@given(
    sample=memento_sequences(bridge_fillers=False, max_blocks=4),
    family=st.sampled_from(list(FAMILIES)),
    impl=st.sampled_from(IMPLS),
    data=st.data(),
)
def test_leak_free_invariance_on_random_sequences(sample, family, impl, data):
    with_content = [i for i, b in enumerate(sample.blocks) if b.content]
    assume(with_content)
    block = data.draw(st.sampled_from(with_content))
    assert_leak_free(family, impl, sample.ids, block)
