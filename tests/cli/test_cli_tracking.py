"""`--log-to tensorboard|wandb` on `kvprobe demo`, `run` and `probe`: the logs under RUN/tracking hold every
cell of results.json, the config and the figures (read back from the event files and the W&B offline run);
W&B stays offline; each call logs into a fresh sub-run; an unknown tracker or a missing package is refused
before anything is written."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.cli_support import FAST, assert_refused, cli, snapshot, write_config
from tests.helpers.sandbox import NETWORK
from tests.helpers.tracking import tensorboard_log, wandb_log

pytestmark = pytest.mark.usefixtures("no_network")

# the demo's conditions on a smaller grid (as tests/cli/test_cli_demo.py runs it), one fixed probe strength
SMALL_DEMO = {
    "capture": {"layers": [0, 3], "offsets": [-1, 0, 1], "sites": ["memento"], "batch_size": 250},
    "probe": {"families": ["linear"], "seeds": 1, "n_boot": 200, "shuffled_control": False,
              "linear_l2_grid": [0.001]},
}


def _cells(run_dir: Path) -> dict[str, dict]:
    """results.json's rows by their tracking tag (condition/probe/site/layerL/+offset)."""
    rows = json.loads((run_dir / "report" / "results.json").read_text())["rows"]
    return {f"{r['condition']}/{r['probe']}/{r['site']}/layer{r['layer']}/{r['offset']:+d}": r for r in rows}


def _check_tensorboard(where: Path, cells: dict[str, dict], name: str, *, figures: bool) -> None:
    scalars, texts, images = tensorboard_log(where)
    for tag, row in cells.items():
        for metric in ("accuracy", "ci_low", "ci_high", "n_val", "p_holm"):
            assert scalars[f"{tag}/{metric}"] == pytest.approx(row[metric], rel=1e-6), (tag, metric)
    assert len([t for t in scalars if t.endswith("/accuracy")]) == len(cells)
    assert texts["run"] == name and f'"name": "{name}"' in texts["config"]
    assert ("figures/accuracy_heatmap" in images) == figures


def test_demo_logs_every_cell_to_tensorboard_and_wandb_offline(capsys, tmp_path, monkeypatch):
    from kvprobe.cli import demo as demo_cli

    monkeypatch.setattr(demo_cli, "DEMO_CONFIG", {**demo_cli.DEMO_CONFIG, **SMALL_DEMO})
    monkeypatch.setenv("WANDB_MODE", "online")  # the environment does not turn the network on
    monkeypatch.delenv("KVPROBE_ALLOW_NETWORK", raising=False)
    NETWORK.clear()
    run_dir = tmp_path / "demo"
    code, out, err = cli(capsys, "demo", "--samples", "500", "--out", run_dir, "--quiet",
                         "--log-to", "tensorboard", "--log-to", "wandb", "--log-to", "tensorboard")
    assert code == 0 and err == "", err
    assert f"tracking: {run_dir / 'tracking'}" in out
    cells = _cells(run_dir)
    assert len(cells) == 2 * 2 * 3  # conditions x layers x offsets

    (board,) = (run_dir / "tracking" / "tensorboard").iterdir()  # a repeated tracker logs once
    _check_tensorboard(board, cells, "toy-demo", figures=True)

    (offline,) = (run_dir / "tracking" / "wandb" / "wandb").glob("offline-run-*")
    config, history = wandb_log(offline)
    assert config["name"] == "toy-demo" and config["data"]["n_samples"] == 500
    for tag, row in cells.items():
        assert history[f"{tag}/accuracy"] == row["accuracy"] and history[f"{tag}/n_val"] == row["n_val"]
    assert history["cells/nrows"] == len(cells) and history["figures/accuracy_heatmap/_type"] == "image-file"
    assert NETWORK == []


@pytest.fixture
def run_copy(tmp_path, tiny_run) -> Path:
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def test_probe_logs_each_time_into_a_fresh_sub_run(capsys, run_copy):
    cells = _cells(run_copy)
    for n in (1, 2):
        code, _, err = cli(capsys, "probe", run_copy, "--log-to", "tensorboard")
        assert code == 0, err
        runs = sorted((run_copy / "tracking" / "tensorboard").iterdir())
        assert [p.name for p in runs] == [f"{i:03d}" for i in range(1, n + 1)]
        _check_tensorboard(runs[-1], cells, "tiny", figures=False)  # probe writes no figures


def test_run_logs_to_tensorboard(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_config(tmp_path / "tiny.yaml", FAST), "--out", run_dir,
                       "--log-to", "tensorboard")
    assert code == 0, err
    (board,) = (run_dir / "tracking" / "tensorboard").iterdir()
    _check_tensorboard(board, _cells(run_dir), "tiny", figures=True)


@pytest.mark.parametrize("command", ["run", "probe", "demo"])
def test_an_unknown_tracker_is_refused_before_anything_is_written(capsys, tmp_path, run_copy, command):
    args = {"run": ["run", write_config(tmp_path / "tiny.yaml", FAST), "--out", tmp_path / "new"],
            "probe": ["probe", run_copy], "demo": ["demo", "--out", tmp_path / "new"]}[command]
    before = snapshot(run_copy)
    code, _, err = cli(capsys, *args, "--log-to", "mlflow")
    assert_refused(code, err, "--log-to", "'mlflow'", "tensorboard, wandb")
    assert not (tmp_path / "new").exists() and snapshot(run_copy) == before


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_names_the_track_extra(capsys, tmp_path, run_copy, monkeypatch, tracker):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    code, _, err = cli(capsys, "demo", "--out", tmp_path / "new", "--log-to", tracker)
    assert_refused(code, err, f"needs {tracker}", "kvprobe[track]")
    assert not (tmp_path / "new").exists()
    before = snapshot(run_copy)
    code, _, err = cli(capsys, "probe", run_copy, "--redo", "--log-to", tracker)
    assert_refused(code, err, f"needs {tracker}", "kvprobe[track]")
    assert snapshot(run_copy) == before
