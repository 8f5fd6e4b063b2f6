"""The run directory's bookkeeping (kvprobe/experiment/rundir.py): stage timings across resumes."""

from __future__ import annotations

import json

from kvprobe.experiment.rundir import record_timing


def test_a_resumed_run_keeps_the_time_its_stages_took(tmp_path):
    """Resuming a finished run redoes nothing and must not overwrite the stages' wall time with ~0 s
    (experiments/results/*/timings.json record what the published numbers cost)."""
    record_timing(tmp_path, "probe", 1266.0)
    record_timing(tmp_path, "report", 70.0)
    record_timing(tmp_path, "probe", 0.02)  # the resumed session: the stage was already done
    assert json.loads((tmp_path / "timings.json").read_text()) == {"probe": 1266.02, "report": 70.0}


def test_a_run_recorded_under_the_old_config_keys_resumes(tmp_path):
    """A run recorded before `probe.linear_l2` became `probe.linear.l2` (and `capture.kinds` `capture.tensors`)
    resumes under the same config written with today's names; another config is still refused."""
    import pytest

    from kvprobe.config import parse_config
    from kvprobe.experiment import ExperimentError
    from kvprobe.experiment.rundir import check_out_dir, prepare_out_dir

    today = {"model": {"kind": "toy"}, "capture": {"layers": [3], "tensors": ["k"]}, "probe": {"linear": {"l2": 0.01}}}
    cfg = parse_config(today)
    out = prepare_out_dir(tmp_path / "run", cfg, resume=False, overwrite=False, stage="run")
    record = json.loads((out / "config.json").read_text())
    old = record["config"]
    old["capture"]["kinds"] = old["capture"].pop("tensors")
    old["probe"]["linear_l2"] = old["probe"].pop("linear")["l2"]
    (out / "config.json").write_text(json.dumps(record))
    check_out_dir(out, cfg, resume=True, overwrite=False)
    with pytest.raises(ExperimentError, match="sections differ: probe"):
        check_out_dir(out, parse_config({**today, "probe": {"linear": {"l2": 0.1}}}), resume=True, overwrite=False)
