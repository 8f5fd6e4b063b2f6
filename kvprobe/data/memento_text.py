"""Memento-format text as a served model emits it: the state machine that splits it into prompt, blocks,
mementos and answer (`kvprobe.data.traces.from_generated_text`), and the end-of-turn tokens after the answer.

The splitter knows nothing of `Trace`: it returns the pieces and raises the error class it is given
(`from_generated_text` gives `TraceError`), so the trace module can import it.
"""

from __future__ import annotations

import re

from ..memento.layout import SPECIAL_TOKEN_STRINGS

__all__ = ["EOS_STRINGS", "MARKER_RE", "split_served_text", "strip_eos"]

MARKER_RE = re.compile("|".join(re.escape(m) for m in SPECIAL_TOKEN_STRINGS.values()))
_FIELD_OF = {text: field for field, text in SPECIAL_TOKEN_STRINGS.items()}  # marker -> its name: "<think>" -> "think"
# end-of-turn tokens a served model may leave at the end of its answer
EOS_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|end|>", "</s>")


def strip_eos(text: str) -> str:
    """`text` stripped, without the end-of-turn tokens (EOS_STRINGS) at its end."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for eos in EOS_STRINGS:
            if text.endswith(eos):
                text, changed = text[: -len(eos)].rstrip(), True
    return text


class _Scanner:
    """The state machine of `split_served_text`: it reads the markers of one text in order."""

    def __init__(self, text: str, trace_id: str, error: type[Exception]) -> None:
        self.text, self.trace_id, self.error = text, trace_id, error
        self.state, self.mark = "prompt", 0  # mark: where the text of the current region starts
        self.prompt: str | None = None
        self.block_text = ""
        self.blocks: list[str] = []
        self.summaries: list[str] = []

    def fail(self, pos: int, problem: str) -> Exception:
        """The error naming the line and column of character `pos`."""
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return self.error(f"trace {self.trace_id!r}, line {line}, column {col}: {problem}")

    def only_space(self, stop: int, between: str) -> None:
        """Refuse anything but whitespace from the mark up to `stop`."""
        gap = self.text[self.mark:stop]
        if gap.strip():
            raise self.fail(self.mark + len(gap) - len(gap.lstrip()), f"text {gap.strip()[:30]!r} {between}")

    def read(self, tok: str, pos: int) -> None:
        """Advance over the marker `tok` at character `pos` (the mark is then moved past it)."""
        getattr(self, _FIELD_OF[tok])(pos)  # the method named after the marker: think, block_start, ...

    def think(self, pos: int) -> None:
        """<think>: ends the prompt."""
        if self.state != "prompt":
            raise self.fail(pos, "<think> after the prompt")
        self.prompt, self.state = self.text[:pos], "think"

    def block_start(self, pos: int) -> None:
        """<|block_start|>: ends the prompt, or follows <think> or a memento across whitespace only."""
        state, n = self.state, len(self.blocks)
        if state == "prompt":
            self.prompt = self.text[:pos]
        elif state == "think":
            self.only_space(pos, "between <think> and the first <|block_start|>")
        elif state == "between":
            self.only_space(pos, f"between the memento of block {n - 1} and the next <|block_start|>")
        else:
            raise self.fail(pos, f"<|block_start|> while block {n} is unfinished" if state != "answer"
                            else "<|block_start|> after </think>")
        self.state = "block"

    def block_end(self, pos: int) -> None:
        """<|block_end|>: closes the open block; its text is kept until the memento is in."""
        if self.state != "block":
            raise self.fail(pos, "<|block_end|> with no open block")
        self.block_text, self.state = self.text[self.mark:pos], "after_block"

    def summary_start(self, pos: int) -> None:
        """<|summary_start|>: opens the memento, across whitespace only from <|block_end|>."""
        if self.state != "after_block":
            raise self.fail(pos, "<|summary_start|> not preceded by <|block_end|>")
        self.only_space(pos, f"between <|block_end|> and <|summary_start|> of block {len(self.blocks)}")
        self.state = "summary"

    def summary_end(self, pos: int) -> None:
        """<|summary_end|>: closes the memento; the block and its memento are read."""
        if self.state != "summary":
            raise self.fail(pos, "<|summary_end|> with no open <|summary_start|>")
        self.blocks.append(self.block_text.strip())
        self.summaries.append(self.text[self.mark:pos].strip())
        self.state = "between"

    def think_end(self, pos: int) -> None:
        """</think>: once, with no block open, across whitespace only from <think> or the last memento."""
        state, n = self.state, len(self.blocks)
        if state in ("block", "after_block", "summary"):
            raise self.fail(pos, f"</think> while block {n} is unfinished")
        if state == "answer":
            raise self.fail(pos, "second </think>")
        if state == "prompt":
            self.prompt = self.text[:pos]
        elif state == "between":
            self.only_space(pos, f"between the memento of block {n - 1} and </think>")
        else:
            self.only_space(pos, "between <think> and </think>")
        self.state = "answer"

    def finish(self, drop_unfinished: bool) -> tuple[str, list[str], list[str], str | None]:
        """(prompt, blocks, mementos, answer) once the last marker is passed; refuses what may not end the text."""
        state, text, trace_id = self.state, self.text, self.trace_id
        answer: str | None = None
        if state in ("block", "after_block", "summary") and not drop_unfinished:
            raise self.error(
                f"trace {trace_id!r}: block {len(self.blocks)} is unfinished at the end of the text "
                "(pass drop_unfinished=True to drop it)"
            )
        if state == "answer":
            answer = strip_eos(text[self.mark:])
        elif state == "between":
            self.only_space(len(text), "after the last memento (no </think>)")
        elif state == "think":
            self.only_space(len(text), "after <think> (no block, no </think>)")
        elif state == "prompt":
            raise self.error(f"trace {trace_id!r}: no Memento markers in the text")
        return (self.prompt or "").strip(), self.blocks, self.summaries, answer


def split_served_text(text: str, trace_id: str, drop_unfinished: bool,
                      error: type[Exception]) -> tuple[str, list[str], list[str], str | None]:
    """(prompt, blocks, mementos, answer) of Memento-format text, each stripped (answer None without </think>);
    a structural problem raises `error` naming `trace_id` and where."""
    scan = _Scanner(text, trace_id, error)
    for m in MARKER_RE.finditer(text):
        scan.read(m.group(), m.start())
        scan.mark = m.end()
    return scan.finish(drop_unfinished)
