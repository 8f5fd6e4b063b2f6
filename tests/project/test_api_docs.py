"""The API reference (`python docs/api.py`, pdoc) covers every library module and renders offline."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from tests.helpers.paths import ROOT

pytest.importorskip("pdoc")


def _api():
    spec = importlib.util.spec_from_file_location("kvprobe_api_docs", ROOT / "docs" / "api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_reference_names_every_library_module():
    files = sorted(p.relative_to(ROOT).with_suffix("") for p in (ROOT / "kvprobe").rglob("*.py"))
    expected = {".".join(f.parts[:-1] if f.name == "__init__" else f.parts) for f in files}
    expected = {m for m in expected if not m.startswith(("kvprobe.cli", "kvprobe.__main__"))}
    assert set(_api().modules()) == expected


def test_it_renders_docstrings_offline(tmp_path):
    index = _api().build(tmp_path, ["kvprobe.files", "kvprobe.grid"])
    page = (tmp_path / "kvprobe" / "files.html").read_text()
    assert index.is_file() and "UniqueKeyLoader" in page and "refuses a key given twice" in page
    assert not re.search(r'(src|href)="https?://[^"]*\.(js|css)', page)  # no remote script or style: offline
