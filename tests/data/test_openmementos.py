"""OpenMementos (microsoft/OpenMementos) read as kvprobe traces: kvprobe.data.openmementos.

The sample (tests/fixtures/openmementos_sample.jsonl) is hand-written with the dataset card's
`full` config columns. Nothing here reaches the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvprobe.data import openmementos as om
from kvprobe.data.openmementos import from_openmementos_row, read_openmementos
from kvprobe.data.traces import TraceError
from tests.helpers.paths import FIXTURES

SAMPLE = FIXTURES / "openmementos_sample.jsonl"


def _rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def _write(tmp_path: Path, rows: list[dict], name: str = "om.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_shipped_sample_has_the_cards_columns():
    for row in _rows():
        assert set(row) == set(om.DEFAULT_COLUMNS + om.FULL_COLUMNS)


@pytest.mark.parametrize("use", ["response", "full"])
def test_shipped_sample_maps_onto_traces(use):
    rows = _rows()
    traces = read_openmementos(SAMPLE, use=use)
    assert [t.trace_id for t in traces] == ["openmementos_sample-0", "openmementos_sample-1"]
    for trace, row in zip(traces, rows):
        assert trace.prompt == row["problem"]
        assert trace.summaries == row["block_summaries"]
        assert trace.n_blocks == len(row["blocks"])
        for text, (first, last) in zip(trace.blocks, row["blocks"]):
            assert text == " ".join(row["sentences"][first:last + 1])
        assert trace.answer == row["response"].split("</think>", 1)[1].strip()
        assert trace.token_ids is None
    assert traces[1].answer.startswith("```python\ndef fib(n):")


def test_default_config_rows_need_only_problem_and_response(tmp_path):
    rows = [{k: r[k] for k in om.DEFAULT_COLUMNS} for r in _rows()]
    path = _write(tmp_path, rows)
    assert [t.n_blocks for t in read_openmementos(path)] == [2, 3]
    with pytest.raises(TraceError, match=r"row 0: .*missing column\(s\) sentences, blocks, block_summaries.*'full'"):
        read_openmementos(path, use="full")


def test_parquet_as_the_hub_ships_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), path)
    for use in ("response", "full"):
        got, want = read_openmementos(path, use=use, id_prefix="x"), read_openmementos(SAMPLE, use=use, id_prefix="x")
        assert got == want


def test_limit_and_id_prefix():
    traces = read_openmementos(SAMPLE, limit=1, id_prefix="OpenMementos")
    assert [t.trace_id for t in traces] == ["OpenMementos-0"]


def test_the_hub_needs_the_opt_in(monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(om, "_rows_from_hub", no_network)
    with pytest.raises(TraceError, match="allow downloads"):
        read_openmementos()


def test_the_hub_path_with_the_opt_in_reads_the_config_for_use(monkeypatch):
    asked = []

    def fake_hub(config, limit):
        asked.append((config, limit))
        return iter(_rows()[:limit])

    monkeypatch.setattr(om, "_rows_from_hub", fake_hub)
    traces = read_openmementos(allow_download=True, use="full", limit=1)
    assert asked == [("full", 1)] and [t.trace_id for t in traces] == ["OpenMementos-0"]
    read_openmementos(allow_download=True, limit=2)
    assert asked[-1] == ("default", 2)


def _row(**kw) -> dict:
    row = dict(_rows()[0])
    row.update(kw)
    return row


@pytest.mark.parametrize("change, message", [
    ({"response": "Sure. <think>\n<|block_start|>a b<|block_end|>\n<|summary_start|>a<|summary_end|>\n</think>\nx"},
     "text before <think>"),
    ({"problem": None}, r"missing column\(s\) problem"),
    ({"problem": 3}, "'problem' must be a string"),
    ({"response": "<think>\n<|block_start|>unfinished"}, "unfinished"),
])
def test_row_errors(change, message):
    with pytest.raises(TraceError, match=message):
        from_openmementos_row(_row(**change), "r0")


def test_full_blocks_must_agree_with_the_response():
    row = _row(blocks=[[0, 5]], block_summaries=["Powers of 2 mod 7 have period 3, so 2^100 leaves 2."])
    assert from_openmementos_row(row, "r0").n_blocks == 2  # use="response" ignores the full columns
    with pytest.raises(TraceError, match="'blocks' has 1 blocks but 'response' has 2"):
        from_openmementos_row(row, "r0", use="full")


def test_errors_name_the_file_and_row(tmp_path):
    rows = _rows()
    rows[1]["response"] = "no markers at all"
    path = _write(tmp_path, rows)
    with pytest.raises(TraceError, match=r"om\.jsonl: row 1: trace 'om-1': no Memento markers"):
        read_openmementos(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows()[0]) + "\n{oops\n")
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: invalid JSON"):
        read_openmementos(bad)
    with pytest.raises(TraceError, match="read as .parquet"):
        read_openmementos(_write(tmp_path, _rows(), "om.csv"))


def test_templated_mementos_are_flagged(tmp_path):
    row = _rows()[1]
    templ = [f"Block {k}: worked through steps {k}-{k + 1} of the solution; key quantities kept for later"
             for k in range(3)]
    parts = [f"<|block_start|>{' '.join(row['sentences'][a:b + 1])}<|block_end|>\n<|summary_start|>{m}<|summary_end|>\n"
             for (a, b), m in zip(row["blocks"], templ)]
    row = dict(row, response="<think>\n" + "\n".join(parts) + "</think>\n\nfib", block_summaries=templ)
    path = _write(tmp_path, [_rows()[0], row])
    with pytest.raises(TraceError, match=r"1 of 2 traces have no usable mementos \(e.g. 'om-1'"):
        read_openmementos(path)
    with pytest.warns(UserWarning, match="left out"):
        assert [t.trace_id for t in read_openmementos(path, summary_check="drop")] == ["om-0"]


# ----------------------------------------------------------------------------- config


def test_config_reads_openmementos(tmp_path):
    from tests.helpers.traces import build_tokenizer

    from kvprobe.config import ConfigError, parse_config
    from kvprobe.experiment import make_source
    from kvprobe.experiment.errors import ExperimentError

    tokdir = tmp_path / "tok"
    build_tokenizer().save_pretrained(tokdir)
    data = {"kind": "traces", "traces": str(SAMPLE), "traces_format": "openmementos", "n_samples": 4,
            "target_block": 0, "chat_template": "none"}
    cfg = parse_config({"model": {"kind": "hf", "checkpoint": str(tokdir)}, "data": data,
                        "capture": {"offsets": [0, 1]}})
    src = make_source(cfg)
    assert [t.trace_id for t in src.traces] == ["openmementos_sample-0", "openmementos_sample-1"]
    hub = parse_config({"model": {"kind": "hf", "checkpoint": str(tokdir)},
                        "data": dict(data, traces="microsoft/OpenMementos")})
    with pytest.raises(ExperimentError, match="model.allow_download"):
        make_source(hub)
    with pytest.raises(ConfigError, match="data.traces_format"):
        parse_config({"data": {"kind": "toy", "traces_format": "openmementos"}})
