"""GPU paths: run where CUDA is present, skipped cleanly elsewhere (`pytest -m gpu`).

- FlexAttention on CUDA equals the dense masked forward on short padded batches and at
  the dense mask's limit (8,192 tokens), where flex's peak memory stays far below the dense
  path's; at 32K tokens (a dense fp32 mask alone would be 4 GiB) the dense path is refused
  with one line naming that memory, and flex runs in a quarter of it.
- A bf16 capture on the GPU matches an fp32 capture on CPU to bf16 precision, and the
  probes read its store.
- Compaction generation on CUDA equals the dense masked forward.
- A model dispatched by a device map (layers offloaded to CPU RAM; or split over two
  GPUs where there are two) captures what it captures on one GPU.
- Two-stage SFT runs on CUDA in bf16 (stage 2 under the memento mask).
- vLLM's offline engine, when installed with the Memento overlay, writes trace records.

Matrix products run in full fp32 here (TF32 off) so fp32 comparisons use CPU tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvprobe.analysis import ProbeConfig, probe_store
from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.memento.forward import masked_forward
from kvprobe.memento.generate import generate_with_compaction
from kvprobe.memento.layout import parse_layout
from kvprobe.memento.masks import MaskConfig
from kvprobe.store import KVStore
from kvprobe.data.trace_source import TracePasscodeSource
from kvprobe.data.traces import read_jsonl
from tests.helpers.models import PAD_ID, SPECIAL, encode, tiny_qwen3
from tests.helpers.stores import assert_same_store, store_features
from tests.helpers.traces import PIPELINE, build_tokenizer
from tests.helpers.traces import tiny_qwen3 as trace_qwen3

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIGS = [MaskConfig(0), MaskConfig(1), MaskConfig(0, restart_mode=True),
           MaskConfig(0, mask_delimiters=True, restart_mode=True)]
SPEC = CaptureConfig(layers=(0, 1), offsets=(-1, 0, 1), sites=("memento", "block_end"), batch_size=4, shard_size=8,
                   dtype="float32")


@pytest.fixture(autouse=True)
def full_fp32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ----------------------------------------------------------------------------- FlexAttention


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
@torch.no_grad()
def test_flex_forward_equals_dense_forward_on_cuda(cfg):
    rows = ["p <think> BS a b c BE SS m n SE BS d e BE SS o SE BS f g h BE SS q SE </think> y z",
            "_ _ _ _ _ _ _ p q <think> BS a b BE SS m SE BS c d e f BE SS n o SE </think> y"]
    ids = torch.tensor([encode(r) for r in rows], device="cuda")
    am = (ids != PAD_ID).long()
    models = {}
    for impl in ("sdpa", "flex_attention"):  # head dim 16: compiled flex on CUDA refuses heads under 16 dims
        models[impl] = trace_qwen3(64).cuda()
        models[impl].set_attn_implementation(impl)
    dense = masked_forward(models["sdpa"], ids, special=SPECIAL, config=cfg, attention_mask=am)
    flex = masked_forward(models["flex_attention"], ids, special=SPECIAL, config=cfg, attention_mask=am)
    real = am.bool()
    torch.testing.assert_close(flex.logits[real], dense.logits[real], atol=1e-4, rtol=1e-4)


def _long_trace(length: int, block_len: int = 480, memento_len: int = 32) -> list[int]:
    """A synthetic Memento trace of exactly `length` tokens over the 64-token test vocabulary."""
    g = torch.Generator().manual_seed(0)

    def words(k: int) -> list[int]:
        return torch.randint(7, 64, (k,), generator=g).tolist()

    ids = words(16) + [SPECIAL.think]
    while len(ids) + block_len + memento_len + 6 < length:
        ids += [SPECIAL.block_start, *words(block_len), SPECIAL.block_end, SPECIAL.summary_start, *words(memento_len),
                SPECIAL.summary_end]
    return ids + [SPECIAL.think_end] + words(length - len(ids) - 1)


def _long_model(impl: str, T: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=T, attn_implementation=impl)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).cuda().eval()


def _masked_kv_and_peak(impl: str, ids: torch.Tensor, layout) -> tuple[tuple[torch.Tensor, ...], int]:
    """The last layer's memento K/V and the last logits of a masked forward, and its peak memory beyond the model."""
    model = _long_model(impl, ids.shape[1])
    mementos = torch.tensor([p for b in layout.blocks for p in b.memento_text], device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = masked_forward(model, ids, layouts=[layout], use_cache=True, logits_to_keep=1)
    peak = torch.cuda.max_memory_allocated() - base
    cache = out.past_key_values.layers[-1]
    return (cache.keys[0, :, mementos], cache.values[0, :, mementos], out.logits[0, -1]), peak


@torch.no_grad()
def test_flex_equals_dense_at_the_dense_limit_in_a_fraction_of_the_memory_and_runs_at_32k():
    """Up to DENSE_MASK_MAX_TOKENS the dense mask and flex agree, flex in a fraction of the memory;
    at 32K tokens (where a dense fp32 mask alone is 4 GiB) the dense path is refused with one line
    naming that memory, and flex runs in under a quarter of it."""
    from kvprobe.memento.forward import DENSE_MASK_MAX_TOKENS, UnsupportedAttentionError

    T = DENSE_MASK_MAX_TOKENS
    ids = torch.tensor([_long_trace(T)], device="cuda")
    layout = parse_layout(ids[0].tolist(), SPECIAL)
    (dense, dense_peak), (flex, flex_peak) = (_masked_kv_and_peak(impl, ids, layout) for impl in ("sdpa",
                                                                                                    "flex_attention"))
    for a, b in zip(flex, dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dense_mask_bytes = T * T * 4  # the fp32 (1, 1, T, T) additive mask alone
    assert dense_peak >= dense_mask_bytes
    assert flex_peak < dense_mask_bytes / 4, (flex_peak, dense_peak)

    T = 32768
    ids = torch.tensor([_long_trace(T)], device="cuda")
    layout = parse_layout(ids[0].tolist(), SPECIAL)
    assert layout.n_blocks == 63
    with pytest.raises(UnsupportedAttentionError, match=r"32768-token .* GiB"):
        masked_forward(_long_model("sdpa", T), ids, layouts=[layout], logits_to_keep=1)
    flex, flex_peak = _masked_kv_and_peak("flex_attention", ids, layout)
    assert all(bool(torch.isfinite(t).all()) for t in flex)
    assert flex_peak < T * T * 4 / 4, flex_peak


# ----------------------------------------------------------------------------- capture in bf16


def test_bf16_capture_on_cuda_matches_fp32_on_cpu_and_the_probes_read_it(tmp_path):
    tok = build_tokenizer()
    source = TracePasscodeSource(read_jsonl(PIPELINE), tok, n_samples=40, offsets=SPEC.offsets)
    cpu = run_capture(trace_qwen3(len(tok)), source, SPEC, tmp_path / "cpu", progress=False)
    gpu_model = trace_qwen3(len(tok)).to("cuda", torch.bfloat16)
    gpu = run_capture(gpu_model, source, SPEC, tmp_path / "gpu", progress=False)
    ref, got = store_features(cpu), store_features(gpu)
    for key in ref:
        # bf16 keeps 8 mantissa bits; through RoPE at positions in the hundreds and two layers the
        # relative error is 2-7% (measured with bf16 on CPU); a wrong mask moves mementos by 30%+
        assert np.linalg.norm(got[key] - ref[key]) < 0.1 * np.linalg.norm(ref[key]), key
        assert np.corrcoef(got[key].ravel(), ref[key].ravel())[0, 1] > 0.99, key
    with KVStore(gpu) as store:
        assert store.config["model"]["dtype"] == "bfloat16"
        grid = probe_store(store, "memento", ProbeConfig(families=("linear",), n_boot=100, device="cuda",
                                                           shuffled_control=False), progress=False)
    assert len(grid.rows) == 2 * 2 * 3 and all(0.0 <= c.accuracy <= 1.0 for c in grid.rows)


# ----------------------------------------------------------------------------- generation, device maps, SFT


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_compaction_generation_on_cuda_equals_the_dense_forward(cfg):
    ids = torch.tensor(encode("p q <think> BS a b c BE SS x y SE BS d e f BE SS y z SE BS g h BE SS w SE </think> A"))
    model = tiny_qwen3("sdpa").cuda()
    result = generate_with_compaction(model, ids[:3], SPECIAL, cfg, forced_ids=ids[3:])
    with torch.no_grad():
        dense = masked_forward(model, ids[None].cuda(), special=SPECIAL, config=cfg, use_cache=True)
    # logits of every position the generator computed with the dense rows (memento rows in
    # restart mode are recomputed; their final KV is what must match)
    layout = parse_layout(ids.tolist(), SPECIAL)
    skip = {p for b in layout.blocks for p in b.memento if p != b.summary_end} if cfg.restart_mode else set()
    rows = [p for p in range(len(ids)) if p not in skip]
    torch.testing.assert_close(result.logits[rows].cuda(), dense.logits[0, rows].float(), atol=1e-4, rtol=1e-4)
    kept = result.kept_positions.cuda()
    for layer in range(2):
        keys, values = result.kv(layer)
        torch.testing.assert_close(keys, dense.past_key_values.layers[layer].keys[:, :, kept], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, dense.past_key_values.layers[layer].values[:, :, kept], atol=1e-4,
                                   rtol=1e-4)


def _device_map_capture_equals_one_gpu(tmp_path, device_map: dict, check) -> None:
    from accelerate import dispatch_model

    tok = build_tokenizer()
    source = TracePasscodeSource(read_jsonl(PIPELINE), tok, n_samples=8, offsets=SPEC.offsets)
    one = run_capture(trace_qwen3(len(tok)).cuda(), source, SPEC, tmp_path / "one", progress=False)
    split = dispatch_model(trace_qwen3(len(tok)), device_map=device_map)
    check(split)
    two = run_capture(split, source, SPEC, tmp_path / "two", progress=False)
    assert_same_store(one, two, atol=1e-4, rtol=1e-4)


def test_device_map_with_layers_offloaded_to_cpu_ram_captures_what_one_gpu_captures(tmp_path):
    """With a GPU present, accelerate treats "cpu" entries as offloaded: weights wait in CPU RAM
    (on "meta" in the module) and are streamed to the GPU for each forward."""
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}

    def check(model):
        assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"

    _device_map_capture_equals_one_gpu(tmp_path, device_map, check)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_device_map_over_two_gpus_captures_what_one_gpu_captures(tmp_path):
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}

    def check(model):
        assert model.model.layers[1].self_attn.k_proj.weight.device == torch.device("cuda", 1)

    _device_map_capture_equals_one_gpu(tmp_path, device_map, check)


def test_two_stage_sft_on_cuda_in_bf16(tmp_path):
    from kvprobe.training.sft import two_stage_sft

    tok = build_tokenizer()
    model = trace_qwen3(len(tok)).cuda()
    first, second = two_stage_sft(model, tok, read_jsonl(PIPELINE)[:2], tmp_path, max_steps=5,
                                  per_device_train_batch_size=2, learning_rate=3e-3, lr_scheduler_type="constant",
                                  warmup_steps=0, logging_steps=1, disable_tqdm=True)
    for result in (first, second):
        assert result.trainer.args.bf16 and result.world_size == 1
        assert len(result.losses) == 5 and all(math.isfinite(x) for x in result.losses)
        assert result.losses[-1] < result.losses[0], result.losses


# ----------------------------------------------------------------------------- vLLM


def test_vllm_offline_engine_writes_resumable_trace_records(tmp_path):
    pytest.importorskip("vllm", reason="vLLM with the Memento overlay is not installed")
    from kvprobe.serving import Prompt, completed_ids, generate_offline

    tok = build_tokenizer()
    ckpt = tmp_path / "ckpt"
    trace_qwen3(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    prompts = [Prompt(f"p{i}", f"Problem {i}?") for i in range(3)]
    out = tmp_path / "gen.jsonl"
    try:
        first = generate_offline(prompts[:2], str(ckpt), out, chat=False, max_tokens=32, max_model_len=512,
                                 llm_kwargs={"gpu_memory_utilization": 0.2, "enforce_eager": True})
    except ImportError as e:  # stock vLLM without the overlay
        pytest.skip(str(e))
    assert [g.prompt_id for g in first] == ["p0", "p1"]
    again = generate_offline(prompts, str(ckpt), out, chat=False, max_tokens=32, max_model_len=512,
                             llm_kwargs={"gpu_memory_utilization": 0.2, "enforce_eager": True})
    assert [g.prompt_id for g in again] == ["p2"] and completed_ids(out) == {"p0", "p1", "p2"}
