"""A command that needs a package of an extra the install left out names the extra, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvprobe.cli import EXTRA_OF
from tests.helpers.cli_support import assert_refused, cli, snapshot

pytestmark = pytest.mark.usefixtures("no_network")


def test_generate_without_httpx_names_the_serve_extra(tmp_path):
    """In a fresh interpreter where `import httpx` fails as if it were not installed."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "a", "prompt": "hi"}\n')
    before = snapshot(tmp_path)
    argv = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"), "--base-url", "http://127.0.0.1:9/v1"]
    code = f"import sys; sys.modules['httpx'] = None; from kvprobe.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_refused(done.returncode, done.stderr, "kvprobe generate needs httpx", "'serve' extra",
                   "pip install 'kvprobe[serve]'")
    assert snapshot(tmp_path) == before


def test_a_missing_module_of_no_extra_is_an_internal_error(capsys, monkeypatch):
    import kvprobe.cli.layout as layout

    def broken(args):
        import kvprobe_no_such_module  # noqa: F401  (kvprobe's own bug, not a missing extra)

    monkeypatch.setattr(layout, "run", broken)
    code, _, err = cli(capsys, "layout")
    assert code == 1 and "Traceback" in err and "internal error" in err.splitlines()[-1]


def test_every_extra_named_is_one_of_the_projects():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert set(EXTRA_OF.values()) <= set(extras["optional-dependencies"])
