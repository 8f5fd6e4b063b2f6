"""experiments/retrain_check.py: the shipped run cut short has the shipped schedule, and the verdict says
what the comparison found in each case (no training here: the committed measurement and made-up ones)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers.published import PUBLISHED


@pytest.fixture(scope="module")
def check():
    return next(s for s in PUBLISHED.SOURCES if s.name == "retrain_check").module()


def test_the_cut_run_has_the_shipped_learning_rate_at_every_step(check):
    from toy_models.train import make_optimizer, make_scheduler

    cut = check.shipped_config(450, Path("unused"))
    saved = json.loads((check.SHIPPED / "train_config.json").read_text())
    full = replace(cut, steps=saved["steps"], decay=saved["decay"])  # the shipped run's own schedule
    rates = []
    for config in (cut, full):
        optimizer = make_optimizer(torch.nn.Linear(2, 2), config)
        scheduler = make_scheduler(optimizer, config)
        seen = []
        for _ in range(450):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(seen)
    assert rates[0] == rates[1] and cut.steps == 450 and cut.threads == 1 and cut.seed == 0


def test_steps_past_the_constant_rate_or_off_the_series_are_refused(check):
    with pytest.raises(ValueError, match="--steps must be in 1..2100"):
        check.shipped_config(2200, Path("unused"))
    with pytest.raises(ValueError, match="no shipped checkpoint series/step_000500"):
        check.check_steps(500, Path("unused"))
    assert check.check_steps(450, Path("unused")) == ("series/step_000450", check.shipped_config(450, Path("unused")))


def test_the_verdict_says_what_differs(check):
    data = check.load()
    assert "not bit for bit" in check.verdict(data) and f"{data['tensors_differing']} of" in check.verdict(data)
    same = copy.deepcopy(data)
    for row in same["log"]:
        row[2], row[4] = row[1], row[3]
    same.update(first_step_differing=None, tensors_differing=0, max_abs_difference=0.0)
    assert check.verdict(same).startswith("the retrain is bit for bit")
    hidden = {**same, "tensors_differing": 3, "max_abs_difference": 1e-7}  # the log agrees, the weights do not
    assert "agree to the last logged digit at every logged step" in check.verdict(hidden)
    at_once = {**data, "first_step_differing": data["log"][0][0]}
    assert f"first differ at step {data['log'][0][0]}," in check.verdict(at_once)


@pytest.mark.parametrize("argv, message", [(["--steps", "500"], "no shipped checkpoint series/step_000500"),
                                           (["--steps", "2200"], "--steps must be in 1..2100"),
                                           (["--threads", "2"], "--threads must be 1")])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(check, tmp_path, monkeypatch, capsys, argv,
                                                                      message):
    out, run = tmp_path / "out", tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["retrain_check.py", "--out", str(out), "--run", str(run), *argv])
    with pytest.raises(SystemExit) as exit_:
        check.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not run.exists()
