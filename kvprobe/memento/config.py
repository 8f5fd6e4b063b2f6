"""Which memento mask to build: `MaskConfig`, the options of kvprobe.memento.masks (SPEC section 2).

Plain data, no torch: the command line and the config read it without loading a model's
libraries; `kvprobe.memento.masks` builds the masks it names and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MaskConfig"]


@dataclass(frozen=True)
class MaskConfig:
    """Which memento mask to build.

    keep_last_n_blocks: -1 plain causal, 0 hide every completed block, N keep N most recent.
    mask_delimiters: hide <|block_start|> and <|block_end|> with the content. None (default)
        follows the fork: hidden in restart mode, visible in memento mode.
    restart_mode: memento tokens cannot see any block up to their own (paper's ablation).
    evict_before_summary_end: the fork's served timing, a block hidden already from its own
        <|summary_end|> (False: kvprobe's base rule, <|summary_end|> sees its block).
    restart_sees_kept_blocks: restart with keep N > 0 as the fork serves it, the memento
        still sees the N most recent blocks (False: it sees none up to its own).
    keep_last_block_for_answer: the fork's option of that name (keep 0 only): a block is
        evicted at the next <|block_start|>, so the last one stays visible to the answer.
    prefill_causal: the fork's prompt prefill. The prompt (every token before the first
        generated one) is prefilled with plain causal attention, and the blocks it completes
        are evicted only at the first generated token (processor.py process_prompt_tokens,
        scheduler.py _update_request_with_output). Takes effect where the per-sample prompt
        length is given (`mask_tables(..., prefill_end=...)`, required: refused without it).
        Memento mode only: the fork's restart rewind over prompt blocks is not modelled.
    """

    keep_last_n_blocks: int = 0
    mask_delimiters: bool | None = None
    restart_mode: bool = False
    evict_before_summary_end: bool = False
    restart_sees_kept_blocks: bool = False
    keep_last_block_for_answer: bool = False
    prefill_causal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last_n_blocks, int) or self.keep_last_n_blocks < -1:
            raise ValueError(f"keep_last_n_blocks must be an integer >= -1, got {self.keep_last_n_blocks!r}")
        if self.mask_delimiters is None:  # the fork's restart always evicts the delimiters (SPEC section 2)
            object.__setattr__(self, "mask_delimiters", self.restart_mode)
        if self.keep_last_block_for_answer and self.keep_last_n_blocks != 0:
            raise ValueError("keep_last_block_for_answer works with keep_last_n_blocks=0 only (as in the fork), "
                             f"got keep_last_n_blocks={self.keep_last_n_blocks}")
        if self.prefill_causal and (self.restart_mode or self.keep_last_block_for_answer):
            # the fork rewinds to the earliest prompt memento and, after that rewind, refuses to mask
            # later prompt blocks (mask_token_span: end > num_computed_tokens); keep_last_block_for_answer
            # compacts every prompt block at the first token (keep 0, not deferred): neither is modelled
            raise ValueError("prefill_causal models the fork's prompt prefill in memento mode only, not with "
                             "restart_mode or keep_last_block_for_answer")

    @property
    def name(self) -> str:
        """The mask's canonical name, the report's vocabulary: 'memento', 'restart' (the fork's
        restart: delimiters hidden), 'restart-delims-visible' (a kvprobe-only control),
        'memento-delims-hidden', 'memento-keep1', 'causal', ... Suffixes name what departs
        from each mode's default: '-evict-at-se' the fork's timing, '-sees-kept' and
        '-keeps-last-block' the fork's options above.

        The report reads a condition's meaning from this name, whatever the condition is called."""
        if self.keep_last_n_blocks == -1 and not self.restart_mode:
            return "causal"  # nothing is evicted, so the timing of eviction does not matter
        base = "restart" if self.restart_mode else "memento"
        if self.keep_last_n_blocks == -1:
            base += "-keepall"
        elif self.keep_last_n_blocks > 0:
            base += f"-keep{self.keep_last_n_blocks}"
        if self.restart_mode and self.restart_sees_kept_blocks and self.keep_last_n_blocks > 0:
            base += "-sees-kept"
        if self.mask_delimiters != self.restart_mode:
            base += "-delims-hidden" if self.mask_delimiters else "-delims-visible"
        if self.keep_last_block_for_answer:  # evicts at the next <|block_start|>: the timing flag is moot
            return base + "-keeps-last-block"
        # keep-all evicts nothing; in restart mode <|summary_end|> is memento, blind to its block either way
        timing = self.evict_before_summary_end and self.keep_last_n_blocks >= 0 and not self.restart_mode
        prefill = self.prefill_causal and self.keep_last_n_blocks >= 0
        return base + ("-evict-at-se" if timing else "") + ("-prefill-causal" if prefill else "")
