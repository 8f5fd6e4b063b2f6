"""What a run's report adds to its metadata from the run directory: package versions and the model's identity."""

from __future__ import annotations

import json

from kvprobe.experiment.pipeline import run_record


def test_versions_and_model_identity_are_read_from_the_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "versions": {"torch": "2.13.0"}}))
    (tmp_path / "model.json").write_text(json.dumps({"name": "final", "param_hash": "15f53842"}))
    assert run_record(tmp_path) == {"versions": {"torch": "2.13.0"},
                                    "model identity": {"name": "final", "param_hash": "15f53842"}}


def test_a_missing_or_damaged_record_is_left_out(tmp_path):
    assert run_record(tmp_path) == {}
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.json").write_text("[1, 2]")
    assert run_record(tmp_path) == {}
