"""Bad input to serving, chat templates, checkpoints, SFT and traces: one line, exit 2, nothing changed.

The same contract as test_bad_input.py, for the inputs of `serve`, `generate`, `generate-offline`,
`export-traces`, `sft`, `toy eval` and a capture of traces: numeric flags out of range (named by
their flag), chat templates that are no template (not .jinja, not valid Jinja, raising, dropping
the prompt, not UTF-8), damaged or unsafe checkpoints (named by file), a checkpoint's own code
under --dry-run (never run), and trace files too long or not UTF-8 (named by file and line).
Everything runs in-process on one sandbox built once (a tiny random Qwen3 with its offline
tokenizer, saved like a real checkpoint, and its damaged copies); nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kvprobe.data.traces as traces_module
from kvprobe.errors import KVProbeWarning
from kvprobe.experiment import load_model
from kvprobe.experiment.kinds import CheckpointError, refusing_damaged_weights, remote_code
from toy_models.checkpoint import CHECKPOINT_DIR
from tests.helpers.cli_support import FAST, assert_refused_untouched, cli, sandbox_args, write_config
from tests.helpers.paths import FIXTURES
from tests.helpers.sandbox import truncate
from tests.helpers.traces import build_tokenizer, tiny_qwen3

pytestmark = pytest.mark.usefixtures("no_network")

PIPELINE = FIXTURES / "pipeline_traces.jsonl"


class _Evil:
    """A pickle that torch's weights-only unpickler refuses (it calls a global)."""

    def __reduce__(self):
        return (print, ("a pickle ran",))


def _evil_checkpoint(root: Path, source: Path, model_type: str) -> Path:
    """`source` with code of its own: config.json's auto_map names it, and it writes root/RAN if it ever runs."""
    path = root / f"code-{model_type}"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(root / 'RAN')!r}).write_text('ran')\n"
        "from transformers import Qwen3Config, Qwen3ForCausalLM\n"
        "class EvilConfig(Qwen3Config):\n    model_type = 'evilqwen'\n"
        "class EvilModel(Qwen3ForCausalLM):\n    config_class = EvilConfig\n")
    return path


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> Path:
    """The sandbox: configs, prompts, traces, templates and checkpoints, good and damaged (read-only)."""
    root = tmp_path_factory.mktemp("inputs")
    tok = build_tokenizer()
    tiny_qwen3(len(tok)).save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    for name in ("qwen-truncated", "qwen-garbage", "qwen-pickle", "qwen-bin-truncated"):
        shutil.copytree(root / "qwen", root / name)
    truncate(root / "qwen-truncated" / "model.safetensors", 3000)
    (root / "qwen-garbage" / "model.safetensors").write_bytes(b"\0" * 100)
    for name in ("qwen-pickle", "qwen-bin-truncated"):
        (root / name / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, root / "qwen-pickle" / "pytorch_model.bin")
    torch.save(tiny_qwen3(len(tok)).state_dict(), root / "qwen-bin-truncated" / "pytorch_model.bin")
    truncate(root / "qwen-bin-truncated" / "pytorch_model.bin", 3000)
    _evil_checkpoint(root, root / "qwen", "evilqwen")  # needs its code: refused under --dry-run
    _evil_checkpoint(root, root / "qwen", "qwen3")  # ships code it does not need: planned without it
    shutil.copytree(CHECKPOINT_DIR / "final", root / "toy-truncated")
    truncate(root / "toy-truncated" / "model.safetensors", 3000)
    write_config(root / "toy.yaml", FAST)
    write_config(root / "hf.yaml", {
        "model": {"kind": "hf", "checkpoint": str(root / "qwen"), "dtype": "float32"},
        "data": {"kind": "traces", "traces": str(PIPELINE), "n_samples": 30, "target_block": 1},
        "capture": {"layers": [0, 1], "offsets": [0, 1], "batch_size": 10, "shard_size": 30},
        "conditions": {"memento": {}}, "probe": {"families": ["linear"]}})
    (root / "prompts.jsonl").write_text(json.dumps({"prompt_id": "p0", "prompt": "2+2?"}) + "\n")
    (root / "latin-prompts.jsonl").write_bytes(b'{"prompt_id": "p0", "prompt": "caf\xe9"}\n')
    (root / "latin.jsonl").write_bytes(PIPELINE.read_bytes().replace(b"trapezoid", b"trap\xe9zoid"))
    (root / "long.jsonl").write_text(json.dumps({"task_id": "t", "sentences": ["x" * traces_module.MAX_LINE_BYTES]}))
    templates = {"syntax.jinja": "{% for m in messages %}[{{ m['content'] }}]",
                 "raises.jinja": "{{ raise_exception('nope, not this prompt') }}",
                 "undefined.jinja": "{{ nothing.here }}",
                 "ignores.jinja": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
                 "good.jinja": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"}
    for name, text in templates.items():
        (root / name).write_text(text)
    (root / "latin.jinja").write_bytes(b"{{ messages[0]['content'] }} caf\xe9")
    return root


G = ["generate", "--prompts", "{dir}/prompts.jsonl", "--out", "{out}/gen.jsonl", "--no-progress"]
S = ["serve", "--model-path", "{dir}/qwen", "--print"]
O = ["generate-offline", "--prompts", "{dir}/prompts.jsonl", "--out", "{out}/gen.jsonl", "--model-path", "{dir}/qwen"]
SFT = ["sft", "--model", "{dir}/qwen", "--traces", str(PIPELINE), "--out", "{out}"]
HF = ["capture", "{dir}/hf.yaml", "--dry-run"]


def ckpt(name: str, *more: str) -> list[str]:
    """A plan of traces with the sandbox's checkpoint `name`."""
    return HF + ["--set", f"model.checkpoint={{dir}}/{name}", *more]


# (id, argv, needles the one line must hold); {dir} is the sandbox, {out} a path that must stay absent
CASES = [
    # generate: ClientConfig refuses its own fields, named by their flags
    ("generate-concurrency-0", G + ["--concurrency", "0"], ["--concurrency", "got 0"]),
    ("generate-concurrency-negative", G + ["--concurrency", "-3"], ["--concurrency", "got -3"]),
    ("generate-max-attempts-0", G + ["--max-attempts", "0"], ["--max-attempts", "got 0"]),
    ("generate-temperature-negative", G + ["--temperature", "-1"], ["--temperature", "got -1.0"]),
    ("generate-temperature-nan", G + ["--temperature", "nan"], ["--temperature", "nan"]),
    ("generate-max-tokens-0", G + ["--max-tokens", "0"], ["--max-tokens", "got 0"]),
    ("generate-top-p-0", G + ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("generate-top-p-above-1", G + ["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    ("generate-top-k-below-minus-1", G + ["--top-k", "-2"], ["--top-k", ">= -1"]),
    ("generate-base-url-not-a-url", G + ["--base-url", "not a url"], ["--base-url", "'not a url'"]),
    ("generate-base-url-no-host", G + ["--base-url", "http://"], ["--base-url", "name a host"]),
    ("generate-base-url-ftp", G + ["--base-url", "ftp://host/v1"], ["--base-url", "ftp://host/v1"]),
    ("generate-base-url-bad-port", G + ["--base-url", "http://host:99999/v1"], ["--base-url", "99999"]),
    ("generate-base-url-twice", G + ["--base-url", "http://a:1/v1", "http://a:1/v1/"], ["--base-url", "twice"]),
    ("generate-prompts-not-utf8", ["generate", "--prompts", "{dir}/latin-prompts.jsonl", "--out", "{out}/g.jsonl"],
     ["latin-prompts.jsonl:1", "UTF-8"]),
    # serve and generate-offline: refused before a server or vLLM starts
    ("serve-port-negative", S + ["--port", "-1"], ["--port", "1..65535", "got -1"]),
    ("serve-port-0", S + ["--port", "0"], ["--port", "got 0"]),
    ("serve-port-65536", S + ["--port", "65536"], ["--port", "got 65536"]),
    ("serve-max-model-len-0", S + ["--max-model-len", "0"], ["--max-model-len", "got 0"]),
    ("offline-chunk-size-0", O + ["--chunk-size", "0"], ["--chunk-size", "got 0"]),
    ("offline-max-model-len-0", O + ["--max-model-len", "0"], ["--max-model-len", "got 0"]),
    ("offline-max-tokens-0", O + ["--max-tokens", "0"], ["--max-tokens", "got 0"]),
    ("offline-template-not-jinja", O + ["--chat-template", "{dir}/hf.yaml"], ["--chat-template", "not a .jinja file"]),
    ("offline-template-missing", O + ["--chat-template", "{dir}/nowhere.jinja"], ["--chat-template", "no such file"]),
    ("export-min-blocks-negative", ["export-traces", "--generations", "{dir}/prompts.jsonl", "--out", "{out}/t.jsonl",
                                    "--min-blocks", "-1"], ["--min-blocks", "got -1"]),
    ("export-long-line", ["export-traces", "--generations", "{dir}/long.jsonl", "--out", "{out}/t.jsonl"],
     ["long.jsonl:1", "MAX_LINE_BYTES"]),
    # sft: every option checked before the traces or the model load
    ("sft-training-arg-unknown", SFT + ["--training-arg", "bogus=1"], ["--training-arg bogus", "TrainingArguments"]),
    ("sft-training-arg-typo", SFT + ["--training-arg", "lr_scheduler_typ=cosine"],
     ["--training-arg lr_scheduler_typ", "did you mean 'lr_scheduler_type'"]),
    ("sft-training-arg-has-a-flag", SFT + ["--training-arg", "learning_rate=1"], ["--training-arg learning_rate", "set"]),
    ("sft-training-arg-output-dir", SFT + ["--training-arg", "output_dir=x"], ["--training-arg output_dir", "--out"]),
    ("sft-training-arg-out-of-range", SFT + ["--training-arg", "weight_decay=-1"],
     ["--training-arg weight_decay", ">= 0"]),
    ("sft-training-arg-beta", SFT + ["--training-arg", "adam_beta2=1"], ["--training-arg adam_beta2", "[0, 1)"]),
    ("sft-max-length-0", SFT + ["--max-length", "0"], ["--max-length", "got 0"]),
    ("sft-max-length-1", SFT + ["--max-length", "1"], ["--max-length", ">= 2"]),
    ("sft-batch-size-0", SFT + ["--batch-size", "0"], ["--batch-size", "got 0"]),
    ("sft-grad-accum-0", SFT + ["--grad-accum", "0"], ["--grad-accum", "got 0"]),
    ("sft-global-batch-0", SFT + ["--global-batch-size", "0"], ["--global-batch-size", "got 0"]),
    ("sft-lr-0", SFT + ["--lr", "0"], ["--lr", "> 0"]),
    ("sft-epochs-negative", SFT + ["--epochs", "-1"], ["--epochs", "> 0"]),
    ("sft-max-steps-0", SFT + ["--max-steps", "0"], ["--max-steps", "-1"]),
    ("sft-save-steps-0", SFT + ["--save-steps", "0"], ["--save-steps", "got 0"]),
    ("sft-seed-negative", SFT + ["--seed", "-1"], ["--seed", "got -1"]),
    ("sft-tokenize-workers-0", SFT + ["--tokenize-workers", "0"], ["--tokenize-workers", "got 0"]),
    ("sft-traces-not-utf8", ["sft", "--model", "{dir}/qwen", "--traces", "{dir}/latin.jsonl", "--out", "{out}"],
     ["latin.jsonl:", "UTF-8"]),
    ("sft-traces-long-line", ["sft", "--model", "{dir}/qwen", "--traces", "{dir}/long.jsonl", "--out", "{out}"],
     ["long.jsonl:1", "MAX_LINE_BYTES"]),
    ("sft-damaged-checkpoint", ["sft", "--model", "{dir}/qwen-truncated", "--traces", str(PIPELINE), "--out", "{out}"],
     ["qwen-truncated/model.safetensors", "damaged checkpoint"]),
    # chat templates: a .jinja file that renders and keeps the prompt, or a refusal naming the file
    ("template-not-jinja", HF + ["--set", "data.chat_template={dir}/toy.yaml"],
     ["data.chat_template", "toy.yaml", "not a .jinja file"]),
    ("template-missing", HF + ["--set", "data.chat_template={dir}/nowhere.jinja"], ["nowhere.jinja", "no such file"]),
    ("template-syntax", HF + ["--set", "data.chat_template={dir}/syntax.jinja"],
     ["syntax.jinja", "Jinja syntax error at line 1"]),
    ("template-raises", HF + ["--set", "data.chat_template={dir}/raises.jinja"],
     ["raises.jinja", "fails as it renders", "nope, not this prompt"]),
    ("template-undefined", HF + ["--set", "data.chat_template={dir}/undefined.jinja"],
     ["undefined.jinja", "fails as it renders", "nothing"]),
    ("template-drops-the-prompt", HF + ["--set", "data.chat_template={dir}/ignores.jinja"],
     ["ignores.jinja", "leaves the prompt out"]),
    ("template-not-utf8", HF + ["--set", "data.chat_template={dir}/latin.jinja"], ["latin.jinja", "UTF-8"]),
    # checkpoints: damaged weights or unsafe pickles, named by file; a checkpoint's code never runs in a plan
    ("toy-eval-truncated", ["toy", "eval", "{dir}/toy-truncated", "--samples", "10"],
     ["toy-truncated/model.safetensors", "damaged checkpoint"]),
    ("toy-capture-truncated", ["capture", "{dir}/toy.yaml", "--dry-run", "--set", "model.checkpoint={dir}/toy-truncated"],
     ["model.checkpoint", "toy-truncated/model.safetensors", "damaged checkpoint"]),
    ("hf-truncated", ckpt("qwen-truncated"), ["model.checkpoint", "qwen-truncated/model.safetensors", "damaged"]),
    ("hf-not-safetensors", ckpt("qwen-garbage"), ["qwen-garbage/model.safetensors", "damaged checkpoint"]),
    ("hf-unsafe-pickle", ckpt("qwen-pickle"), ["qwen-pickle/pytorch_model.bin", "pickle", "safetensors"]),
    ("hf-truncated-pickle", ckpt("qwen-bin-truncated"), ["qwen-bin-truncated/pytorch_model.bin", "damaged"]),
    ("hf-remote-code-dry-run", ckpt("code-evilqwen", "--set", "model.trust_remote_code=true"),
     ["model.trust_remote_code", "modeling_evil.py", "--dry-run does not run"]),
    # traces: too long, or not UTF-8, named by file and line
    ("traces-long-line", HF + ["--set", "data.traces={dir}/long.jsonl"], ["long.jsonl:1", "MAX_LINE_BYTES"]),
    ("traces-not-utf8", HF + ["--set", "data.traces={dir}/latin.jsonl"], ["latin.jsonl:", "UTF-8"]),
    ("openmementos-not-utf8", HF + ["--set", "data.traces={dir}/latin.jsonl", "--set", "data.traces_format=openmementos"],
     ["latin.jsonl:", "UTF-8"]),
]


def _refused(capsys, root: Path, argv: list[str], *needles: str) -> None:
    """Run `kvprobe argv` on the sandbox: refused in one line naming `needles`, the sandbox unchanged
    (RAN: the marker a checkpoint's own code would write, had it run)."""
    assert_refused_untouched(capsys, root, sandbox_args(argv, root), *needles, absent=("out", "RAN"))


@pytest.mark.parametrize("argv, needles", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(capsys, where, argv, needles):
    _refused(capsys, where, argv, *needles)


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_a_trace_over_the_token_limit_is_refused_naming_it(capsys, where, monkeypatch):
    monkeypatch.setattr(traces_module, "MAX_TRACE_TOKENS", 64)
    _refused(capsys, where, HF, "trace 'aime25-i-p05'", "rendered tokens", "MAX_TRACE_TOKENS")


def test_a_good_template_and_a_checkpoint_with_needless_code_still_plan(capsys, where):
    """The refusals above are not everything refused: a .jinja template that keeps the prompt plans,
    and a checkpoint that ships code it does not need plans without running it, saying so."""
    code, out, err = cli(capsys, *sandbox_args(HF + ["--set", "data.chat_template={dir}/good.jinja"], where))
    assert code == 0 and "total expected size" in out, err
    with pytest.warns(KVProbeWarning, match=r"--dry-run ran none of the checkpoint's own code \(.*modeling_evil.py"):
        code, out, err = cli(capsys, *sandbox_args(ckpt("code-qwen3", "--set", "model.trust_remote_code=true"), where))
    assert code == 0 and "total expected size" in out, err
    assert not (where / "RAN").exists()


def test_trusting_a_checkpoints_code_warns_naming_it(where, tmp_path):
    """Outside --dry-run the code runs, after a warning naming every file (here: a checkpoint whose
    architecture transformers knows, so nothing actually runs)."""
    from kvprobe.config import ModelSection

    shutil.copytree(where / "qwen", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "helper.py").write_text("raise SystemExit('never imported')\n")
    assert remote_code(tmp_path / "ckpt") == [str(tmp_path / "ckpt" / "helper.py")]
    section = ModelSection(kind="hf", checkpoint=str(tmp_path / "ckpt"), dtype="float32", trust_remote_code=True)
    with pytest.warns(KVProbeWarning, match=r"kvprobe runs the checkpoint's own code: .*helper.py"):
        load_model(section)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without the flag
        load_model(section.model_copy(update={"trust_remote_code": False}))


def test_damaged_weights_name_the_file_and_other_failures_pass(where):
    with pytest.raises(CheckpointError, match="qwen-garbage/model.safetensors"):
        with refusing_damaged_weights(where / "qwen-garbage"):
            raise RuntimeError("as from_pretrained fails on it")
    with pytest.raises(RuntimeError, match="not the weights"):  # whole weights: the failure is not theirs
        with refusing_damaged_weights(where / "qwen"):
            raise RuntimeError("not the weights")


def test_the_installed_command_prints_the_code_warning_as_one_line(where):
    """Outside pytest's warning capture, the note is one line, `kvprobe: warning: ...`."""
    exe = shutil.which("kvprobe", path=os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)]))
    proc = subprocess.run([exe, *sandbox_args(ckpt("code-qwen3", "--set", "model.trust_remote_code=true"), where)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "KVPROBE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "trust_remote_code" in line]
    assert len(notes) == 1 and notes[0].startswith("kvprobe: warning: model.trust_remote_code: --dry-run ran none")
    assert not (where / "RAN").exists()
