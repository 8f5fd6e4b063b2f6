"""Passcode samples on real traces, as a `kvprobe.capture.SampleSource`.

Sample i is trace ``i % len(traces)`` with a passcode injected into its target block
(kvprobe.data.inject). Passcodes come in fixed chunks seeded by (seed, chunk), so any range of
samples is the same however a capture batches or shards it, and two sources that differ
only in `seed` differ only in their passcodes. Batches are right-padded with the
tokenizer's pad token (else its eos token) and carry an attention mask.

Which ids are fed (`token_ids`): a trace that carries the ids a server generated it with
(`Trace.token_ids`, prompt then completion) is fed those, the ids the model saw, with the
passcode injected into the target block alone (`kvprobe.data.inject.inject_served`);
trailing end-of-turn tokens are dropped, as kvprobe's own rendering has none.
`token_ids="retokenize"` renders and tokenizes every trace kvprobe's way instead (the
behaviour before served ids were fed). Traces without served ids are tokenized kvprobe's
way in either mode. Where the two tokenizations differ a warning names the traces, and
`describe()` records the mode and the counts.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from ..grid import SITES
from ..memento.sites import site_positions
from .samples import SampleBatch
from .inject import DEFAULT_TEMPLATE, InjectedSample, inject_and_tokenize, inject_served
from ..memento.layout import Layout, SpecialTokens
from .passcodes import PasscodeConfig, passcode_labels, sample_passcodes
from .traces import (Trace, TraceError, check_trace_length, end_of_turn_ids, parse_trace_ids, render,
                     served_ids_differ, tokenize_trace)

__all__ = ["TOKEN_IDS", "TracePasscodeSource"]

CHUNK = 1024
TOKEN_IDS = ("served", "retokenize")  # what a trace with served ids is fed: those, or kvprobe's tokenization


@lru_cache(maxsize=16)
def _passcode_chunk(seed: int, chunk: int, spec: PasscodeConfig) -> tuple[str, ...]:
    chunk_seed = np.random.SeedSequence([seed, chunk]).generate_state(1)
    return tuple(sample_passcodes(CHUNK, seed=int(chunk_seed[0]), spec=spec))


@dataclass
class TracePasscodeSource:
    """`n_samples` passcode samples over `traces`, tokenized with `tokenizer` (fast, with markers).

    target_block is 0-based (1 is the paper's T_2). All traces are tokenized and checked
    up front: each must have the target block and take an injection at `where`; with
    `offsets`, each must also have the blocks target+offset (see `check`). token_ids:
    "served" feeds a trace's served ids when it has them, "retokenize" always kvprobe's own.
    """

    traces: Sequence[Trace]
    tokenizer: Any
    n_samples: int
    seed: int = 0
    target_block: int = 1
    passcode_spec: PasscodeConfig = field(default_factory=PasscodeConfig)
    where: str | int = "start"
    template: str = DEFAULT_TEMPLATE
    offsets: tuple[int, ...] | None = None
    chat_template: str | None = None  # Jinja text that wraps each prompt (kvprobe.data.chat), None for none
    token_ids: str = "served"  # TOKEN_IDS
    special: SpecialTokens = field(init=False)
    pad_id: int = field(init=False)
    served_ids_differ: list[str] = field(init=False)  # ids of served traces whose tokens are not the server's
    fed_served: list[bool] = field(init=False)  # per trace: its served ids are what is fed

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not self.traces:
            raise ValueError("no traces")
        self.traces = list(self.traces)
        ids = [t.trace_id for t in self.traces]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate trace id(s) {dup}")
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad batches with")
        self.pad_id = int(pad)
        if self.token_ids not in TOKEN_IDS:
            raise ValueError(f"token_ids must be one of {TOKEN_IDS}, got {self.token_ids!r}")
        ends = end_of_turn_ids(self.tokenizer)
        self._base: list[tuple[torch.Tensor, Layout]] = []
        self.fed_served, self.served_ids_differ = [], []
        probe_code = self.passcode_spec.alphabet[0] * self.passcode_spec.length
        for t in self.traces:
            ours = tokenize_trace(t, self.tokenizer, self.special, chat_template=self.chat_template)
            if served_ids_differ(t, ours[0].tolist(), ends):
                self.served_ids_differ.append(t.trace_id)
            served = self.token_ids == "served" and t.token_ids is not None
            base = self._served_base(t, ends) if served else ours
            # fails now, naming the trace, if the target block is missing or the injection cannot verify
            self._inject(t, probe_code, base, served)
            self._base.append(base)
            self.fed_served.append(served)
        if self.served_ids_differ:
            first = ", ".join(map(repr, self.served_ids_differ[:3]))
            fed = ("captured with the served ids (data.token_ids: served)" if self.token_ids == "served" else
                   "captured with kvprobe's tokens (data.token_ids: retokenize)")
            warnings.warn(f"{len(self.served_ids_differ)} of {self.n_served} served traces tokenize to other ids than the "
                          f"server's (e.g. {first}): {fed}; check data.chat_template and the tokenizer", stacklevel=2)
        if self.offsets is not None:
            self.check(self.offsets)

    def _served_base(self, trace: Trace, ends: set[int]) -> tuple[torch.Tensor, Layout]:
        """The served ids of `trace` (T,), trailing end-of-turn tokens removed, and their layout."""
        ids = list(trace.token_ids or ())
        while ids and ids[-1] in ends:
            ids.pop()
        check_trace_length(ids, trace, "served ids")
        return torch.tensor(ids, dtype=torch.long), parse_trace_ids(ids, self.special, trace, "served ids")

    def _inject(self, trace: Trace, code: str, base: tuple[torch.Tensor, Layout], served: bool) -> InjectedSample:
        """`trace` with passcode `code`, injected into its served ids (`served`) or into kvprobe's tokenization."""
        if served:
            return inject_served(trace, self.target_block, code, self.tokenizer, self.special, base,
                                 template=self.template, where=self.where)
        return inject_and_tokenize(trace, self.target_block, code, self.tokenizer, self.special, template=self.template,
                                   where=self.where, base=base, chat_template=self.chat_template)

    def summary(self) -> str:
        """One line on the traces and which ids are fed, for a capture plan."""
        fed = sum(self.fed_served)
        return (f"data: {len(self.traces)} traces, {self.n_samples} samples; token ids fed: served for {fed}, "
                f"kvprobe's tokenization for {len(self.traces) - fed} (data.token_ids: {self.token_ids}; "
                f"{len(self.served_ids_differ)} of {self.n_served} served traces differ from kvprobe's tokenization)")

    @property
    def n_served(self) -> int:
        """How many traces carry the ids a server produced them with."""
        return sum(t.token_ids is not None for t in self.traces)

    def check(self, offsets: Sequence[int], sites: Sequence[str] = SITES) -> None:
        """Raise ValueError naming the first trace without a site at target_block + offset."""
        for t, (_, lay) in zip(self.traces, self._base):
            for off in offsets:
                for site in sites:
                    try:
                        site_positions(lay, site, self.target_block + off)
                    except ValueError as e:
                        where = f"{site} at offset {off:+d} from target block {self.target_block}"
                        raise TraceError(f"trace {t.trace_id!r}: {where}: {e}") from None

    def passcodes(self, start: int, stop: int) -> list[str]:
        """The passcodes of samples start..stop-1."""
        out: list[str] = []
        for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1):
            codes = _passcode_chunk(self.seed, chunk, self.passcode_spec)
            lo, hi = max(start, chunk * CHUNK) - chunk * CHUNK, min(stop, (chunk + 1) * CHUNK) - chunk * CHUNK
            out.extend(codes[lo:hi])
        return out

    def samples(self, start: int, stop: int) -> SampleBatch:
        """Samples start..stop-1: ids (n, T) right-padded, attention_mask (n, T), passcodes, labels (n, L), layouts."""
        if not 0 <= start < stop <= self.n_samples:
            raise ValueError(f"sample range {start}..{stop} outside 0..{self.n_samples}")
        codes = self.passcodes(start, stop)
        rows = []
        for i, code in zip(range(start, stop), codes):
            k = i % len(self.traces)
            rows.append(self._inject(self.traces[k], code, self._base[k], self.fed_served[k]))
        T = max(len(r.input_ids) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (n, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (n, T)
        for b, r in enumerate(rows):
            input_ids[b, : len(r.input_ids)] = r.input_ids
            attention_mask[b, : len(r.input_ids)] = 1
        return SampleBatch(
            index=np.arange(start, stop, dtype=np.int64),
            input_ids=input_ids,
            attention_mask=attention_mask,
            passcodes=codes,
            labels=passcode_labels(codes, self.passcode_spec),
            layouts=[r.layout for r in rows],  # right padding: offset 0, positions index the padded row
        )

    def describe(self) -> dict[str, Any]:
        """What identifies these samples: tokenizer, traces (ids and text hashes), seed, injection."""
        ids = "\n".join(t.trace_id for t in self.traces)
        texts = "\x00".join(render(t) for t in self.traces)
        tok = self.tokenizer
        traces: dict[str, Any] = {"n": len(self.traces), "ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
                                  "text_sha256": hashlib.sha256(texts.encode()).hexdigest(),
                                  "served_ids": self.n_served, "served_ids_differ": len(self.served_ids_differ)}
        if self.n_served:  # only then can the mode change the ids (stores of plain traces keep their description)
            fed = [t.token_ids for t, f in zip(self.traces, self.fed_served) if f]
            traces["token_ids"] = self.token_ids
            traces["served_ids_fed"] = len(fed)
            traces["served_ids_sha256"] = hashlib.sha256(repr(fed).encode()).hexdigest()
        return {
            "kind": "traces",
            "n_samples": self.n_samples,
            "seed": self.seed,
            "target_block": self.target_block,
            "where": self.where,
            "template": self.template,
            "chat_template_sha256": (hashlib.sha256(self.chat_template.encode()).hexdigest()
                                     if self.chat_template is not None else None),
            "passcode": {"length": self.passcode_spec.length, "alphabet": self.passcode_spec.alphabet},
            "tokenizer": {"name": getattr(tok, "name_or_path", "") or "", "class": type(tok).__name__,
                          "vocab_size": len(tok), "pad_id": self.pad_id},
            "traces": traces,
        }
