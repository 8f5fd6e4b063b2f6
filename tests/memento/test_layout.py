"""kvprobe.memento.layout: parsing the Memento token structure (issue #2, "What must be true")."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS, LayoutError, SpecialTokens, parse_batch, parse_layout
from tests.helpers.models import PAD_ID, SPECIAL, encode
from tests.helpers.strategies import memento_sequences, padded_batches

PROPERTY = settings(max_examples=150, deadline=None)


def parse(text: str, **kwargs):
    return parse_layout(encode(text), SPECIAL, **kwargs)


# --------------------------------------------------------------------------- hand-written examples

#            0 1 2       3  4 5 6 7  8  9 10 11 12 13 14 15 16 17 18       19 20
FULL = "p q <think> BS a b c BE SS x SE BS d  e  BE SS y  z  SE </think> A"


def test_full_example_positions():
    lay = parse(FULL)
    assert (lay.offset, lay.length, lay.stop) == (0, 21, 21)
    assert lay.prompt == range(0, 3)
    assert lay.n_blocks == 2 and lay.n_completed == 2
    b0, b1 = lay.blocks
    assert (b0.index, b0.start, b0.end, b0.summary_start, b0.summary_end, b0.stop) == (0, 3, 7, 8, 10, 11)
    assert (b1.index, b1.start, b1.end, b1.summary_start, b1.summary_end, b1.stop) == (1, 11, 14, 15, 18, 19)
    assert b0.content == range(4, 7) and b1.content == range(12, 14)
    assert b0.delimiters == (3, 7) and b1.delimiters == (11, 14)
    assert b0.memento == range(8, 11) and b1.memento == range(15, 19)
    assert b0.memento_text == range(9, 10) and b1.memento_text == range(16, 18)
    assert b0.completed and b1.completed
    assert lay.think_end == 19
    assert lay.answer == range(20, 21)


def test_block_of_names_content_positions_only():
    lay = parse(FULL)
    owners = {p: lay.block_of(p) for p in range(lay.length)}
    assert [p for p, b in owners.items() if b == 0] == [4, 5, 6]
    assert [p for p, b in owners.items() if b == 1] == [12, 13]
    # delimiters, mementos, prompt and answer belong to no block's content
    assert all(owners[p] is None for p in (0, 2, 3, 7, 8, 9, 10, 11, 14, 15, 18, 19, 20))


def test_prompt_only():
    lay = parse("p q r")
    assert lay.prompt == range(0, 3)
    assert lay.blocks == ()
    assert lay.think_end is None and lay.answer == range(3, 3)


def test_prompt_and_answer_without_blocks():
    lay = parse("p <think> </think> a b")
    assert lay.prompt == range(0, 2)
    assert lay.blocks == ()
    assert lay.think_end == 2 and lay.answer == range(3, 5)


def test_empty_content_and_empty_memento_text():
    lay = parse("BS BE SS SE")
    (b,) = lay.blocks
    assert lay.prompt == range(0, 0)
    assert (b.start, b.end, b.summary_start, b.summary_end) == (0, 1, 2, 3)
    assert b.content == range(1, 1) and b.memento_text == range(3, 3)
    assert b.memento == range(2, 4) and b.completed


def test_fillers_between_markers_belong_to_no_content_or_memento():
    #           0  1 2  3 4  5 6  7 8  9 10 11 12
    lay = parse("BS a BE f SS m SE g BS b BE SS SE")
    b0, b1 = lay.blocks
    assert b0.content == range(1, 2) and b0.memento == range(4, 7)
    assert b1.start == 8 and b1.content == range(9, 10)
    assert lay.block_of(3) is None and lay.block_of(7) is None  # the fillers
    assert 3 not in b0.memento and 7 not in b1.memento


def test_tensor_input_and_offset():
    ids = torch.tensor(encode(FULL))
    plain = parse_layout(ids, SPECIAL)
    shifted = parse_layout(ids, SPECIAL, offset=5)
    assert plain == parse(FULL)
    assert shifted.offset == 5 and shifted.stop == 26
    assert shifted.prompt == range(5, 8) and shifted.answer == range(25, 26) and shifted.think_end == 24
    for a, b in zip(plain.blocks, shifted.blocks):
        assert (b.start, b.end, b.summary_start, b.summary_end, b.stop) == (
            a.start + 5, a.end + 5, a.summary_start + 5, a.summary_end + 5, a.stop + 5,
        )


def test_two_dimensional_tensor_is_refused():
    with pytest.raises(LayoutError, match=r"shape \(1, 3\)"):
        parse_layout(torch.tensor([encode("p q r")]), SPECIAL)


# --------------------------------------------------------------------------- malformed structures

MALFORMED = [
    # (sequence, position the message must name, words the message must contain)
    ("p SS x SE", 1, "summary with no block"),
    ("p BS a b", 1, "unclosed block"),
    ("p BS a BE", 1, "block without memento"),
    ("p BS a BE SS x", 1, "unclosed memento"),
    ("BS a BS b", 2, "nested"),
    ("BS a BE SS x SE BS b BS", 8, "nested"),
    ("BS a SS x SE", 2, "inside block"),
    ("BS a BE SE", 3, "no open <|summary_start|>"),
    ("BS a BE BS", 3, "memento of block 0"),
    ("BS a BE SS x BS", 5, "memento of block 0"),
    ("p BE", 1, "<|block_end|> with no open block"),
    ("BS a BE SS x SE BE", 6, "<|block_end|> with no open block"),
    ("BS a BE SS x SE <think>", 6, "<think> after the prompt"),
    ("BS a </think>", 2, "</think> while block 0"),
    ("BS a BE SS x </think>", 5, "</think> while block 0"),
    # markers after </think>
    ("p </think> BS a", 2, "<|block_start|> after </think>"),
    ("p </think> a BE", 3, "<|block_end|>"),
    ("p </think> SS a", 2, "<|summary_start|>"),
    ("p </think> a SE", 3, "<|summary_end|>"),
    ("p </think> a </think>", 3, "second </think>"),
    ("p </think> <think>", 2, "<think>"),
]


@pytest.mark.parametrize("text, position, problem", MALFORMED)
def test_malformed_structure_raises_naming_position_and_problem(text, position, problem):
    with pytest.raises(LayoutError) as info:
        parse(text)
    message = str(info.value)
    assert re.search(rf"\bposition {position}\b", message), message
    assert problem in message, message


@pytest.mark.parametrize("text, position, problem", MALFORMED)
def test_malformed_positions_include_the_offset(text, position, problem):
    with pytest.raises(LayoutError, match=rf"\bposition {position + 7}\b"):
        parse(text, offset=7)


def test_unfinished_block_hint_names_allow_unfinished():
    with pytest.raises(LayoutError, match="allow_unfinished=True"):
        parse("p BS a BE SS x")


# --------------------------------------------------------------------------- unfinished trailing block


def test_unfinished_memento_accepted_when_allowed():
    #           0 1  2 3  4  5 6  7  8  9
    lay = parse("p BS a BE SS x SE BS b BE SS m n", allow_unfinished=True)
    done, last = lay.blocks
    assert done.completed and done.summary_end == 6
    assert (last.start, last.end, last.summary_start, last.summary_end) == (7, 9, 10, None)
    assert not last.completed
    assert last.stop == 13
    assert last.memento == range(10, 13) and last.memento_text == range(11, 13)
    assert lay.n_completed == 1


def test_unfinished_block_without_memento_accepted_when_allowed():
    lay = parse("p BS a b BE", allow_unfinished=True)
    (b,) = lay.blocks
    assert (b.end, b.summary_start, b.summary_end) == (4, None, None)
    assert b.content == range(2, 4) and b.memento == range(0) and not b.completed


def test_unclosed_block_accepted_when_allowed_content_runs_to_the_end():
    lay = parse("p BS a b", allow_unfinished=True)
    (b,) = lay.blocks
    assert (b.start, b.end, b.summary_start, b.summary_end) == (1, None, None, None)
    assert b.content == range(2, 4) and b.delimiters == (1,)
    assert lay.block_of(3) == 0


def test_allow_unfinished_does_not_excuse_other_errors():
    with pytest.raises(LayoutError, match="position 2"):
        parse("BS a BS", allow_unfinished=True)


# --------------------------------------------------------------------------- SpecialTokens


def _word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_from_tokenizer_reads_the_six_marker_ids():
    words = ["hello", *SPECIAL_TOKEN_STRINGS.values(), "world"]
    tokenizer = _word_level_tokenizer(words)
    special = SpecialTokens.from_tokenizer(tokenizer)
    for field, text in SPECIAL_TOKEN_STRINGS.items():
        assert getattr(special, field) == tokenizer.convert_tokens_to_ids(text)
    assert special.block_start == words.index("<|block_start|>") + 1


def test_from_tokenizer_reads_added_special_tokens():
    tokenizer = _word_level_tokenizer(["hello", "world"])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKEN_STRINGS.values())})
    special = SpecialTokens.from_tokenizer(tokenizer)
    assert special.summary_end == tokenizer.convert_tokens_to_ids("<|summary_end|>")


@pytest.mark.parametrize("missing", list(SPECIAL_TOKEN_STRINGS.values()))
def test_from_tokenizer_names_the_missing_token(missing):
    present = [t for t in SPECIAL_TOKEN_STRINGS.values() if t != missing]
    tokenizer = _word_level_tokenizer(["hello", *present])
    with pytest.raises(LayoutError) as info:
        SpecialTokens.from_tokenizer(tokenizer)
    message = str(info.value)
    assert missing in message
    assert not any(t in message for t in present if t not in missing), message


def test_special_token_ids_must_be_distinct():
    with pytest.raises(LayoutError, match="distinct"):
        SpecialTokens(think=1, think_end=2, block_start=3, block_end=3, summary_start=5, summary_end=6)


def test_name_of():
    assert SPECIAL.name_of(SPECIAL.summary_start) == "<|summary_start|>"
    assert SPECIAL.name_of(PAD_ID) is None


# --------------------------------------------------------------------------- padded batches


def _pad(rows: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [encode(r) for r in rows]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD_ID)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return ids, mask


def test_left_padding_gives_positions_in_the_padded_row():
    ids, mask = _pad(["p BS a b BE SS x SE", "q r s p BS a BE SS SE"], "left")
    first, second = parse_batch(ids, SPECIAL, mask)
    assert (first.offset, first.length) == (1, 8)
    assert first.prompt == range(1, 2)
    (b,) = first.blocks
    assert (b.start, b.end, b.summary_start, b.summary_end) == (2, 5, 6, 8)
    assert b.content == range(3, 5)
    assert second.offset == 0 and second.blocks[0].start == 4


def test_right_padding_gives_positions_in_the_padded_row():
    ids, mask = _pad(["p BS a b BE SS x SE", "q r s p BS a BE SS SE"], "right")
    first, second = parse_batch(ids, SPECIAL, mask)
    assert (first.offset, first.length, first.stop) == (0, 8, 8)
    assert first.blocks[0].content == range(2, 4)
    assert first.answer == range(8, 8)
    assert second.blocks[0].summary_end == 8


def test_batch_without_attention_mask_parses_whole_rows():
    ids = torch.tensor([encode("p BS a BE SS SE"), encode("BS a b BE SS SE")])
    layouts = parse_batch(ids, SPECIAL)
    assert [lay.blocks[0].start for lay in layouts] == [1, 0]


def test_batch_error_names_row_and_padded_position():
    ids, mask = _pad(["p BS a BE SS x SE", "SS p"], "left")
    with pytest.raises(LayoutError, match=r"row 1.*position 5"):
        parse_batch(ids, SPECIAL, mask)


def test_batch_rejects_padding_inside_a_sequence():
    ids = torch.tensor([encode("p q r s")])
    mask = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(LayoutError, match="row 0.*contiguous"):
        parse_batch(ids, SPECIAL, mask)


def test_batch_rejects_all_padding_row_and_shape_mismatch():
    ids = torch.tensor([encode("p q"), encode("r s")])
    with pytest.raises(LayoutError, match="row 1"):
        parse_batch(ids, SPECIAL, torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(LayoutError, match="shape"):
        parse_batch(ids, SPECIAL, torch.ones(2, 3))
    with pytest.raises(LayoutError, match="shape"):
        parse_batch(ids[0], SPECIAL)


# --------------------------------------------------------------------------- properties


def assert_matches_sample(lay, sample, offset: int = 0) -> None:
    """The parsed layout is exactly the structure the generator built, shifted by offset."""
    n = len(sample)
    assert (lay.offset, lay.length) == (offset, n)
    assert lay.prompt == range(offset, offset + sample.prompt_stop)
    expected_think_end = None if sample.think_end is None else sample.think_end + offset
    assert lay.think_end == expected_think_end
    assert lay.answer == (
        range(expected_think_end + 1, offset + n) if expected_think_end is not None else range(offset + n, offset + n)
    )
    assert lay.n_blocks == len(sample.blocks)
    for i, (got, want) in enumerate(zip(lay.blocks, sample.blocks)):
        shift = lambda p: None if p is None else p + offset  # noqa: E731
        assert got.index == i
        assert (got.start, got.end, got.summary_start, got.summary_end) == (
            shift(want.start), shift(want.end), shift(want.summary_start), shift(want.summary_end),
        )
        content_ids = [sample.ids[p - offset] for p in got.content]
        assert content_ids == want.content


def assert_consistent(lay) -> None:
    """Block ranges are ordered, disjoint, inside the real tokens, and marker-free."""
    lo, hi = lay.offset, lay.stop
    assert lay.prompt.start == lo and lay.prompt.stop <= hi
    previous_stop = lay.prompt.stop
    for i, b in enumerate(lay.blocks):
        assert b.index == i
        assert previous_stop <= b.start < b.stop <= hi
        assert b.content.start == b.start + 1
        if b.end is not None:
            assert b.content.stop == b.end and b.start < b.end < b.stop
        if b.summary_start is not None:
            assert b.end is not None and b.end < b.summary_start
            assert b.memento.start == b.summary_start and b.memento.stop <= b.stop
        if b.summary_end is not None:
            assert b.summary_start < b.summary_end == b.stop - 1
            assert b.memento == range(b.summary_start, b.summary_end + 1)
        assert b.completed == (b.summary_end is not None)
        assert set(b.content).isdisjoint(b.memento)
        previous_stop = b.stop
    # only the last block may be unfinished
    assert all(b.completed for b in lay.blocks[:-1])
    if lay.think_end is not None:
        assert previous_stop <= lay.think_end < hi
        assert lay.answer == range(lay.think_end + 1, hi)


@PROPERTY
@given(memento_sequences(allow_unfinished=True))
def test_random_valid_sequences_parse_to_their_structure(sample):
    lay = parse_layout(sample.ids, SPECIAL, allow_unfinished=True)
    assert_matches_sample(lay, sample)
    assert_consistent(lay)
    assert lay.n_completed == len(sample.blocks) - int(sample.unfinished)


@PROPERTY
@given(memento_sequences(allow_unfinished=True))
def test_unfinished_sequences_are_rejected_by_default(sample):
    if sample.unfinished:
        with pytest.raises(LayoutError, match="allow_unfinished"):
            parse_layout(sample.ids, SPECIAL)
    else:
        assert parse_layout(sample.ids, SPECIAL) == parse_layout(sample.ids, SPECIAL, allow_unfinished=True)


@PROPERTY
@given(memento_sequences(), st.data())
def test_removing_one_marker_never_crashes_with_anything_but_layout_error(sample, data):
    markers = [p for p, t in enumerate(sample.ids) if SPECIAL.name_of(t) is not None]
    if not markers:
        return
    drop = data.draw(st.sampled_from(markers))
    ids = sample.ids[:drop] + sample.ids[drop + 1 :]
    try:
        assert_consistent(parse_layout(ids, SPECIAL))
    except LayoutError as e:
        assert re.search(r"position \d+", str(e)), str(e)


@settings(max_examples=60, deadline=None)
@given(padded_batches(allow_unfinished=True))
def test_padded_batches_give_positions_in_the_padded_row(batch):
    layouts = parse_batch(batch.input_ids, SPECIAL, batch.attention_mask, allow_unfinished=True)
    assert len(layouts) == len(batch.samples)
    for lay, sample, off in zip(layouts, batch.samples, batch.offsets):
        assert_matches_sample(lay, sample, offset=off)
        assert_consistent(lay)
        assert lay == parse_layout(sample.ids, SPECIAL, allow_unfinished=True, offset=off)


@pytest.mark.parametrize("text, message", [
    ("p <think> <think> q", "position 2: second <think>"),
    ("p </think> a BE", "position 3: <|block_end|> after </think>"),
    ("p </think> SS", "position 2: <|summary_start|> after </think>"),
])
def test_markers_after_think_end_and_repeated_think(text, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        parse_layout(encode(text), SPECIAL)
