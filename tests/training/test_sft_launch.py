"""The launch configs of experiments/launch/, checked as far as a CPU allows.

- Both configs load through accelerate's own loader with the fields the docs promise, and
  the FSDP config becomes, through accelerate's launcher, the FSDP plugin a GPU rank builds
  (FSDP2, full shard, Qwen3DecoderLayer wrapping, activation checkpointing, sharded state dict).
- `accelerate launch --config_file experiments/launch/fsdp_qwen3.yaml --num_processes 2` starts
  two CPU ranks that train both SFT stages on a tiny Qwen3 with the tokenised table built once
  (rank 0 builds, rank 1 maps it) and exit cleanly (`exit_if_launched`). accelerate applies FSDP
  on GPUs only; on CPU the ranks run DDP over gloo, and the test pins that, so the FSDP sharding
  itself is not exercised here (docs/real_models.md says so).
- DeepSpeed is not installed here: the ZeRO-3 config is loaded and checked, never launched.
- Every launch line in the docs and the code names a config that exists.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvprobe.training import sft
from tests.helpers.paths import ROOT as REPO
from tests.helpers.traces import PIPELINE, build_tokenizer, tiny_qwen3

LAUNCH = REPO / "experiments" / "launch"
FSDP = LAUNCH / "fsdp_qwen3.yaml"
ZERO3 = LAUNCH / "zero3.yaml"


def _load(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def _launcher_env(config: Path) -> dict[str, str]:
    """The environment accelerate's launcher gives each rank for `config` (its own parser and
    validation, then the multi-GPU launcher's environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_the_fsdp_config_is_full_shard_bf16_with_qwen3_layer_wrapping(monkeypatch):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    cfg = _load(FSDP)
    assert (cfg.distributed_type, cfg.mixed_precision, cfg.num_processes, cfg.use_cpu) == (
        DistributedType.FSDP, "bf16", 8, False)
    assert cfg.fsdp_config == {
        "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "Qwen3DecoderLayer", "fsdp_activation_checkpointing": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False}
    # what a rank launched with it builds
    env = _launcher_env(FSDP)
    assert (env["ACCELERATE_USE_FSDP"], env["ACCELERATE_MIXED_PRECISION"], env["FSDP_SHARDING_STRATEGY"]) == (
        "true", "bf16", "FULL_SHARD")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.activation_checkpointing) == (2, True, True)
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT and plugin.cpu_ram_efficient_loading
    # the class it wraps is a Qwen3's decoder layer
    model = tiny_qwen3(300)
    assert {type(layer).__name__ for layer in model.model.layers} == {"Qwen3DecoderLayer"}
    assert "Qwen3DecoderLayer" in model._no_split_modules
    # under it, kvprobe leaves activation checkpointing to FSDP where FSDP applies (GPUs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sft._fsdp_checkpoints_activations()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not sft._fsdp_checkpoints_activations()  # a CPU launch is DDP: the Trainer's own checkpointing stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    assert not sft._fsdp_checkpoints_activations()


def test_the_zero3_config_is_stage3_bf16_with_the_trainers_values():
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    cfg = _load(ZERO3)
    assert (cfg.distributed_type, cfg.mixed_precision, cfg.num_processes) == (DistributedType.DEEPSPEED, "bf16", 8)
    assert cfg.deepspeed_config == {"deepspeed_config_file": "experiments/launch/zero3.json", "zero3_init_flag": False}
    path = REPO / cfg.deepspeed_config["deepspeed_config_file"]  # relative: launched from the repository root
    ds = HfDeepSpeedConfig(str(path))
    assert ds.is_zero3() and not ds.is_offload()
    assert ds.get_value("bf16.enabled") == "auto"
    assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True  # whole final model
    raw = json.loads(path.read_text())
    autos = sorted(k for k, v in raw.items() if v == "auto")
    assert autos == ["gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                     "train_micro_batch_size_per_gpu"]  # the Trainer fills them from the recipe
    assert "optimizer" not in raw and "scheduler" not in raw  # the Trainer's AdamW and cosine schedule


def test_the_zero3_config_takes_the_recipes_values():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it is not run on CPU here)")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    ds = HfTrainerDeepSpeedConfig(str(LAUNCH / "zero3.json"))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=1, gradient_accumulation_steps=64,
                             max_grad_norm=1.0, bf16=True, report_to="none", use_cpu=True)
    ds.trainer_config_process(args)
    assert (ds.get_value("train_micro_batch_size_per_gpu"), ds.get_value("gradient_accumulation_steps"),
            ds.get_value("gradient_clipping"), ds.get_value("bf16.enabled")) == (1, 64, 1.0, True)


LAUNCH_LINE = re.compile(r"accelerate launch\s+(?:--|-m\b)[^\n`]*")  # a command, not the words in prose


def test_every_launch_line_names_a_config_that_exists():
    """Docs, README and code: every `accelerate launch` names --config_file of a shipped config;
    no line names the fsdp.yaml that never existed; no SFT of Qwen3-8B is suggested as plain DDP."""
    files = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", *sorted((REPO / "kvprobe").rglob("*.py")),
             *sorted(LAUNCH.glob("*.yaml"))]
    lines = []
    for path in files:
        text = path.read_text().replace("\\\n", " ")  # join continued shell lines
        assert not re.search(r"(?<![\w/])fsdp\.yaml", text), f"{path} names fsdp.yaml"
        for line in LAUNCH_LINE.findall(text):
            lines.append((path, line))
            named = re.search(r"--config_file\s+(\S+)", line)
            assert named, f"{path}: {line!r} names no config"
            assert (REPO / named.group(1)).is_file(), f"{path}: {named.group(1)} does not exist"
        for line in re.findall(r"torchrun[^\n`]*kvprobe sft[^\n`]*", text):
            assert "8B" not in line and "8b" not in line, f"{path}: {line!r} suggests plain DDP for 8B"
    named = {re.search(r"--config_file\s+(\S+)", line).group(1) for _, line in lines}
    assert {"experiments/launch/fsdp_qwen3.yaml", "experiments/launch/zero3.yaml"} <= named


# ----------------------------------------------------------------------------- a real launch on CPU


DRIVER = """
import json, os, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from kvprobe.data.traces import read_jsonl
from kvprobe.training.sft import exit_if_launched, two_stage_sft

ckpt, traces, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
first, second = two_stage_sft(model, tok, read_jsonl(traces), out, max_length=1000, gradient_accumulation_steps=1,
                              num_train_epochs=1, logging_steps=1, disable_tqdm=True, save_strategy="no")
trainer = second.trainer
report = json.dumps({
    "rank": int(os.environ["RANK"]), "world": second.world_size, "steps": [first.steps, second.steps],
    "reused": [first.tokenized_reused, second.tokenized_reused], "table": second.tokenized.name,
    "truncated": sorted(second.truncated), "distributed": str(trainer.accelerator.distributed_type),
    "fsdp_env": [os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")],
    "checkpointing": trainer.args.activation_checkpointing, "attn": model.config._attn_implementation,
    "losses": second.losses})
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:  # one file each: no interleaved output
    f.write(report)
exit_if_launched()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_trains_two_ranks_on_cpu(tmp_path):
    tok = build_tokenizer()
    ckpt = tmp_path / "ckpt"
    tiny_qwen3(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(driver), str(ckpt), str(PIPELINE),
           str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["steps"] == [2, 2]  # 3 traces split over 2 ranks, batch 1: 2 steps
        assert r["truncated"] == ["aime25-i-p02", "aime25-i-p05"] and r["table"] == ranks[0]["table"]
        # accelerate runs FSDP on GPUs only: these CPU ranks are DDP over gloo, with the config's FSDP env
        assert r["distributed"] == "DistributedType.MULTI_CPU" and r["fsdp_env"] == ["true", "Qwen3DecoderLayer"]
        assert r["checkpointing"] is True and r["attn"] == "sdpa"
        assert len(r["losses"]) == 2 and all(0 < x < 20 for x in r["losses"])
    # the main process tokenised for both stages' first use; rank 1 mapped its table, and stage 2 reused it
    assert ranks[0]["reused"] == [False, True] and ranks[1]["reused"] == [True, True]
    assert [p.name for p in (tmp_path / "out" / "tokenized").iterdir()] == [ranks[0]["table"]]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "stage2")
    assert saved.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
