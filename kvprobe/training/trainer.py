"""`MementoTrainer`: transformers' `Trainer`, with the stage-2 memento mask built on the device.

The stage-2 collator ships each batch's mask as O(B x T) tables (`MementoCollator`). After
`Trainer` has moved the batch to the device, `_prepare_inputs` replaces the tables by the
attention mask (`with_memento_mask`): a FlexAttention `BlockMask` for flex_attention, the
dense additive mask for eager/sdpa up to `DENSE_MASK_MAX_TOKENS`. Training and evaluation
both go through it. A stage-1 batch has no tables and passes unchanged.

`save_model` writes a whole model under every launcher. transformers' Trainer writes no
weights at all for FSDP with ``SHARDED_STATE_DICT`` (the state dict type of
experiments/launch/fsdp_qwen3.yaml, for fast sharded checkpoints); here the final save
gathers the full state dict on every rank (a collective) and the main process writes it as
safetensors, so each stage's directory loads with `from_pretrained`. Checkpoints during
training stay sharded.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..memento.masks import MaskConfig
from .collate import with_memento_mask

__all__ = ["MementoTrainer"]


class MementoTrainer(Trainer):
    """`Trainer` for the two Memento SFT stages.

    memento_mask: the stage-2 mask the collator's tables describe (stage 1: unused).
    Every other argument is `Trainer`'s.
    """

    def __init__(self, *args: Any, memento_mask: MaskConfig = MaskConfig(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memento_mask = memento_mask

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)  # tensors, nested tables included, on the device now
        return with_memento_mask(self.accelerator.unwrap_model(self.model), inputs, self.memento_mask)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if _internal_call or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            super().save_model(output_dir, _internal_call)
            return
        state_dict = self.accelerator.get_state_dict(self.model)  # full, on the main process (all ranks join)
        if self.args.should_save:  # the writing process only, whatever this transformers' _save checks
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)
