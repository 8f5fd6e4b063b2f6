"""The measuring steps of the GPU check (benchmarks/gpu_check.py), each run in its own child process.

`python benchmarks/gpu_check.py --child STEP --mode MODE --step-out FILE` runs `CHILD_STEPS[STEP]`
with `SIZES[MODE]`; a step calls `save(figures=..., checks=...)` as it goes (so that a step cut off
at its budget keeps what it measured) or `skip(reason)`. gpu_check.py's docstring describes the
steps; the models and long traces come from shapes.py (random weights, nothing downloaded).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from shapes import (BLOCKS, MEMENTO_LEN, MODELS, TINY_4_LAYERS, VLLM_MODEL, build_qwen3, forward_tokens, long_source,
                    qwen3_config)

# Sizes per mode; the rehearsal keeps the logic and shrinks every number, but its long trace is still
# longer than the dense mask's limit (8,192 tokens), so the same long-trace path runs. rel_tol bounds
# the relative L2 difference of flex and dense features: bf16 keeps 8 mantissa bits and the two sum in
# different orders; a wrong mask moves memento features by 30% or more (tests/project/test_gpu.py).
SIZES = {
    "cuda": dict(device="cuda", dtype="bfloat16", model=MODELS["qwen3-8b"], model_name="qwen3-8b", long_length=32768,
                 compare_lengths=(4096, 8192), qwen3_samples={4096: 4, 8192: 2}, repeats=2, toy_samples=5_000,
                 probe_layers=None, probe_offsets=None, mlp_epochs=30, rel_tol=0.05,
                 vllm=dict(max_model_len=2048, prompts=16, max_tokens=128)),
    "rehearse": dict(device="cpu", dtype="float32", model=TINY_4_LAYERS, model_name="tiny", long_length=9216,
                     compare_lengths=(1024,), qwen3_samples={512: 2, 1024: 1}, repeats=1, toy_samples=400,
                     probe_layers=(3,), probe_offsets=(-1, 0), mlp_epochs=2, rel_tol=1e-4,
                     vllm=dict(max_model_len=512, prompts=4, max_tokens=16)),
}
OFFSETS = (-1, 0, 1, 2)  # the captured blocks: target-1 .. target+2, the target 3 blocks from the end
TOY_SPEC = dict(layers=(0, 1, 2, 3), offsets=tuple(range(-1, 9)), pooling=("mean",), batch_size=256, shard_size=5000,
                dtype="float16")  # experiments/toy_reproduction.yaml
QWEN3_SITES = ("memento", "block_end")  # as experiments/qwen3_8b_memento.yaml


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ----------------------------------------------------------------------------- helpers of the steps


def sync_for(device: str) -> Callable[[], None]:
    """A synchronise call that makes wall-clock timing honest on CUDA (a no-op on CPU)."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def peak_bytes(device: str) -> int:
    """Peak allocated CUDA memory since the last reset, or this process's peak resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: str) -> int | None:
    """Reset the CUDA peak; returns the bytes allocated now (None on CPU, where the peak cannot be reset)."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def peak_since(device: str, base: int | None) -> int | None:
    """CUDA bytes allocated at the peak since `reset_peak` beyond what was allocated then; None on CPU."""
    return None if base is None else peak_bytes(device) - base


def light_identity(model: Any) -> dict[str, Any]:
    """The store's model identity without the parameter hash (16.4 GB hashed per capture on Qwen3-8B;
    the qwen3 step times one hash on its own)."""
    return {"name": type(model).__name__, "class": type(model).__name__,
            "dtype": str(model.dtype).removeprefix("torch."), "n_params": sum(p.numel() for p in model.parameters()),
            "param_hash": "not computed (gpu_check)"}


def capture_spec(n_layers: int, samples: int) -> Any:
    from kvprobe.capture import CaptureConfig

    layers = (3, n_layers - 1) if n_layers > 4 else (0, n_layers - 1)  # the paper's 4th and last on Qwen3-8B
    return CaptureConfig(layers=layers, offsets=OFFSETS, sites=QWEN3_SITES, pooling=("mean",), batch_size=1,
                       shard_size=samples, dtype="float16")


def store_features(path: Path) -> dict[str, Any]:
    """Every feature matrix of a store, by 'site/offset/layer'."""
    from kvprobe.store import KVStore

    with KVStore(path) as store:
        return {f"{k.site}/{k.offset}/{layer}": store.features(layer, k.offset, k.site, k.pooling)
                for k in store.keys for layer in store.layers}


def relative_l2(a: dict[str, Any], b: dict[str, Any]) -> float:
    import numpy as np

    return max(float(np.linalg.norm(b[k] - a[k]) / max(float(np.linalg.norm(a[k])), 1e-30)) for k in a)


# ----------------------------------------------------------------------------- the steps (in the child)


def step_flex32k(sz: dict[str, Any], save: Callable[..., None], skip: Callable[[str], None]) -> None:
    """The 32K FlexAttention capture: BlockMask on its own, then the capture cold and warm."""
    import numpy as np
    import torch

    from kvprobe.capture import run_capture
    from kvprobe.memento import forward
    from kvprobe.memento.forward import memento_inputs

    device, sync, T, shape = sz["device"], sync_for(sz["device"]), sz["long_length"], sz["model"]
    t = time.perf_counter()
    model = build_qwen3(shape, "flex_attention", device, sz["dtype"], T)
    sync()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    source = long_source(1, T, BLOCKS, MEMENTO_LEN, shape["vocab"])  # offsets -1..+2: the last four blocks
    n_fwd = forward_tokens(source)  # the capture's forward stops at the last position it reads
    spec = capture_spec(shape["layers"], 1)
    dense_limit = getattr(forward, "DENSE_MASK_MAX_TOKENS", None)
    fig: dict[str, Any] = {"model": sz["model_name"], "dtype": sz["dtype"], "device": device, "length": T,
                           "n_blocks": source.layout.n_blocks, "block_len": len(source.layout.blocks[0].content),
                           "target_block": source.target_block, "forward_tokens": n_fwd,
                           "dense_mask_limit_tokens": dense_limit, "model_bytes": model_bytes,
                           "build_s": time.perf_counter() - t,
                           "dense_mask_bytes_avoided": T * T * torch.empty((), dtype=model.dtype).element_size()}
    checks = {"forward_runs_the_trace": n_fwd >= 0.95 * T}
    save(figures=fig, checks=checks)

    batch = source.samples(0, 1)  # the BlockMask alone, as the capture builds it (the forward's length)
    ids = batch.input_ids[:, :n_fwd].to(device)
    for label in ("mask_cold", "mask_warm"):
        base = reset_peak(device)
        sync()
        t = time.perf_counter()
        kwargs = memento_inputs(model, ids, batch.layouts, spec.mask, truncate=True)
        sync()
        fig[label] = {"type": type(kwargs["attention_mask"]).__name__, "build_s": time.perf_counter() - t,
                      "peak_bytes": peak_since(device, base)}
        del kwargs
    checks["block_mask"] = fig["mask_warm"]["type"] == "BlockMask"
    if device == "cuda":  # an eighth of a boolean T x T (128 MiB at 32K): no dense mask was made on the way
        checks["block_mask_memory_below_dense"] = fig["mask_warm"]["peak_bytes"] < T * T / 8
    save(figures=fig, checks=checks)

    with tempfile.TemporaryDirectory() as d:
        for label in ("capture_cold", "capture_warm"):  # cold: FlexAttention compiles for this length
            base = reset_peak(device)
            sync()
            t = time.perf_counter()
            path = run_capture(model, source, spec, Path(d) / label, progress=False, identity=light_identity(model))
            sync()
            wall = time.perf_counter() - t
            fig[label] = {"s": wall, "tokens_per_s": n_fwd / wall,
                          "peak_bytes": peak_bytes(device), "peak_over_weights_bytes": peak_since(device, base)}
            save(figures=fig, checks=checks)
        feats = store_features(path)
    from kvprobe.memento.forward import attention_implementation

    fig["attention_implementation"] = attention_implementation(model)
    fig["features"] = {k: list(v.shape) for k, v in feats.items()}
    checks["ran_on_flex"] = fig["attention_implementation"] == "flex_attention"
    checks["features_finite"] = all(bool(np.isfinite(v).all()) for v in feats.values())
    save(figures=fig, checks=checks)


def step_flex(sz: dict[str, Any], save: Callable[..., None], skip: Callable[[str], None]) -> None:
    """FlexAttention against the dense mask: one model, each length captured under sdpa, then flex."""
    from kvprobe.capture import run_capture

    device, sync, shape = sz["device"], sync_for(sz["device"]), sz["model"]
    model = build_qwen3(shape, "sdpa", device, sz["dtype"], max(sz["compare_lengths"]))
    fig: dict[str, Any] = {"model": sz["model_name"], "dtype": sz["dtype"], "device": device, "runs": [],
                           "flex_vs_dense": [], "peak_kind": "cuda max_memory_allocated" if device == "cuda"
                           else "cpu peak RSS"}
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as d:
        for T in sz["compare_lengths"]:
            source = long_source(1, T, BLOCKS, MEMENTO_LEN, shape["vocab"])
            n_fwd = forward_tokens(source)
            spec = capture_spec(shape["layers"], 1)
            feats = {}
            for impl in ("sdpa", "flex_attention"):
                model.set_attn_implementation(impl)
                times = []
                for r in range(2):  # the first compiles FlexAttention for this length
                    base = reset_peak(device)
                    sync()
                    t = time.perf_counter()
                    path = run_capture(model, source, spec, Path(d) / f"{impl}-{T}-{r}", progress=False,
                                       identity=light_identity(model))
                    sync()
                    times.append(time.perf_counter() - t)
                fig["runs"].append({"impl": impl, "length": T, "forward_tokens": n_fwd,
                                    "first_s": times[0], "capture_s": times[1],
                                    "tokens_per_s": n_fwd / times[1],
                                    "peak_bytes": peak_bytes(device),
                                    "peak_over_weights_bytes": peak_since(device, base)})
                feats[impl] = store_features(path)
                save(figures=fig, checks=checks)
            rel = relative_l2(feats["sdpa"], feats["flex_attention"])
            fig["flex_vs_dense"].append({"length": T, "max_rel_l2": rel, "rel_tol": sz["rel_tol"]})
            checks[f"flex_equals_dense_{T}"] = rel <= sz["rel_tol"]
            save(figures=fig, checks=checks)


def step_qwen3(sz: dict[str, Any], save: Callable[..., None], skip: Callable[[str], None]) -> None:
    """The dense-mask capture against the bare masked forward, tokens/s; then one parameter hash."""
    import torch

    from kvprobe.capture import model_identity, run_capture
    from kvprobe.memento.forward import memento_inputs

    device, sync, shape = sz["device"], sync_for(sz["device"]), sz["model"]
    t = time.perf_counter()
    model = build_qwen3(shape, "sdpa", device, sz["dtype"], max(sz["qwen3_samples"]))
    sync()
    fig: dict[str, Any] = {"model": sz["model_name"], "dtype": sz["dtype"], "device": device, "rows": [],
                           "n_params": sum(p.numel() for p in model.parameters()), "build_s": time.perf_counter() - t}
    checks: dict[str, bool] = {}
    for length, n in sz["qwen3_samples"].items():
        source = long_source(n, length, BLOCKS, MEMENTO_LEN, shape["vocab"])
        spec = capture_spec(shape["layers"], n)
        T = forward_tokens(source)
        batches = [source.samples(i, i + 1) for i in range(n)]

        def bare() -> float:  # the masked forward over the tokens the capture's forward runs, nothing kept
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    ids = b.input_ids[:, :T].to(device)
                    model(input_ids=ids, **memento_inputs(model, ids, b.layouts, spec.mask, truncate=True),
                          logits_to_keep=1)
            sync()
            return time.perf_counter() - start

        bare()  # warm-up: kernels, allocator caches
        base = reset_peak(device)
        fwd, cap = [], []
        with tempfile.TemporaryDirectory() as d:
            for r in range(sz["repeats"]):  # interleaved, best of
                fwd.append(bare())
                sync()
                start = time.perf_counter()
                run_capture(model, source, spec, Path(d) / f"s{r}", progress=False, identity=light_identity(model))
                sync()
                cap.append(time.perf_counter() - start)
        f, c = min(fwd), min(cap)
        fig["rows"].append({"length": length, "forward_tokens": T, "samples": n, "n_blocks": source.layout.n_blocks,
                            "forward_s_per_sample": f / n, "capture_s_per_sample": c / n,
                            "forward_tokens_per_s": n * T / f, "capture_tokens_per_s": n * T / c,
                            "capture_over_forward": c / f, "peak_bytes": peak_bytes(device),
                            "peak_over_weights_bytes": peak_since(device, base)})
        if device == "cuda":  # the target of bench_capture.py; on the rehearsal's tiny model the store's costs dominate
            checks["capture_over_forward_le_1.10"] = all(r["capture_over_forward"] <= 1.10 for r in fig["rows"])
        save(figures=fig, checks=checks)
    t = time.perf_counter()  # last, so that a timeout here keeps the rows
    model_identity(model)
    fig["param_hash_s"] = time.perf_counter() - t
    save(figures=fig, checks=checks)


def step_toy(sz: dict[str, Any], save: Callable[..., None], skip: Callable[[str], None]) -> None:
    """The toy reproduction's capture and probe grid on the shipped checkpoint."""
    import torch

    import toy_models
    from kvprobe.analysis import ProbeConfig, probe_store
    from kvprobe.capture import CaptureConfig, run_capture
    from kvprobe.memento.forward import masked_forward
    from kvprobe.probes.mlp import MLPConfig
    from kvprobe.store import KVStore
    from toy_models.source import ToyPasscodeSource

    device, sync, n = sz["device"], sync_for(sz["device"]), sz["toy_samples"]
    model = toy_models.load("final").to(device)
    spec = CaptureConfig(**TOY_SPEC)
    warm = ToyPasscodeSource(256, seed=1).samples(0, 256)
    with torch.inference_mode():
        masked_forward(model, warm.input_ids.to(device), layouts=warm.layouts, config=spec.mask)
    fig: dict[str, Any] = {"checkpoint": "final", "device": device, "samples": n,
                           "capture": {k: list(v) if isinstance(v, tuple) else v for k, v in TOY_SPEC.items()}}
    with tempfile.TemporaryDirectory() as d:
        sync()
        t = time.perf_counter()
        path = run_capture(model, ToyPasscodeSource(n, seed=0), spec, Path(d) / "memento", progress=False)
        sync()
        fig["capture_s"] = time.perf_counter() - t
        fig["capture_samples_per_s"] = n / fig["capture_s"]
        save(figures=fig, checks={})
        with KVStore(path) as store:
            common = dict(n_boot=200, pooling="mean", device=device)
            linear = ProbeConfig(families=("linear",), layers=sz["probe_layers"], offsets=sz["probe_offsets"], **common)
            t = time.perf_counter()  # the grid with its shuffled-label control; probe_layers None: all 40 cells
            grid = probe_store(store, "memento", linear, progress=False)
            fig["probe_grid_s"] = time.perf_counter() - t
            fig["probe_grid_cells"] = len(grid.rows)
            mlp = ProbeConfig(families=("mlp",), seeds=1, shuffled_control=False, layers=(0, 3), offsets=(1,),
                                mlp=MLPConfig(max_epochs=sz["mlp_epochs"]), **common)  # the paper's 2 MLP cells
            t = time.perf_counter()
            mlp_grid = probe_store(store, "memento", mlp, progress=False)
            fig["mlp_s"] = time.perf_counter() - t
    acc = {f"layer{r.layer}_offset{r.offset:+d}": r.accuracy for r in grid.rows if r.layer == 3}
    fig["linear_accuracy_layer3"] = acc
    fig["mlp_accuracy_offset+1"] = {f"layer{r.layer}": r.accuracy for r in mlp_grid.rows}
    checks = {"control_near_chance": abs(acc["layer3_offset-1"] - 0.1) < 0.1}  # chance is 10%
    if n >= 5000:  # a few hundred rehearsal samples are too few to require the direct signal
        checks["direct_above_chance"] = acc["layer3_offset+0"] > 0.2
    save(figures=fig, checks=checks)


def write_vllm_model(folder: Path, shape: dict[str, int], max_len: int) -> int:
    """A tiny Qwen3 checkpoint folder without weights: config.json and tokenizer files (a byte-level BPE
    trained here on a few sentences, with the Memento markers as special tokens). Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *SPECIAL_TOKEN_STRINGS.values()]
    trainer = trainers.BpeTrainer(vocab_size=shape["vocab"], special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"Problem {i}: find the sum of the first {i} odd numbers, then check the result twice."
              for i in range(64)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if len(fast) > shape["vocab"]:
        raise ValueError(f"the tokenizer has {len(fast)} tokens, more than the model's {shape['vocab']}")
    cfg = qwen3_config(shape, max_len, eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                       pad_token_id=fast.pad_token_id)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.torch_dtype = "bfloat16"  # vLLM's dtype="auto" reads it; the engine is given dtype explicitly as well
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    fast.save_pretrained(folder)
    return len(fast)


def step_vllm(sz: dict[str, Any], save: Callable[..., None], skip: Callable[[str], None]) -> None:
    """vLLM's offline engine on a tiny Qwen3 with random weights (load_format="dummy")."""
    try:
        import vllm
    except Exception as e:  # a vLLM built for another torch fails here, not in find_spec
        return skip(f"vllm is installed but not importable: {type(e).__name__}: {last_line(str(e))}")
    v = sz["vllm"]
    fig: dict[str, Any] = {"vllm": getattr(vllm, "__version__", "unknown"), **v}
    checks: dict[str, bool] = {}
    llm_kwargs = dict(load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    prompts = [f"Problem {i}: find the sum of the first {i + 3} odd numbers." for i in range(v["prompts"])]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "tiny-qwen3"
        fig["vocab"] = write_vllm_model(folder, VLLM_MODEL, v["max_model_len"])
        save(figures=fig, checks=checks)
        # kvprobe's own path first: the fork's engine under the memento block mask; stock vLLM refuses
        # the block_masking_config keyword before any engine starts, and the step runs stock vLLM instead
        from kvprobe.serving import Prompt, generate_offline

        t = time.perf_counter()
        try:
            gens = generate_offline([Prompt(f"p{i}", p) for i, p in enumerate(prompts)], str(folder),
                                    Path(d) / "gen.jsonl", max_tokens=v["max_tokens"],
                                    max_model_len=v["max_model_len"], llm_kwargs=llm_kwargs, progress=False)
        except ImportError as e:
            if "block_masking_config" not in str(e):
                raise
            fig["overlay"] = f"not installed: {last_line(str(e))}"
        else:
            fig.update(overlay="installed", generate_offline_s=time.perf_counter() - t, generations=len(gens))
            checks["every_prompt_generated"] = len(gens) == len(prompts)
            save(figures=fig, checks=checks)
            return
        t = time.perf_counter()
        llm = vllm.LLM(model=str(folder), tokenizer=str(folder), max_model_len=v["max_model_len"], **llm_kwargs)
        fig["engine_start_s"] = time.perf_counter() - t
        save(figures=fig, checks=checks)
        params = vllm.SamplingParams(max_tokens=v["max_tokens"], temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        n_tokens = [len(o.outputs[0].token_ids) for o in outs]
        fig.update(generate_s=wall, generated_tokens=sum(n_tokens), tokens_per_s=sum(n_tokens) / wall)
        checks["every_prompt_ran_to_max_tokens"] = n_tokens == [v["max_tokens"]] * len(prompts)
        save(figures=fig, checks=checks)


CHILD_STEPS = {"flex32k": step_flex32k, "flex": step_flex, "vllm": step_vllm, "qwen3": step_qwen3, "toy": step_toy}
