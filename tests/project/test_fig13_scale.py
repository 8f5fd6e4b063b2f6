"""experiments/fig13_scale.py and fig13_seeds.py refuse what they cannot read in one line (exit 2) before they write anything."""

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
])
def test_bad_input_is_refused_before_anything_is_written(name, argv, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(out), *argv])
    with pytest.raises(SystemExit) as e:
        _script(name).main()
    assert e.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_each_checkpoint_has_its_own_results_file():
    fig13 = _script("fig13_scale")
    assert fig13.json_name("final") == "final.json"
    assert fig13.json_name("series/step_002400") == "series_step_002400.json"


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
    fig13, seen = _script("fig13_scale"), []
    (tmp_path / "final.json").write_text('{"checkpoint": "final", "old": true}\n')
    measure_one = lambda checkpoint: seen.append(checkpoint) or {"checkpoint": checkpoint}  # noqa: E731
    fig13.measure_each(["final", "series/step_002400"], False, tmp_path, measure_one)
    assert seen == ["series/step_002400"] and "old" in (tmp_path / "final.json").read_text()
    fig13.measure_each(["final"], True, tmp_path, measure_one)
    assert seen[-1] == "final" and "old" not in (tmp_path / "final.json").read_text()
