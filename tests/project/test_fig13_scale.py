"""experiments/fig13_scale.py, fig13_seeds.py and toy_seeds.py: refusals (one line, exit 2, nothing written) and plumbing."""

from __future__ import annotations

import sys

import pytest

from tests.helpers.published import PUBLISHED


def _script(name: str):
    return next(s for s in PUBLISHED.SOURCES if s.name == name).module()


@pytest.mark.parametrize("name, argv, message", [
    ("fig13_scale", ["--checkpoint", "final", "series/step_999999"], "no toy checkpoint 'series/step_999999'"),
    ("fig13_scale", ["--table-only"], "no fig13_scale results in"),
    ("fig13_seeds", ["--checkpoint", "series/step_000450"], "fig13_scale publishes no reading of 'series/step_000450'"),
    ("fig13_seeds", ["--table-only"], "no fig13_seeds results in"),
    ("toy_seeds", ["--table-only"], "no toy_seeds results in"),
    ("toy_seeds", ["--seed", "1", "-1"], "seed must be in [0, 2**30), got -1"),
])
def test_bad_input_is_refused_before_anything_is_written(name, argv, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(out), *argv])
    with pytest.raises(SystemExit) as e:
        _script(name).main()
    assert e.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_each_checkpoint_has_its_own_results_file():
    assert PUBLISHED.json_name("final") == "final.json"
    assert PUBLISHED.json_name("series/step_002400") == "series_step_002400.json"


def test_fig13_seeds_captures_one_store_for_all_the_cells_of_a_checkpoint(monkeypatch):
    """Without --store-dir the missed cells of a checkpoint share one temporary store (one capture, not one
    per cell); here on 60 passcodes of `final`, whose committed reading misses two cells."""
    import toy_models.leakage

    seeds = _script("fig13_seeds")
    small = {**seeds.fig13_scale.load()["final"], "samples": 60}
    monkeypatch.setattr(seeds.fig13_scale, "load", lambda: {"final": small})
    calls = []
    capture = toy_models.leakage.run_capture
    monkeypatch.setattr(toy_models.leakage, "run_capture", lambda *a, **k: calls.append(1) or capture(*a, **k))
    record = seeds.measure("final")
    assert len(calls) == 1 and len(record["cells"]) == len(seeds.fig13_scale.missed_cells(small)) == 2
    assert all(len(c["accuracy_seeds"]) == 3 for c in record["cells"])


def test_a_published_checkpoint_is_kept_unless_named(tmp_path):
    """Without --checkpoint a checkpoint whose JSON is already in --out is kept; named, it is measured again."""
    seen = []
    (tmp_path / "final.json").write_text('{"checkpoint": "final", "old": true}\n')
    measure_one = lambda checkpoint: seen.append(checkpoint) or {"checkpoint": checkpoint}  # noqa: E731
    PUBLISHED.measure_each(["final", "series/step_002400"], False, tmp_path, measure_one)
    assert seen == ["series/step_002400"] and "old" in (tmp_path / "final.json").read_text()
    PUBLISHED.measure_each(["final"], True, tmp_path, measure_one)
    assert seen[-1] == "final" and "old" not in (tmp_path / "final.json").read_text()


def test_toy_seeds_trains_the_shipped_recipe_with_only_the_seed_changed(tmp_path):
    """Each toy of toy_seeds is `final`'s recipe (its train_config.json) with another seed, in runs/seed_N."""
    import json

    from toy_models.checkpoint import CHECKPOINT_DIR, read_meta
    from toy_models.config import TrainConfig

    seeds = _script("toy_seeds")
    shipped = TrainConfig.from_run_settings(json.loads((CHECKPOINT_DIR / "train_config.json").read_text()))
    assert read_meta("final")["seed"] == shipped.seed == 0 and seeds.SEEDS[0] == 0
    for seed in seeds.SEEDS[1:]:
        config = seeds.recipe(seed, tmp_path)
        assert config.differing_settings(shipped) == ["seed"] and config.seed == seed
        assert config.out_dir == str(tmp_path / f"seed_{seed}")


def test_toy_seeds_reads_the_last_checkpoint_of_the_run_it_trains(tmp_path, monkeypatch):
    """measure() resumes the seed's run (a finished run is reused), then reads its last checkpoint with
    fig13_scale's reading, and records the training (seed, config, task accuracy, minutes)."""
    seeds = _script("toy_seeds")
    trained, read = [], []
    monkeypatch.setattr(seeds, "train", lambda config, resume, command: trained.append((config, resume)))
    monkeypatch.setattr(seeds, "read_meta", lambda path: {"task_accuracy": 0.97, "wall_time_s": 1800.0,
                                                          "hardware": "CPU"})
    monkeypatch.setattr(seeds.toy_models, "load", lambda name: f"model {name}")
    monkeypatch.setattr(seeds, "readme_example", lambda model: {"read": model})
    monkeypatch.setattr(seeds.fig13_scale, "measure", lambda checkpoint, samples, seed: read.append(
        (checkpoint, samples, seed)) or {"checkpoint": checkpoint, "samples": samples, "seed": seed, "cells": []})
    record = seeds.measure(2, tmp_path, 600, 0)
    assert [(c.seed, resume) for c, resume in trained] == [(2, True)]
    assert read == [(str(tmp_path / "seed_2" / "step_003000"), 600, 0)]
    assert record["train_seed"] == 2 and record["task_accuracy"] == 0.97 and record["train_minutes"] == 30.0
    assert record["train_config"] == seeds.recipe(2, tmp_path).run_settings() and record["checkpoint"] == "seed 2"
    assert record["readme_example"] == {"read": f"model {tmp_path / 'seed_2' / 'step_003000'}"}
    final = seeds.measure(0, tmp_path, 600, 0)  # the shipped toy: not trained, only its README example read here
    assert len(trained) == 1 and final["train_seed"] == 0 and final["readme_example"] == {"read": "model final"}
