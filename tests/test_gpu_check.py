"""benchmarks/gpu_check.py (issue 13): its CPU dry run, its JSON schema, and clean skips without CUDA.

The GPU run itself needs a lent GPU; these checks keep the script's logic working on CPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_schema(report: dict, gpu_check) -> None:
    assert report["schema"] == "kvprobe-gpu-check/1"
    assert {"mode", "started", "budget_s", "wall_s", "environment", "steps"} <= set(report)
    assert {"python", "torch", "cuda_available", "git_commit"} <= set(report["environment"])
    assert list(report["steps"]) == list(gpu_check.STEPS)
    for result in report["steps"].values():
        assert isinstance(result["status"], str)
        if result["status"] == "ok":
            assert {"wall_s", "timeout_s", "figures", "checks"} <= set(result)
            assert all(isinstance(v, bool) for v in result["checks"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_step_is_skipped_and_the_exit_status_is_0(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_schema(report, gpu_check)
    assert report["mode"] == "no-cuda"
    assert {r["status"] for r in report["steps"].values()} == {"skipped: no CUDA"}
    assert "skipped: no CUDA" in capsys.readouterr().out


def test_cpu_dry_run_of_the_qwen3_step_writes_its_figures(gpu_check, tmp_path):
    out = tmp_path / "dry.json"
    assert gpu_check.main(["--cpu-dry-run", "--steps", "qwen3", "--out", str(out), "--timeout", "qwen3=120"]) == 0
    report = json.loads(out.read_text())
    check_schema(report, gpu_check)
    assert report["mode"] == "cpu-dry-run"
    steps = report["steps"]
    assert steps["qwen3"]["status"] == "ok", steps["qwen3"]
    assert {steps[s]["status"] for s in ("pytest", "flex", "toy")} == {"skipped: not selected"}
    figures = steps["qwen3"]["figures"]
    assert figures["device"] == "cpu" and figures["param_hash_s"] > 0
    assert [r["length"] for r in figures["rows"]] == [512, 1024]
    for row in figures["rows"]:
        assert row["forward_tokens_per_s"] > 0 and row["capture_tokens_per_s"] > 0 and row["peak_bytes"] > 0
        assert row["capture_over_forward"] == pytest.approx(row["forward_tokens_per_s"] / row["capture_tokens_per_s"])


def test_pytest_output_is_parsed_and_unexpected_skips_are_flagged(gpu_check):
    output = "\n".join([
        "ss.F",
        "SKIPPED [1] tests/test_gpu.py:201: needs 2 GPUs",
        "SKIPPED [1] tests/test_gpu.py:230: vLLM with the Memento overlay is not installed",
        "SKIPPED [2] tests/test_gpu.py:40: needs CUDA",
        "FAILED tests/test_gpu.py::test_two_stage_sft_on_cuda_in_bf16 - AssertionError",
        "1 failed, 12 passed, 4 skipped, 300 deselected in 61.2s",
    ])
    parsed = gpu_check.parse_pytest(output)
    assert parsed["counts"] == {"failed": 1, "passed": 12, "skipped": 4, "deselected": 300}
    assert parsed["unexpected_skips"] == ["tests/test_gpu.py:40: needs CUDA"]
    assert parsed["failed"] == ["tests/test_gpu.py::test_two_stage_sft_on_cuda_in_bf16 - AssertionError"]
    assert gpu_check.status_of(124, "", 90) == "timeout after 90 s"
    assert gpu_check.status_of(1, "a\nValueError: bad\n", 90) == "failed (rc 1): ValueError: bad"
