"""kvprobe.memento.generate: token-by-token generation with physical KV compaction against the
dense masked forward (the SPEC section 2 contract), on tiny random GPT-2 and Qwen3, fp32.

The replayed sequence has four blocks; block contents have 3, 3, 2 and 2 tokens, so the
expected cache sizes below are counted by hand, not derived from the code under test.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen3Config, Qwen3ForCausalLM

from kvprobe.memento.forward import UnsupportedAttentionError, masked_forward
from kvprobe.memento.generate import GenerationResult, evictable_positions, generate_with_compaction
from kvprobe.memento.layout import LayoutError, parse_layout
from kvprobe.memento.masks import MaskConfig, additive_mask, allow_matrix
from tests.helpers.models import PAD_ID, SPECIAL, VOCAB_SIZE, decode, encode, tiny_gpt2, tiny_qwen3
from tests.helpers.strategies import memento_sequences

FAMILIES = {"gpt2": tiny_gpt2, "qwen3": tiny_qwen3}
IMPLS = ("eager", "sdpa")
ATOL = 1e-5

# positions: 0 p, 1 q, 2 <think> | block 0: BS 3, content 4-6, BE 7, SS 8, x y 9-10, SE 11 |
# block 1: BS 12, content 13-15, BE 16, SS 17, 18-19, SE 20 | block 2: BS 21, content 22-23,
# BE 24, SS 25, 26, SE 27 | block 3: BS 28, content 29-30, BE 31, SS 32, 33-34, SE 35 |
# </think> 36, answer 37-38
SEQUENCE = (
    "p q <think> BS a b c BE SS x y SE BS d e f BE SS y z SE BS g h BE SS w SE "
    "BS k l BE SS u v SE </think> A B"
)
T = 39
N_CONTENT = 3 + 3 + 2 + 2  # content tokens of the four (completed) blocks
N_DELIMS = 2 * 4
# keys left in the cache at the end, counted by hand
EXPECTED_KEPT = {
    "memento": T - N_CONTENT,  # 29
    "memento-keep1": T - N_CONTENT + 2,  # the last block (k l) stays
    "memento-delims-hidden": T - N_CONTENT - N_DELIMS,  # 21
    "restart-delims-visible": T - N_CONTENT,
    "restart": T - N_CONTENT - N_DELIMS,  # the fork's restart evicts the delimiters too
    "restart-keep1-delims-visible": T - N_CONTENT + 2,
}
MEMENTO_CONFIGS = [MaskConfig(0), MaskConfig(1), MaskConfig(0, mask_delimiters=True)]
RESTART_CONFIGS = [MaskConfig(0, False, True), MaskConfig(0, True, True), MaskConfig(1, False, True)]
ALL_CONFIGS = MEMENTO_CONFIGS + RESTART_CONFIGS
EVICTION_CONFIGS = [MaskConfig(n, delims) for n in (-1, 0, 1, 2) for delims in (False, True)]


@functools.cache
def model(family: str, impl: str):
    return FAMILIES[family](impl, seed=0)


def sequence() -> torch.Tensor:
    ids = torch.tensor(encode(SEQUENCE))
    assert len(ids) == T
    return ids


@torch.no_grad()
def dense(family: str, impl: str, ids: torch.Tensor, cfg: MaskConfig, allow_unfinished: bool = False):
    """The dense masked forward with its full cache: (logits (T, V), cache)."""
    out = masked_forward(
        model(family, impl), ids[None], special=SPECIAL, config=cfg, use_cache=True, allow_unfinished=allow_unfinished
    )
    return out.logits[0], out.past_key_values


def replay(family: str, impl: str, ids: torch.Tensor, cfg: MaskConfig, prompt_length: int = 3) -> GenerationResult:
    """Teacher-force ids[prompt_length:] token by token through the compacting generator."""
    return generate_with_compaction(
        model(family, impl), ids[:prompt_length], SPECIAL, cfg, forced_ids=ids[prompt_length:]
    )


def memento_interiors(ids: torch.Tensor) -> torch.Tensor:
    """(T,) bool: memento tokens other than <|summary_end|> (<|summary_start|> included).

    In restart mode their generation-time rows see the block (as in the vLLM fork) while
    the dense restart forward's rows do not, so only their recomputed KV is compared.
    """
    out = torch.zeros(len(ids), dtype=torch.bool)
    for b in parse_layout(ids, SPECIAL, allow_unfinished=True).blocks:
        for p in b.memento:
            out[p] = p != b.summary_end
    return out


def assert_cache_matches(result: GenerationResult, dense_cache, positions: torch.Tensor) -> None:
    """The generator's cache slots holding `positions` equal the dense cache at those positions."""
    slot = {int(p): s for s, p in enumerate(result.kept_positions)}
    slots = torch.tensor([slot[int(p)] for p in positions], dtype=torch.long)
    for layer in range(len(dense_cache.layers)):
        keys, values = result.kv(layer)
        expected = dense_cache.layers[layer]
        torch.testing.assert_close(keys[:, :, slots], expected.keys[:, :, positions], atol=ATOL, rtol=0)
        torch.testing.assert_close(values[:, :, slots], expected.values[:, :, positions], atol=ATOL, rtol=0)


def assert_cache_is_compacted(result: GenerationResult) -> None:
    """Every layer holds exactly one slot per kept position, ascending, no duplicates."""
    kept = result.kept_positions
    assert torch.equal(kept, kept.unique()), "kept positions must be ascending and distinct"
    for layer in result.cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == len(kept)
    assert result.cache.get_seq_length() == len(kept)


# --------------------------------------------------------------------------- (1) memento mode


@pytest.mark.parametrize("cfg", MEMENTO_CONFIGS, ids=[c.name for c in MEMENTO_CONFIGS])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compacted_replay_equals_dense_forward(family, impl, cfg):
    ids = sequence()
    result = replay(family, impl, ids, cfg)
    logits, cache = dense(family, impl, ids, cfg)
    assert torch.equal(result.ids, ids) and result.prompt_length == 3
    torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=0)
    assert_cache_matches(result, cache, result.kept_positions)


# --------------------------------------------------------------------------- (2) restart mode


@pytest.mark.parametrize("cfg", RESTART_CONFIGS, ids=[c.name for c in RESTART_CONFIGS])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_restart_recomputes_memento_kv_as_the_dense_restart_forward(family, impl, cfg):
    ids = sequence()
    result = replay(family, impl, ids, cfg)
    logits, cache = dense(family, impl, ids, cfg)
    interior = memento_interiors(ids)
    # every kept position, memento tokens included, holds the dense restart KV
    assert_cache_matches(result, cache, result.kept_positions)
    assert int(interior[result.kept_positions].sum()) == 3 + 3 + 2 + 3  # SS + memento text, all kept
    # logits everywhere outside memento interiors (each <|summary_end|> row comes from the re-prefill)
    torch.testing.assert_close(result.logits[~interior], logits[~interior], atol=ATOL, rtol=0)
    # the first memento was generated with its block visible: the memento-mode rows, not restart's
    first = torch.arange(8, 11)  # SS x y
    memento_logits, _ = dense(family, impl, ids, MaskConfig(cfg.keep_last_n_blocks, cfg.mask_delimiters))
    torch.testing.assert_close(result.logits[first], memento_logits[first], atol=ATOL, rtol=0)
    assert (result.logits[first] - logits[first]).abs().amax() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_restart_differs_from_memento_mode(family):
    """The recomputation is real: restart and memento replays disagree after the first memento."""
    ids = sequence()
    restart = replay(family, "sdpa", ids, RESTART_CONFIGS[0])
    memento = replay(family, "sdpa", ids, MEMENTO_CONFIGS[0])
    assert torch.equal(restart.kept_positions, memento.kept_positions)
    torch.testing.assert_close(restart.logits[:11], memento.logits[:11], atol=ATOL, rtol=0)
    assert (restart.logits[11:] - memento.logits[11:]).abs().amax(-1).min() > 1e-4
    keys_r, _ = restart.kv(1)
    keys_m, _ = memento.kv(1)
    assert (keys_r - keys_m).abs().amax() > 1e-3


# --------------------------------------------------------------------------- (3) the cache shrinks


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=[c.name for c in ALL_CONFIGS])
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_really_shrinks(family, cfg):
    ids = sequence()
    result = replay(family, "eager", ids, cfg)
    assert_cache_is_compacted(result)
    assert len(result.kept_positions) == EXPECTED_KEPT[cfg.name] < T
    kept = set(result.kept_positions.tolist())
    assert {4, 5, 6, 13, 14, 15}.isdisjoint(kept), "contents of blocks 0 and 1 must be gone"
    assert {0, 1, 2, 8, 9, 10, 11, 36, 37, 38} <= kept, "prompt, mementos and answer are never dropped"
    assert ({3, 7} <= kept) != cfg.mask_delimiters


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_drops_nothing(family):
    ids = sequence()
    result = replay(family, "sdpa", ids, MaskConfig(-1))
    assert torch.equal(result.kept_positions, torch.arange(T))
    logits, cache = dense(family, "sdpa", ids, MaskConfig(-1))
    torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=0)
    assert_cache_matches(result, cache, torch.arange(T))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_evicts_a_block_only_when_the_next_one_completes(family):
    ids = sequence()
    # stop right after the second <|summary_end|> (position 20): block 0 gone, block 1 kept
    result = replay(family, "eager", ids[:21], MaskConfig(1))
    kept = set(result.kept_positions.tolist())
    assert {4, 5, 6}.isdisjoint(kept) and {13, 14, 15} <= kept
    # and the final cache is compacted even though the sequence ends on <|summary_end|>
    assert_cache_is_compacted(result)
    assert len(kept) == 21 - 3


@pytest.mark.parametrize("cfg", [MaskConfig(0), MaskConfig(0, True, True)], ids=["memento", "restart"])
@pytest.mark.parametrize("prompt_length", [1, 12, 15, 27])
def test_prompt_with_blocks_is_compacted_at_prefill(prompt_length, cfg):
    """Prompts holding whole blocks (12: through SE_0), ending mid-block (15) or mid-memento
    (27: the memento started in the prompt is recomputed in restart mode) give the same result."""
    ids = sequence()
    result = replay("qwen3", "sdpa", ids, cfg, prompt_length=prompt_length)
    logits, cache = dense("qwen3", "sdpa", ids, cfg)
    same = ~memento_interiors(ids) if cfg.restart_mode else torch.ones(T, dtype=torch.bool)
    torch.testing.assert_close(result.logits[same], logits[same], atol=ATOL, rtol=0)
    assert_cache_matches(result, cache, result.kept_positions)
    assert len(result.kept_positions) == EXPECTED_KEPT[cfg.name]


# --------------------------------------------------------------------------- eviction rule


@settings(max_examples=60, deadline=None)
@given(
    sample=memento_sequences(allow_unfinished=True),
    cfg=st.sampled_from(EVICTION_CONFIGS),
)
def test_evictable_positions_are_exactly_the_keys_the_next_query_cannot_see(sample, cfg):
    """For every prefix: the evicted set is what the dense mask hides from the next query,
    and that query's hidden set stays hidden from every later query."""
    ids = sample.ids + [encode("a")[0]]  # one more (ordinary) token to serve as the next query
    n = len(ids)
    allow = allow_matrix([parse_layout(ids, SPECIAL, allow_unfinished=True)], n, cfg)[0, 0]
    for last in range(n - 1):
        layout = parse_layout(ids[: last + 1], SPECIAL, allow_unfinished=True)
        hidden = [k for k in range(last + 1) if not allow[last + 1, k]]
        assert evictable_positions(layout, cfg) == hidden, decode(ids[: last + 1])
        assert not allow[last + 1 :, hidden].any()


@settings(max_examples=12, deadline=None)
@given(
    sample=memento_sequences(max_blocks=4, allow_unfinished=True),
    family=st.sampled_from(list(FAMILIES)),
    cfg=st.sampled_from(ALL_CONFIGS),
    data=st.data(),
)
def test_random_replays_equal_the_dense_forward(sample, family, cfg, data):
    ids = torch.tensor(sample.ids)
    prompt_length = data.draw(st.integers(1, len(ids)))
    result = replay(family, "sdpa", ids, cfg, prompt_length)
    logits, cache = dense(family, "sdpa", ids, cfg, allow_unfinished=True)
    same = ~memento_interiors(ids) if cfg.restart_mode else torch.ones(len(ids), dtype=torch.bool)
    torch.testing.assert_close(result.logits[same], logits[same], atol=ATOL, rtol=0)
    kept = result.kept_positions
    if cfg.restart_mode:  # an unfinished trailing memento keeps its generation-time KV
        kept = kept[same[kept]]
    assert_cache_matches(result, cache, kept)
    assert_cache_is_compacted(result)


# --------------------------------------------------------------------------- (4) free generation


@torch.no_grad()
def dense_loop(m, ids: list[int], cfg: MaskConfig, n: int, temperature: float = 0.0, seed: int | None = None):
    """Independent reference: re-run the whole sequence densely at every step."""
    ids = list(ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(n):
        last = masked_forward(m, torch.tensor([ids]), special=SPECIAL, config=cfg, allow_unfinished=True).logits[0, -1]
        if temperature == 0:
            token = int(last.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(last.float() / temperature, -1), 1, generator=gen))
        try:
            parse_layout(ids + [token], SPECIAL, allow_unfinished=True)
        except LayoutError:
            break
        ids.append(token)
    return ids


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_free_greedy_generation(family, impl):
    prompt = torch.tensor(encode("p q <think> BS a"))
    result = generate_with_compaction(model(family, impl), prompt, SPECIAL, MaskConfig(0), max_new_tokens=12)
    assert torch.equal(result.ids[: len(prompt)], prompt)
    assert len(result.ids) > len(prompt) and len(result.ids) <= len(prompt) + 12
    assert result.logits.shape == (len(result.ids), VOCAB_SIZE)
    assert_cache_is_compacted(result)
    assert result.ids.tolist() == dense_loop(model(family, impl), prompt.tolist(), MaskConfig(0), 12)
    if len(result.ids) < len(prompt) + 12:
        assert result.stop_reason.startswith("invalid structure")
    else:
        assert result.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("cfg", MEMENTO_CONFIGS, ids=[c.name for c in MEMENTO_CONFIGS])
@pytest.mark.parametrize("family", FAMILIES)
def test_free_generation_after_forced_blocks(family, cfg):
    """Forced through three completed blocks (so compaction has happened) into a fourth, then free greedy."""
    ids = sequence()[:30]  # ... BS g h BE SS w SE BS k
    m = model(family, "sdpa")
    result = generate_with_compaction(m, ids[:3], SPECIAL, cfg, forced_ids=ids[3:], max_new_tokens=27 + 8)
    assert torch.equal(result.ids[:30], ids)
    assert len(result.ids) == 30 + 8 and result.stop_reason == "max_new_tokens"
    assert result.ids.tolist() == dense_loop(m, ids.tolist(), cfg, 8)
    assert_cache_is_compacted(result)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling(family):
    m = model(family, "sdpa")
    prompt = encode("p <think> BS")
    run = functools.partial(generate_with_compaction, m, prompt, SPECIAL, max_new_tokens=10, temperature=2.0)
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert a.ids.tolist() == dense_loop(m, prompt, MaskConfig(), 10, temperature=2.0, seed=1)


def test_eos_stops_free_generation_but_not_forced_tokens():
    m = model("gpt2", "sdpa")
    prompt = encode("p q <think> BS a")
    free = generate_with_compaction(m, prompt, SPECIAL, max_new_tokens=6)
    first = int(free.new_ids[0])
    stopped = generate_with_compaction(m, prompt, SPECIAL, max_new_tokens=6, eos_token_ids=[first])
    assert stopped.new_ids.tolist() == [first] and stopped.stop_reason == "eos"
    forced = generate_with_compaction(m, prompt, SPECIAL, forced_ids=[first, first], eos_token_ids=[first])
    assert forced.new_ids.tolist() == [first, first] and forced.stop_reason == "max_new_tokens"


def test_keep_logits_false():
    ids = sequence()
    m = model("gpt2", "eager")
    lean = generate_with_compaction(m, ids[:3], SPECIAL, forced_ids=ids[3:], keep_logits=False)
    full = replay("gpt2", "eager", ids, MaskConfig())
    assert lean.logits is None
    assert torch.equal(lean.kept_positions, full.kept_positions)
    torch.testing.assert_close(lean.kv(0)[0], full.kv(0)[0], atol=0, rtol=0)


# --------------------------------------------------------------------------- refusals


def test_refuses_what_it_cannot_do():
    m = model("gpt2", "eager")
    with pytest.raises(ValueError, match="B = 1"):
        generate_with_compaction(m, torch.ones(2, 3, dtype=torch.long), SPECIAL, max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        generate_with_compaction(m, [], SPECIAL, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_with_compaction(m, [7], SPECIAL)
    with pytest.raises(ValueError, match="shorter than forced_ids"):
        generate_with_compaction(m, [7], SPECIAL, forced_ids=[7, 8], max_new_tokens=1)
    with pytest.raises(LayoutError, match=r"forced_ids\[1\]"):
        generate_with_compaction(m, encode("p BS a"), SPECIAL, forced_ids=encode("b BS"))
    flash = tiny_gpt2("eager")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedAttentionError, match="flash_attention_2"):
        generate_with_compaction(flash, [7], SPECIAL, max_new_tokens=1)


def test_refuses_sliding_window_models():
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=0,
        pad_token_id=PAD_ID, attn_implementation="sdpa",
    )
    with pytest.raises(ValueError, match="sliding"):
        generate_with_compaction(Qwen3ForCausalLM(config).eval(), [7, 8], SPECIAL, max_new_tokens=1)


# --------------------------------------------------------------------------- the fork's prompt prefill

PREFILL_CONFIGS = [MaskConfig(0, prefill_causal=True), MaskConfig(1, prefill_causal=True),
                   MaskConfig(0, mask_delimiters=True, prefill_causal=True)]


@torch.no_grad()
def dense_prefill(family: str, impl: str, ids: torch.Tensor, cfg: MaskConfig, prompt_length: int):
    """The dense forward under cfg's mask with prefill_end = prompt_length: (logits (T, V), cache)."""
    allow = allow_matrix([parse_layout(ids, SPECIAL)], len(ids), cfg, prefill_end=[prompt_length])
    m = model(family, impl)
    out = m(input_ids=ids[None], position_ids=torch.arange(len(ids))[None], use_cache=True,
            attention_mask=additive_mask(allow, dtype=m.dtype))
    return out.logits[0].float(), out.past_key_values


@pytest.mark.parametrize("cfg", PREFILL_CONFIGS, ids=[c.name for c in PREFILL_CONFIGS])
@pytest.mark.parametrize("prompt_length", [12, 21, 28, 30])
def test_prefill_causal_replay_equals_the_dense_forward(prompt_length, cfg):
    """A continuation prompt (whole blocks in it) prefilled causally as the fork does, compacted at the
    first new token: logits and KV equal the dense forward under the same mask with that prompt length."""
    ids = sequence()
    result = replay("qwen3", "sdpa", ids, cfg, prompt_length=prompt_length)
    logits, cache = dense_prefill("qwen3", "sdpa", ids, cfg, prompt_length)
    torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=0)
    assert_cache_matches(result, cache, result.kept_positions)
    assert_cache_is_compacted(result)
    assert len(result.kept_positions) == EXPECTED_KEPT[replace(cfg, prefill_causal=False).name]
    # the prompt's rows saw the prompt's blocks: not what today's prefill gives, where the masks differ
    default = replay("qwen3", "sdpa", ids, replace(cfg, prefill_causal=False), prompt_length=prompt_length)
    P, layout = prompt_length, parse_layout(ids, SPECIAL)
    differs = bool((allow_matrix([layout], T, cfg, prefill_end=[P]) != allow_matrix([layout], T, cfg, prefill_end=[None])).any())
    assert differs == (P > 12 + (9 if cfg.keep_last_n_blocks else 0))  # a prompt past the first eviction point
    assert torch.allclose(result.logits[:P], default.logits[:P], atol=ATOL, rtol=0) != differs
