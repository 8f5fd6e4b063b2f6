"""Traces that would measure nothing: templated or content-free mementos, records the pipeline
scored 0, records without a problem, and what read_jsonl says about a missing think_suffix.

`tests/fixtures/templated_traces.jsonl` ships two good AIME records beside one whose mementos are
the templated "Block k: worked through steps a-b of the solution; ..." and one with
avg_final_score 0; `kvprobe capture --dry-run` on it must refuse, naming them.
"""

from __future__ import annotations

import json
import re

import pytest

from kvprobe.data.quality import memento_flag
from kvprobe.data.traces import TraceError, from_pipeline_record, read_generated, read_jsonl, render
from tests.helpers.cli_support import cli_quiet, write_config
from tests.helpers.traces import EXAMPLES, PIPELINE, TEMPLATED, build_tokenizer, tiny_qwen3
from tests.helpers.traces import pipeline_record as _record

FLAGGED = ["aime25-i-p02-templated", "aime25-i-p05-scored-zero"]
BLOCKS = ["Start with 1037 and split it.", "Take the first two digits, ten and three.", "Now the last two digits."]


def test_templated_and_content_free_mementos_are_flagged():
    template = [f"Block {k}: worked through steps {2 * k}-{2 * k + 1} of the solution; key quantities kept for later"
                for k in range(1, 4)]
    assert "templated mementos (blocks 0, 1, 2)" in memento_flag(BLOCKS, template)
    unrelated = ["Considered the weather outside", "Thought about lunch plans", "Remembered an appointment"]
    assert memento_flag(BLOCKS, unrelated) == "mementos sharing no content word with their block (blocks 0, 1, 2)"
    good = ["1037 split into parts", "first digits are ten and three", "last two digits next"]
    assert memento_flag(BLOCKS, good) is None
    assert memento_flag(BLOCKS, ["m0", "m1", "m2"]) is None  # too terse to judge
    assert memento_flag(BLOCKS, [good[0], unrelated[1], good[2]]) is None  # one paraphrase among three is no broken trace
    for path in (PIPELINE, EXAMPLES):
        assert all(memento_flag(t.blocks, t.summaries) is None for t in read_jsonl(path))  # real mementos pass


def test_a_case_analysis_whose_mementos_share_a_form_is_not_templated():
    """Mementos that share a form but each speak of their own block (the numbers are the content) pass;
    the same form with nothing of its block in it is flagged."""
    blocks = [f"Case n = {n}: compute n^2 + 1 = {n * n + 1}; check whether {n * n + 1} is divisible by 7, it is "
              "not divisible." for n in (3, 4, 5, 6)]
    summaries = [f"Case n = {n}: n^2 + 1 = {n * n + 1}, not divisible by 7." for n in (3, 4, 5, 6)]
    assert memento_flag(blocks, summaries) is None
    generic = [f"Block {k}: worked through steps {2 * k}-{2 * k + 1} of the solution; key quantities kept for later"
               for k in range(4)]
    assert memento_flag(blocks, generic).startswith("templated mementos (blocks 0, 1, 2, 3)")


def test_flagged_records_are_refused_with_a_count_and_ids_or_dropped_or_kept():
    with pytest.raises(TraceError) as err:
        read_jsonl(TEMPLATED)
    message = str(err.value)
    assert "\n" not in message and "2 of 4 traces have no usable mementos" in message
    assert all(repr(i) in message for i in FLAGGED) and "avg_final_score 0" in message
    assert "data.summary_check" in message
    with pytest.warns(UserWarning, match="2 of 4 traces .* left out"):
        assert [t.trace_id for t in read_jsonl(TEMPLATED, summary_check="drop")] == ["aime25-i-p05", "aime25-i-p01"]
    with pytest.warns(UserWarning, match="2 of 4 traces .* kept"):
        assert len(read_jsonl(TEMPLATED, summary_check="keep")) == 4


def test_a_generated_trace_with_templated_mementos_is_refused(tmp_path):
    with pytest.warns(UserWarning):
        templated = read_jsonl(TEMPLATED, summary_check="keep")[1]
    path = tmp_path / "gen.txt"
    path.write_text(render(templated))
    with pytest.raises(TraceError, match="1 of 1 traces have no usable mementos"):
        read_generated(path)
    with pytest.warns(UserWarning, match="kept"):
        assert read_generated(path, summary_check="keep").summaries == templated.summaries


def test_a_record_without_a_problem_is_refused_by_name():
    rec = {k: v for k, v in _record().items() if k != "problem"}
    with pytest.raises(TraceError, match=re.escape("trace 't1': no problem field (none of problem, question, prompt")):
        from_pipeline_record(rec)
    assert from_pipeline_record({**rec, "original_question": "Q?"}).prompt.startswith("Q?")


@pytest.mark.parametrize("suffix, said", [(..., "think_suffix missing in 1"), (None, "think_suffix null in 1")])
def test_an_unfinished_trace_says_whether_think_suffix_is_missing_or_null(tmp_path, suffix, said):
    rec = _record(task_id="t2", blocks=[[0, 4]], block_summaries=["m"])
    if suffix is not ...:
        rec["think_suffix"] = suffix
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_record(think_suffix="Done.")) + "\n" + json.dumps(rec) + "\n")
    with pytest.warns(UserWarning) as caught:
        read_jsonl(path)
    text = " ".join(str(w.message) for w in caught)
    assert "1 of 2 traces have no text after </think>" in text and said in text
    assert ("null" in text) == (suffix is None) and ("missing" in text) == (suffix is ...)


def test_a_new_user_dry_run_on_the_templated_sample_is_flagged_not_probed(tmp_path):
    tok = build_tokenizer()
    ckpt = tmp_path / "qwen3"
    tiny_qwen3(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    config = {"model": {"kind": "hf", "checkpoint": str(ckpt)},
              "data": {"kind": "traces", "traces": str(TEMPLATED), "n_samples": 8, "target_block": 1},
              "capture": {"layers": [0, 1], "offsets": [0, 1]}}
    path = write_config(tmp_path / "q.yaml", config)
    code, out, err = cli_quiet("capture", path, "--dry-run")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (code, out, err)
    assert "2 of 4 traces have no usable mementos" in err and all(i in err for i in FLAGGED)
    with pytest.warns(UserWarning, match="left out"):
        code, out, err = cli_quiet("capture", path, "--dry-run", "--set", "data.summary_check=drop")
    assert code == 0, err
    assert "data: 2 traces, 8 samples; token ids fed: served for 0" in out


def test_the_data_options_are_for_traces_and_the_report_says_which_ids_were_fed(tmp_path):
    from kvprobe.config import ConfigError, parse_config
    from kvprobe.experiment.pipeline import token_ids_fed

    for field, value in (("token_ids", "retokenize"), ("summary_check", "keep")):
        with pytest.raises(ConfigError, match=f"data.{field}.*data.kind 'traces'"):
            parse_config({"data": {"kind": "toy", field: value}})
    cfg = parse_config({"data": {"kind": "traces", "token_ids": "retokenize"}})
    assert token_ids_fed(tmp_path, cfg) is None  # no store yet
    store = tmp_path / "stores" / "memento"
    store.mkdir(parents=True)
    traces = {"n": 3, "served_ids": 2, "served_ids_differ": 1, "token_ids": "served", "served_ids_fed": 2}
    (store / "config.json").write_text(json.dumps({"source": {"kind": "traces", "traces": traces}}))
    assert token_ids_fed(tmp_path, cfg) == ("served ids for 2 of 3 traces, kvprobe's tokenization for the rest "
                                            "(data.token_ids: served; 2 traces carried served ids)")
