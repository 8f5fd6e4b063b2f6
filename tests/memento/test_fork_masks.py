"""kvprobe's masks for the fork's served inference against a replay of the fork's own code.

`fork_reference.fork_allow` ports the block tracking of the Memento vLLM fork and replays a
sequence through a simulated KV cache (evict on the sampled <|summary_end|>, restart rewinds
and re-prefills, keep_last_block_for_answer defers to the next <|block_start|>). Every mask
the fork can serve must be what the cache held when each token's KV was computed.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvprobe.memento.layout import parse_layout
from kvprobe.memento.masks import MaskConfig, allow_matrix
from tests.helpers.fork_reference import fork_allow
from tests.helpers.models import SPECIAL, encode
from tests.helpers.strategies import memento_sequences

# (fork keys) -> the kvprobe MaskConfig that must equal them, for every configuration the fork serves
SERVED = [
    *[(dict(keep_last_n_blocks=k, mask_delimiters=d, restart_mode=False),
       MaskConfig(k, d, False, evict_before_summary_end=True)) for k in (-1, 0, 1, 2) for d in (False, True)],
    *[(dict(keep_last_n_blocks=k, mask_delimiters=d, restart_mode=True),  # the fork ignores mask_delimiters
       MaskConfig(k, restart_mode=True, evict_before_summary_end=True, restart_sees_kept_blocks=True))
      for k in (0, 1, 2) for d in (False, True)],
    *[(dict(keep_last_n_blocks=0, mask_delimiters=d, restart_mode=r, keep_last_block_for_answer=True),
       MaskConfig(0, d or r, r, evict_before_summary_end=True, keep_last_block_for_answer=True))
      for d in (False, True) for r in (False, True)],
]


def served_id(case) -> str:
    fork, _ = case
    return "-".join(f"{k}={int(v)}" for k, v in fork.items())


@pytest.mark.parametrize("case", SERVED, ids=[served_id(c) for c in SERVED])
@settings(max_examples=40, deadline=None)
@given(sample=memento_sequences(allow_unfinished=True))
def test_mask_equals_the_forks_kv_cache(case, sample):
    fork, cfg = case
    layout = parse_layout(sample.ids, SPECIAL, allow_unfinished=True)
    # one documented difference: a memento still being generated has, in the fork, its generation-time
    # KV (the re-prefill comes with <|summary_end|>); kvprobe's restart rows are the re-prefilled ones
    unfinished_memento = layout.blocks and layout.blocks[-1].summary_start is not None and (
        layout.blocks[-1].summary_end is None)
    assume(not (cfg.restart_mode and unfinished_memento and not cfg.keep_last_block_for_answer))
    want = fork_allow(sample.ids, SPECIAL, **fork)
    got = allow_matrix([layout], len(sample.ids), cfg)[0, 0]
    if not bool((got == want).all()):
        q, k = (got != want).nonzero()[0].tolist()
        pytest.fail(f"{cfg.name} on {sample.ids}: query {q}, key {k}: kvprobe {bool(got[q, k])}, fork {bool(want[q, k])}")


EXAMPLE = "p BS a b BE SS m SE BS c BE SS n SE BS d BE SS o SE </think> A"


@pytest.mark.parametrize("keep", [1, 2])
def test_kvprobes_own_restart_with_kept_blocks_is_not_the_forks(keep):
    """Without restart_sees_kept_blocks, restart with keep N > 0 hides a memento's own block: not what the fork serves."""
    ids = encode(EXAMPLE)
    layout = parse_layout(ids, SPECIAL)
    want = fork_allow(ids, SPECIAL, keep_last_n_blocks=keep, mask_delimiters=True, restart_mode=True)
    own = allow_matrix([layout], len(ids), MaskConfig(keep, restart_mode=True, evict_before_summary_end=True))[0, 0]
    assert not bool((own == want).all())
    assert bool((own <= want).all())  # it only hides more


def test_keep_last_block_for_answer_keeps_the_last_block_for_the_answer():
    ids = encode(EXAMPLE)
    layout = parse_layout(ids, SPECIAL)
    allow = allow_matrix([layout], len(ids), MaskConfig(0, keep_last_block_for_answer=True))[0, 0]
    answer = len(ids) - 1
    last_content = layout.blocks[-1].content
    assert all(bool(allow[answer, k]) for k in last_content)
    assert not any(bool(allow[answer, k]) for blk in layout.blocks[:-1] for k in blk.content)


@settings(max_examples=30, deadline=None)
@given(sample=memento_sequences(allow_unfinished=True), keep=st.sampled_from([0, 1]))
def test_the_forks_restart_evicts_delimiters_whatever_mask_delimiters_says(sample, keep):
    """tracker.get_restart_range ignores mask_delimiters: both settings replay to one cache."""
    a = fork_allow(sample.ids, SPECIAL, keep_last_n_blocks=keep, mask_delimiters=False, restart_mode=True)
    b = fork_allow(sample.ids, SPECIAL, keep_last_n_blocks=keep, mask_delimiters=True, restart_mode=True)
    assert bool((a == b).all())


PREFILL = [(k, d) for k in (0, 1) for d in (False, True)]


@pytest.mark.parametrize("keep,delims", PREFILL, ids=[f"keep{k}-delims{int(d)}" for k, d in PREFILL])
@settings(max_examples=40, deadline=None)
@given(sample=memento_sequences(allow_unfinished=True), data=st.data())
def test_prefill_causal_equals_the_forks_prompt_prefill(keep, delims, sample, data):
    """A prompt holding blocks (a continuation prompt) is prefilled causally; its blocks go at the first new token."""
    prompt_length = data.draw(st.integers(1, len(sample.ids)), label="prompt_length")
    cfg = MaskConfig(keep, delims, evict_before_summary_end=True, prefill_causal=True)
    layout = parse_layout(sample.ids, SPECIAL, allow_unfinished=True)
    want = fork_allow(sample.ids, SPECIAL, keep_last_n_blocks=keep, mask_delimiters=delims, restart_mode=False,
                      prompt_length=prompt_length)
    got = allow_matrix([layout], len(sample.ids), cfg, prefill_end=[prompt_length])[0, 0]
    if not bool((got == want).all()):
        q, k = (got != want).nonzero()[0].tolist()
        pytest.fail(f"{cfg.name} prompt {prompt_length} on {sample.ids}: query {q}, key {k}: "
                    f"kvprobe {bool(got[q, k])}, fork {bool(want[q, k])}")


def test_a_continuation_prompt_is_not_masked_from_the_start_by_the_fork():
    """With two blocks in the prompt, the fork's prompt sees them all; kvprobe's default mask does not."""
    ids = encode(EXAMPLE)
    layout = parse_layout(ids, SPECIAL)
    prompt_length = layout.blocks[1].summary_end + 2  # through SE_1 and BS_2
    want = fork_allow(ids, SPECIAL, keep_last_n_blocks=0, mask_delimiters=False, restart_mode=False,
                      prompt_length=prompt_length)
    assert bool(want[prompt_length - 1, layout.blocks[0].content.start])  # the prompt's end sees block 0
    assert not bool(want[prompt_length, layout.blocks[0].content.start])  # the first new token does not
    default = allow_matrix([layout], len(ids), MaskConfig(0, evict_before_summary_end=True))[0, 0]
    assert not bool((default == want).all())
    cfg = MaskConfig(0, evict_before_summary_end=True, prefill_causal=True)
    assert cfg.name == "memento-evict-at-se-prefill-causal"
    with pytest.raises(ValueError, match="needs each sample's prompt length"):  # never the name without the rule
        allow_matrix([layout], len(ids), cfg)
    assert bool((allow_matrix([layout], len(ids), cfg, prefill_end=[None])[0, 0] == default).all())  # no prompt
    assert bool((allow_matrix([layout], len(ids), cfg, prefill_end=[prompt_length])[0, 0] == want).all())


@pytest.mark.parametrize("kwargs", [dict(restart_mode=True), dict(keep_last_block_for_answer=True)])
def test_prefill_causal_refuses_what_it_does_not_model(kwargs):
    """The fork's restart rewind over prompt blocks, and keep_last_block_for_answer's prompt flush, are not modelled."""
    with pytest.raises(ValueError, match="prefill_causal"):
        MaskConfig(0, prefill_causal=True, **kwargs)
