"""Generation over several servers (one per GPU) and merging several generations files.

The servers are `tests.helpers.fake_server.FakeServer`s on 127.0.0.1 (random ports); one of them
dies mid-run: it drops the connection of the request it is answering and closes its
socket, so every later request is refused. Backoffs are tiny and every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from kvprobe.cli import main
from kvprobe.data.traces import read_jsonl
from kvprobe.serving import (
    ClientConfig,
    ServeError,
    export_pipeline_jsonl,
    generate_traces,
    merge_generations,
)
from kvprobe.serving.client import _Endpoints
from tests.helpers.fake_server import FakeServer, canned, config, lines, memento_text, prompts


def several(srvs: list[FakeServer], **kw: Any) -> ClientConfig:
    return config(srvs[0], base_url=tuple(s.base_url for s in srvs), **kw)


def dies_after(n_answers: int, get_srv: Any) -> Any:
    """A responder that answers `n_answers` requests, then dies: drops the connection and closes its socket."""
    state = {"answered": 0, "dead": False}
    lock = threading.Lock()

    def responder(path: str, body: dict, attempt: int) -> tuple[int, Any, dict]:
        with lock:
            if not state["dead"] and state["answered"] < n_answers:
                state["answered"] += 1
                return canned(path, body, attempt)
            if not state["dead"]:
                state["dead"] = True
                threading.Thread(target=get_srv().close, daemon=True).start()
        raise ConnectionResetError("the server died")  # no answer: the client sees the connection drop

    return responder


def quiet(srv: FakeServer) -> FakeServer:
    srv.httpd.handle_error = lambda request, address: None  # the dropped connections print no traceback
    return srv


# ----------------------------------------------------------------------------- config and dispatch


def test_config_takes_several_urls():
    one = ClientConfig(base_url=("http://127.0.0.1:1/v1",))
    assert one.base_url == "http://127.0.0.1:1/v1" and one.base_urls == ("http://127.0.0.1:1/v1",)
    two = ClientConfig(base_url=["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"])
    assert two.base_urls == ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    assert two.url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(ValueError, match="the same URL is given twice"):
        ClientConfig(base_url=("http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1/"))
    with pytest.raises(ValueError, match="must start with http"):
        ClientConfig(base_url=("http://127.0.0.1:1/v1", "127.0.0.1:2"))
    with pytest.raises(ValueError, match="at least one URL"):
        ClientConfig(base_url=())
    with pytest.raises(ValueError, match="dispatch must be"):
        ClientConfig(dispatch="random")


def test_least_loaded_and_round_robin_picks():
    urls = tuple(f"http://127.0.0.1:{p}/v1" for p in (1, 2, 3))
    ll = _Endpoints(ClientConfig(base_url=urls, concurrency=2))
    assert [ll.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2] and ll.pick() is None  # all full
    ll.in_flight[1] -= 2  # endpoint 1 answered both of its requests
    ll.in_flight[0] -= 1
    assert ll.pick() == 1  # the fewest in flight
    ll.dead[1] = ServeError("down")
    assert ll.pick() == 0 and ll.pick() is None  # 1 is dead, 0 and 2 are full

    rr = _Endpoints(ClientConfig(base_url=urls, concurrency=3, dispatch="round-robin"))
    assert [rr.pick() for _ in range(4)] == [0, 1, 2, 0]
    rr.in_flight[2] = 0
    assert rr.pick() == 1  # in turn, not the least loaded (2)
    rr.dead[2] = ServeError("down")
    assert [rr.pick() for _ in range(3)] == [0, 1, None]  # 2 is skipped; 0 and 1 fill up

# ----------------------------------------------------------------------------- fan-out


@pytest.mark.parametrize("dispatch", ["least-loaded", "round-robin"])
def test_prompts_fan_out_into_one_file(server, tmp_path, dispatch):
    srvs = [server() for _ in range(3)]
    out = tmp_path / "gen.jsonl"
    run = generate_traces(prompts(12), out, several(srvs, concurrency=2, dispatch=dispatch), progress=False)
    assert (run.generated, run.parse_errors) == (12, 0)
    records = lines(out)
    assert sorted(r["prompt_id"] for r in records) == sorted(f"p{i}" for i in range(12))
    for srv in srvs:  # every server got some, and each record names the server that answered it
        served = {r["prompt_id"] for r in records if r["endpoint"] == srv.base_url}
        assert served and served == set(srv.ids_requested())


def test_a_busy_server_is_given_no_more_than_its_share(server, tmp_path):
    fast_done = threading.Event()

    def slow(path, body, attempt):
        fast_done.wait(timeout=5)  # busy until the fast server has answered the rest
        return canned(path, body, attempt)

    slow_srv, fast_srv = server(slow), server()
    n = 10

    def fast(path, body, attempt):
        if len(fast_srv.requests) >= n - 2:
            fast_done.set()
        return canned(path, body, attempt)

    fast_srv.responder = fast
    out = tmp_path / "gen.jsonl"
    generate_traces(prompts(n), out, several([slow_srv, fast_srv], concurrency=2), progress=False)
    assert len(slow_srv.requests) == 2 and len(fast_srv.requests) == n - 2
    assert len(lines(out)) == n


def test_a_server_that_dies_mid_run_is_taken_out_and_its_prompts_go_elsewhere(server, tmp_path):
    a, c = server(), server()
    b = quiet(server())
    b.responder = dies_after(2, lambda: b)
    out = tmp_path / "gen.jsonl"
    with pytest.warns(UserWarning, match=rf"endpoint {b.base_url} is unreachable, taken out of rotation "
                                         r"\(2 of 3 left"):
        run = generate_traces(prompts(12), out, several([a, b, c], concurrency=2), progress=False)
    assert run.generated == 12
    records = lines(out)
    ids = [r["prompt_id"] for r in records]
    assert sorted(ids) == sorted(f"p{i}" for i in range(12)) and len(ids) == len(set(ids))  # each once
    by_b = [r["prompt_id"] for r in records if r["endpoint"] == b.base_url]
    assert len(by_b) == 2  # what b answered before it died
    lost = set(b.ids_requested()) - set(by_b)
    assert lost  # the prompts b dropped were answered by the others
    assert all(r["endpoint"] in (a.base_url, c.base_url) for r in records if r["prompt_id"] in lost)


def test_the_run_fails_only_when_no_endpoint_is_left_and_resumes(server, tmp_path):
    a, b = quiet(server()), quiet(server())
    a.responder, b.responder = dies_after(2, lambda: a), dies_after(3, lambda: b)
    out = tmp_path / "gen.jsonl"
    ps = prompts(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ServeError, match=r"no endpoint left: all 2 are unreachable; last error: prompt 'p\d+': "
                                             r"gave up on .*; 5 new record\(s\) written .*run again"):
            generate_traces(ps, out, several([a, b], concurrency=1, max_attempts=2), progress=False)
    assert len(lines(out)) == 5

    c = server()  # a fresh server: the run goes on where it stopped
    run = generate_traces(ps, out, config(c), progress=False)
    assert (run.skipped, run.generated) == (5, 5)
    ids = [r["prompt_id"] for r in lines(out)]
    assert sorted(ids) == sorted(p.prompt_id for p in ps) and len(ids) == len(set(ids))


def test_an_http_error_on_one_endpoint_still_stops_the_run(server, tmp_path):
    a = server()
    b = server(lambda path, body, attempt: (404, {"error": "no such model"}, {}))
    with pytest.raises(ServeError, match=r"HTTP 404, not retried"):
        generate_traces(prompts(6), tmp_path / "gen.jsonl", several([a, b], concurrency=1), progress=False)


def test_command_line_with_several_servers_one_dead(server, tmp_path, capsys):
    a, b = server(), quiet(server())
    b.responder = dies_after(0, lambda: b)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_id": p.prompt_id, "prompt": p.text}) + "\n"
                                              for p in prompts(4)))
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(gen), "--base-url", a.base_url,
                 b.base_url, "--dispatch", "round-robin", "--no-progress", "--max-attempts", "2"]) == 0
    captured = capsys.readouterr()
    assert f"kvprobe: warning: endpoint {b.base_url} is unreachable" in captured.err
    assert "4 generated" in captured.out
    assert {r["endpoint"] for r in lines(gen)} == {a.base_url}
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(gen), "--base-url", a.base_url,
                 a.base_url + "/"]) == 2
    assert "given twice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- merging files


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.filterwarnings("ignore:.*no usable mementos")  # the canned mementos are templated
def test_export_merges_files_and_drops_identical_duplicates(server, tmp_path, capsys):
    srv = server()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate_traces(prompts(3), a, config(srv), progress=False)  # p0 p1 p2
    generate_traces(prompts(5)[2:], b, config(srv), progress=False)  # p2 p3 p4: p2 again, same seed, same text
    rec_b = lines(b)
    for r in rec_b:  # another server, other bookkeeping: still the same generation
        r["endpoint"], r["usage"] = "http://elsewhere/v1", {"completion_tokens": 1}
        r.pop("prompt_token_ids")  # an older file without the key: the same as null
    write_records(b, rec_b)
    assert sorted(g.prompt_id for g in merge_generations([a, b])) == ["p0", "p1", "p2", "p3", "p4"]
    out = tmp_path / "traces.jsonl"
    assert export_pipeline_jsonl([a, b], out, min_blocks=2) == 5
    assert main(["export-traces", "--generations", str(a), str(b), "--out", str(out)]) == 0
    assert "5 trace(s)" in capsys.readouterr().out
    assert [t.trace_id for t in read_jsonl(out, summary_check="keep")] == [f"p{i}" for i in range(5)]


def test_export_refuses_conflicting_duplicates_by_name(tmp_path, capsys):
    a = write_records(tmp_path / "a.jsonl", [{"prompt_id": "p0", "text": memento_text("p0"), "trace": None}])
    b = write_records(tmp_path / "b.jsonl", [{"prompt_id": "p1", "text": "x", "trace": None},
                                             {"prompt_id": "p0", "text": memento_text("p0", 3), "trace": None}])
    with pytest.raises(ValueError, match=r"prompt id 'p0' is in .*a.jsonl:1 and .*b.jsonl:2 with different "
                                         r"content \(text differ\)"):
        merge_generations([a, b])
    assert main(["export-traces", "--generations", str(a), str(b), "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'p0'" in err and "different content" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t.jsonl").exists()
    dup = write_records(tmp_path / "dup.jsonl", [{"prompt_id": "p0", "text": "x"}, {"prompt_id": "p0", "text": "y"}])
    with pytest.raises(ValueError, match=r"dup.jsonl:1 and .*dup.jsonl:2"):  # within one file too
        merge_generations(dup)
