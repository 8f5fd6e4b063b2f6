"""The toy model's 16-token vocabulary and its Hugging Face tokenizer.

Digits '0'..'9' are ids 0..9, so a digit's id is its value; the six Memento markers
follow as ids 10..15. The tokenizer is a `tokenizers` WordLevel model over exactly
these 16 words with a whitespace pre-tokenizer: "<think> <|block_start|> 3 1 4"
encodes word by word. It is built offline and saved next to every checkpoint, so
`AutoTokenizer.from_pretrained(checkpoint_dir)` works.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS, SpecialTokens

__all__ = ["DIGITS", "SPECIAL", "VOCAB", "VOCAB_SIZE", "build_tokenizer"]

DIGITS = [str(d) for d in range(10)]
# id -> token text, in id order
VOCAB = DIGITS + [
    "<think>",
    "</think>",
    "<|block_start|>",
    "<|block_end|>",
    "<|summary_start|>",
    "<|summary_end|>",
]
VOCAB_SIZE = len(VOCAB)  # 16

SPECIAL = SpecialTokens(
    think=10,
    think_end=11,
    block_start=12,
    block_end=13,
    summary_start=14,
    summary_end=15,
)

assert all(VOCAB[getattr(SPECIAL, field)] == text for field, text in SPECIAL_TOKEN_STRINGS.items())


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: WordLevel over the 16 tokens, split on whitespace.

    The six markers are registered as special tokens so `decode(..., skip_special_tokens=True)`
    leaves the digits. No unknown, padding or BOS token exists: every toy sequence has
    the same length and starts with <think>.
    """
    vocab = {text: i for i, text in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=VOCAB[10:],
        model_max_length=128,
    )
