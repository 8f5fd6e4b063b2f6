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
