"""The fork's --block-masking-config: it serves the mask it is built from, and only keys the fork reads.

`block_masking_config` is checked against a replay of the fork's own block tracking
(`fork_reference.fork_allow`, as in `tests/memento/test_fork_masks.py`): every mask it accepts without a
word must be what the fork's KV cache holds under the keys it emits; a mask the fork serves
differently is refused or warned about, naming the mask that matches. Extra keys are checked
against the fork's `BlockMaskingConfig` fields (`FORK_CONFIG_FIELDS`).
"""

from __future__ import annotations

import itertools
import json
import re
import warnings

import pytest
from hypothesis import given, settings

from kvprobe.memento.layout import parse_layout
from kvprobe.memento.masks import MaskConfig, allow_matrix
from kvprobe.serving import block_masking_config, serve_command
from kvprobe.serving.fork import FORK_COMMIT, FORK_CONFIG_FIELDS, served_mask
from tests.helpers.cli_support import assert_refused, cli
from tests.helpers.fork_reference import fork_allow
from tests.helpers.models import SPECIAL
from tests.helpers.strategies import memento_sequences


def _masks() -> list[MaskConfig]:
    """Every MaskConfig the fork's keys could be asked for: keep -1..2, both delimiter settings, both modes, the
    three fork options."""
    masks = []
    for keep, delims, restart, at_se, sees_kept, last in itertools.product(
            (-1, 0, 1, 2), (None, False, True), (False, True), (False, True), (False, True), (False, True)):
        if last and keep != 0:
            continue  # MaskConfig refuses it
        masks.append(MaskConfig(keep, delims, restart, at_se, sees_kept, last))
    return masks


MASKS = _masks()


def _served_allow(config: dict, ids: list[int]):
    """What the fork's KV cache holds, token by token, under the emitted keys."""
    return fork_allow(ids, SPECIAL, keep_last_n_blocks=config["keep_last_n_blocks"],
                      mask_delimiters=config["mask_delimiters"], restart_mode=config["restart_mode"],
                      keep_last_block_for_answer=config.get("keep_last_block_for_answer", False))


@settings(max_examples=25, deadline=None)
@given(sample=memento_sequences())
def test_an_accepted_mask_is_what_the_fork_serves_and_a_warned_one_names_the_mask_it_serves(sample):
    layout = parse_layout(sample.ids, SPECIAL)
    T = len(sample.ids)
    for mask in MASKS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                config = block_masking_config(mask)
            except ValueError:
                continue  # refusals are checked by name below
        assert set(config) <= set(FORK_CONFIG_FIELDS), f"{mask.name}: emits a key the fork drops"
        served = _served_allow(config, sample.ids)
        if caught:
            match = served_mask(mask)
            assert len(caught) == 1 and match.name in str(caught[0].message), (mask.name, caught)
            assert match.name != mask.name
        else:
            match = mask
        got = allow_matrix([layout], T, match)[0, 0]
        assert bool((got == served).all()), f"{mask} (named {match.name}) is not what the fork serves on {sample.ids}"


@settings(max_examples=25, deadline=None)
@given(sample=memento_sequences())
def test_a_refused_restart_names_the_mask_the_fork_would_serve(sample):
    """The mask a refusal names is accepted and replays to the fork's cache under the refused mask's own keys."""
    layout = parse_layout(sample.ids, SPECIAL)
    for keep in (1, 2):
        match = MaskConfig(keep, restart_mode=True, restart_sees_kept_blocks=True)
        with pytest.raises(ValueError, match=re.escape(f"is MaskConfig({keep}, restart_mode=True, "
                                                       f"restart_sees_kept_blocks=True), named {match.name}")):
            block_masking_config(MaskConfig(keep, restart_mode=True))
        config = block_masking_config(match)
        assert config == {"enable": True, "keep_last_n_blocks": keep, "mask_delimiters": True,
                          "compact_on_summary_end": True, "restart_mode": True}  # what the refused mask asked for
        got = allow_matrix([layout], len(sample.ids), match)[0, 0]
        assert bool((got == _served_allow(config, sample.ids)).all())


@pytest.mark.parametrize("keep", [1, 2])
def test_restart_with_kept_blocks_is_refused_in_one_line(keep):
    with pytest.raises(ValueError) as refused:
        block_masking_config(MaskConfig(keep, restart_mode=True))
    message = str(refused.value)
    assert "\n" not in message and f"restart-keep{keep} is not what the vLLM fork serves" in message
    assert (f"MaskConfig({keep}, restart_mode=True, restart_sees_kept_blocks=True), named "
            f"restart-keep{keep}-sees-kept") in message
    with pytest.raises(ValueError, match=f"restart-keep{keep}-sees-kept"):
        serve_command("/ckpt/m", MaskConfig(keep, restart_mode=True))


def test_memento_with_the_base_rule_timing_is_served_with_a_warning_naming_evict_at_se():
    with pytest.warns(UserWarning, match=r"serves memento-keep1-evict-at-se, not memento-keep1: "
                                         r"MaskConfig\(1, evict_before_summary_end=True\)"):
        block_masking_config(MaskConfig(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fork's own timing, causal, and the deferred eviction: no warning
        block_masking_config(MaskConfig(0, evict_before_summary_end=True))
        block_masking_config(MaskConfig(-1))
        block_masking_config(MaskConfig(0, keep_last_block_for_answer=True))
        block_masking_config(MaskConfig(0, restart_mode=True))


def test_compact_on_summary_end_off_is_refused_where_it_stops_eviction():
    with pytest.raises(ValueError, match="never evicts a block.*serves causal, not memento"):
        block_masking_config(MaskConfig(0, evict_before_summary_end=True), compact_on_summary_end=False)
    # keep_last_block_for_answer evicts on the next <|block_start|> either way; keep -1 evicts nothing either way
    assert block_masking_config(MaskConfig(0, keep_last_block_for_answer=True),
                                compact_on_summary_end=False)["compact_on_summary_end"] is False
    assert block_masking_config(MaskConfig(-1), compact_on_summary_end=False)["enable"] is False


# ----------------------------------------------------------------------------- extra keys


def test_the_vendored_fields_name_their_fork_commit():
    assert re.fullmatch(r"[0-9a-f]{40}", FORK_COMMIT)
    assert len(set(FORK_CONFIG_FIELDS)) == len(FORK_CONFIG_FIELDS)
    assert not any(f.startswith("_") for f in FORK_CONFIG_FIELDS)  # the fork's resolved state is not an option


def test_a_misspelled_fork_key_is_refused_with_did_you_mean():
    with pytest.raises(ValueError) as refused:
        block_masking_config(MaskConfig(0, evict_before_summary_end=True), keep_last_block_for_anwser=True)
    message = str(refused.value)
    assert "\n" not in message and "unknown block-masking key 'keep_last_block_for_anwser'" in message
    assert message.endswith("did you mean 'keep_last_block_for_answer'?")
    with pytest.raises(ValueError, match="did you mean 'max_block_tokens'"):
        serve_command("/ckpt/m", MaskConfig(0, evict_before_summary_end=True), max_block_token=4096)
    with pytest.raises(ValueError, match="unknown block-masking key 'temperature'.*the fork's keys are .*debug"):
        block_masking_config(MaskConfig(0, evict_before_summary_end=True), temperature=0.6)


def test_a_key_the_mask_sets_is_refused_as_an_extra_key():
    with pytest.raises(ValueError, match="'restart_mode' comes from the mask"):
        block_masking_config(MaskConfig(0, evict_before_summary_end=True), restart_mode=True)


def test_the_forks_other_keys_pass_through():
    config = block_masking_config(MaskConfig(0, evict_before_summary_end=True), debug=True, max_block_tokens=4096,
                                  require_assistant_section=False)
    assert config["debug"] is True and config["max_block_tokens"] == 4096
    assert config["require_assistant_section"] is False


# ----------------------------------------------------------------------------- the command line


def test_serve_refuses_restart_with_kept_blocks_in_one_line(capsys):
    restart_keep1 = ("serve", "--model-path", "/m", "--print", "--restart-mode", "--keep-last-n-blocks", "1")
    code, out, err = cli(capsys, *restart_keep1)
    assert_refused(code, err, "restart-keep1-sees-kept",
                   "MaskConfig(1, restart_mode=True, restart_sees_kept_blocks=True)")
    assert out == ""
    code, out, err = cli(capsys, *restart_keep1, "--restart-sees-kept-blocks")
    assert code == 0 and err == ""
    config = json.loads(out.split("--block-masking-config ", 1)[1].strip().strip("'"))
    assert config["restart_mode"] is True and config["keep_last_n_blocks"] == 1


def test_serve_warns_in_one_line_about_the_forks_timing(capsys):
    code, out, err = cli(capsys, "serve", "--model-path", "/m", "--print")
    assert code == 0 and "--block-masking-config" in out
    assert err.splitlines() == ["kvprobe: warning: the vLLM fork evicts a block as soon as <|summary_end|> is sampled, "
                                "so it serves memento-evict-at-se, not memento: MaskConfig(0, "
                                "evict_before_summary_end=True) is the mask that matches it"]
    code, _, err = cli(capsys, "serve", "--model-path", "/m", "--print", "--evict-before-summary-end")
    assert code == 0 and err == ""


def test_serve_refuses_a_misspelled_fork_key_in_one_line(capsys):
    code, out, err = cli(capsys, "serve", "--model-path", "/m", "--print", "--evict-before-summary-end",
                         "--block-masking-arg", "keep_last_block_for_anwser=true")
    assert_refused(code, err, "'keep_last_block_for_anwser'", "did you mean 'keep_last_block_for_answer'?")
    assert out == ""
    # a key that is one of serve_command's own keywords is still only a fork key here, and unknown
    code, _, err = cli(capsys, "serve", "--model-path", "/m", "--print", "--block-masking-arg", "port=1")
    assert_refused(code, err, "unknown block-masking key 'port'")
    code, out, err = cli(capsys, "serve", "--model-path", "/m", "--print", "--evict-before-summary-end",
                         "--block-masking-arg", "max_block_tokens=8192", "--block-masking-arg", "debug=true")
    assert code == 0 and err == ""
    assert '"max_block_tokens": 8192, "debug": true}' in out
