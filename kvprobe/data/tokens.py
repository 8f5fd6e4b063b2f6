"""New marker tokens: add the Memento markers to a tokenizer and initialise their embeddings.

The paper (appendix A.2.1) adds the four block and summary markers and initialises each
as "the mean of semantically related existing tokens plus small Gaussian noise
(sigma=0.01)"; `add_memento_tokens` does that, with the paper's words (`RELATED_WORDS`).
"""

from __future__ import annotations

from typing import Any

from ..memento.layout import SPECIAL_TOKEN_STRINGS

__all__ = ["RELATED_WORDS", "add_memento_tokens"]

BS, BE = SPECIAL_TOKEN_STRINGS["block_start"], SPECIAL_TOKEN_STRINGS["block_end"]
SS, SE = SPECIAL_TOKEN_STRINGS["summary_start"], SPECIAL_TOKEN_STRINGS["summary_end"]
THINK, THINK_END = SPECIAL_TOKEN_STRINGS["think"], SPECIAL_TOKEN_STRINGS["think_end"]

# words whose embeddings seed each new marker's embedding (add_memento_tokens); the four block and
# summary markers as the paper's appendix A.2.1 lists them ("<|block start|> <- mean(block, start,
# begin, section, step)", ...); <think>/</think> are not in the paper (Qwen3 has them already)
RELATED_WORDS = {
    THINK: "think",
    THINK_END: "end think",
    BS: "block start begin section step",
    BE: "block end finish section done",
    SS: "summary summarize brief recap overview",
    SE: "summary end finish done complete",
}


def add_memento_tokens(
    tokenizer: Any,
    model: Any = None,
    *,
    init: str = "mean",
    noise: float = 0.01,
    seed: int = 0,
) -> dict[str, int]:
    """Add the Memento markers missing from `tokenizer` as special tokens; returns {text: id} of those added.

    The four block/summary markers, and <think>/</think> if missing. With a `model`, its
    embeddings are resized to cover the tokenizer (if needed) and each new marker's row
    (input embedding and, if untied, output embedding) is set to ``base + noise * N(0, 1)``
    with a generator seeded by `seed`, where base is, for ``init="mean"``, the mean of the rows
    of the tokens of related words (``RELATED_WORDS``: block, start, begin, section, step for
    <|block_start|>, ...) and, for ``init="vocab_mean"``, the mean of all existing rows. The
    defaults are the paper's (appendix A.2.1: "the mean of semantically related existing tokens
    plus small Gaussian noise (sigma=0.01)"): the noise is absolute, not scaled to the rows.
    Other rows are not touched.
    """
    import torch  # here, not at the top: the traces module that imports this one reads traces without torch
    from tokenizers import AddedToken

    if init not in ("mean", "vocab_mean"):
        raise ValueError(f"init must be 'mean' or 'vocab_mean', got {init!r}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKEN_STRINGS.values() if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in missing}
    if model is None:
        return added

    emb_in = model.get_input_embeddings()
    old_rows = emb_in.weight.shape[0]
    # rows to set: markers added now, and markers the old embedding matrix did not cover
    new_ids = {t: i for t, i in ((t, tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKEN_STRINGS.values())
               if t in added or i >= old_rows}
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)

    gen = torch.Generator().manual_seed(seed)
    related: dict[str, list[int]] = {}
    for text in new_ids:
        ids = tokenizer(RELATED_WORDS[text], add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if i < old_rows and i not in tokenizer.all_special_ids]
        if init == "mean" and not ids:
            raise ValueError(f"cannot initialise {text}: the words {RELATED_WORDS[text]!r} give no usable tokens")
        related[text] = ids
    with torch.no_grad():
        for W in matrices:  # (V, d)
            old = W[:old_rows].float()
            for text, idx in new_ids.items():
                base = old[related[text]].mean(0) if init == "mean" else old.mean(0)  # (d,)
                eps = torch.randn(W.shape[1], generator=gen)
                W[idx] = (base + noise * eps).to(W.dtype)
    return added
