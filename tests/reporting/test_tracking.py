"""Experiment tracking (`kvprobe.reporting.tracking`): what a TensorBoard or W&B offline run holds,
read back from its files; each call logs into a fresh sub-run; a missing package is named."""

from __future__ import annotations

import dataclasses
import math
import socket
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvprobe.reporting.tracking import METRICS, cell_metrics, cell_tag, require, track_run  # noqa: E402
from tests.helpers.grids import make_grid  # noqa: E402
from tests.helpers.tracking import tensorboard_log, wandb_log  # noqa: E402

CONFIG = {"name": "tiny", "probe": {"families": ["linear"], "n_boot": 200}}


@pytest.fixture(scope="module")
def rows():
    """A small grid; one cell without a chosen strength (a fixed-strength fit records none)."""
    rows = make_grid(conditions=("memento", "restart"), offsets=(-1, 0, 1), layers=(0, 3), probes=("linear",),
                     block_end=False)
    rows = [dataclasses.replace(r, l2=0.01 * (i + 1)) for i, r in enumerate(rows)]
    rows[0] = dataclasses.replace(rows[0], l2=None)
    return rows


@pytest.fixture(scope="module")
def figure(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fig") / "accuracy_heatmap.png"
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    plt.close(fig)
    return path


def _expected(rows) -> dict[str, float]:
    return {f"{cell_tag(r)}/{m}": float(getattr(r, m)) for r in rows for m in METRICS if getattr(r, m) is not None}


def test_cell_metrics_name_every_cell_and_metric(rows):
    metrics = cell_metrics(rows)
    assert len(metrics) == len(rows) * len(METRICS) - 1  # the cell without a strength logs no l2
    r = rows[5]
    assert metrics[f"{r.condition}/linear/memento/layer{r.layer}/{r.offset:+d}/accuracy"] == r.accuracy
    assert f"{cell_tag(rows[0])}/l2" not in metrics


def test_tensorboard_holds_every_cell_the_config_and_the_figures(tmp_path, rows, figure):
    (where,) = track_run(["tensorboard"], tmp_path / "tracking", name="tiny", config=CONFIG, rows=rows,
                         figures=[figure, figure.with_suffix(".pdf")])  # only PNGs are images
    assert where == tmp_path / "tracking" / "tensorboard" / "001"
    scalars, texts, images = tensorboard_log(where)
    expected = _expected(rows)
    assert scalars.keys() == expected.keys()
    for tag, value in expected.items():  # event files store float32
        assert scalars[tag] == pytest.approx(value, rel=1e-6) or (math.isnan(value) and math.isnan(scalars[tag]))
    assert '"n_boot": 200' in texts["config"] and texts["run"] == "tiny"
    assert images == ["figures/accuracy_heatmap"]


def test_each_call_logs_into_a_fresh_sub_run(tmp_path, rows):
    first, = track_run(["tensorboard"], tmp_path, name="a", config=CONFIG, rows=rows[:2])
    before = {p: p.read_bytes() for p in first.iterdir()}
    second, = track_run(["tensorboard"], tmp_path, name="b", config=CONFIG, rows=rows)
    assert (first.name, second.name) == ("001", "002")
    assert {p: p.read_bytes() for p in first.iterdir()} == before  # the earlier log untouched
    assert len(tensorboard_log(second)[0]) == len(cell_metrics(rows))


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, rows, figure, monkeypatch):
    tried = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: tried.append(host) or [][0])
    monkeypatch.setenv("WANDB_MODE", "online")  # offline is kvprobe's choice, not the environment's
    (where,) = track_run(["wandb"], tmp_path / "tracking", name="tiny", config=CONFIG, rows=rows, figures=[figure])
    assert where.parent == tmp_path / "tracking" / "wandb" / "wandb" and where.name.startswith("offline-run-")
    config, history = wandb_log(where)
    assert config["probe"] == CONFIG["probe"] and config["name"] == "tiny"
    for tag, value in _expected(rows).items():
        assert history[tag] == value or (math.isnan(value) and history[tag] in ("NaN", None))
    assert history["cells/nrows"] == len(rows)
    assert history["figures/accuracy_heatmap/_type"] == "image-file"
    tables = list(where.glob("files/media/table/cells_*.table.json"))
    assert len(tables) == 1 and tried == []


def test_a_missing_package_is_named_without_importing_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as e:
        require(["tensorboard"])
    assert e.value.name == "tensorboard"
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        require(["mlflow"])


def test_wandb_online_without_a_login_is_one_clear_error(tmp_path, rows, monkeypatch):
    from kvprobe.errors import KVProbeError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline (tests)")))
    with pytest.raises(KVProbeError, match=r"wandb: could not start a run \(UsageError: No API key"):
        track_run(["wandb"], tmp_path, name="tiny", config=CONFIG, rows=rows, online=True)
