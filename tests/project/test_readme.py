"""The README's library example runs as written, and CI runs the README's commands."""

from __future__ import annotations

import re

from tests.helpers.paths import ROOT
from tests.helpers.published import PUBLISHED
from tests.helpers.readme import MACHINE_TOLERANCE, parsed as _parsed, quoted_output as _quoted_output

README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_library_example_prints_what_the_readme_quotes(tmp_path, monkeypatch, capsys):
    code = PUBLISHED.readme_example_code()
    assert len(code.strip().splitlines()) < 30  # the promise: a custom study in under 30 lines
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("layer ")]
    message = "README.md quotes output the example no longer prints; paste what it prints now:\n" + "\n".join(lines)
    printed, quoted = [_parsed(l) for l in lines], [_parsed(l) for l in _quoted_output()]
    assert [p[0] for p in printed] == [q[0] for q in quoted], message  # the same cells, in order
    for (_, numbers, significant), (_, said, said_significant) in zip(printed, quoted):
        assert significant == said_significant and len(numbers) == len(said), message
        assert all(abs(a - b) <= MACHINE_TOLERANCE for a, b in zip(numbers, said)), message
    assert (tmp_path / "study" / "memento" / "kvstore.h5").is_file()


def test_quoted_output_tells_the_story():
    """What the prose says of the quoted lines: control at chance, direct high, masked above chance and
    decaying with distance (the paper's Fig. 13: 93.6, 26.2, 21.4), the first layer near chance."""
    quoted = [_parsed(l) for l in _quoted_output()]
    accuracy = {cell: numbers[0] for cell, numbers, _ in quoted}
    significant = {cell: flag for cell, _, flag in quoted}
    assert len(accuracy) == 8  # 2 layers x 4 offsets
    assert accuracy["layer 3 offset +0"] >= 93 and significant["layer 3 offset +0"]  # issue 30's bound
    assert accuracy["layer 3 offset +1"] > accuracy["layer 3 offset +2"] > 15
    assert all(abs(accuracy[f"layer {l} offset -1"] - 10) < 3 for l in (0, 3))
    assert all(accuracy[f"layer 0 offset {o:+d}"] < 16 for o in (-1, 0, 1, 2))


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = _blocks("bash")[0], _blocks("bash")[1]
    for block in (install, test):
        for line in block.strip().splitlines():
            if line.startswith("kvprobe "):
                continue  # the main job is not part of CI
            assert line in ci, f"README command not in .ci/run: {line}"


def test_the_docs_reading_order_lists_every_page_once():
    """docs/README.md is the reading order: every page of docs/ appears in it, once, and nothing else."""
    order = re.findall(r"^\d+\. \[([\w.]+)\]\(\1\)", (ROOT / "docs" / "README.md").read_text(), flags=re.M)
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert sorted(order) == pages and len(order) == len(set(order))


def test_the_readme_lists_every_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (ROOT / "README.md").read_text()
    listed = text[text.index("Extras:"):text.index("`dev` is everything but `gpu`")]
    assert [name for name in extras if name != "dev" and f"`{name}`" not in listed] == []
