"""Real traces: pipeline JSONL and generated text, rendering, tokenizing, adding the markers.

Tokenizers are trained offline on the shipped example traces (a small byte-level BPE,
`tests.helpers.traces`, shared with the other trace tests); models are tiny random Qwen3s.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kvprobe.memento.layout import LayoutError, SpecialTokens
from kvprobe.data.traces import (
    RELATED_WORDS,
    Trace,
    TraceError,
    add_memento_tokens,
    from_generated_text,
    from_pipeline_record,
    read_generated,
    read_jsonl,
    render,
    render_with_spans,
    tokenize_trace,
)
from tests.helpers.traces import EXAMPLES, GENERATED, MARKERS, PIPELINE, build_tokenizer, plain_tokenizer, tiny_qwen3
from tests.helpers.traces import pipeline_record as _record


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    return read_jsonl(PIPELINE)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


# ----------------------------------------------------------------------------- pipeline JSONL


def test_shipped_pipeline_records(traces):
    raw = [json.loads(line) for line in PIPELINE.read_text().splitlines()]
    assert len(traces) == len(raw) >= 3
    for t, r in zip(traces, raw):
        assert t.trace_id == r["task_id"] and t.n_blocks == len(r["blocks"]) >= 4
        assert t.prompt == (r.get("problem") or r.get("question"))
        assert t.answer == r["think_suffix"]
        assert t.summaries == r["block_summaries"]
        for (first, last), content in zip(r["blocks"], t.blocks):
            assert content == " ".join(r["sentences"][first : last + 1])
            assert last - first + 1 >= 4  # several sentences per block
    assert {"problem", "question"} <= {k for r in raw for k in r}  # both prompt keys exercised
    shipped = read_jsonl(EXAMPLES)
    assert len(shipped) >= 3 and all(t.n_blocks >= 4 for t in shipped)


def test_pipeline_sentences_outside_blocks_go_to_prompt_and_answer():
    t = from_pipeline_record(_record(think_suffix="Done."))
    assert t.prompt == "P?\n\nS0."
    assert t.blocks == ["S1. S2.", "S3."] and t.summaries == ["m0", "m1"]
    assert t.answer == "S4.\n\nDone."
    t = from_pipeline_record(_record(blocks=[[0, 4]], block_summaries=["m"], problem=None, prompt="Q"))
    assert (t.prompt, t.answer) == ("Q", None)
    assert from_pipeline_record(_record(problem=None, question="Why?", task_id=7)).prompt == "Why?\n\nS0."
    with pytest.raises(TraceError, match="trace 't1': no problem field"):  # not an empty prompt, silently
        from_pipeline_record(_record(problem=None))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task_id": ...}, "missing field(s) task_id"),
        ({"blocks": [[1, 2], [3]]}, "block 1 is [3], expected [first, last]"),
        ({"blocks": [[1, 2], [3, 9]]}, "block 1 = [3, 9] is not a range inside 0..4"),
        ({"blocks": [[1, 2], [2, 3]]}, "block 1 = [2, 3] overlaps block 0"),
        ({"blocks": [[0, 1], [3, 4]]}, "block 1 = [3, 4] leaves a gap after block 0"),
        ({"block_summaries": ["m0"]}, "2 blocks but 1 block_summaries"),
        ({"block_summaries": ["m0", "  "]}, "trace 't1', summary 1 is empty"),
        ({"sentences": ["S0.", "S1 <|block_end|>", "S2.", "S3.", "S4."]}, "block 0 contains the marker <|block_end|>"),
        ({"problem": 3}, "field 'problem' must be a string"),
        ({"sentences": "S0. S1."}, "'sentences' must be a list of strings"),
    ],
)
def test_pipeline_record_errors(change, message):
    rec = {k: v for k, v in _record(**change).items() if v is not ...}  # ... drops the field
    with pytest.raises(TraceError) as err:
        from_pipeline_record(rec)
    assert message in str(err.value)


def test_a_pipeline_record_without_include_problem_renders_its_problem(tmp_path):
    """Without --include-problem the Memento pipeline copies the input's fields as original_<key>
    (run_full_pipeline.py); its other bookkeeping fields are ignored."""
    raw = json.loads(PIPELINE.read_text().splitlines()[0])
    problem = raw.pop("problem")
    record = {**raw, "original_problem": problem, "num_sentences": len(raw["sentences"]), "think_prefix": None,
              "boundary_scores": [0.1] * len(raw["sentences"]), "scoring_metadata": {}, "num_blocks": len(raw["blocks"]),
              "refinement_metadata": [None] * len(raw["blocks"]), "avg_final_score": 8.5, "total_iterations": 2}
    trace = from_pipeline_record(record)
    assert trace.prompt.startswith(problem.strip()) and trace.n_blocks == len(raw["blocks"])
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert read_jsonl(path)[0].prompt == trace.prompt


@pytest.mark.parametrize("summaries, message", [
    (["m0", "Summarization failed"], "block 1's summary is the pipeline's failure placeholder 'Summarization failed'"),
    (["[Missing summary]", "m1"], "block 0's summary is the pipeline's failure placeholder '[Missing summary]'"),
    (["Summary 1: a\nSummary 2: b"] * 2, "all 2 block summaries are the same text"),
])
def test_pipeline_failure_placeholders_are_refused(summaries, message):
    with pytest.raises(TraceError, match=re.escape(message)):
        from_pipeline_record(_record(block_summaries=summaries))


def test_records_without_think_end_are_reported(tmp_path):
    path = tmp_path / "t.jsonl"
    unfinished = _record(task_id="t2", blocks=[[0, 4]], block_summaries=["m"], think_suffix=None)
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(unfinished) + "\n")
    with pytest.warns(UserWarning, match=r"1 of 2 traces have no text after </think>"):
        traces = read_jsonl(path)
    assert [t.answer for t in traces] == ["S4.", None]


def test_read_jsonl_errors_name_the_line(tmp_path):
    good = json.dumps(_record())
    path = tmp_path / "t.jsonl"
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text(good + "\n" + json.dumps(_record(task_id="t2", blocks=[[1, 2], [4, 4]])) + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:2: trace 't2': block 1 = \[4, 4\] leaves a gap"):
        read_jsonl(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:2: trace id 't1' already used on line 1"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(TraceError, match="no records"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- generated text


def test_shipped_generated_trace():
    t = read_generated(GENERATED)
    assert t.trace_id == "generated_trace"
    assert t.prompt == "How many three-digit positive integers have digits that sum to 10?"
    assert t.n_blocks == 4
    assert t.blocks[0].startswith("Okay, a three-digit number") and t.blocks[0].endswith("= 55 \\).")
    assert t.summaries[3] == "Extremes 109 and 910 check out; answer 54."
    assert t.answer == "There are \\( \\binom{11}{2} - 1 = \\boxed{54} \\) such integers."


def test_render_format_is_exact():
    t = Trace("x", "Q?", ["A one. A two.", "B."], ["a", "b"], "42")
    expected = (
        "Q?\n<think>\n"
        "<|block_start|>A one. A two.<|block_end|>\n<|summary_start|>a<|summary_end|>\n"
        "\n"
        "<|block_start|>B.<|block_end|>\n<|summary_start|>b<|summary_end|>\n"
        "</think>\n\n42"
    )
    assert render(t) == expected
    text, spans = render_with_spans(t)
    assert [text[a:b] for a, b in spans] == t.blocks
    assert render(Trace("x", "", ["B."], ["b"], None)).endswith("<|summary_end|>\n")
    assert render(Trace("x", "", ["B."], ["b"], "")).startswith("<think>\n")
    assert render(Trace("x", "", ["B."], ["b"], "")).endswith("<|summary_end|>\n</think>")


def test_generated_text_round_trips(traces):
    for t in traces + [read_generated(GENERATED)]:
        assert from_generated_text(render(t), t.trace_id) == t
    bare = Trace("x", "", ["B."], ["b"], None)
    assert from_generated_text(render(bare), "x") == bare


def test_generated_text_variants():
    # a served response: no prompt, no <think>, an end-of-turn token after the answer
    text = "<|block_start|> a b. <|block_end|>\n\n<|summary_start|> m <|summary_end|>\n</think>\n\n7<|im_end|>"
    t = from_generated_text(text, "r")
    assert (t.prompt, t.blocks, t.summaries, t.answer) == ("", ["a b."], ["m"], "7")
    # a truncated generation
    cut = "<think><|block_start|>a<|block_end|><|summary_start|>m<|summary_end|><|block_start|>half a thought"
    with pytest.raises(TraceError, match="trace 'c': block 1 is unfinished at the end of the text"):
        from_generated_text(cut, "c")
    t = from_generated_text(cut, "c", drop_unfinished=True)
    assert (t.blocks, t.answer) == (["a"], None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<think>\n<|block_start|>a<|block_end|><|summary_start|>m<|summary_end|>\nstray words\n"
         "<|block_start|>b<|block_end|><|summary_start|>n<|summary_end|></think>",
         "line 3, column 1: text 'stray words' between the memento of block 0 and the next <|block_start|>"),
        ("<think><|block_end|>", "column 8: <|block_end|> with no open block"),
        ("<think><|block_start|>a<|summary_start|>", "<|summary_start|> not preceded by <|block_end|>"),
        ("<think><|block_start|>a<|block_end|> x <|summary_start|>m<|summary_end|>",
         "text 'x' between <|block_end|> and <|summary_start|> of block 0"),
        ("<think><|block_start|>a<|block_start|>", "<|block_start|> while block 0 is unfinished"),
        ("<think></think>a</think>", "second </think>"),
        ("<think><|block_start|>a<|block_end|><|summary_start|><|summary_end|></think>", "summary 0 is empty"),
        ("just words", "no Memento markers"),
        ("<think>\n</think>\n<|block_start|>", "<|block_start|> after </think>"),
        ("p <think> x <think>", "<think> after the prompt"),
    ],
)
def test_generated_text_errors(text, message):
    with pytest.raises(TraceError) as err:
        from_generated_text(text, "g")
    assert message in str(err.value) and "trace 'g'" in str(err.value)


def test_trace_validation():
    with pytest.raises(TraceError, match="trace 'x': 2 blocks but 1 summaries"):
        Trace("x", "", ["a", "b"], ["m"])
    with pytest.raises(TraceError, match=r"trace 'x', prompt contains the marker </think> at character 2"):
        Trace("x", "a </think>", ["a"], ["m"])
    with pytest.raises(TraceError, match="trace 'x', block 0 is empty"):
        Trace("x", "", [""], ["m"])


# ----------------------------------------------------------------------------- tokenizing


def test_tokenize_round_trip(traces, tok):
    special = SpecialTokens.from_tokenizer(tok)
    for t in traces + [read_generated(GENERATED)]:
        ids, lay = tokenize_trace(t, tok, special)
        assert ids.dtype == torch.long and ids.dim() == 1 and lay.length == len(ids)
        assert lay.n_blocks == t.n_blocks and lay.think_end is not None
        for blk, content, summary in zip(lay.blocks, t.blocks, t.summaries):
            assert tok.decode(ids[list(blk.content)]) == content
            assert tok.decode(ids[list(blk.memento_text)]) == summary
        assert tok.decode(ids[: lay.prompt.stop]) == (t.prompt + "\n" if t.prompt else "") + "<think>\n"
        assert tok.decode(ids[lay.answer.start :]) == "\n\n" + t.answer
        assert ids[0] != tok.eos_token_id  # no token added in front


def test_tokenize_needs_the_markers(traces):
    with pytest.raises(LayoutError, match="missing from the tokenizer.*add_memento_tokens"):
        tokenize_trace(traces[0], plain_tokenizer())


# ----------------------------------------------------------------------------- add_memento_tokens


@pytest.mark.parametrize("tie", [False, True])
def test_add_memento_tokens(traces, tie):
    tokz = plain_tokenizer()
    n_old = len(tokz)
    model = tiny_qwen3(n_old, tie=tie)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    added = add_memento_tokens(tokz, model, noise=0.005, seed=3)

    assert list(added) == MARKERS and sorted(added.values()) == list(range(n_old, n_old + 6))
    assert all(tokz.convert_ids_to_tokens(i) == m for m, i in added.items())
    ids, lay = tokenize_trace(traces[0], tokz)  # the markers are single tokens now
    assert lay.n_blocks == traces[0].n_blocks
    W_in = model.get_input_embeddings().weight.detach()
    W_out = model.get_output_embeddings().weight.detach()
    assert W_in.shape[0] == W_out.shape[0] == n_old + 6 == model.config.vocab_size
    assert torch.equal(W_in[:n_old], before_in) and torch.equal(W_out[:n_old], before_out)  # old rows untouched
    for W, old in ((W_in, before_in), (W_out, before_out)):
        for marker, idx in added.items():
            rel = tokz(RELATED_WORDS[marker], add_special_tokens=False)["input_ids"]
            dev = W[idx] - old[rel].mean(0)
            assert 0.003 < dev.std() < 0.007  # the related tokens' mean plus absolute noise, sigma 0.005 (rows: 0.02)
            others = [i for i in range(n_old) if i not in rel]
            assert (W[idx] - old[others]).norm(dim=1).min() > dev.norm()  # nearer the mean than any unrelated row
    if tie:
        assert torch.equal(W_in, W_out)
    assert add_memento_tokens(tokz, model) == {}  # nothing left to add
    assert torch.equal(model.get_input_embeddings().weight, W_in)

    # seeded: same seed, same rows; another seed, other rows; noise 0: exactly the mean
    def rows(**kw):
        t, m = plain_tokenizer(), tiny_qwen3(n_old, tie=tie)
        add_memento_tokens(t, m, **kw)
        return m.get_input_embeddings().weight.detach()[n_old:]

    assert torch.equal(rows(noise=0.005, seed=3), W_in[n_old:])
    assert not torch.allclose(rows(noise=0.005, seed=4), W_in[n_old:])
    exact = rows(noise=0.0)
    for k, marker in enumerate(MARKERS):
        rel = tokz(RELATED_WORDS[marker], add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(exact[k], before_in[rel].mean(0))
    torch.testing.assert_close(rows(noise=0.0, init="vocab_mean")[0], before_in.mean(0))


def test_add_memento_tokens_tokenizer_only_and_bad_init():
    tokz = plain_tokenizer()
    added = add_memento_tokens(tokz)
    assert set(added) == set(MARKERS)
    assert SpecialTokens.from_tokenizer(tokz).block_start == added["<|block_start|>"]
    assert add_memento_tokens(build_tokenizer()) == {}
    with pytest.raises(ValueError, match="init must be 'mean' or 'vocab_mean'"):
        add_memento_tokens(plain_tokenizer(), init="zeros")
