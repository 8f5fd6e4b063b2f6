"""benchmarks/gpu_check.py and gpu_wheels.py (issues 13, 25): step budgets, skips, the JSON, the wheel plan.

The GPU run itself needs a lent GPU, and the bare-machine rehearsal (`bash benchmarks/gpu_rehearse.sh`)
builds a virtual environment: neither runs here. These tests keep the check's logic honest on CPU: a
step over its budget is cut off with what it saved and the check goes on; a step whose modules are
missing is skipped naming them; the report is written after every step and on SIGTERM; the first
step runs its rehearsal sizes; the vLLM step drives an engine with vLLM's interface; the wheel plan
installs exactly what an interpreter lacks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import BENCHMARKS as BENCH


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load("gpu_check")


@pytest.fixture(scope="module")
def gpu_steps(gpu_check):
    return sys.modules["gpu_steps"]  # gpu_check imports it from benchmarks/ (its steps, run as children)


@pytest.fixture(scope="module")
def gpu_wheels():
    return load("gpu_wheels")


def check_schema(report: dict, gpu_check) -> None:
    assert report["schema"] == "kvprobe-gpu-check/2"
    assert {"mode", "started", "budget_s", "step_budget_s", "wall_s", "environment", "steps"} <= set(report)
    assert {"python", "torch", "cuda_available", "git_commit", "versions"} <= set(report["environment"])
    assert list(report["steps"]) == list(gpu_check.STEPS)
    for result in report["steps"].values():
        assert isinstance(result["status"], str)
        if result["status"] == "ok":
            assert {"wall_s", "budget_s", "figures", "checks"} <= set(result)
            assert all(isinstance(v, bool) for v in result["checks"].values())


def test_the_32k_flex_capture_runs_first_and_every_step_has_a_budget_within_8_minutes(gpu_check, gpu_steps):
    assert gpu_check.STEPS[0] == "flex32k"
    for mode in gpu_check.MODES:
        assert set(gpu_check.STEP_BUDGET_S[mode]) == set(gpu_check.STEPS)
    assert gpu_check.BUDGET_S["cuda"] <= 8 * 60
    assert gpu_steps.SIZES["cuda"]["long_length"] == 32768
    assert gpu_steps.SIZES["rehearse"]["long_length"] > 8192  # the same long-trace path, on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_step_is_skipped_and_the_exit_status_is_0(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_schema(report, gpu_check)
    assert report["mode"] == "no-cuda"
    assert {r["status"] for r in report["steps"].values()} == {"skipped: no CUDA"}
    assert "skipped: no CUDA" in capsys.readouterr().out


def test_a_step_whose_modules_are_missing_is_skipped_naming_them(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.NEEDS, "toy", ("h5py", "no_such_module_kvprobe"))
    monkeypatch.setattr(gpu_check, "run_child_step", lambda *a: pytest.fail("a skipped step was started"))
    out = tmp_path / "report.json"
    assert gpu_check.main(["--rehearse", "--steps", "toy", "vllm", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps["toy"]["status"] == "skipped: needs no_such_module_kvprobe (not installed)"
    if importlib.util.find_spec("vllm") is None:
        assert steps["vllm"]["status"] == "skipped: needs vllm (not installed)"
    else:
        assert steps["vllm"]["status"] == "skipped: vLLM's engine needs CUDA (this run is on CPU)"
    assert steps["flex32k"]["status"] == "skipped: not selected"


def test_a_step_over_its_budget_keeps_what_it_saved_and_the_check_goes_on(gpu_check, tmp_path, monkeypatch,
                                                                         capsys):
    """The budget is enforced on the real step command; the next steps still run, and the report on
    disk holds each finished step before the next one starts."""
    out = tmp_path / "report.json"
    seen = []
    real = gpu_check.timed_run

    def timed_run(cmd, timeout_s, env):
        step = cmd[cmd.index("--child") + 1]
        seen.append((step, timeout_s, json.loads(out.read_text())["steps"]))
        if step == "flex32k":  # saves a first figure, then works past its budget
            step_out = cmd[cmd.index("--step-out") + 1]
            code = (f"import json, time; open({step_out!r}, 'w').write(json.dumps("
                    "{'figures': {'build_s': 1.5}, 'checks': {'forward_runs_the_trace': True}})); time.sleep(60)")
            return real([sys.executable, "-c", code], 2, env)
        return 0, "", "", 0.1

    monkeypatch.setattr(gpu_check, "timed_run", timed_run)
    t = time.perf_counter()
    assert gpu_check.main(["--rehearse", "--steps", "flex32k", "flex", "qwen3", "--timeout", "flex32k=2",
                           "--out", str(out)]) == 1
    assert time.perf_counter() - t < 30
    assert "flex32k | timeout after 2 s" in capsys.readouterr().out  # the summary prints partial figures
    report = json.loads(out.read_text())
    check_schema(report, gpu_check)
    first = report["steps"]["flex32k"]
    assert first["status"] == "timeout after 2 s" and first["budget_s"] == 2
    assert first["figures"] == {"build_s": 1.5} and first["checks"] == {"forward_runs_the_trace": True}
    assert [s for s, _, _ in seen] == ["flex32k", "flex", "qwen3"]
    assert seen[1][2]["flex32k"]["status"] == "timeout after 2 s"  # written before the next step started
    assert seen[2][1] == gpu_check.STEP_BUDGET_S["rehearse"]["qwen3"]


def test_steps_past_the_overall_budget_are_skipped(gpu_check, tmp_path, monkeypatch):
    def slow_step(step, mode, timeout_s, env, threads, log):
        time.sleep(1.2)
        return {"status": "ok", "wall_s": 1.2, "figures": {}, "checks": {}}

    monkeypatch.setattr(gpu_check, "run_child_step", slow_step)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--rehearse", "--steps", "flex32k", "flex", "--budget", "2", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps["flex32k"]["status"] == "ok" and steps["flex32k"]["budget_s"] <= 2
    assert steps["flex"]["status"].startswith("skipped: out of the overall time budget")


def test_a_step_command_is_killed_with_its_group_at_its_budget_and_leaves_nothing_behind(gpu_check):
    env = gpu_check.child_env(1)
    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print(p.pid, flush=True); time.sleep({})")
    # over its budget: the command and the process it started are both ended
    t = time.perf_counter()
    rc, out, _, wall = gpu_check.timed_run([sys.executable, "-c", spawn.format(60)], 2, env)
    assert rc == 124 and 2 <= wall < 20 and time.perf_counter() - t < 20
    assert not alive(int(out.split()[0]))
    # finished in time but left a process holding its output open (as vLLM's engine core can): not waited for
    rc, out, _, wall = gpu_check.timed_run([sys.executable, "-c", spawn.format(0)], 30, env)
    assert rc == 0 and wall < 20
    assert not alive(int(out.split()[0]))


def alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_sigterm_writes_the_report_and_ends_the_running_step(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_check.py"), "--rehearse", "--steps", "flex32k",
                             "--out", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "flex32k: running" in line:
                break
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1
    finally:
        proc.kill()
    report = json.loads(out.read_text())
    assert report["steps"]["flex32k"]["status"] == "interrupted (SIGTERM)"
    assert report["steps"]["flex"]["status"] == "not started"


@pytest.mark.slow
def test_rehearsal_of_the_32k_flex_step_and_the_qwen3_step_writes_their_figures(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--rehearse", "--steps", "flex32k", "qwen3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    check_schema(report, gpu_check)
    steps = report["steps"]
    assert steps["flex32k"]["status"] == "ok", steps["flex32k"]
    f32 = steps["flex32k"]["figures"]
    assert f32["length"] == 9216 and f32["forward_tokens"] >= 0.95 * 9216 and f32["n_blocks"] >= 10
    assert f32["mask_warm"]["type"] == "BlockMask" and f32["attention_implementation"] == "flex_attention"
    assert f32["capture_warm"]["tokens_per_s"] > 0
    assert steps["flex32k"]["checks"] == {"forward_runs_the_trace": True, "block_mask": True, "ran_on_flex": True,
                                          "features_finite": True}
    assert steps["qwen3"]["status"] == "ok", steps["qwen3"]
    figures = steps["qwen3"]["figures"]
    assert figures["device"] == "cpu" and figures["param_hash_s"] > 0
    assert [r["length"] for r in figures["rows"]] == [512, 1024]
    for row in figures["rows"]:
        assert row["forward_tokens_per_s"] > 0 and row["capture_tokens_per_s"] > 0 and row["peak_bytes"] > 0
        assert row["capture_over_forward"] == pytest.approx(row["forward_tokens_per_s"] / row["capture_tokens_per_s"])
    assert {steps[s]["status"] for s in ("flex", "toy", "pytest")} == {"skipped: not selected"}
    assert (tmp_path / "check_steps.log").read_text().count("=====") == 4  # each step's output, in one log


class FakeVLLM:
    """vLLM's offline interface, as the vllm step uses it: `LLM(model=..., **engine args)` and
    `generate(prompts, params, use_tqdm=...)`. Stock vLLM (no Memento overlay) refuses
    `block_masking_config`. The engine checks the checkpoint folder as vLLM would read it."""

    def __init__(self) -> None:
        self.built: list[dict] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kw) -> None:
                self.kw = kw

        class Completion:
            def __init__(self, n: int) -> None:
                self.token_ids = list(range(n))

        class Output:
            def __init__(self, n: int) -> None:
                self.outputs = [Completion(n)]

        class LLM:
            def __init__(self, model: str, **kw) -> None:
                if "block_masking_config" in kw:
                    raise TypeError("EngineArgs.__init__() got an unexpected keyword argument 'block_masking_config'")
                from transformers import AutoConfig, AutoTokenizer

                config, tok = AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(kw["tokenizer"])
                assert config.architectures == ["Qwen3ForCausalLM"] and len(tok) <= config.vocab_size
                assert kw["max_model_len"] <= config.max_position_embeddings
                fake.built.append({"model": model, **kw})

            def generate(self, prompts, params, use_tqdm=True):
                assert params.kw["ignore_eos"] is True and use_tqdm is False
                return [Output(params.kw["max_tokens"]) for _ in prompts]

        self.module = type(sys)("vllm")
        self.module.LLM, self.module.SamplingParams, self.module.__version__ = LLM, SamplingParams, "0.13.0"


def test_the_vllm_step_runs_a_dummy_weight_engine_on_a_tiny_qwen3_it_writes(gpu_steps, monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    saved, skipped = [], []
    sizes = dict(gpu_steps.SIZES["rehearse"])
    gpu_steps.step_vllm(sizes, lambda figures, checks: saved.append((dict(figures), dict(checks))), skipped.append)
    assert not skipped
    figures, checks = saved[-1]
    built = fake.built[0]
    assert built["load_format"] == "dummy" and built["enforce_eager"] is True
    assert figures["overlay"].startswith("not installed: this vLLM does not know block_masking_config")
    assert figures["generated_tokens"] == sizes["vllm"]["prompts"] * sizes["vllm"]["max_tokens"]
    assert figures["tokens_per_s"] > 0 and figures["vocab"] <= gpu_steps.VLLM_MODEL["vocab"]
    assert checks == {"every_prompt_ran_to_max_tokens": True}


def test_a_vllm_that_cannot_be_imported_is_a_skip_with_its_reason(gpu_steps, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    skipped = []
    gpu_steps.step_vllm(dict(gpu_steps.SIZES["rehearse"]), lambda **kw: pytest.fail("saved"), skipped.append)
    assert skipped and skipped[0].startswith("vllm is installed but not importable: ModuleNotFoundError")


def test_pytest_output_is_parsed_and_unexpected_skips_are_flagged(gpu_check):
    output = "\n".join([
        "ss.F",
        "SKIPPED [1] tests/project/test_gpu.py:201: needs 2 GPUs",
        "SKIPPED [1] tests/project/test_gpu.py:230: vLLM with the Memento overlay is not installed",
        "SKIPPED [2] tests/project/test_gpu.py:40: needs CUDA",
        "FAILED tests/project/test_gpu.py::test_two_stage_sft_on_cuda_in_bf16 - AssertionError",
        "1 failed, 12 passed, 4 skipped, 300 deselected in 61.2s",
    ])
    parsed = gpu_check.parse_pytest(output)
    assert parsed["counts"] == {"failed": 1, "passed": 12, "skipped": 4, "deselected": 300}
    assert parsed["unexpected_skips"] == ["tests/project/test_gpu.py:40: needs CUDA"]
    assert parsed["failed"] == ["tests/project/test_gpu.py::test_two_stage_sft_on_cuda_in_bf16 - AssertionError"]
    assert gpu_check.status_of(124, "", 90) == "timeout after 90 s"
    assert gpu_check.status_of(1, "a\nValueError: bad\n", 90) == "failed (rc 1): ValueError: bad"
    assert set(gpu_check.gpu_test_files()) >= {"tests/project/test_gpu.py", "tests/toy_models/test_toy.py"}


# ----------------------------------------------------------------------------- the wheel plan


def manifest(folder: Path, packages: dict, pythons=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "manifest.json").write_text(json.dumps({"pythons": pythons or [py], "packages": packages}))
    return folder


def test_the_plan_installs_what_this_python_lacks_or_has_too_old_and_always_kvprobe(gpu_wheels, tmp_path, capsys):
    import pytest as here

    folder = manifest(tmp_path / "wheels", {
        "kvprobe": {"version": "0.1.0", "needed": ""},
        "pytest": {"version": "8.0.0", "needed": ">=1"},  # satisfied here: left alone
        "typing-extensions": {"version": "99.0", "needed": ">=99"},  # too old here
        "no-such-package-kvprobe": {"version": "1.0", "needed": ">=0.5"},  # absent here
    })
    assert gpu_wheels.plan(folder) == ["kvprobe==0.1.0", "typing-extensions==99.0", "no-such-package-kvprobe==1.0"]
    err = capsys.readouterr().err
    assert f"pytest: {here.__version__} here satisfies >=1" in err
    assert "no-such-package-kvprobe: installing 1.0: not installed here" in err
    assert "typing-extensions: installing 99.0:" in err and ">=99 needed" in err


def test_the_plan_refuses_a_folder_for_another_python(gpu_wheels, tmp_path):
    folder = manifest(tmp_path / "wheels", {}, pythons=["2.7"])
    with pytest.raises(SystemExit, match=r"holds wheels for CPython 2.7, not this Python \d\.\d+"):
        gpu_wheels.plan(folder)
    with pytest.raises(SystemExit, match="manifest.json not found: run `python benchmarks/gpu_wheels.py prepare`"):
        gpu_wheels.plan(tmp_path / "empty")


def test_what_the_folder_carries_is_what_the_image_lacks_of_kvprobe_its_train_extra_and_the_check(gpu_wheels):
    names = {gpu_wheels.canonical(re.split(r"[<>=!~; \[]", r)[0]) for r in gpu_wheels.lacking_requirements()}
    assert {"pydantic", "datasets"} <= names  # kvprobe.config; the SFT's tokenised table (train extra)
    assert not names & gpu_wheels.IMAGE_HAS
    assert {"torch", "transformers", "h5py", "scipy", "scikit-learn", "pytest", "numpy"} <= gpu_wheels.IMAGE_HAS


@pytest.mark.skipif(not (BENCH.parent / ".gpuwheels" / "manifest.json").exists(),
                    reason="no .gpuwheels/ here (python benchmarks/gpu_wheels.py prepare makes it)")
def test_the_prepared_folder_fits_the_device_call_and_holds_one_version_of_each(gpu_wheels):
    folder = BENCH.parent / ".gpuwheels"
    saved = json.loads((folder / "manifest.json").read_text())
    assert "3.12" in saved["pythons"] and "kvprobe" in saved["packages"] and "pydantic" in saved["packages"]
    files = sorted(p.name for p in folder.glob("*.whl"))
    assert files == sorted(f["file"] for p in saved["packages"].values() for f in p["files"])
    assert gpu_wheels.folder_bytes(folder) + gpu_wheels.tracked_bytes() <= gpu_wheels.TRAVEL_LIMIT
    assert not any("checkpoints/" in n for n in __import__("zipfile").ZipFile(
        next(folder.glob("kvprobe-*.whl"))).namelist())


@pytest.mark.skipif(os.environ.get("KVPROBE_GPU_REHEARSAL") != "1",
                    reason="builds a virtual environment (minutes): set KVPROBE_GPU_REHEARSAL=1")
def test_the_bare_machine_rehearsal_passes():
    done = subprocess.run(["bash", str(BENCH / "gpu_rehearse.sh")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rehearsal passed" in done.stdout
