"""The `kvprobe layout` command: prints a sequence's Memento layout and its mask."""

from __future__ import annotations

import pytest
import torch

from kvprobe.cli import main
from kvprobe.memento.layout import SpecialTokens, parse_layout
from kvprobe.memento.masks import MaskConfig, allow_matrix

# the CLI's own example (kvprobe/cli/layout.py EXAMPLE), written out here on purpose
#          0 1 2       3               4 5 6 7             8                 9 10
EXAMPLE = ("P P <think> <|block_start|> a b c <|block_end|> <|summary_start|> x <|summary_end|> "
           #  11            12 13 14            15                16 17 18             19       20
           "<|block_start|> d e <|block_end|> <|summary_start|> y z <|summary_end|> </think> A")
MARKERS = ["<think>", "</think>", "<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["layout", *args])
    out, err = capsys.readouterr()
    return code, out, err


def grid(out: str, T: int) -> torch.Tensor:
    """The printed mask as a (T, T) bool tensor: the last field of the T lines after the header."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mask ("))
    rows = [line.split()[-1] for line in lines[header + 1 : header + 1 + T]]
    assert all(len(r) == T and set(r) <= {"#", "."} for r in rows), rows
    return torch.tensor([[c == "#" for c in r] for r in rows])


def expected_mask(text: str, cfg: MaskConfig) -> torch.Tensor:
    words = text.split()
    vocab = {m: i for i, m in enumerate(MARKERS)}
    ids = [vocab.get(w, len(MARKERS)) for w in words]
    lay = parse_layout(ids, SpecialTokens(*range(6)))
    return allow_matrix([lay], len(ids), cfg)[0, 0]


def test_default_example_prints_layout_and_memento_mask(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and err == ""
    assert out.startswith("tokens (21): 0:P 1:P 2:<think> 3:<|block_start|>")
    assert "prompt   [0, 1, 2]" in out
    assert "block 0  content [4, 5, 6]  delimiters [3, 7]  memento [8, 9, 10]" in out
    assert "block 1  content [12, 13]  delimiters [11, 14]  memento [15, 16, 17, 18]" in out
    assert "answer   [20]" in out
    assert "mask (memento)" in out
    mask = grid(out, 21)
    # after block 0's <|summary_end|> (position 10) its content 4..6 is hidden, delimiters are not
    assert mask[11, :12].tolist() == [True] * 4 + [False] * 3 + [True] * 5
    assert torch.equal(mask, expected_mask(EXAMPLE, MaskConfig(0)))


@pytest.mark.parametrize(
    "args, cfg",
    [
        (["--keep-last-n-blocks", "-1"], MaskConfig(-1)),
        (["--keep-last-n-blocks", "1"], MaskConfig(1)),
        (["--mask-delimiters"], MaskConfig(0, True)),
        (["--restart-mode"], MaskConfig(0, True, True)),  # the fork's restart: delimiters evicted too
        (["--restart-mode", "--no-mask-delimiters"], MaskConfig(0, False, True)),
        (["--restart-mode", "--mask-delimiters"], MaskConfig(0, True, True)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_options_select_the_mask(capsys, args, cfg):
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    assert f"mask ({cfg.name})" in out
    assert torch.equal(grid(out, 21), expected_mask(EXAMPLE, cfg))


def test_custom_sequence(capsys):
    text = "q <|block_start|> a <|block_end|> <|summary_start|> <|summary_end|> r"
    code, out, _ = run_cli(capsys, "--sequence", text, "--mask-delimiters")
    assert code == 0
    assert "block 0  content [2]  delimiters [1, 3]  memento [4, 5]" in out
    assert grid(out, 7)[6].tolist() == [True, False, False, False, True, True, True]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("p <|summary_start|> x", "position 1: summary with no block"),
        ("<|block_start|> a <|block_start|>", "position 2: nested"),
        ("p <|block_end|>", "position 1: <|block_end|> with no open block"),
        ("p <|block_start|> a", "position 1: unclosed block"),
    ],
)
def test_malformed_sequence_exits_2_with_one_line_on_stderr(capsys, text, problem):
    code, out, err = run_cli(capsys, "--sequence", text)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert err.startswith("kvprobe: error: --sequence: ")
    assert problem in err


def test_negative_keep_below_minus_one_exits_2(capsys):
    code, out, err = run_cli(capsys, "--keep-last-n-blocks", "-2")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--keep-last-n-blocks" in err


def test_help_exits_0_and_shows_examples(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "examples:" in out and "kvprobe layout --keep-last-n-blocks 1" in out
