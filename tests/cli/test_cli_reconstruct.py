"""`kvprobe reconstruct` and the reconstruct stage of `kvprobe run`: results, report, refusals."""

from __future__ import annotations

import json

from tests.helpers.cli_support import FAST, cli, write_config

TWO = {**FAST, "data": {**FAST["data"], "n_samples": 800},  # a block's five digits need a few hundred to read
       "conditions": {"memento": {"keep_last_n_blocks": 0},
                              "restart": {"keep_last_n_blocks": 0, "mask_delimiters": True, "restart_mode": True}},
       "reconstruct": {"layers": [3], "offsets": [-1, 0]}}


def test_run_reconstructs_reports_and_the_command_redoes_with_new_fields(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_config(tmp_path / "c.yaml", TWO), "--out", out)
    assert code == 0, err
    data = json.loads((out / "reconstruction" / "results.json").read_text())
    assert data["conditions"] == ["memento", "restart"] and data["pairs"] == [["memento", "restart"]]
    assert data["positions"] == ["t1", "t2", "t3", "t4", "t5"]  # the toy block: its five digits
    cells = {(r["condition"], r["offset"]): r for r in data["rows"]}
    assert set(cells) == {(c, o) for c in ("memento", "restart") for o in (-1, 0)}
    assert cells[("memento", 0)]["bits"] > 2.0 and abs(cells[("memento", -1)]["bits"]) < 0.1
    summary = (out / "report" / "summary.md").read_text()
    assert "## What survives an erased block" in summary and "figures/reconstruction.png" in summary
    assert (out / "report" / "figures" / "reconstruction.png").is_file()
    assert "reconstruct" in json.loads((out / "timings.json").read_text())

    code, printed, _ = cli(capsys, "reconstruct", out)  # read back, not refitted
    assert code == 0 and "memento - restart: bits per token" in printed
    code, _, err = cli(capsys, "reconstruct", out, "--set", "reconstruct.target=ends")
    assert code == 2 and "add --redo" in err
    code, _, err = cli(capsys, "reconstruct", out, "--set", "probe.n_boot=300")
    assert code == 2 and "only reconstruct.* fields" in err
    code, _, err = cli(capsys, "reconstruct", out, "--redo", "--set", "reconstruct.target=set")
    assert code == 2 and "reconstruct.target" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "reconstruct", out, "--redo", "--set", "reconstruct.k=40")
    assert code == 2 and "reconstruct.k" in err and err.count("\n") == 1
    code, printed, err = cli(capsys, "reconstruct", out, "--redo", "--set", "reconstruct.target=ends",
                             "--set", "reconstruct.k=2", "--set", "reconstruct.families=[mlp]")
    assert code == 0, err
    data = json.loads((out / "reconstruction" / "results.json").read_text())
    assert data["positions"] == ["first 1", "first 2", "last 2", "last 1"] and data["config"]["k"] == 2
    assert {r["probe"] for r in data["rows"]} == {"mlp"} and "(mlp probe)" in printed
    code, _, err = cli(capsys, "report", out)  # drawn with the family that was fitted
    assert code == 0, err
    assert "by a mlp probe" in (out / "report" / "summary.md").read_text()
    code, _, err = cli(capsys, "reconstruct", out)  # read back as fitted, whatever the run's config says
    assert code == 0, err
    saved = (out / "reconstruction" / "results.json").read_bytes()
    code, _, err = cli(capsys, "run", tmp_path / "c.yaml", "--out", out, "--resume")  # the run's own settings
    assert code == 2 and "fitted with other reconstruct settings" in err and "--redo" in err
    assert err.count("\n") == 1 and (out / "reconstruction" / "results.json").read_bytes() == saved


def test_reconstruct_names_a_cell_the_capture_lacks(tmp_path, capsys):
    bad = {**FAST, "reconstruct": {"layers": [1]}}
    code, _, err = cli(capsys, "run", write_config(tmp_path / "c.yaml", bad), "--out", tmp_path / "run")
    assert code == 2 and "reconstruct.layers" in err and "capture.layers" in err
