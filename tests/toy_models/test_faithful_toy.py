"""The faithful toy (issue 17): init schemes, the new recipe's determinism, the memento span
site and `tail_mean` pooling, and the text-controlled passcode sources with their exact
chance baseline and test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from kvprobe.capture import CaptureConfig, run_capture
from kvprobe.memento.forward import masked_forward
from kvprobe.data.passcodes import PasscodeConfig, allowed_codes, sample_passcodes
from kvprobe.stats import binomial_pvalue, constrained_pvalue
from kvprobe.store import KVStore
from toy_models.data import MEMENTO_POSITIONS, layout
from toy_models.model import GPT2_INIT, PYTORCH_INIT, InitScheme, build_model
from toy_models.source import ToyPasscodeSource
from toy_models.train import TrainConfig, train, training_batch

# --- initialisation --------------------------------------------------------------------


def test_pytorch_init_draws_what_torch_nn_draws():
    model = build_model(0, init=PYTORCH_INIT)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(1.0, abs=0.05)
    for module in model.modules():
        if isinstance(module, Conv1D):
            bound = 1 / math.sqrt(module.weight.shape[0])  # fan_in of a (in, out) Conv1D
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.9 * bound
            assert module.bias.abs().max() <= bound and module.bias.abs().max() > 0.5 * bound
            # a uniform's std is bound / sqrt(3)
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_init_is_transformers_own_and_numbers_set_a_normal_std():
    from transformers import GPT2LMHeadModel

    from toy_models.model import toy_config

    torch.manual_seed(5)
    reference = GPT2LMHeadModel(toy_config("sdpa"))
    ours = build_model(5, init=GPT2_INIT)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ours.parameters()))
    scaled = build_model(5, init=InitScheme(embedding=0.3, linear=0.07))
    assert scaled.transformer.wte.weight.std().item() == pytest.approx(0.3, rel=0.05)
    w = scaled.transformer.h[1].mlp.c_fc.weight
    assert w.std().item() == pytest.approx(0.07, rel=0.05) and not scaled.transformer.h[1].mlp.c_fc.bias.any()


@pytest.mark.parametrize("bad", [dict(embedding="pytorch"), dict(linear="xavier"), dict(linear=-1.0),
                                 dict(embedding=float("nan"))])
def test_bad_init_schemes_are_refused(bad):
    with pytest.raises(ValueError, match="init"):
        InitScheme(**bad)


def test_untied_head_and_capacity_options():
    untied = build_model(0, tied=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    small = build_model(0, n_embd=64, n_layer=2)
    assert small.config.n_head == 2 and small.config.n_inner == 256 and small.config.n_layer == 2


# --- the recipe ------------------------------------------------------------------------


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_default_recipe_trains_deterministically(tmp_path):
    kw = dict(steps=4, batch_size=8, eval_every=2, save_every=4, eval_samples=8, threads=1)
    a = train(TrainConfig(out_dir=str(tmp_path / "a"), **kw))
    b = train(TrainConfig(out_dir=str(tmp_path / "b"), **kw))
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))
    c = train(TrainConfig(out_dir=str(tmp_path / "c"), seed=1, **kw))
    assert not all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(c)))
    cfg = TrainConfig()
    assert (cfg.init, cfg.batch_size, cfg.lr, cfg.schedule, cfg.weight_decay) == (PYTORCH_INIT, 64, 1e-3, "constant", 0.0)
    assert (cfg.tied, cfg.grad_clip) == (False, None)  # the independent build's: it learns fastest per step (issue 30)


def test_a_keep_n_toy_trains_under_its_own_mask(tmp_path):
    """keep_last_n_blocks is the training mask's keep N: the model sees what kvprobe's keep-N mask
    allows, and the run records it (a keep-0 run's settings stay as before the option existed)."""
    from tests.helpers.reference_mask import reference_allow
    from toy_models.data import SEQ_LEN
    from toy_models.task import MEMENTO_MASK, memento_attention

    model = build_model(seed=0)
    for keep in (0, 1):
        mask = memento_attention(model, keep)["attention_mask"][0, 0]  # (T, T) additive
        reference = reference_allow(layout(), SEQ_LEN, keep, MEMENTO_MASK.mask_delimiters, MEMENTO_MASK.restart_mode)
        assert torch.equal(mask == 0, torch.tensor(reference))  # the brute-force definition of the keep-N mask
    assert not torch.equal(memento_attention(model, 0)["attention_mask"], memento_attention(model, 1)["attention_mask"])
    assert "keep_last_n_blocks" not in TrainConfig().run_settings()
    assert TrainConfig(keep_last_n_blocks=1).run_settings()["keep_last_n_blocks"] == 1
    with pytest.raises(ValueError, match="keep_last_n_blocks"):
        TrainConfig(keep_last_n_blocks=-1)
    kw = dict(steps=2, batch_size=8, eval_every=2, save_every=2, eval_samples=8, threads=1)
    keep0 = train(TrainConfig(out_dir=str(tmp_path / "k0"), **kw))
    keep1 = train(TrainConfig(out_dir=str(tmp_path / "k1"), keep_last_n_blocks=1, **kw))
    assert not all(torch.equal(x, y) for x, y in zip(_weights(keep0), _weights(keep1)))  # another mask, other gradients


def test_a_fixed_training_set_is_seen_once_per_epoch():
    cfg = TrainConfig(batch_size=4, train_set=12)
    epoch0 = torch.cat([training_batch(cfg, s) for s in range(3)])  # 3 batches per epoch
    epoch1 = torch.cat([training_batch(cfg, s) for s in range(3, 6)])
    rows = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert rows(epoch0) == rows(epoch1) and len(set(rows(epoch0))) == 12  # same 12 sequences, each once
    assert not torch.equal(epoch0, epoch1)  # in another order
    assert torch.equal(training_batch(cfg, 4), training_batch(cfg, 4))
    with pytest.raises(ValueError, match="train_set"):
        TrainConfig(batch_size=8, train_set=4)


def test_recipe_fields_are_validated():
    for bad in (dict(schedule="linear"), dict(beta2=1.0), dict(grad_clip=0.0), dict(init_linear="he")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# --- the memento span site and tail_mean pooling -----------------------------------------


def test_span_site_and_tail_mean_pooling_read_the_kv_cache(tmp_path):
    model = build_model(0).eval()
    src = ToyPasscodeSource(64, seed=2)
    spec = CaptureConfig(layers=(0, 2), offsets=(-1, 0, 1), sites=("memento", "memento_text"),
                       pooling=("tail_mean", "tokens", "mean"), max_tokens=4, dtype="float32", batch_size=32)
    run_capture(model, src, spec, tmp_path / "s", progress=False)
    batch = src.samples(0, 64)
    with torch.no_grad():
        out = masked_forward(model, batch.input_ids, layouts=batch.layouts, use_cache=True)
    lay = layout()
    with KVStore(tmp_path / "s") as store:
        for layer in (0, 2):
            cache = out.past_key_values.layers[layer]
            kv = torch.cat([cache.keys.permute(0, 2, 1, 3).flatten(2), cache.values.permute(0, 2, 1, 3).flatten(2)], -1)
            for offset in (-1, 0, 1):
                blk = lay.blocks[1 + offset]
                span = list(range(blk.summary_start, blk.summary_end + 1))  # SS d d d SE: 5 tokens
                assert len(span) == 5 and list(blk.memento) == span
                tail = store.features(layer, offset)  # default: site memento, pooling tail_mean
                assert tail.shape == (64, 5, kv.shape[-1])
                np.testing.assert_allclose(tail[:, :4], kv[:, span[1:]].numpy(), atol=1e-6)  # the last 4 tokens
                np.testing.assert_allclose(tail[:, 4], kv[:, span].mean(1).numpy(), atol=1e-5)  # then the mean
                np.testing.assert_allclose(store.features(layer, offset, pooling="tokens"), kv[:, span[:4]].numpy(),
                                           atol=1e-6)
                text = store.features(layer, offset, site="memento_text", pooling="tail_mean")  # 3 tokens
                assert not text[:, 0].any()  # zero-padded in front
                np.testing.assert_allclose(text[:, 1:4], kv[:, list(blk.memento_text)].numpy(), atol=1e-6)


def test_tail_mean_of_the_toy_span_is_an_invertible_map_of_all_five_tokens():
    # last 4 tokens and the mean of 5 determine the first token: 5 * mean - sum(last 4)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(5, 7))
    tail_mean = np.concatenate([tokens[1:], tokens.mean(0, keepdims=True)])
    np.testing.assert_allclose(5 * tail_mean[4] - tail_mean[:4].sum(0), tokens[0])


# --- text-controlled passcodes -----------------------------------------------------------


def test_fixed_sum_chance_is_the_exact_majority_baseline():
    codes = [c for c in itertools.product(range(10), repeat=5) if sum(c) == 22]  # brute force
    assert len(allowed_codes(PasscodeConfig(digit_sum=22))) == len(codes) == 6000
    majority = np.mean([max(sum(c[k] == d for c in codes) for d in range(10)) / len(codes) for k in range(5)])
    assert PasscodeConfig(digit_sum=22).chance() == pytest.approx(majority, abs=1e-12)
    assert majority == pytest.approx(0.11167, abs=1e-4) and PasscodeConfig().chance() == 0.1
    drawn = sample_passcodes(500, seed=0, spec=PasscodeConfig(digit_sum=22))
    assert all(sum(map(int, c)) == 22 for c in drawn) and len(set(drawn)) > 400


def test_text_controlled_mementos_carry_nothing_of_the_passcode():
    a = ToyPasscodeSource.text_controlled(300, seed=4, passcode_seed=1).samples(0, 300)
    b = ToyPasscodeSource.text_controlled(300, seed=4, passcode_seed=2).samples(0, 300)
    assert a.passcodes != b.passcodes
    m = MEMENTO_POSITIONS.ravel()
    assert torch.equal(a.input_ids[:, m], b.input_ids[:, m])  # other passcodes, the same memento texts
    assert len({tuple(r) for r in a.input_ids[:, m].tolist()}) > 250  # the background still varies


def test_text_identical_source_gives_every_sample_the_same_memento_texts():
    src = ToyPasscodeSource.text_controlled(2000, seed=0, shared_background=True)
    batch = src.samples(0, 2000)  # two chunks
    texts = batch.input_ids[:, MEMENTO_POSITIONS.ravel()]
    assert (texts == texts[0]).all()
    assert len(set(batch.passcodes)) > 1500
    assert src.describe()["passcode"] == {"length": 5, "alphabet": "0123456789", "digit_sum": 22,
                                          "chance": pytest.approx(0.111667, abs=1e-6)}


def test_constrained_pvalue_is_the_binomial_without_a_constraint_and_calibrated_with_one():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(10), size=(3, 150, 5)))
    y = rng.integers(0, 10, (150, 5))
    np.testing.assert_allclose(constrained_pvalue(lp, y, allowed_codes(PasscodeConfig())), binomial_pvalue(lp, y),
                               rtol=1e-9)
    # under the fixed-sum null, guessing the majority digit everywhere: p-values are not
    # too small (the binomial at 1/10 would call this leakage)
    spec = PasscodeConfig(digit_sum=22)
    codes = allowed_codes(spec)
    counts = np.stack([np.bincount(codes[:, k], minlength=10) for k in range(5)])
    guess = np.full((1000, 5, 10), -30.0)
    guess[:, np.arange(5), counts.argmax(1)] = 0.0
    ps, naive = [], []
    for seed in range(10):
        y = codes[np.random.default_rng(seed).integers(0, len(codes), 1000)]
        ps.append(constrained_pvalue(guess, y, codes))
        naive.append(binomial_pvalue(guess, y))
    assert np.mean(np.array(ps) < 0.05) <= 0.2
    assert np.mean(np.array(naive) < 0.05) > 0.5


# --- the shipped faithful toy --------------------------------------------------------------


def test_the_default_training_command_remakes_the_shipped_run():
    """`kvprobe toy train --out DIR` with no other option is the shipped run's recipe."""
    import json

    from toy_models.checkpoint import CHECKPOINT_DIR

    shipped = json.loads((CHECKPOINT_DIR / "train_config.json").read_text())
    assert TrainConfig().run_settings() == shipped
    meta = json.loads((CHECKPOINT_DIR / "final" / "meta.json").read_text())
    assert all(meta["config"][k] == v for k, v in shipped.items() if k in meta["config"])
    assert meta["step"] == TrainConfig().steps
    assert "toy train" in meta["command"] and "--lr" not in meta["command"]


def test_the_former_toy_is_kept_as_a_named_contrast():
    import toy_models

    contrast = toy_models.load("gpt2-init/final")
    assert sum(p.numel() for p in contrast.parameters()) == 811_776
    assert toy_models.read_meta("gpt2-init/final")["config"]["weight_decay"] == 0.1
    former = toy_models.read_meta("tied-clip/final")["config"]  # the toy shipped before issue 30
    assert (former["tied"], former["grad_clip"], former["steps"]) == (True, 1.0, 2400)
    assert sum(p.numel() for p in toy_models.load("tied-clip/final").parameters()) == 811_776
    assert sum(p.numel() for p in toy_models.load("final").parameters()) == 811_776 + 16 * 128  # its own head


def test_the_keep1_toy_is_shipped_and_read_under_its_training_mask():
    import toy_models
    from toy_models.task import heldout_seed, task_accuracy

    meta = toy_models.read_meta("keep1/final")
    assert meta["config"]["keep_last_n_blocks"] == 1 and meta["task_accuracy_eval"]["mask"] == "memento keep1"
    shipped = {k: v for k, v in toy_models.read_meta("final")["config"].items() if k not in ("out_dir", "keep_last_n_blocks")}
    assert {k: v for k, v in meta["config"].items() if k not in ("out_dir", "keep_last_n_blocks")} == shipped  # same recipe
    model = toy_models.load("keep1/final")
    under_keep1 = task_accuracy(model, 200, heldout_seed(3), keep_last_n_blocks=1)
    assert under_keep1 > 0.9 and under_keep1 > task_accuracy(model, 200, heldout_seed(3)) + 0.05


def test_config_fields_make_the_text_controlled_source():
    from kvprobe.experiment import make_source
    from kvprobe.config import ConfigError, parse_config

    cfg = parse_config({"data": {"kind": "toy", "n_samples": 100, "digit_sum": 22, "shared_background": True}})
    src = make_source(cfg)
    assert src.digit_sum == 22 and src.shared_background
    with pytest.raises(ConfigError, match="data.digit_sum"):
        parse_config({"model": {"kind": "hf", "checkpoint": "x"}, "data": {"kind": "traces", "traces": "t.jsonl",
                                                                         "digit_sum": 22}})


def test_resume_accepts_a_run_saved_before_a_setting_existed(tmp_path):
    import json

    from toy_models.train import RunDirError

    cfg = TrainConfig(steps=2, batch_size=4, eval_every=2, save_every=2, eval_samples=4, out_dir=str(tmp_path / "r"))
    train(cfg)
    saved = tmp_path / "r" / "train_config.json"
    settings = json.loads(saved.read_text())
    del settings["n_layer"]  # a run written before the capacity fields existed
    saved.write_text(json.dumps(settings))
    train(cfg, resume=True)  # the missing setting is its default: the same run
    with pytest.raises(RunDirError, match="n_layer: 4 -> 2"):
        train(TrainConfig(**{**cfg.__dict__, "n_layer": 2}), resume=True)
    settings["rope"] = True  # a run from a later version, with a setting this one cannot honour
    saved.write_text(json.dumps(settings))
    with pytest.raises(RunDirError, match=r"settings this version lacks \(rope\)"):
        train(cfg, resume=True)


@pytest.mark.parametrize("bad", [-1, 46])
def test_a_digit_sum_no_passcode_can_have_is_refused(bad):
    with pytest.raises(ValueError, match="digit_sum must be in 0..45"):
        PasscodeConfig(digit_sum=bad)


@pytest.mark.parametrize("args, message", [(["--init-linear", "xavier"], "--init-linear"),
                                           (["--schedule", "linear"], "schedule must be one of"),
                                           (["--grad-clip", "0"], "grad_clip must be positive"),
                                           (["--decay", "1.5"], "decay must be a fraction")])
def test_toy_train_bad_recipe_options_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    from kvprobe.cli import main

    out = tmp_path / "run"
    assert main(["toy", "train", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_docs_list_every_shipped_checkpoint_as_its_meta_says():
    """docs/toy.md's table of shipped checkpoints: step, task accuracy and the accuracy logged during training."""
    import toy_models
    from toy_models.checkpoint import CHECKPOINT_DIR

    text = (CHECKPOINT_DIR.parents[1] / "docs" / "toy.md").read_text()
    for name in [*toy_models.checkpoint_names(), "final", "keep1/final", "tied-clip/final"]:
        meta = toy_models.read_meta(name)
        row = (f"| `{name}` | {meta['step']} | {100 * meta['task_accuracy']:.1f}% | "
               f"{100 * meta['task_accuracy_during_training']:.1f}% |")
        assert row in text, f"docs/toy.md should list {row}"


def test_a_saved_runs_settings_give_back_its_config():
    """`TrainConfig.from_run_settings` reads train_config.json as a resume does: what `run_settings` wrote comes
    back as the same config, and a run saved before `tied` and `decay` existed gets what it used then."""
    cfg = TrainConfig(steps=120, decay=0.3, tied=False, grad_clip=None, seed=3)
    assert TrainConfig.from_run_settings(cfg.run_settings()) == cfg
    old = {k: v for k, v in cfg.run_settings().items() if k not in ("tied", "decay")}
    back = TrainConfig.from_run_settings(old)
    assert (back.tied, back.decay, back.seed, back.steps) == (True, 0, 3, 120)
    with pytest.raises(ValueError, match=r"settings this version lacks \(rope\)"):  # a later version's run
        TrainConfig.from_run_settings({**cfg.run_settings(), "rope": True})
