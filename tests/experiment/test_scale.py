"""Scale-out paths, checked on CPU: device maps, standard launchers, a real checkpoint on disk.

- A model dispatched over devices by accelerate (here: one layer and the LM head
  offloaded to disk, the rest on CPU; on a GPU machine the same hooks move tensors
  between GPUs) captures and generates exactly what the plain model does.
- `torchrun` with two processes splits a capture into one store equal to a single
  process's, and runs two-stage SFT as real DDP (gloo on CPU: the data is split).
- `kvprobe run` on a Hugging Face checkpoint directory (tiny Qwen3 + an offline BPE
  tokenizer) and data-pipeline traces: capture, probes, report; `model.device_map`
  gives the same stores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.experiment import capture as experiment_capture
from kvprobe.cli import main
from kvprobe.experiment import process_device
from kvprobe.config import ConfigError, parse_config
from kvprobe.memento.forward import input_device
from kvprobe.memento.generate import generate_with_compaction
from kvprobe.memento.masks import MaskConfig
from kvprobe.store import KVStore
from kvprobe.data.trace_source import TracePasscodeSource
from kvprobe.data.traces import read_jsonl
from tests.helpers.models import SPECIAL, encode
from tests.helpers.models import tiny_qwen3 as tiny_synthetic_qwen3
from tests.helpers.paths import ROOT as REPO
from tests.helpers.stores import assert_same_store
from tests.helpers.traces import PIPELINE, build_tokenizer, tiny_qwen3

dispatch_model = pytest.importorskip("accelerate", reason="the device_map tests need kvprobe[train]").dispatch_model

SPEC = CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), sites=("memento", "block_end"), batch_size=4, shard_size=8,
                   dtype="float32")
# one decoder layer and the LM head offloaded to disk (weights on "meta", loaded per forward)
OFFLOAD_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
               "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "disk"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _dispatched(model, tmp_path: Path):
    model = dispatch_model(model, device_map=OFFLOAD_MAP, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[0].self_attn.k_proj.weight.device.type == "meta"  # really offloaded
    return model


# ----------------------------------------------------------------------------- device maps


def test_capture_through_a_device_map_equals_the_plain_model(tmp_path):
    tok = build_tokenizer()
    source = TracePasscodeSource(read_jsonl(PIPELINE), tok, n_samples=8, offsets=SPEC.offsets)
    plain = run_capture(tiny_qwen3(len(tok)), source, SPEC, tmp_path / "plain", progress=False)
    model = _dispatched(tiny_qwen3(len(tok)), tmp_path)
    assert input_device(model) == torch.device("cpu")  # the embedding's execution device, not "meta"
    spread = run_capture(model, source, SPEC, tmp_path / "spread", progress=False)
    assert_same_store(plain, spread, atol=1e-5)
    with KVStore(plain) as a, KVStore(spread) as b:  # offloaded weights are hashed from their offloaded copy
        assert a.config["model"]["param_hash"] == b.config["model"]["param_hash"]
        assert a.config["model"]["n_params"] == b.config["model"]["n_params"]


def test_compaction_generation_through_a_device_map_equals_the_plain_model(tmp_path):
    ids = torch.tensor(encode("p q <think> BS a b c BE SS x y SE BS d e f BE SS y z SE BS g h BE SS w SE </think> A"))
    for cfg in (MaskConfig(0), MaskConfig(0, restart_mode=True)):
        runs = [generate_with_compaction(m, ids[:3], SPECIAL, cfg, forced_ids=ids[3:])
                for m in (tiny_synthetic_qwen3("sdpa"), _dispatched(tiny_synthetic_qwen3("sdpa"), tmp_path / cfg.name))]
        assert torch.equal(runs[0].kept_positions, runs[1].kept_positions)
        torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-5, rtol=0)
        for layer in range(2):
            for x, y in zip(runs[0].kv(layer), runs[1].kv(layer)):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_process_device_gives_each_launched_rank_its_gpu():
    assert process_device("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3", "RANK": "7"}) == "cuda:3"
    assert process_device("cuda", {}) == "cuda"  # one process: as configured
    assert process_device("cuda", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == "cuda"
    assert process_device("cuda:1", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == "cuda:1"  # explicit index wins
    assert process_device("cpu", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}) == "cpu"


@pytest.mark.parametrize("model, message", [
    ({"kind": "toy", "device_map": "auto"}, "model.device_map': only hf models"),
    ({"kind": "hf", "max_memory": {"0": "70GiB"}}, "model.max_memory': needs model.device_map"),
    ({"kind": "hf", "device_map": "auto", "attn_implementation": "flex_attention"}, "flex_attention's block mask"),
    ({"kind": "hf", "device_map": "everywhere"}, "model.device_map"),
])
def test_device_map_config_errors(model, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"model": model})


def test_cuda_device_without_cuda_is_a_usage_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"kind": "toy", "device": "cuda"}}))
    for how in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        assert main(["capture", str(config), *how]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["kvprobe: error: model.device 'cuda': CUDA is not available on this machine"]
        assert not (tmp_path / "out").exists()  # refused before the output directory is made


# ----------------------------------------------------------------------------- a checkpoint on disk, end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen3 and its offline BPE tokenizer (with the Memento markers), saved like a real checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3"
    tok = build_tokenizer()
    tiny_qwen3(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _real_model_config(tmp_path: Path, checkpoint: Path, **model) -> Path:
    cfg = {
        "name": "tiny-qwen3-traces",
        "model": {"kind": "hf", "checkpoint": str(checkpoint), "dtype": "float32", "device": "cpu", **model},
        "data": {"kind": "traces", "traces": str(PIPELINE), "n_samples": 60, "target_block": 1},
        "capture": {"layers": [0, 1], "offsets": [-1, 0, 1], "sites": ["memento", "block_end"], "batch_size": 10,
                    "shard_size": 20, "dtype": "float32"},
        "conditions": {"memento": {}, "restart": {"restart_mode": True, "mask_delimiters": True}},
        "probe": {"families": ["linear"], "n_boot": 200},
    }
    path = tmp_path / f"config{len(model)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_on_a_checkpoint_directory_with_pipeline_traces(checkpoint, tmp_path, capsys, monkeypatch):
    """Pipeline records -> passcodes injected in text -> capture -> probes -> report, from the CLI."""
    out = tmp_path / "run"
    assert main(["--threads", "1", "run", str(_real_model_config(tmp_path, checkpoint)), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "memento: linear probe accuracy (%), chance 10" in stdout
    for cond in ("memento", "restart"):
        with KVStore(out / "stores" / cond) as store:
            assert len(store) == 60 and store.config["source"]["kind"] == "traces"
            assert store.config["model"]["class"] == "Qwen3ForCausalLM"
            assert store.features(1, 1, "memento").shape == (60, 5, 2 * 2 * 16)  # tail_mean: 4 tokens + mean
    grid = json.loads((out / "probes" / "memento.json").read_text())
    assert grid and (out / "report" / "summary.md").is_file()

    # the same capture with the model spread by accelerate writes the same stores: a CPU budget
    # of 300 KB leaves the decoder layers and the LM head offloaded to disk (weights on "meta")
    spread = tmp_path / "spread"
    config = _real_model_config(tmp_path, checkpoint, device_map="auto", max_memory={"cpu": "300KB"})
    loaded, real_load = [], experiment_capture.load_model
    monkeypatch.setattr(experiment_capture, "load_model", lambda section: loaded.append(real_load(section)) or loaded[-1])
    assert main(["--threads", "1", "capture", str(config), "--out", str(spread)]) == 0
    offloaded = [n for n, p in loaded[0].named_parameters() if p.device.type == "meta"]
    assert "lm_head.weight" in offloaded and any(n.startswith("model.layers.1.") for n in offloaded), offloaded
    for cond in ("memento", "restart"):
        assert_same_store(out / "stores" / cond, spread / "stores" / cond)


# ----------------------------------------------------------------------------- launchers


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_capture_equals_one_process(tmp_path):
    overrides = ["--set", "data.n_samples=96", "--set", "capture.offsets=[-1,0,1]", "--set", "capture.shard_size=16",
                 "--set", "capture.batch_size=16"]
    done = _torchrun("-m", "kvprobe", "--threads", "1", "capture", *overrides, "--out", str(tmp_path / "two"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["--threads", "1", "capture", *overrides, "--out", str(tmp_path / "one")]) == 0
    shards = sorted(p.name for p in (tmp_path / "two" / "stores" / "memento" / "shards").iterdir())
    assert shards == sorted(f"shard_{i:06d}.{ext}" for i in range(6) for ext in ("h5", "json"))  # + checksum records
    assert_same_store(tmp_path / "one" / "stores" / "memento", tmp_path / "two" / "stores" / "memento")


@pytest.mark.slow
def test_torchrun_sft_is_data_parallel(checkpoint, tmp_path):
    """3 traces, batch 1 per process, one epoch: 2 processes take 2 steps (the data is split), one takes 3."""
    args = ["-m", "kvprobe", "sft", "--model", str(checkpoint), "--traces", str(PIPELINE), "--dtype", "float32",
            "--grad-accum", "1", "--epochs", "1", "--chat-template", "none", "--training-arg", "disable_tqdm=true"]
    done = _torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("stage ")]
    assert len(lines) == 2, done.stdout  # printed by rank 0 only
    assert all("3 traces (0 dropped as too long), 2 steps on 2 process(es)" in line for line in lines), lines
    assert (tmp_path / "two" / "stage2" / "model.safetensors").is_file()
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "3 steps on 1 process(es)" in one.stdout


@pytest.mark.parametrize("command", [["run", "experiments/toy_reproduction.yaml", "--out", "OUT"], ["probe", "OUT"]])
def test_one_process_commands_refuse_a_launcher(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = [str(tmp_path / "out") if a == "OUT" else str(REPO / a) if a.endswith(".yaml") else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs in one process, not under a launcher (WORLD_SIZE=4)" in err[0]
    assert not (tmp_path / "out").exists()
