"""The example configs under experiments/ load and validate, without loading a model; the sizes the
Qwen3-8B config's comments state are what the dry run computes."""

from __future__ import annotations

from types import SimpleNamespace

from kvprobe.config import ExperimentConfig, load_config
from tests.helpers.paths import EXPERIMENTS
from tests.helpers.paths import ROOT as REPO


def test_example_configs_validate():
    for path in sorted(EXPERIMENTS.glob("*.y*ml")) + sorted(EXPERIMENTS.glob("*.toml")):
        assert isinstance(load_config(path), ExperimentConfig), path


QWEN3_8B = SimpleNamespace(num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           hidden_size=4096)


def test_qwen3_8b_config_validates_without_a_model(monkeypatch):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("validating a config must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    path = EXPERIMENTS / "qwen3_8b_memento.yaml"
    cfg = load_config(path)
    assert cfg.model.kind == "hf" and cfg.model.dtype == "bfloat16" and cfg.model.device == "cuda"
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.data.kind == "traces" and cfg.data.n_samples == 15000 and cfg.data.target_block == 1
    assert cfg.capture.layers == (3, 35) and cfg.capture.offsets == (-1, 0, 1, 2)
    assert cfg.capture.sites == ("memento", "block_end")
    assert cfg.capture.batch_size == 4 and cfg.capture.shard_size == 512
    assert set(cfg.conditions) == {"memento", "restart-delims-visible", "restart"}
    assert {n: cfg.capture_spec(n).mask.name for n in cfg.conditions} == {
        "memento": "memento", "restart-delims-visible": "restart-delims-visible", "restart": "restart"}
    assert cfg.probe.families == ("linear", "mlp")
    assert all(0 <= layer < QWEN3_8B.num_hidden_layers for layer in cfg.capture.layers)

    # the traces exist and every trace has the blocks the offsets reach
    from kvprobe.data.traces import read_jsonl

    traces = read_jsonl(REPO / cfg.data.traces)
    need = cfg.data.target_block + max(cfg.capture.offsets) + 1
    assert traces and all(t.n_blocks >= need for t in traces), [t.n_blocks for t in traces]

    # the sizes its comments state are what the dry run computes for Qwen3-8B's dimensions
    from kvprobe.capture import CapturePlan, model_dims
    from kvprobe.store import FeatureKey

    dims = model_dims(SimpleNamespace(config=QWEN3_8B))
    assert dims == (36, 8, 128)
    spec = cfg.capture_spec("memento")
    keys = tuple(FeatureKey(s, o, p) for s in spec.sites for o in spec.offsets for p in spec.pooling)
    plan = CapturePlan(spec, cfg.data.n_samples, *dims, keys)
    per_condition = plan.estimate_bytes()
    text = path.read_text()
    assert f"{per_condition:,} bytes" in text, per_condition
    assert f"{per_condition * len(cfg.conditions):,} bytes" in text
    assert f"{plan.n_shards} shards" in text


