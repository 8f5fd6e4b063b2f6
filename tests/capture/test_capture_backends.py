"""The TransformerLens and nnsight capture backends against the transformers reference.

On tiny random models (GPT-2; Qwen3 with grouped-query attention, RoPE and q/k norm;
Llama; OLMo-3 with its flat k-norm; Phi-3 with fused qkv), fp32, under `sdpa` and
`eager`, with a real memento mask built from a Memento-structured batch of two rows with
different block layouts:

- all backends return the same K and V as `past_key_values` of a plain forward under the
  same mask (post-RoPE keys, per KV head), at every layer and at memento and delimiter
  positions;
- the mask really reaches the attention: at a memento of the first block (which hides
  nothing from it) masked and plain-causal captures agree, at the last memento they
  differ, and the plain-causal capture still equals the reference's plain-causal one;
- unsupported architectures and layers out of range fail with one-line errors.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from kvprobe.capture import hf
from kvprobe.capture.backend_helpers import gather_positions
from kvprobe.memento.forward import memento_inputs
from kvprobe.memento.layout import parse_batch
from kvprobe.memento.masks import MaskConfig
from tests.helpers.models import PAD_ID, SPECIAL, VOCAB_SIZE, encode, tiny_gpt2, tiny_qwen3

ATOL = 1e-5

# Two rows of the same length with different block sizes, so each row has its own mask.
ROWS = (
    "p q <think> BS a b c d BE SS m n SE BS e f g BE SS o SE BS h i j k l BE SS r s SE </think> y z",
    "x <think> BS A B BE SS C D E SE BS F G H I J K BE SS L SE BS M N O BE SS P Q SE </think> R S T",
)


def _small(config_cls: type, **extra: Any) -> Any:
    """A 2-layer config in the style of tests/helpers/models.py: 4 query heads, 2 KV heads of 8 dims."""
    return config_cls(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        **extra,
    )


def tiny_llama(attn_implementation: str = "eager", seed: int = 0) -> LlamaForCausalLM:
    config = _small(LlamaConfig, head_dim=8, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_olmo3(attn_implementation: str = "eager", seed: int = 0) -> Olmo3ForCausalLM:
    """OLMo-3: RMS norm over the whole flat key projection, before the head reshape."""
    config = _small(Olmo3Config, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return Olmo3ForCausalLM(config).eval()


def tiny_phi3(attn_implementation: str = "eager", seed: int = 0) -> Phi3ForCausalLM:
    """Phi-3 / Phi-4: one fused qkv projection."""
    config = _small(Phi3Config, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config).eval()


FACTORIES: dict[str, Callable[..., Any]] = {
    "gpt2": tiny_gpt2,
    "qwen3": tiny_qwen3,
    "llama": tiny_llama,
    "olmo3": tiny_olmo3,
    "phi3": tiny_phi3,
}
IMPLEMENTATIONS = ("sdpa", "eager")
# (architecture, backend) pairs a backend's table leaves out on purpose (see its docstring)
UNSUPPORTED = {("phi3", "lens")}


def backend(name: str) -> ModuleType:
    """The backend module, skipping the test when its framework is not installed."""
    if name == "lens":
        pytest.importorskip("transformer_lens")
        from kvprobe.capture import lens

        return lens
    if name == "nnsight":
        pytest.importorskip("nnsight")
        from kvprobe.capture import nnsight

        return nnsight
    return hf


@lru_cache(maxsize=None)
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (2, T) and positions (2, 4): first memento token of M_1, <|block_end|> of
    T_2, <|summary_end|> of M_2, last memento token of M_3."""
    input_ids = torch.tensor([encode(row) for row in ROWS])
    positions = [
        [b.blocks[0].memento_text[0], b.blocks[1].end, b.blocks[1].summary_end, b.blocks[2].memento_text[-1]]
        for b in parse_batch(input_ids, SPECIAL)
    ]
    return input_ids, torch.tensor(positions)


@lru_cache(maxsize=None)
def model(arch: str, impl: str) -> Any:
    """The reference model (never prepared by a backend: backends get deep copies)."""
    return FACTORIES[arch](attn_implementation=impl)


def inputs(m: Any, config: MaskConfig = MaskConfig(keep_last_n_blocks=0)) -> dict[str, torch.Tensor]:
    """attention_mask (2, 1, T, T) additive float, position_ids (2, T)."""
    input_ids, _ = batch()
    return memento_inputs(m, input_ids, parse_batch(input_ids, SPECIAL), config)


@lru_cache(maxsize=None)
def cache_reference(arch: str, impl: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K and V at the test positions, read from `past_key_values` of a plain masked forward."""
    m = model(arch, impl)
    input_ids, positions = batch()
    with torch.no_grad():
        cache = m(input_ids=input_ids, **inputs(m), use_cache=True).past_key_values
    reference = {}
    for layer in range(m.config.num_hidden_layers):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (B, n_kv, T, d_head)
        reference[layer] = (gather_positions(keys, positions), gather_positions(values, positions))
    return reference


def prepared(name: str, arch: str, impl: str) -> tuple[ModuleType, Any]:
    """(backend module, wrapped model) on a deep copy: lens and nnsight change the model in place."""
    module = backend(name)
    if (arch, name) in UNSUPPORTED:
        pytest.skip(f"{name} backend does not support {arch} (tested in test_unsupported_architecture)")
    return module, module.prepare(copy.deepcopy(model(arch, impl)))


def capture(module: ModuleType, wrapped: Any, m: Any, layers: list[int], config: MaskConfig = MaskConfig()) -> dict:
    input_ids, positions = batch()
    return module.capture_kv(wrapped, input_ids, **inputs(m, config), layers=layers, positions=positions)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", sorted(FACTORIES))
@pytest.mark.parametrize("name", ["hf", "lens", "nnsight"])
def test_capture_equals_kv_cache(name: str, arch: str, impl: str) -> None:
    """Every backend's K and V equal the cache of a plain forward under the same mask."""
    module, wrapped = prepared(name, arch, impl)
    m = model(arch, impl)
    reference = cache_reference(arch, impl)
    layers = list(range(m.config.num_hidden_layers))
    got = capture(module, wrapped, m, layers)
    assert sorted(got) == layers
    n_kv = m.config.num_key_value_heads if arch != "gpt2" else m.config.n_head
    for layer in layers:
        for kind, got_states, want in zip("kv", got[layer], reference[layer]):
            assert got_states.shape == (2, n_kv, 4, want.shape[-1]) == want.shape, (layer, kind)
            assert torch.allclose(got_states, want, atol=ATOL), (
                f"{name}/{arch}/{impl} layer {layer} {kind}: max diff {(got_states - want).abs().max():.2e}"
            )


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
@pytest.mark.parametrize("name", ["lens", "nnsight"])
def test_backends_agree_on_any_layer_subset(name: str, arch: str) -> None:
    """Unordered, repeated layer lists; a single early layer (the forward stops after it);
    the two implementations of attention: all give the transformers backend's values."""
    m = model(arch, "sdpa")
    input_ids, positions = batch()
    reference = hf.capture_kv(m, input_ids, **inputs(m), layers=[0, 1], positions=positions)
    module, wrapped = prepared(name, arch, "sdpa")
    for layers in ([1, 0, 1], [0]):
        got = capture(module, wrapped, m, layers)
        assert sorted(got) == sorted(set(layers))
        for layer in got:
            for got_states, want in zip(got[layer], reference[layer]):
                assert torch.allclose(got_states, want, atol=ATOL)
                assert not got_states.requires_grad


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "olmo3"])
@pytest.mark.parametrize("name", ["hf", "lens", "nnsight"])
def test_mask_reaches_attention(name: str, arch: str) -> None:
    """Masked and plain-causal captures agree where the mask hides nothing and differ
    where it hides completed blocks; the plain-causal capture matches the reference's."""
    m = model(arch, "eager")
    module, wrapped = prepared(name, arch, "eager")
    last = m.config.num_hidden_layers - 1
    masked = capture(module, wrapped, m, [0, last])
    causal = capture(module, wrapped, m, [0, last], MaskConfig(keep_last_n_blocks=-1))
    reference_causal = capture(hf, m, m, [0, last], MaskConfig(keep_last_n_blocks=-1))
    for i in range(2):
        # layer 0 keys/values are per-token: no mask can change them
        assert torch.allclose(masked[0][i], causal[0][i], atol=ATOL)
        # M_1 sees no completed block, with or without the memento mask
        assert torch.allclose(masked[last][i][:, :, 0], causal[last][i][:, :, 0], atol=ATOL)
        assert torch.allclose(causal[last][i], reference_causal[last][i], atol=ATOL)
    # M_3 has T_1 and T_2 hidden: its keys at the last layer must move well beyond tolerance
    assert (masked[last][0][:, :, 3] - causal[last][0][:, :, 3]).abs().max() > 100 * ATOL


def _neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("name", "factory"),
    [("lens", _neox), ("nnsight", _neox), ("lens", tiny_phi3)],
    ids=["lens-neox", "nnsight-neox", "lens-phi3"],
)
def test_unsupported_architecture(name: str, factory: Callable[[], Any]) -> None:
    module = backend(name)
    m = factory()
    with pytest.raises(ValueError, match=rf"architecture '{m.config.model_type}'.*supported: .*gpt2.*qwen3") as err:
        module.prepare(m)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layer", [2, -1])
@pytest.mark.parametrize("name", ["lens", "nnsight"])
def test_layer_out_of_range(name: str, layer: int) -> None:
    m = model("qwen3", "sdpa")
    module, wrapped = prepared(name, "qwen3", "sdpa")
    with pytest.raises(ValueError, match=rf"layer {layer} out of range: the model has 2 layers") as err:
        capture(module, wrapped, m, [0, layer])
    assert "\n" not in str(err.value)


def test_lens_refuses_a_mask_it_cannot_apply() -> None:
    m = model("qwen3", "sdpa")
    module, wrapped = prepared("lens", "qwen3", "sdpa")
    input_ids, positions = batch()
    with pytest.raises(TypeError, match="4D"):
        module.capture_kv(
            wrapped,
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            position_ids=inputs(m)["position_ids"],
            layers=[0],
            positions=positions,
        )


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "phi3"])
def test_hf_capture_stops_after_its_deepest_layer(arch: str) -> None:
    """The transformers backend ends the forward once the deepest captured layer has stored its
    K/V: the head never runs, and the values are those of the full forward."""
    m = model(arch, "sdpa")
    reference = cache_reference(arch, "sdpa")
    head_calls = []
    handle = m.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    try:
        for layers in ([0], [m.config.num_hidden_layers - 1, 0]):
            got = capture(hf, m, m, layers)
            for layer in layers:
                for got_states, want in zip(got[layer], reference[layer]):
                    assert torch.allclose(got_states, want, atol=ATOL)
        assert head_calls == []
        input_ids, _ = batch()
        with torch.no_grad():
            m(input_ids=input_ids, **inputs(m))  # the hook itself works
        assert head_calls == [1]
    finally:
        handle.remove()
