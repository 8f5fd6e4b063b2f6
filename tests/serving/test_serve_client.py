"""The served-model trace client against a fake OpenAI-compatible server on 127.0.0.1.

The server is `tests.helpers.fake_server.FakeServer`, started by the `server` fixture
(tests/serving/conftest.py). Client backoff is made tiny (or the sleep function is
replaced) so every test takes well under a second. Offline vLLM: test_offline.py.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import warnings
from typing import Any

import pytest

from kvprobe.cli import main
from kvprobe.data.traces import from_generated_text, read_jsonl
from kvprobe.memento.masks import MaskConfig
from kvprobe.serving import (
    ClientConfig,
    Generation,
    Prompt,
    ServeError,
    block_masking_config,
    completed_ids,
    export_pipeline_jsonl,
    generate_traces,
    prompt_seed,
    read_generations,
    read_prompts,
    request_body,
    serve_command,
)
from tests.helpers.fake_server import canned, config, lines, memento_text, ok, pid_of, prompts


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_served_token_ids_are_asked_for_and_kept_to_the_pipeline_record(server, tmp_path, endpoint):
    """vLLM answers return_token_ids with the ids on the choice (prompt ids on the answer for chat)."""
    def with_ids(path: str, body: dict, attempt: int) -> tuple[int, Any, dict]:
        status, payload, headers = canned(path, body, attempt)
        payload["choices"][0]["token_ids"] = [11, 12, 13]
        (payload["choices"][0] if endpoint == "completions" else payload)["prompt_token_ids"] = [1, 2]
        return status, payload, headers

    srv = server(with_ids)
    out = tmp_path / "gen.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # completions prompts without an assistant turn: tested in tests/data/test_chat.py
        generate_traces(prompts(2), out, config(srv, endpoint=endpoint), progress=False)
    assert all(body["return_token_ids"] is True for _, body in srv.requests)
    gens = read_generations(out)
    assert all(g.prompt_token_ids == [1, 2] and g.token_ids == [11, 12, 13] for g in gens)
    assert all(g.trace.token_ids == (1, 2, 11, 12, 13) for g in gens)
    export_pipeline_jsonl(out, tmp_path / "traces.jsonl")
    assert [t.token_ids for t in read_jsonl(tmp_path / "traces.jsonl", summary_check="keep")] == [(1, 2, 11, 12, 13)] * 2
    assert "return_token_ids" not in request_body(prompts(1)[0], ClientConfig(return_token_ids=False))


# ----------------------------------------------------------------------------- the fork's config


def test_block_masking_config_from_mask_config():
    assert block_masking_config(MaskConfig(keep_last_n_blocks=0)) == {
        "enable": True, "keep_last_n_blocks": 0, "mask_delimiters": False,
        "compact_on_summary_end": True, "restart_mode": False}
    phi = block_masking_config(MaskConfig(keep_last_n_blocks=2, mask_delimiters=True, restart_mode=True,
                                          restart_sees_kept_blocks=True), debug=True)
    assert phi == {"enable": True, "keep_last_n_blocks": 2, "mask_delimiters": True,
                   "compact_on_summary_end": True, "restart_mode": True, "debug": True}
    causal = block_masking_config(MaskConfig(keep_last_n_blocks=-1))
    assert causal["enable"] is False and causal["keep_last_n_blocks"] == -1
    with pytest.raises(ValueError, match="no equivalent in the vLLM fork"):
        block_masking_config(MaskConfig(keep_last_n_blocks=-1, restart_mode=True))
    # the fork's restart evicts the delimiters whatever mask_delimiters says: the visible variant is kvprobe's own
    with pytest.raises(ValueError, match="restart-delims-visible.*kvprobe-only control"):
        block_masking_config(MaskConfig(keep_last_n_blocks=0, mask_delimiters=False, restart_mode=True))
    answer = block_masking_config(MaskConfig(keep_last_n_blocks=0, keep_last_block_for_answer=True))
    assert answer["keep_last_block_for_answer"] is True


def test_serve_command():
    argv = serve_command("/ckpt/memento-qwen3-8b", MaskConfig(restart_mode=True), port=9000)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "/ckpt/memento-qwen3-8b"
    assert argv[argv.index("--port") + 1] == "9000"
    assert "--no-enable-prefix-caching" in argv
    cfg = json.loads(argv[argv.index("--block-masking-config") + 1])
    assert cfg["restart_mode"] is True and cfg["enable"] is True and cfg["mask_delimiters"] is True
    assert "--trust-remote-code" not in argv  # only when asked for
    assert "--trust-remote-code" in serve_command("/ckpt/x", MaskConfig(), trust_remote_code=True)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_generate_sends_skip_special_tokens_false_and_parses(server, tmp_path, endpoint):
    srv = server()
    out = tmp_path / "gen.jsonl"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = generate_traces(prompts(3), out, config(srv, endpoint=endpoint), progress=False)
    assert [str(w.message).startswith("3 of 3 completions prompts") for w in seen] == (
        [True] if endpoint == "completions" else [])  # bare prompts: the fork would never evict
    assert (run.total, run.skipped, run.generated, run.parse_errors) == (3, 0, 3, 0)

    assert len(srv.requests) == 3
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    for req_path, body in srv.requests:
        assert req_path == path
        assert body["skip_special_tokens"] is False
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_k"]) == ("memento", 512, 0.6, 20)
        assert body["seed"] == prompt_seed(7, pid_of(body))
        assert ("messages" in body) == (endpoint == "chat") and ("prompt" in body) == (endpoint == "completions")
    assert len({b["seed"] for _, b in srv.requests}) == 3  # one seed per prompt

    records = {r["prompt_id"]: r for r in lines(out)}
    assert sorted(records) == ["p0", "p1", "p2"]
    for i in range(3):
        r = records[f"p{i}"]
        expected = from_generated_text(memento_text(f"p{i}"), f"p{i}")
        assert r["error"] is None and r["finish_reason"] == "stop" and r["text"] == memento_text(f"p{i}")
        assert r["trace"] == {"trace_id": f"p{i}", "prompt": f"Problem {i}?", "blocks": expected.blocks,
                              "summaries": expected.summaries, "answer": f"The answer for p{i} is 42."}
    gens = read_generations(out)
    assert [g.trace.n_blocks for g in gens] == [2, 2, 2]


def test_prompt_seed_is_stable_and_per_prompt():
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, "a"), prompt_seed(0, "b"), prompt_seed(1, "a")}) == 3
    assert prompt_seed(None, "a") is None
    assert 0 <= prompt_seed(123, "x") < 2**31


def test_chat_reasoning_field_is_joined_back(server, tmp_path):
    def split(path, body, attempt):
        pid = pid_of(body)
        full = memento_text(pid)
        reasoning = full[len("<think>\n"): full.index("</think>")]
        msg = {"role": "assistant", "content": f"The answer for {pid} is 42.", "reasoning_content": reasoning}
        return 200, {"choices": [{"message": msg, "finish_reason": "stop"}]}, {}

    out = tmp_path / "gen.jsonl"
    generate_traces(prompts(1), out, config(server(split)), progress=False)
    (gen,) = read_generations(out)
    assert gen.error is None and gen.trace.n_blocks == 2 and gen.trace.answer == "The answer for p0 is 42."


def test_retries_500_and_429_then_succeeds(server, tmp_path):
    def flaky(path, body, attempt):
        if attempt == 1:
            return 500, {"error": "boom"}, {}
        if attempt == 2:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        return canned(path, body, attempt)

    srv = server(flaky)
    waits: list[float] = []
    out = tmp_path / "gen.jsonl"
    run = generate_traces(prompts(2), out, config(srv, max_attempts=3, jitter=0.0, backoff=0.5, max_backoff=0.75),
                          progress=False, sleep=waits.append)
    assert run.generated == 2
    assert sorted(srv.ids_requested()) == ["p0", "p0", "p0", "p1", "p1", "p1"]
    assert sorted(waits) == [0.5, 0.5, 0.75, 0.75]  # 0.5, then 1.0 capped at 0.75, per prompt
    assert completed_ids(out) == {"p0", "p1"}


def test_retries_are_bounded_and_name_the_prompt(server, tmp_path):
    srv = server(lambda path, body, attempt: (503, {"error": "overloaded"}, {}))
    out = tmp_path / "gen.jsonl"
    with pytest.raises(ServeError, match=r"prompt 'p0': gave up on .*/v1/chat/completions after 3 attempt\(s\); "
                                         r"last error: HTTP 503") as info:
        generate_traces(prompts(1), out, config(srv, max_attempts=3), progress=False)
    assert info.value.prompt_id == "p0"
    assert srv.ids_requested() == ["p0"] * 3
    assert completed_ids(out) == set()


def test_client_errors_are_not_retried(server, tmp_path):
    srv = server(lambda path, body, attempt: (404, {"error": "model 'memento' does not exist"}, {}))
    with pytest.raises(ServeError, match=r"prompt 'p0'.*HTTP 404, not retried.*base_url end in /v1"):
        generate_traces(prompts(1), tmp_path / "gen.jsonl", config(srv, concurrency=1), progress=False)
    assert srv.ids_requested() == ["p0"]


def test_bad_url_fails_after_bounded_retries(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    cfg = ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", max_attempts=4, backoff=0.25, jitter=0.0,
                       max_backoff=10.0, connect_timeout=2.0)
    with pytest.raises(ServeError, match=rf"prompt 'p0': gave up on http://127.0.0.1:{port}/v1/chat/completions "
                                         r"after 4 attempt\(s\); last error: ConnectError"):
        generate_traces(prompts(1), tmp_path / "gen.jsonl", cfg, progress=False, sleep=waits.append)
    assert waits == [0.25, 0.5, 1.0]  # exponential backoff between the 4 attempts


def test_unfinished_and_invalid_traces_are_recorded_not_raised(server, tmp_path):
    def mixed(path, body, attempt):
        pid = pid_of(body)
        if pid == "p0":  # cut off by max_tokens inside block 1
            return ok(path, body, "<think>\n<|block_start|>a<|block_end|>\n<|summary_start|>m<|summary_end|>\n"
                                  "<|block_start|>half a thou", finish="length")
        if pid == "p1":
            return ok(path, body, "no markers at all")
        return canned(path, body, attempt)

    out = tmp_path / "gen.jsonl"
    run = generate_traces(prompts(3), out, config(server(mixed)), progress=False)
    assert (run.generated, run.parse_errors) == (3, 2)
    gens = {g.prompt_id: g for g in read_generations(out)}
    assert gens["p0"].trace is None and "block 1 is unfinished" in gens["p0"].error
    assert "finish_reason 'length'" in gens["p0"].error and gens["p0"].finish_reason == "length"
    assert gens["p1"].trace is None and "no Memento markers" in gens["p1"].error
    assert gens["p2"].error is None and gens["p2"].trace.n_blocks == 2


# ----------------------------------------------------------------------------- resuming


def test_resume_after_a_failure_never_duplicates(server, tmp_path):
    healthy = threading.Event()

    def dies_after_p3(path, body, attempt):
        if int(pid_of(body)[1:]) >= 4 and not healthy.is_set():
            return 500, {"error": "GPU fell off the bus"}, {}
        return canned(path, body, attempt)

    srv = server(dies_after_p3)
    out = tmp_path / "gen.jsonl"
    ps = prompts(10)
    with pytest.raises(ServeError, match=r"prompt 'p[4-9]'.*run again to continue"):
        generate_traces(ps, out, config(srv, concurrency=2, max_attempts=2), progress=False)
    first = [r["prompt_id"] for r in lines(out)]
    assert set(first) == {"p0", "p1", "p2", "p3"}  # no new request was started after the failure
    assert len(first) == 4

    # a crash in the middle of a write leaves a cut-off last line: it is dropped and redone
    with out.open("a") as f:
        f.write('{"prompt_id": "p4", "text": "<think>')
    assert completed_ids(out) == set(first)

    healthy.set()
    n_before = len(srv.requests)
    run = generate_traces(ps, out, config(srv, concurrency=3), progress=False)
    assert (run.total, run.skipped, run.generated) == (10, 4, 6)
    assert sorted(srv.ids_requested()[n_before:]) == [f"p{i}" for i in range(4, 10)]  # only the missing ones
    ids = [r["prompt_id"] for r in lines(out)]
    assert sorted(ids) == sorted(p.prompt_id for p in ps) and len(ids) == len(set(ids))

    # a third run has nothing to do and sends nothing
    n_before = len(srv.requests)
    run = generate_traces(ps, out, config(srv), progress=False)
    assert (run.skipped, run.generated) == (10, 0) and len(srv.requests) == n_before


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text('{"prompt_id": "a"}\nnot json\n{"prompt_id": "b"}\n')
    with pytest.raises(ValueError, match=r"gen.jsonl:2: not a JSON line"):
        completed_ids(out)


def test_duplicate_prompt_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt id 'p0' appears twice"):
        generate_traces(prompts(2) + prompts(1), tmp_path / "gen.jsonl", progress=False)


# ----------------------------------------------------------------------------- files and export


def test_export_round_trips_through_read_jsonl(server, tmp_path):
    def varied(path, body, attempt):
        pid = pid_of(body)
        if pid == "p3":
            return ok(path, body, "garbage")
        return ok(path, body, memento_text(pid, n_blocks=int(pid[1:]) + 1))

    gen = tmp_path / "gen.jsonl"
    generate_traces(prompts(4), gen, config(server(varied)), progress=False)
    n = export_pipeline_jsonl(gen, tmp_path / "traces.jsonl", min_blocks=2)
    assert n == 2  # p1 (2 blocks) and p2 (3 blocks); p0 has 1 block, p3 failed to parse
    back = {t.trace_id: t for t in read_jsonl(tmp_path / "traces.jsonl", summary_check="keep")}
    originals = {g.prompt_id: g.trace for g in read_generations(gen) if g.trace is not None}
    assert sorted(back) == ["p1", "p2"]
    for pid, trace in back.items():
        assert trace == originals[pid]


def test_generation_json_round_trip():
    g = Generation("x", "t", "stop", from_generated_text(memento_text("x"), "x"), None, {"a": 1})
    assert Generation.from_json(json.loads(json.dumps(g.to_json()))) == g


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt_id": "a", "prompt": "templated a", "problem": "A?"}\n\n'
                    '{"task_id": 7, "question": "Q7?"}\n')
    assert read_prompts(path) == [Prompt("a", "templated a", "A?"), Prompt("7", "Q7?")]
    path.write_text('{"text": "no id"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: needs an id"):
        read_prompts(path)


def test_command_line(server, tmp_path, capsys):
    srv = server()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_id": p.prompt_id, "prompt": p.text}) + "\n"
                                              for p in prompts(2)))
    gen, traces = tmp_path / "gen.jsonl", tmp_path / "traces.jsonl"
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(gen), "--base-url",
                 srv.base_url, "--no-progress", "--max-attempts", "2"]) == 0
    assert main(["export-traces", "--generations", str(gen), "--out", str(traces), "--min-blocks", "2"]) == 0
    assert [t.trace_id for t in read_jsonl(traces, summary_check="keep")] == ["p0", "p1"]
    assert main(["serve", "--model-path", "/m", "--restart-mode", "--print"]) == 0
    assert '"restart_mode": true' in capsys.readouterr().out
    assert main(["generate", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(gen)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_serve_without_vllm_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    import kvprobe.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "find_spec", lambda name: None)
    assert main(["serve", "--model-path", "/m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vLLM is not installed" in err[0] and "--print" in err[0]
