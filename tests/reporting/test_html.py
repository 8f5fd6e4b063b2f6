"""report/index.html: self-contained, small, complete, deterministic, and working in a real browser.

The browser tests open the page in headless Chromium (the system's, through playwright) with the
network off; they skip, saying why, where chromium or playwright is missing (.ci/run installs chromium).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kvprobe.errors import KVProbeError
from kvprobe.grid import LINEAR, MEMENTO, MLP
from kvprobe.reporting import PAPER_TOY, write_report
from kvprobe.reporting.html import LINKED_FILES, render_html
from kvprobe.reporting.webfigures import EDGE, EPOCH_LIMIT
from tests.helpers.grids import make_diffs, make_grid, make_sweep

SIZE_LIMIT = 5 * 2**20  # the "at most 5 MB"
METADATA = {"name": "toy-html", "model": "toy", "timings": {"capture": 1.5, "probe": 12.25},
            "versions": {"kvprobe": "0.1.0", "torch": "2.5.1"}, "model identity": {"name": "final", "param_hash": "15f53842"},
            "config": {"seed": 7, "model": {"kind": "toy", "checkpoint": "final"}, "probe": {"seeds": 3}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory, grid, diffs) -> dict[str, Path]:
    return write_report(grid, diffs, tmp_path_factory.mktemp("report"), sweep=make_sweep(), paper=PAPER_TOY,
                        metadata=METADATA)


@pytest.fixture(scope="module")
def page(report) -> str:
    return report["index.html"].read_text(encoding="utf-8")


def _figures(page: str) -> list[dict]:
    found = re.search(r"<script type='application/json' id='figures'>(.*?)</script>", page, re.S)
    return json.loads(found.group(1))


def _outside_bundle(page: str) -> str:
    """The page less the inlined plotly.js (whose source names URLs it never fetches here)."""
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1  # inlined once
    return page.replace(get_plotlyjs(), "")


def _heatmap(page: str, title: str) -> dict:
    (spec,) = [f for f in _figures(page) if f["layout"]["title"]["text"] == title]
    return spec["data"][0]


def _hover_of(trace: dict, layer: int, offset_label: str) -> str:
    """The hover text plotly.js makes of a cell: the template with the cell's values put in."""
    i, j = trace["y"].index(f"layer {layer}"), trace["x"].index(offset_label)
    text = trace["hovertemplate"].replace("%{y}", trace["y"][i]).replace("%{x}", trace["x"][j])
    text = text.replace("%{z:.1f}", f"{trace['z'][i][j]:.1f}")
    return re.sub(r"%\{customdata\[(\d)\]\}", lambda m: str(trace["customdata"][i][j][int(m.group(1))]), text)


# ----------------------------------------------------------------- the file

def test_the_report_writes_index_html_beside_its_data(report, page):
    assert report["index.html"].parent == report["results.json"].parent
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_the_page_is_self_contained_and_under_the_size_limit(report, page):
    rest = _outside_bundle(page)
    assert report["index.html"].stat().st_size < SIZE_LIMIT
    assert not re.search(r"<link|<script[^>]*\bsrc=|<img|<iframe|https?://", rest, re.I)
    targets = re.findall(r"""(?:href|src)=['"]([^'"]*)['"]""", rest)
    assert targets and all(t.startswith("#") or t in LINKED_FILES for t in targets), targets


def test_links_are_relative_and_point_at_the_files_written(report, page):
    links = re.findall(r"<a href='([^'#]+)'>", _outside_bundle(page))
    assert {"results.csv", "results.json", "diffs.csv", "sweep.csv", "summary.md"} <= set(links)
    assert all((report["index.html"].parent / link).is_file() for link in links)


def test_a_heatmap_per_condition_site_and_probe(page, grid):
    titles = [f["layout"]["title"]["text"] for f in _figures(page) if f["data"][0]["type"] == "heatmap"]
    expected = {f"{r.condition} · {r.site} · {r.probe} probe" for r in grid}
    assert sorted(titles) == sorted(expected)


def test_a_cells_hover_gives_its_numbers(page, grid):
    (cell,) = [r for r in grid if (r.condition, r.site, r.probe, r.layer, r.offset) == ("memento", MEMENTO, LINEAR, 3, 1)]
    hover = _hover_of(_heatmap(page, f"memento · {MEMENTO} · {LINEAR} probe"), 3, "masked +1")
    interval = f"95% interval {100 * cell.ci_low:.1f}–{100 * cell.ci_high:.1f}%"
    assert f"accuracy {100 * cell.accuracy:.1f}%" in hover and interval in hover, hover
    assert "n 1000" in hover and "chance 10.0%" in hover and "p (Holm) " in hover and "strength (L2) —" in hover


def test_a_strength_at_the_edge_and_a_cell_of_its_own_n_are_shown_per_cell(grid, diffs):
    target = ("memento", MEMENTO, LINEAR, 2, 1)
    rows = [dataclasses.replace(r, l2=1e-4, l2_grid=[1e-4, 1e-3], l2_at_bound=True, n_val=333)
            if (r.condition, r.site, r.probe, r.layer, r.offset) == target else r for r in grid]
    trace = _heatmap(render_html(rows, diffs), f"memento · {MEMENTO} · {LINEAR} probe")
    assert f"strength (L2) 1e-04{EDGE}<br>n 333" in _hover_of(trace, 2, "masked +1")
    assert "strength (L2) —<br>n 1000" in _hover_of(trace, 1, "masked +1")


def test_an_mlp_cell_still_improving_at_its_epoch_limit_says_so_on_hover(grid, diffs):
    target = ("memento", MEMENTO, MLP, 3, 1)
    assert any((r.condition, r.site, r.probe, r.layer, r.offset) == target for r in grid)
    rows = [dataclasses.replace(r, epochs=30, epochs_at_cap=True)
            if (r.condition, r.site, r.probe, r.layer, r.offset) == target else r for r in grid]
    trace = _heatmap(render_html(rows, diffs), f"memento · {MEMENTO} · {MLP} probe")
    assert EPOCH_LIMIT in _hover_of(trace, 3, "masked +1")
    assert EPOCH_LIMIT not in _hover_of(trace, 2, "masked +1")


def test_curves_differences_and_sweep_are_drawn(page):
    sections = re.findall(r"<h2>([^<]+)</h2>", page)
    assert sections == ["Accuracy by layer and offset", "Distance and depth", "Condition differences", "Across training"]
    lines = [f for f in _figures(page) if f["data"][0]["type"] == "scatter"]
    assert len(lines) == 4 and all(t["y"] and any(v is not None for v in t["y"]) for f in lines for t in f["data"])
    differences = [f for f in lines if "difference" in f["layout"]["yaxis"]["title"]["text"]]
    assert differences and all(t["error_y"]["array"] for t in differences[0]["data"])


def test_the_causal_map_sits_beside_the_probe_map(grid, diffs):
    from kvprobe.causal import CausalResult, CausalRow

    cells = sorted({(r.layer, r.offset) for r in grid if (r.condition, r.site) == (MEMENTO, MEMENTO)})
    rows = [CausalRow("ablation", MEMENTO, offset, layer, "tail_mean", 40, 0.01 * layer, -0.02, 0.03 + layer, 0.0, 0.0,
                      0.0, 0.25) for layer, offset in cells]
    page = render_html(grid, diffs, causal=(CausalResult(rows, {}), MEMENTO), files=["causal.csv"])
    assert "<h2>The causal map beside the probe map</h2><div class='beside'>" in page
    assert "href='causal.csv'" in page
    layer, offset = cells[-1]
    trace = _heatmap(page, f"{MEMENTO} · ablation: what it costs the later mementos")
    from kvprobe.reporting.words import offset_label

    i, j = trace["y"].index(f"layer {layer}"), trace["x"].index(offset_label(offset))
    assert trace["z"][i][j] == pytest.approx(0.01 * layer) and trace["customdata"][i][j][0] == f"-0.020 to +{0.03 + layer:.3f}"
    assert "digits flipped 25" in trace["customdata"][i][j][2]
    titles = [f["layout"]["title"]["text"] for f in _figures(page)]
    assert titles[titles.index(f"{MEMENTO} · ablation: what it costs the later mementos") - 1] == \
        f"{MEMENTO} · {MEMENTO} · linear probe"  # the probe map, then the causal map beside it
    assert "causal map" not in render_html(grid, diffs)  # no section without a causal map


def test_the_runs_metadata_is_on_the_page(page):
    for text in ("<h1>toy-html</h1>", "<td>seed</td><td>7</td>", "<td>probe seeds (fits per cell)</td><td>3</td>",
                 "<td>probe</td><td>12.25</td>", "<td>torch</td><td>2.5.1</td>",
                 "<td>model identity</td><td>name final, param_hash 15f53842</td>", "&quot;checkpoint&quot;: &quot;final&quot;",
                 "<td>restart-delims-visible</td><td>restart-delims-visible</td>", "plotly.js "):
        assert text in page, text


def test_the_same_results_give_the_same_bytes(page):
    again = render_html(make_grid(), make_diffs(make_grid()), sweep=make_sweep(), metadata=METADATA,
                        files=LINKED_FILES[:-1])  # fresh rows, equal to the report's
    assert again == page


def test_names_cannot_break_out_of_the_page(grid, diffs):
    rows = [dataclasses.replace(r, condition="</script><b>x") if r.condition == "restart" else r for r in grid]
    page = render_html(rows, diffs, metadata={"name": "<script>alert(1)</script>"})
    assert "<script>alert(1)" not in page and "</script><b>x" not in page
    assert "&lt;/script&gt;&lt;b&gt;x · " in page  # the heading, escaped
    assert any(f["layout"]["title"]["text"].startswith("</script><b>x") for f in _figures(page))  # the JSON, intact


def test_a_page_that_fails_leaves_no_report(tmp_path, grid, diffs, monkeypatch):
    import kvprobe.reporting.figures as figures
    import kvprobe.reporting.html as html

    def broken(*args, **kwargs):
        raise RuntimeError("the page failed")

    monkeypatch.setattr(figures, "save_all", lambda *args, **kwargs: [])  # (fast) tables, then the page
    monkeypatch.setattr(html, "render_html", broken)
    with pytest.raises(RuntimeError, match="the page failed"):
        write_report(grid, diffs, tmp_path / "report")
    assert not (tmp_path / "report").exists()  # the tables went with it


def test_a_report_folder_that_cannot_be_made_is_refused(tmp_path, grid, diffs):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    with pytest.raises(KVProbeError, match="taken"):
        write_report(grid, diffs, tmp_path / "taken" / "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (tmp_path / "taken").read_text() == "a file, not a folder\n"


# ----------------------------------------------------------------- in a browser

def _browser():
    """Headless system Chromium through playwright, or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (.ci/run installs the Debian package)")
    return sync_api, chromium


ALL_DRAWN = """() => [...document.querySelectorAll('.figure')].every(d => d.querySelector('.main-svg'))"""
CELL_CENTRE = """([id, column, row]) => { const gd = document.getElementById(id); gd.scrollIntoView();
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
    return [box.left + xa._offset + xa.c2p(column), box.top + ya._offset + ya.c2p(row)]; }"""
DRAWN = """() => [...document.querySelectorAll('.figure')].map(d => ({
    id: d.id, height: d.getBoundingClientRect().height, heatmap: !!d.querySelector('g.hm'),
    image: (d.querySelector('g.hm image') || {getAttribute: () => ''}).getAttribute('href') || '',
    imageWidth: d.querySelector('g.hm image') ? d.querySelector('g.hm image').getBoundingClientRect().width : 0,
    lines: [...d.querySelectorAll('g.trace.scatter path.js-line')].filter(p => (p.getAttribute('d') || '').length > 10).length}))"""


@pytest.fixture(scope="module")
def browser_page(report):
    sync_api, chromium = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(offline=True)
        fetched, messages = [], []
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                      else (fetched.append(route.request.url), route.abort()))
        tab = context.new_page()
        tab.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        tab.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        tab.goto(report["index.html"].as_uri())
        tab.wait_for_function(ALL_DRAWN, timeout=15_000)
        yield tab, fetched, messages
        browser.close()


def test_the_page_loads_offline_without_errors(browser_page):
    tab, fetched, messages = browser_page
    assert fetched == [] and messages == []
    assert tab.evaluate("typeof Plotly") == "object"


def test_every_figure_renders(browser_page, page):
    drawn = browser_page[0].evaluate(DRAWN)
    assert len(drawn) == len(_figures(page)) == 14
    for fig in drawn:
        assert fig["height"] > 200, fig
        if fig["heatmap"]:
            assert fig["image"].startswith("data:image/png;base64,") and fig["imageWidth"] > 100, fig["id"]
            pixels = Image.open(io.BytesIO(base64.b64decode(fig["image"].split(",", 1)[1]))).convert("RGB")
            assert pixels.size == (9, 4) and len(set(pixels.getdata())) > 3, fig["id"]  # a pixel per cell, not blank
        else:
            assert fig["lines"] >= 1, fig


def test_hovering_a_cell_shows_its_interval(browser_page, page, grid):
    tab = browser_page[0]
    title = f"memento · {MEMENTO} · {LINEAR} probe"
    (index,) = [i for i, f in enumerate(_figures(page)) if f["layout"]["title"]["text"] == title]
    (cell,) = [r for r in grid if (r.condition, r.site, r.probe, r.layer, r.offset) == ("memento", MEMENTO, LINEAR, 3, 1)]
    trace = _heatmap(page, title)
    column, row = trace["x"].index("masked +1"), trace["y"].index("layer 3")
    tab.mouse.move(*tab.evaluate(CELL_CENTRE, [f"fig-{index}", column, row]))
    label = tab.wait_for_selector(f"#fig-{index} g.hovertext", timeout=5_000).text_content()
    assert f"95% interval {100 * cell.ci_low:.1f}–{100 * cell.ci_high:.1f}%" in label, label
    assert label.startswith("layer 3, masked +1") and f"accuracy {100 * cell.accuracy:.1f}%" in label, label
