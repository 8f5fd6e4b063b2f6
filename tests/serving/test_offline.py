"""Offline generation through vLLM's engine interface (kvprobe.serving.offline), against a stand-in
`vllm` module, and the mask flags every serving command shares.

`FakeVLLM` records how its `LLM` was built and what it was asked to generate, and answers each
prompt with a canned Memento completion; `overlay=False` behaves like stock vLLM.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pytest

from kvprobe.cli import main
from kvprobe.data.chat import MEMENTO_NOSYS
from kvprobe.memento.masks import MaskConfig
from kvprobe.serving import block_masking_config, completed_ids, generate_offline, prompt_seed, read_generations
from tests.helpers.fake_server import memento_text, prompts


def test_generate_offline_without_vllm_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"vLLM with the Memento block-masking overlay.*install_overlay\.sh"):
        generate_offline(prompts(1), "/no/model", tmp_path / "gen.jsonl")
    assert not (tmp_path / "gen.jsonl").exists()  # nothing touched before the check


class FakeVLLM:
    """A stand-in for the `vllm` module: `LLM` records how it was built and what it was asked
    to generate, and answers each prompt with a canned Memento completion (prompts are
    "Solve problem <pid>"). `overlay=False` behaves like stock vLLM, which lacks the
    `block_masking_config` keyword."""

    def __init__(self, overlay: bool = True, truncate: str | None = None) -> None:
        self.built: list[dict] = []
        self.calls: list[tuple[list[str], list[dict]]] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kw: Any) -> None:
                self.kw = kw

        class Tokenizer:
            def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template):
                assert tokenize is False and add_generation_prompt is True
                assert chat_template == MEMENTO_NOSYS  # the fork's template, what its server applies
                return f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"

        class Completion:  # vllm.CompletionOutput, the fields read
            def __init__(self, text: str, finish_reason: str) -> None:
                self.text, self.finish_reason = text, finish_reason
                self.token_ids = [ord(c) for c in text]  # stand-in ids, one per character

        class Output:  # vllm.RequestOutput
            def __init__(self, completion: Completion, prompt: str) -> None:
                self.outputs = [completion]
                self.prompt_token_ids = [ord(c) for c in prompt]

        class LLM:
            def __init__(self, model: str, **kw: Any) -> None:
                if not overlay and "block_masking_config" in kw:
                    raise TypeError("LLM.__init__() got an unexpected keyword argument 'block_masking_config'")
                fake.built.append({"model": model, **kw})

            def get_tokenizer(self) -> Tokenizer:
                return Tokenizer()

            def generate(self, texts: list[str], params: list[SamplingParams]) -> list[Output]:
                fake.calls.append((texts, [p.kw for p in params]))
                outs = []
                for text in texts:
                    pid = re.search(r"problem (p\d+)", text).group(1)
                    if pid == truncate:  # cut off inside a block, as max_tokens does
                        outs.append(Output(Completion("<think>\n<|block_start|>Step 0 of", "length"), text))
                    else:
                        outs.append(Output(Completion(memento_text(pid), "stop"), text))
                return outs

        self.module = type(sys)("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_generate_offline_through_the_engine_interface(monkeypatch, tmp_path):
    fake = FakeVLLM(truncate="p3")
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    out = tmp_path / "gen.jsonl"
    mask = MaskConfig(keep_last_n_blocks=1)
    first = generate_offline(prompts(3), "/models/memento", out, mask=mask, chunk_size=2, seed=7, max_tokens=100,
                             progress=False)
    assert [g.prompt_id for g in first] == ["p0", "p1", "p2"] and all(g.trace is not None for g in first)
    assert first[1].trace.summaries == ["memento 0 of p1", "memento 1 of p1"]
    built = fake.built[0]
    assert built["model"] == "/models/memento" and built["block_masking_config"] == block_masking_config(mask)
    assert built["enable_prefix_caching"] is False  # the fork needs prefix caching off
    assert [len(texts) for texts, _ in fake.calls] == [2, 1]  # chunks of 2
    texts, params = fake.calls[0]
    assert texts[0] == "<|im_start|>user\nSolve problem p0<|im_end|>\n<|im_start|>assistant\n"  # chat template
    assert params[0]["seed"] == prompt_seed(7, "p0") and params[1]["seed"] == prompt_seed(7, "p1")
    assert params[0]["skip_special_tokens"] is False and params[0]["max_tokens"] == 100
    assert completed_ids(out) == {"p0", "p1", "p2"}
    # the engine's ids are kept: prompt then completion, on the generation and its trace
    assert first[0].prompt_token_ids == [ord(c) for c in texts[0]]
    assert first[0].trace.token_ids == tuple(first[0].prompt_token_ids) + tuple(first[0].token_ids)

    # a second call with more prompts generates only the new ones; a truncated one is recorded, not fatal
    with pytest.warns(UserWarning, match="4 of 4 completions prompts have no"):  # verbatim: never evicted
        again = generate_offline(prompts(4), "/models/memento", out, mask=mask, chat=False, progress=False)
    assert [g.prompt_id for g in again] == ["p3"]
    assert again[0].trace is None and "finish_reason 'length'" in again[0].error
    assert fake.calls[-1][0] == ["Solve problem p3"]  # chat=False sends the text verbatim
    records = read_generations(out)
    assert [g.prompt_id for g in records] == ["p0", "p1", "p2", "p3"]
    assert read_generations(out)[0].trace == first[0].trace  # the file round-trips


def test_generate_offline_with_stock_vllm_names_the_overlay(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM(overlay=False).module)
    with pytest.raises(ImportError, match="does not know block_masking_config: apply the Memento overlay"):
        generate_offline(prompts(1), "/models/memento", tmp_path / "out" / "gen.jsonl")
    assert not (tmp_path / "out").exists()  # nothing written before the engine is up


def test_generate_offline_command_line(monkeypatch, tmp_path, capsys):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_id": p.prompt_id, "prompt": p.text}) + "\n" for p in prompts(3)))
    out = tmp_path / "gen.jsonl"
    argv = ["generate-offline", "--prompts", str(prompts_file), "--out", str(out), "--model-path", "/models/memento",
            "--restart-mode", "--chunk-size", "2", "--llm-arg", "gpu_memory_utilization=0.5",
            "--llm-arg", "tokenizer_mode=auto", "--no-progress"]
    assert main(argv) == 0
    assert "3 generated (0 with parse errors), 0 already present, 3 prompts" in capsys.readouterr().out
    built = fake.built[0]
    assert built["gpu_memory_utilization"] == 0.5 and built["tokenizer_mode"] == "auto"  # JSON, else string
    assert built["block_masking_config"]["restart_mode"] is True
    assert [len(texts) for texts, _ in fake.calls] == [2, 1]
    assert main(argv) == 0 and "0 generated (0 with parse errors), 3 already present" in capsys.readouterr().out
    other = tmp_path / "other" / "gen.jsonl"
    for module in (None, FakeVLLM(overlay=False).module):  # no vLLM; stock vLLM without the overlay
        monkeypatch.setitem(sys.modules, "vllm", module)
        assert main(argv[:3] + ["--out", str(other)] + argv[5:]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "install_overlay.sh" in err[0], err
        assert not other.parent.exists()  # nothing written


@pytest.mark.parametrize("argv", [
    ["serve", "--model-path", "/m", "--print"],
    ["generate-offline", "--prompts", "p.jsonl", "--out", "OUT", "--model-path", "/m"],
    ["sft", "--model", "/m", "--traces", "t.jsonl", "--out", "OUT"],
], ids=lambda a: a[0])
def test_every_mask_flag_refuses_a_bad_keep_last_n_blocks(argv, tmp_path, capsys, monkeypatch):
    """One check for the shared mask flags: one line naming the flag, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt_id": "p0", "prompt": "x"}) + "\n")
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv] + ["--keep-last-n-blocks", "-2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvprobe: error: --keep-last-n-blocks must be >= -1, got -2"]
    assert not (tmp_path / "out").exists()
