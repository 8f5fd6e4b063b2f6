"""Interventions on memento KV (kvprobe.causal): exact where they must change nothing, equal
to an independent computation where they change something, and a whole run on a tiny
random Qwen3 over real-format traces.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from kvprobe.capture.hf import KVPatch, forward_patched
from kvprobe.causal import CausalConfig, batch_effects, causal_map, cell_positions, downstream_masks, load_causal
from kvprobe.data.samples import SampleBatch
from kvprobe.memento.forward import memento_inputs
from kvprobe.memento.layout import parse_batch
from kvprobe.memento.masks import MaskConfig
from kvprobe.grid import Cell
from tests.helpers.cli_support import cli_quiet, write_config
from tests.helpers.models import SPECIAL, encode

MEMENTO = MaskConfig(keep_last_n_blocks=0)
FORK_RESTART = MaskConfig(keep_last_n_blocks=0, mask_delimiters=True, restart_mode=True)
# three blocks, their mementos, then an answer; rows differ only in block 1's content
TEXT = "p <think> BS a b BE SS m n SE BS {x} {y} BE SS m o SE BS c d BE SS q r SE </think> y z"


def batch(rows=("x y", "y x", "z z", "x x")) -> SampleBatch:
    ids = torch.tensor([encode(TEXT.format(x=r.split()[0], y=r.split()[1])) for r in rows])
    layouts = parse_batch(ids, SPECIAL)
    return SampleBatch(np.arange(len(rows)), ids, None, list(rows), np.zeros((len(rows), 1), dtype=np.int64), layouts)


def clean_and_cache(model, b: SampleBatch, mask=MEMENTO):
    return forward_patched(model, b.input_ids, **memento_inputs(model, b.input_ids, b.layouts, mask))


def test_patching_a_layer_with_its_own_kv_is_bit_identical(model_factory):
    model = model_factory("eager")
    b = batch()
    logits, cache = clean_and_cache(model, b)
    pos = cell_positions(b.layouts, "memento", 1)
    index = pos[:, None, :, None].expand(-1, cache.layers[1].keys.shape[1], -1, cache.layers[1].keys.shape[3])
    own = KVPatch(1, pos, cache.layers[1].keys.gather(2, index), cache.layers[1].values.gather(2, index))
    patched, _ = forward_patched(model, b.input_ids, **memento_inputs(model, b.input_ids, b.layouts, MEMENTO),
                                 patches=[own])
    assert torch.equal(patched, logits)
    plain = model(input_ids=b.input_ids, **memento_inputs(model, b.input_ids, b.layouts, MEMENTO)).logits
    assert torch.equal(plain, logits)  # the patching cache itself changes nothing


def test_interchange_with_the_base_as_its_own_donor_changes_nothing(model_factory):
    from kvprobe.capture.hf import forward_patched as forward

    model = model_factory("eager")
    b = batch()
    cells = [Cell("memento", o, layer) for o in (0, 1) for layer in (0, 1)] + [Cell("block_end", 0, 1)]
    effects = batch_effects(model, forward, b, cells, target_block=1, mask=MEMENTO, ablate_with=FORK_RESTART,
                            donor=np.arange(4))
    for cell in cells:
        e = effects[("interchange", cell)]
        assert np.array_equal(e.delta_loss_all, np.zeros(4))
        if cell.offset == 0:
            assert np.array_equal(e.delta_loss_memento, np.zeros(4)) and np.array_equal(e.flip_memento, np.zeros(4))
        else:  # the last block's memento: no later memento to measure on
            assert np.isnan(e.delta_loss_memento).all()


def test_ablation_at_layer_0_changes_nothing(model_factory):
    """Layer-0 K/V are a function of the token embeddings alone: restart mode cannot change
    them, so replacing them with their restart-mode K/V is the identity, bit for bit."""
    from kvprobe.capture.hf import forward_patched as forward

    model = model_factory("eager")
    effects = batch_effects(model, forward, batch(), [Cell("memento", 0, 0), Cell("block_end", 0, 0)], target_block=1,
                            mask=MEMENTO, ablate_with=FORK_RESTART)
    for (name, _), e in effects.items():
        if name == "ablation":
            assert np.array_equal(e.delta_loss_all, np.zeros(4)) and np.array_equal(e.flip_memento, np.zeros(4))
    # at layer 1 the same ablation does change later predictions: the test could fail
    e = batch_effects(model, forward, batch(), [Cell("memento", 0, 1)], target_block=1, mask=MEMENTO,
                      ablate_with=FORK_RESTART)[("ablation", Cell("memento", 0, 1))]
    assert np.abs(e.delta_loss_all).max() > 0


def test_kv_no_later_token_can_attend_changes_nothing_downstream(model_factory):
    """The last layer's K/V of block 1's content: only block 1 and its memento attend it (the
    mask hides the block after its memento), and at the last layer nothing is computed from
    their outputs but their own logits. Garbage there leaves every prediction after the
    memento bit-identical, and the predictions inside the block do change."""
    model = model_factory("eager")
    b = batch()
    logits, cache = clean_and_cache(model, b)
    last = len(cache.layers) - 1
    content = torch.tensor([list(lay.blocks[1].content) for lay in b.layouts])  # (B, 2)
    shape = cache.layers[last].keys.shape
    garbage = torch.randn(shape[0], shape[1], content.shape[1], shape[3], generator=torch.Generator().manual_seed(0))
    patched, _ = forward_patched(model, b.input_ids, **memento_inputs(model, b.input_ids, b.layouts, MEMENTO),
                                 patches=[KVPatch(last, content, 10 * garbage, 10 * garbage)])
    down = downstream_masks(b.layouts, 1, b.input_ids.shape[1])["later_all"]  # (B, T - 1)
    after = down[0].nonzero().squeeze(-1)
    assert torch.equal(patched[:, after], logits[:, after])
    inside = list(b.layouts[0].blocks[1].content)
    assert not torch.equal(patched[:, inside], logits[:, inside])


def test_the_measured_effect_equals_an_independent_computation():
    """A hand-built 2-layer GPT-2 (no RoPE: the cache's keys are c_attn's): the interchange
    through the patching cache against the same swap done by a forward hook on layer 1's
    c_attn output, and the loss change computed by hand."""
    from tests.helpers.models import tiny_gpt2

    from kvprobe.capture.hf import forward_patched as forward

    model = tiny_gpt2("eager")
    b = batch()
    cell = Cell("memento", 0, 1)
    donor = np.array([1, 2, 3, 0])
    effects = batch_effects(model, forward, b, [cell], target_block=1, mask=MEMENTO, ablate_with=FORK_RESTART,
                            donor=donor)
    inputs = memento_inputs(model, b.input_ids, b.layouts, MEMENTO)
    pos = list(b.layouts[0].blocks[1].memento)  # offset 0 from target block 1
    attn = model.transformer.h[1].attn
    qkv = {}
    handle = attn.c_attn.register_forward_hook(lambda m, i, o: qkv.__setitem__("clean", o.detach().clone()))
    with torch.no_grad():
        clean = model(input_ids=b.input_ids, **inputs).logits
    handle.remove()
    d = model.config.n_embd

    def swap(module, inputs_, output):
        output = output.clone()
        output[:, pos, d:] = qkv["clean"][torch.as_tensor(donor)][:, pos, d:]  # k and v of the donor
        return output

    handle = attn.c_attn.register_forward_hook(swap)
    with torch.no_grad():
        swapped = model(input_ids=b.input_ids, **inputs).logits
    handle.remove()
    ids = b.input_ids
    loss = lambda lg: -torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # noqa: E731
    later = downstream_masks(b.layouts, 1, ids.shape[1])
    delta = loss(swapped) - loss(clean)
    for name, metric in (("later_memento", "delta_loss_memento"), ("later_all", "delta_loss_all"),
                         ("answer", "delta_loss_answer")):
        m = later[name]
        expected = ((delta * m).sum(-1) / m.sum(-1)).double().numpy()
        got = getattr(effects[("interchange", cell)], metric)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(effects[("interchange", cell)].delta_loss_all).max() > 1e-4  # it did change something


def test_causal_map_over_a_source_and_its_files(tmp_path):
    import toy_models
    from toy_models.source import ToyPasscodeSource

    from kvprobe.causal import save_causal

    source = ToyPasscodeSource.text_controlled(40, seed=3, shared_background=True)
    spec = CausalConfig(layers=(0, 3), offsets=(-1, 0, 1), n_samples=20, batch_size=10, n_boot=200)
    result = causal_map(toy_models.load(), source, spec, start=20, progress=False)
    assert len(result.rows) == 2 * 2 * 3 and all(r.n == 20 for r in result.rows)
    assert result.row("interchange", Cell("memento", 0, 3)).text_identical == 1.0
    for offset in (-1, 0, 1):  # layer 0: restart-mode K/V equal the memento's
        assert result.row("ablation", Cell("memento", offset, 0)).delta_loss_all == 0.0
    # the control memento precedes the passcode: base and donor K/V there are the same
    assert result.row("interchange", Cell("memento", -1, 3)).delta_loss_all == 0.0
    save_causal(result, tmp_path / "causal")
    again = load_causal(tmp_path / "causal")
    same = lambda rows: json.dumps([asdict(r) for r in rows])  # noqa: E731  (NaN == NaN as text)
    assert same(again.rows) == same(result.rows) and again.per_sample.keys() == result.per_sample.keys()
    with pytest.raises(ValueError, match="the source has 40"):
        causal_map(toy_models.load(), source, spec, start=30, progress=False)


def test_a_run_with_a_causal_section_on_a_tiny_random_qwen3_trace(tmp_path):
    """generate-free: real-format pipeline traces, a trained BPE with the markers, a random
    2-layer Qwen3 saved like a checkpoint; `kvprobe run` captures, probes, intervenes, reports."""
    from tests.helpers.traces import PIPELINE, build_tokenizer, tiny_qwen3

    tok = build_tokenizer()
    ckpt = tmp_path / "qwen3"
    tiny_qwen3(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    config = {
        "name": "qwen3-causal", "seed": 0,
        "model": {"kind": "hf", "checkpoint": str(ckpt)},
        "data": {"kind": "traces", "traces": str(PIPELINE), "n_samples": 40, "target_block": 1},
        "capture": {"layers": [0, 1], "offsets": [0, 1], "batch_size": 8},
        "conditions": {"memento": {"keep_last_n_blocks": 0}},
        "probe": {"families": ["linear"], "n_boot": 200, "shuffled_control": False, "linear_l2_grid": [0.01]},
        "causal": {"layers": [0, 1], "offsets": [0, 1], "n_samples": 16, "batch_size": 16},
    }
    out = tmp_path / "run"
    code, stdout, err = cli_quiet("run", write_config(tmp_path / "q.yaml", config), "--out", out)
    assert code == 0, err
    result = load_causal(out / "causal" / "causal")
    assert {r.intervention for r in result.rows} == {"ablation", "interchange"} and len(result.rows) == 8
    assert result.row("ablation", Cell("memento", 0, 0)).delta_loss_all == 0.0  # layer 0, as above
    assert result.reader == "memento|+1|1|tail_mean"
    swap = result.row("interchange", Cell("memento", 0, 1))  # traces of one layout pair up as donors
    assert np.isfinite(swap.delta_loss_all) and swap.follow_donor is not None and 0 <= swap.text_identical <= 1
    summary = (out / "report" / "summary.md").read_text()
    assert "## Causal use: interventions on memento KV" in summary and "figures/causal_map.png" in summary
    assert (out / "report" / "figures" / "causal_map.png").read_bytes()[:4] == b"\x89PNG"
    assert "causal" in json.loads((out / "timings.json").read_text())
