"""`kvprobe layout`: print the Memento layout and mask of an example sequence."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import UsageError, add_mask_args, add_parser, mask_from_args

if TYPE_CHECKING:
    from ..memento.config import MaskConfig
    from ..memento.layout import SpecialTokens

# a small example in the Memento token format; specials are written as their text
EXAMPLE = (
    "P P <think> <|block_start|> a b c <|block_end|> <|summary_start|> x <|summary_end|> "
    "<|block_start|> d e <|block_end|> <|summary_start|> y z <|summary_end|> </think> A"
)


def _tokenize(text: str) -> tuple[list[int], list[str], SpecialTokens]:
    from ..memento.layout import SpecialTokens

    words = text.split()
    specials = ["<think>", "</think>", "<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"]
    vocab = {w: i for i, w in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return [vocab[w] for w in words], words, SpecialTokens(*range(6))


def render(text: str, config: MaskConfig) -> str:
    """The parsed layout of a whitespace-tokenized sequence and its mask as a character grid."""
    from ..memento.layout import LayoutError, parse_layout
    from ..memento.masks import allow_matrix  # torch: only for the command itself

    ids, words, special = _tokenize(text)
    try:
        lay = parse_layout(ids, special)
    except LayoutError as e:
        raise UsageError(f"--sequence: {e}") from None
    lines = [f"tokens ({len(ids)}): " + " ".join(f"{i}:{w}" for i, w in enumerate(words))]
    lines.append(f"prompt   {list(lay.prompt)}")
    for b in lay.blocks:
        lines.append(
            f"block {b.index}  content {list(b.content)}  delimiters {list(b.delimiters)}  memento {list(b.memento)}"
        )
    lines.append(f"answer   {list(lay.answer)}")
    allow = allow_matrix([lay], len(ids), config)[0, 0]
    lines.append(f"\nmask ({config.name}): row = query, column = key, '#' = may attend")
    abbrev = {"<think>": "<t>", "</think>": "</t>", "<|block_start|>": "BS", "<|block_end|>": "BE",
              "<|summary_start|>": "SS", "<|summary_end|>": "SE"}
    short = [abbrev.get(w, w[:3]) for w in words]
    for q, row in enumerate(allow):
        lines.append(f"{q:3d} {short[q]:>4} " + "".join("#" if a else "." for a in row.tolist()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(render(args.sequence, mask_from_args(args)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub,
        "layout",
        "print the Memento layout and attention mask of a sequence",
        "  kvprobe layout\n  kvprobe layout --keep-last-n-blocks 1 --mask-delimiters\n"
        "  kvprobe layout --sequence '<think> <|block_start|> a <|block_end|> <|summary_start|> s <|summary_end|>'",
    )
    p.add_argument("--sequence", default=EXAMPLE, help="whitespace-separated tokens (specials as text)")
    add_mask_args(p)
    p.set_defaults(func=run)
