"""A property-based fuzz of config files: random mutations of a valid config, written as a file and
checked with `kvprobe capture FILE --dry-run`, are accepted (exit 0) or refused in one line (exit 2),
never with a traceback, and nothing is written either way.

The mutations: a field set to a value of any type (out of range, of the wrong type, a list, a
mapping, null), a field removed, an unknown key added, a line of the YAML given twice (a duplicate
key, or broken indentation), random characters inserted, or the whole file replaced by random
text. YAML and JSON are fuzzed. KVPROBE_FUZZ_EXAMPLES=1000 fuzzes deeper; the default runs in
well under a minute. (A fuzz of `--set` overrides: tests/cli/test_recovery.py.)
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.cli_support import FAST, assert_refused, cli

BASE = {**FAST, "data": {**FAST["data"], "n_samples": 20}}  # a valid dry run stays quick


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping, sections and leaves."""
    out = []
    for key, value in tree.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


# the config's own keys, fields it leaves at their defaults, and keys no section has
PATHS = _paths(BASE) + [tuple(p.split(".")) for p in (
    "sweep.checkpoints", "sweep.layers", "sweep.offsets", "model.dtype", "model.device", "model.allow_download",
    "model.trust_remote_code", "data.digit_sum", "data.shared_background", "data.where", "data.traces",
    "data.chat_template", "probe.linear.l2", "probe.mlp.hidden", "probe.pooling", "probe.mlp_layers",
    "conditions.memento.restart_mode", "conditions.other", "causal.layers", "report.paper", "report.comparisons",
    "capture.max_tokens", "capture.sites", "capture.dtype", "bogus", "capture.bogus", "probe.linear.bogus")]
NAMES = st.sampled_from(["final", "series/step_000450", "", ".", "no_such", "memento", "linear", "tail_mean",
                         "toy", "traces", "hf", "cuda", "float16", "none", "start"])
LEAVES = st.one_of(
    st.integers(-3, 3000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), NAMES,
    st.text(max_size=6),
)
VALUES = st.one_of(LEAVES, st.lists(LEAVES, max_size=3), st.dictionaries(NAMES, LEAVES, max_size=2))
YAML_NOISE = st.text(alphabet=list(":{}[]-#&*!|>'\",? \n\t") + list("abc01"), min_size=1, max_size=12)


@st.composite
def mutated(draw) -> dict[str, Any]:
    """The base config with one to three of its fields set, removed or added."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        *parents, leaf = draw(st.sampled_from(PATHS))
        node: Any = data
        for p in parents:
            if not isinstance(node, dict):
                break
            node = node.setdefault(p, {})
        if not isinstance(node, dict):
            continue
        if draw(st.booleans()) and leaf in node:
            del node[leaf]
        else:
            node[leaf] = draw(VALUES)
    return data


@st.composite
def config_files(draw) -> tuple[str, str]:
    """(suffix, text): a mutated config as YAML or JSON, its text perhaps mutated too."""
    data = draw(mutated())
    if draw(st.booleans()):
        return ".json", json.dumps(data)  # NaN and Infinity included, as Python writes them
    text = yaml.safe_dump(data, sort_keys=False)
    lines = text.splitlines(keepends=True)
    how = draw(st.sampled_from(["as is", "line twice", "noise", "random"]))
    if how == "line twice":
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    elif how == "noise":
        i = draw(st.integers(0, len(text)))
        return ".yaml", text[:i] + draw(YAML_NOISE) + text[i:]
    elif how == "random":
        return ".yaml", draw(st.text(max_size=40))
    return ".yaml", "".join(lines)


@settings(max_examples=int(os.environ.get("KVPROBE_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=config_files())
def test_fuzzed_config_files_exit_0_or_2_in_one_line_and_write_nothing(capsys, tmp_path, config):
    suffix, text = config
    for old in tmp_path.iterdir():
        old.unlink()
    path = tmp_path / f"study{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, _, err = cli(capsys, "capture", path, "--dry-run")
    assert "Traceback" not in err, err
    assert code in (0, 2), err
    if code == 2:
        assert_refused(code, err)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
