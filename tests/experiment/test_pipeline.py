"""The pipeline's stages (kvprobe.experiment.pipeline) on a finished tiny run, through the Python API
a study uses: saved probe results are read back, not refitted; what is missing is fitted again to the
same numbers; a resumed run with the same config writes the same results.csv.

The same run through `kvprobe`: tests/cli/test_cli.py (end to end, resume, refusals) and
tests/cli/test_recovery.py (damage, kill -9).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kvprobe.analysis import load_grid
from kvprobe.config import parse_config
from kvprobe.experiment import pipeline, run_pipeline, stage_probe, start_run
from tests.helpers.cli_support import FAST, snapshot

CFG = parse_config(FAST)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of the fast tiny config (read-only: tests work on copies)."""
    out, plans = start_run(CFG, tmp_path_factory.mktemp("pipeline") / "run", resume=False, overwrite=False)
    run_pipeline(CFG, out, plans, resume=False, progress=False)
    return out


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _rows(grid) -> list[str]:
    return [json.dumps(r.to_dict(), sort_keys=True) for r in grid.rows]


def test_stage_probe_reads_saved_probes_back(finished_run, monkeypatch):
    def no_fitting(*args, **kwargs):
        raise AssertionError("probe_store was called: the saved results should have been read back")

    monkeypatch.setattr(pipeline, "probe_store", no_fitting)
    before = snapshot(finished_run / "probes")
    grids = stage_probe(CFG, finished_run, progress=False)
    assert list(grids) == ["memento"]
    saved = load_grid(finished_run / "probes" / "memento")
    assert _rows(grids["memento"]) == _rows(saved) and len(saved.rows) == 2 * 3  # layers x offsets
    assert np.array_equal(grids["memento"].val_index, saved.val_index)
    assert snapshot(finished_run / "probes") == before  # read, not rewritten


def test_stage_probe_fits_what_is_missing_to_the_same_numbers(finished_run, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "probes")
    calls = []
    real = pipeline.probe_store
    monkeypatch.setattr(pipeline, "probe_store", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    grids = stage_probe(CFG, run, progress=False)
    assert calls == ["memento"]  # one fit per condition and family (linear only here)
    assert (run / "probes" / "memento.json").read_text() == (finished_run / "probes" / "memento.json").read_text()
    assert _rows(grids["memento"]) == _rows(load_grid(finished_run / "probes" / "memento"))


def test_a_resumed_run_with_the_same_config_writes_the_same_results(finished_run, tmp_path, capsys):
    """Interrupted after its capture (no probe results, no report), then resumed: the store is kept,
    the probes are fitted again and the report's results.csv is the uninterrupted run's, byte for byte.
    Resuming the finished run again changes nothing and rewrites the same report."""
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "probes")
    shutil.rmtree(run / "report")
    stores = snapshot(run / "stores")
    out, plans = start_run(CFG, run, resume=True, overwrite=False)
    run_pipeline(CFG, out, plans, resume=True, progress=False)
    assert snapshot(run / "stores") == stores  # nothing captured again
    expected = (finished_run / "report" / "results.csv").read_bytes()
    assert (run / "report" / "results.csv").read_bytes() == expected
    assert len(expected.decode().splitlines()) == 1 + 2 * 3  # header + layers x offsets

    probes = snapshot(run / "probes")
    out, plans = start_run(CFG, run, resume=True, overwrite=False)
    grids = run_pipeline(CFG, out, plans, resume=True, progress=False)
    assert snapshot(run / "probes") == probes and snapshot(run / "stores") == stores
    assert (run / "report" / "results.csv").read_bytes() == expected
    assert any(r.significant for r in grids["memento"].rows)  # the grids come back Holm-corrected
    assert "[memento] store complete, skipping" in capsys.readouterr().out
