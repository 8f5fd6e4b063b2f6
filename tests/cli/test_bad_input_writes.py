"""Nothing lost, nothing half-written (issue 29): a full disk under every writer, and files kvprobe did not write.

FULL: each writer of the library meets a full disk (tests/helpers/disk.py: the write of one chosen
file fails with ENOSPC after a few bytes). `kvprobe` must exit 2 with one line naming that file and
"no space left on device", leave no temporary, leave that file as it was (old or absent), and,
where the case says "all", change nothing at all: files written together (a grid's .json and .npz,
a report, a run's marker and record) are all written or none. A capture that fails mid-way keeps
its whole shards and resumes.

REFUSED: a file kvprobe would replace, append to or repair, but did not write (no kvprobe marker
at its start: kvprobe.files.check_ours), or that is one of the command's inputs, is refused in one
line naming it, before anything is touched; `probe --redo` keeps the old results when the store
is refused. The contract is tests/cli/test_bad_input.py's; the sandbox is tests/cli/conftest.py's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from kvprobe.causal import CausalResult, CausalRow, load_causal, save_causal
from kvprobe.data.traces import Trace
from kvprobe.files import WriteError
from kvprobe.grid import Cell
from kvprobe.serving import Generation
from tests.helpers.cli_support import assert_refused, assert_refused_untouched, cli, cli_quiet, sandbox_args
from tests.helpers.disk import full_disk, leftovers
from tests.helpers.fake_server import FakeServer
from tests.helpers.sandbox import SHARD0, SHARD1, STORE, edit_json, flip_feature_byte, swap_store, truncate

pytestmark = pytest.mark.usefixtures("no_network")  # offline: the one server is on 127.0.0.1

NO_SPACE = "no space left on device"
C = "{cfg}"
CAPTURE = ["capture", C, "--out", "{out}"]
GENERATE = ["generate", "--prompts", "{dir}/prompts.jsonl", "--base-url", "{url}", "--max-attempts", "1",
            "--no-progress", "--out"]
EXPORT = ["export-traces", "--generations", "{dir}/gen.jsonl", "--out"]


def _generations(path: Path, ids: tuple[str, ...] = ("p0", "p1")) -> None:
    """A generations file as `kvprobe generate` writes it (one parsed trace per prompt id)."""
    records = [Generation(pid, "<think>...", "stop", Trace(pid, f"P{pid}?", ["a b.", "c d."], ["a b", "c d"], "42"))
               for pid in ids]
    path.write_text("".join(json.dumps(g.to_json()) + "\n" for g in records))


def _causal(run: Path) -> None:
    """Causal results beside the probe results (what `kvprobe run` with a causal section leaves)."""
    cell = Cell("memento", 1, 3, "tail_mean")
    row = CausalRow("ablate", cell.site, cell.offset, cell.layer, cell.pooling, 4, 0.1, 0.0, 0.2, 0.05, 0.0, 0.1, 0.5)
    save_causal(CausalResult([row], {("ablate", cell): {"delta_loss_memento": np.arange(4.0)}}), run / "causal" / "causal")


def _exported(sandbox: Path) -> None:
    """A traces file from an earlier `kvprobe export-traces`."""
    _generations(sandbox / "gen.jsonl")
    code, _, err = cli_quiet(*_args(EXPORT + ["{dir}/traces.jsonl"], sandbox, ""))
    assert code == 0, err


SETUP: dict[str, Callable[[Path], None]] = {
    "generations": lambda d: _generations(d / "gen.jsonl"),
    "two-generations": lambda d: (_generations(d / "gen.jsonl"), _generations(d / "b.jsonl", ("q0",))),
    "generated-elsewhere": lambda d: _generations(d / "out.jsonl", ("p9",)),  # then `generate` appends p0
    "exported": _exported,
    "causal": lambda d: _causal(d / "run"),
    "user-file-without-newline": lambda d: (d / "mine.jsonl").write_text('{"prompt_id": "mine"}\nmy last line'),
    "pipeline-file": lambda d: (d / "mine.jsonl").write_text(json.dumps(
        {"task_id": "t1", "sentences": ["a."], "blocks": [[0, 0]], "block_summaries": ["a"], "problem": "P?"}) + "\n"),
}

# (id, argv, the file whose write fails (fnmatch on its path), "all" / "target" / "nothing" (see below),
#  setup or None). all: the sandbox is unchanged; nothing: that too, and no {out}; target: the file as it was.
FULL = [
    ("capture-run-marker", CAPTURE, "*/out/.kvprobe", "nothing"),
    ("capture-run-record", CAPTURE, "*/out/config.json", "nothing"),
    ("capture-store-config", CAPTURE, "*/out/stores/memento/config.json", "target"),
    ("capture-shard", CAPTURE, "*/shard_000001.h5", "target"),
    ("capture-shard-record", CAPTURE, "*/shard_000001.json", "target"),
    ("capture-index", CAPTURE, "*/out/stores/memento/kvstore.h5", "target"),
    ("capture-model-record", CAPTURE, "*/out/model.json", "target"),
    ("probe-results-npz", ["probe", "{run}", "--redo"], "*/probes/memento.npz", "all"),
    ("probe-results-json", ["probe", "{run}", "--redo"], "*/probes/memento.json", "all"),
    ("probe-timings", ["probe", "{run}", "--redo"], "*/run/timings.json", "target"),
    ("report-results-json", ["report", "{run}"], "*/report/results.json", "all"),
    ("report-results-csv", ["report", "{run}"], "*/report/results.csv", "all"),
    ("report-diffs-csv", ["report", "{run}"], "*/report/diffs.csv", "all"),
    ("report-summary", ["report", "{run}"], "*/report/summary.md", "all"),
    ("report-figure-png", ["report", "{run}"], "*/figures/accuracy_by_layer.png", "all"),
    ("report-figure-pdf", ["report", "{run}"], "*/figures/accuracy_heatmap.pdf", "all"),
    ("report-causal-csv", ["report", "{run}"], "*/report/causal.csv", "target", "causal"),
    ("report-causal-figure", ["report", "{run}"], "*/figures/causal_map.png", "target", "causal"),
    ("run-report", ["run", C, "--out", "{out}"], "*/out/report/summary.md", "target"),
    ("generate-new", GENERATE + ["{out}/gen.jsonl"], "*/out/gen.jsonl", "nothing"),
    ("generate-append", GENERATE + ["{dir}/out.jsonl"], "*/out.jsonl", "all", "generated-elsewhere"),
    ("export-new", EXPORT + ["{out}/traces.jsonl"], "*/out/traces.jsonl", "nothing", "generations"),
    ("export-over-previous", EXPORT + ["{dir}/traces.jsonl"], "*/traces.jsonl", "all", "exported"),
]

# (id, argv, needles, setup or damage or None)
REFUSED = [
    ("export-onto-user-file", EXPORT + ["{dir}/notes/readme.txt"], ["readme.txt", "not a traces file", "--out"],
     "generations"),
    ("export-onto-pipeline-file", EXPORT + ["{dir}/mine.jsonl"], ["mine.jsonl", "not a traces file"], "pipeline-file"),
    ("export-out-is-the-input", EXPORT + ["{dir}/gen.jsonl"], ["gen.jsonl", "--out is also an input"], "generations"),
    ("export-out-is-a-second-input", ["export-traces", "--generations", "{dir}/gen.jsonl", "{dir}/b.jsonl", "--out",
                                      "{dir}/b.jsonl"], ["b.jsonl", "--out is also an input"], "two-generations"),
    ("export-out-is-a-directory", EXPORT + ["{dir}/notes"], ["notes", "is a directory", "--out"], "generations"),
    ("generate-onto-user-file", GENERATE + ["{dir}/notes/readme.txt"], ["readme.txt", "not a generations file",
                                                                         "--out"]),
    ("generate-onto-cut-off-user-file", GENERATE + ["{dir}/mine.jsonl"], ["mine.jsonl", "not a generations file"],
     "user-file-without-newline"),
    ("generate-out-is-the-prompts", GENERATE + ["{dir}/prompts.jsonl"], ["prompts.jsonl", "not a generations file"]),
    ("generate-out-is-a-directory", GENERATE + ["{dir}/notes"], ["notes", "is a directory"]),
    ("redo-shard-truncated", ["probe", "{run}", "--redo"], ["shard_000000.h5", "truncated"], "raw-shard-truncated"),
    ("redo-shard-deleted", ["probe", "{run}", "--redo"], ["shard_000001.h5", "missing"], "raw-shard-deleted"),
    ("redo-shard-flipped", ["probe", "{run}", "--redo"], ["shard_000000.h5", "checksum mismatch"], "raw-shard-flipped"),
    ("redo-index-truncated", ["probe", "{run}", "--redo"], ["kvstore.h5"], "raw-index-truncated"),
    ("redo-model-record", ["probe", "{run}", "--redo"], ["stores/memento", "parameter hash"], "raw-model-record"),
    ("redo-store-swapped", ["probe", "{run}", "--redo"], ["stores/memento", "series/step_000450"], "store-swapped"),
]
# the store damages of tests/helpers/sandbox.py with the probe results kept (`probe --redo` must keep them)
RAW = {
    "raw-shard-truncated": lambda run: truncate(run / SHARD0),
    "raw-shard-deleted": lambda run: (run / SHARD1).unlink(),
    "raw-shard-flipped": lambda run: flip_feature_byte(run / SHARD0),
    "raw-index-truncated": lambda run: truncate(run / STORE / "kvstore.h5", 1000),
    "raw-model-record": lambda run: edit_json(run / "model.json", lambda d: d.update(param_hash="0" * 64)),
    "store-swapped": swap_store,
}


@pytest.fixture(scope="module")
def url():
    server = FakeServer()
    yield server.base_url
    server.close()


def _args(argv: list[str], sandbox: Path, url: str) -> list[str]:
    return sandbox_args(argv, sandbox, url=url)


def snapshot(root: Path) -> dict[str, tuple[str, int] | str]:
    """Every file under root with its content's digest and its mtime, and every folder (a folder's mtime
    changes when a temporary is made in it and removed: that is no change to what it holds)."""
    return {str(p.relative_to(root)): "folder" if p.is_dir() else
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _prepare(sandbox: Path, setup: str | None) -> None:
    if setup in SETUP:
        SETUP[setup](sandbox)
    elif setup in RAW:
        RAW[setup](sandbox / "run")


def _refused_mid_way(code: int, err: str, *needles: str) -> None:
    """`assert_refused` for a command that failed mid-way: its progress bars may come first (closed),
    then the one error line, last."""
    assert "Traceback" not in err, err
    bars, _, line = err.rstrip("\n").rpartition("\n")
    assert all(not b.startswith("kvprobe: error:") for b in bars.splitlines()), err
    assert_refused(code, line + "\n", *needles)
    assert not bars or bars.split("\r")[-1].strip(), err  # a bar, not an empty line before the error


@pytest.mark.parametrize("argv, pattern, scope, setup",
                         [pytest.param(c[1], c[2], c[3], c[4] if len(c) > 4 else None, id=c[0]) for c in FULL])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(capsys, monkeypatch, sandbox, url, argv, pattern,
                                                                 scope, setup):
    _prepare(sandbox, setup)
    capsys.readouterr()
    before = snapshot(sandbox)
    failed = full_disk(monkeypatch, pattern)
    code, _, err = cli(capsys, *_args(argv, sandbox, url))
    assert len(set(failed)) == 1, (failed, err)  # one file (a writer may try it again while failing)
    _refused_mid_way(code, err, failed[0], NO_SPACE)
    assert leftovers(sandbox) == []
    target = str(Path(failed[0]).relative_to(sandbox))
    after = snapshot(sandbox)
    content = {k: v[0] for k, v in before.items() if v != "folder"}
    assert {k: v[0] for k, v in after.items() if v != "folder"}.get(target) == content.get(target), \
        "the file that failed changed"
    if scope in ("all", "nothing"):  # an append cut back leaves the same bytes, but a new mtime
        assert {k: v for k, v in after.items() if k != target} == {k: v for k, v in before.items() if k != target}
    if "shard_000001" in target:  # the shard and its checksum record go in together
        assert not any("shard_000001" in name for name in after if name.startswith("out"))


@pytest.mark.parametrize("pattern", ["*/shard_000001.h5", "*/kvstore.h5"])
def test_a_capture_that_met_a_full_disk_resumes(capsys, monkeypatch, sandbox, pattern):
    full_disk(monkeypatch, pattern)
    code, _, err = cli(capsys, *_args(CAPTURE, sandbox, ""))
    assert code == 2, err
    monkeypatch.undo()  # space freed
    code, _, err = cli(capsys, *_args(CAPTURE, sandbox, ""), "--resume")
    assert code == 0, err
    assert sorted(p.name for p in (sandbox / "out" / STORE / "shards").iterdir()) == \
        sorted(p.name for p in (sandbox / "run" / STORE / "shards").iterdir())


@pytest.mark.parametrize("argv, needles, setup",
                         [pytest.param(c[1], c[2], c[3] if len(c) > 3 else None, id=c[0]) for c in REFUSED])
def test_a_file_kvprobe_did_not_write_is_refused_untouched(capsys, sandbox, url, argv, needles, setup):
    _prepare(sandbox, setup)
    capsys.readouterr()
    assert_refused_untouched(capsys, sandbox, _args(argv, sandbox, url), *needles, snap=snapshot)


def test_kvprobes_own_files_are_replaced_and_appended_to(capsys, sandbox, url):
    """The other side of REFUSED: a second export onto the first, a generate onto its own file,
    a `probe --redo` that succeeds (and leaves no old results aside)."""
    _generations(sandbox / "gen.jsonl")
    for _ in range(2):
        code, _, err = cli(capsys, *_args(EXPORT + ["{dir}/traces.jsonl"], sandbox, url))
        assert code == 0, err
    SETUP["generated-elsewhere"](sandbox)
    code, _, err = cli(capsys, *_args(GENERATE + ["{dir}/out.jsonl"], sandbox, url))
    assert code == 0, err
    assert [json.loads(line)["prompt_id"] for line in (sandbox / "out.jsonl").read_text().splitlines()] == ["p9", "p0"]
    code, _, err = cli(capsys, "probe", sandbox / "run", "--redo")
    assert code == 0, err
    assert not list((sandbox / "run" / "probes").glob(".*"))


@pytest.mark.parametrize("new_results_whole", [False, True])
def test_a_redo_killed_mid_way_is_undone_by_the_next_probe(capsys, sandbox, new_results_whole):
    """Killed after setting the old results aside: the next `probe` puts them back, unless the new
    results are whole (their .json, written last, is there); then the old ones are deleted."""
    probes = sandbox / "run" / "probes"
    before = {p.name: p.read_bytes() for p in probes.iterdir()}
    for p in probes.glob("memento.*"):
        p.rename(p.with_name(f".{p.name}.redo"))
    if new_results_whole:
        for name, data in before.items():
            (probes / name).write_bytes(data)
    code, _, err = cli(capsys, "probe", sandbox / "run")
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in probes.iterdir()} == before


@pytest.mark.parametrize("which", ["causal.npz", "causal.json"])
def test_causal_results_are_saved_both_or_neither(tmp_path, monkeypatch, which):
    _causal(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "causal").iterdir()}
    full_disk(monkeypatch, f"*/{which}")
    with pytest.raises(WriteError, match=f"{which}.*{NO_SPACE}"):
        _causal(tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "causal").iterdir()} == before
    assert load_causal(tmp_path / "causal" / "causal").rows[0].intervention == "ablate"


def test_the_tables_are_large_and_every_setup_is_used():
    assert len(FULL) + len(REFUSED) >= 30
    used = {c[4] for c in FULL if len(c) > 4} | {c[3] for c in REFUSED if len(c) > 3}
    assert used == set(SETUP) | set(RAW)
    assert len({c[0] for c in FULL + REFUSED}) == len(FULL) + len(REFUSED)
