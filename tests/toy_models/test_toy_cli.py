"""`kvprobe toy` (the toy plugin's command, toy_models/cli.py): eval the shipped checkpoint, train a few steps."""

from __future__ import annotations

import json
import re

from tests.helpers.cli_support import assert_refused, cli, snapshot


def test_toy_eval_prints_task_accuracy_of_the_shipped_checkpoint(capsys):
    code, out, err = cli(capsys, "toy", "eval", "final", "--samples", "50")
    assert code == 0, err
    m = re.fullmatch(r"final\ttask accuracy (\d\.\d{4}) \(50 held-out sequences, set 1\)\n", out)
    assert m, out
    assert float(m.group(1)) >= 0.8  # the shipped checkpoint (86.0% on 5,000 held-out sequences)


def test_toy_train_a_few_steps_then_eval_it(capsys, tmp_path):
    run_dir = tmp_path / "toy"
    code, out, err = cli(capsys, "toy", "train", "--steps", "3", "--batch-size", "8", "--warmup", "1",
                         "--eval-every", "3", "--save-every", "3", "--eval-samples", "20", "--out", run_dir)
    assert code == 0, err
    ckpt = run_dir / "step_000003"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "meta.json").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config"]["batch_size"] == 8
    assert out.startswith(f"{ckpt}: step 3, task accuracy ")
    # an existing run without --resume/--overwrite is refused and left alone
    before = snapshot(run_dir)
    code, _, err = cli(capsys, "toy", "train", "--steps", "3", "--batch-size", "8", "--out", run_dir)
    assert_refused(code, err, str(run_dir))
    assert snapshot(run_dir) == before
    # the new checkpoint loads by directory
    code, out, err = cli(capsys, "toy", "eval", ckpt, "--samples", "20")
    assert code == 0, err
    assert out.startswith(f"{ckpt}\ttask accuracy ")




def test_a_keep_n_toy_is_evaluated_under_its_own_mask(capsys, tmp_path):
    run_dir = tmp_path / "keep1"
    code, _, err = cli(capsys, "toy", "train", "--steps", "2", "--batch-size", "8", "--eval-every", "2",
                       "--save-every", "2", "--eval-samples", "8", "--keep-last-n-blocks", "1", "--out", run_dir)
    assert code == 0, err
    ckpt = run_dir / "step_000002"
    assert json.loads((ckpt / "meta.json").read_text())["config"]["keep_last_n_blocks"] == 1
    code, out, err = cli(capsys, "toy", "eval", ckpt, "--samples", "20")
    assert code == 0, err
    assert out.rstrip().endswith("set 1, keep 1)")
    code, _, err = cli(capsys, "toy", "train", "--keep-last-n-blocks", "-1", "--out", tmp_path / "bad")
    assert_refused(code, err, "keep_last_n_blocks")
    assert not (tmp_path / "bad").exists()
