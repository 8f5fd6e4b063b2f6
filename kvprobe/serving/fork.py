"""The Memento vLLM fork's configuration: its --block-masking-config JSON and its server command line."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from ..memento.masks import MaskConfig


def block_masking_config(mask: MaskConfig, *, compact_on_summary_end: bool = True, **extra: Any) -> dict[str, Any]:
    """The vLLM fork's ``--block-masking-config`` for a kvprobe `MaskConfig`.

    ========================  ======================================================
    ``enable``                block masking on; False for plain causal attention
                              (``keep_last_n_blocks = -1``)
    ``keep_last_n_blocks``    as in MaskConfig: 0 evicts every completed block, N > 0
                              keeps the N most recent, -1 disables eviction
    ``mask_delimiters``       evict <|block_start|>/<|block_end|> with the content
                              (false for Qwen3/OLMo3, true for Phi-3/Phi-4)
    ``compact_on_summary_end``  evict when <|summary_end|> is produced (the Memento
                              behaviour; keep True)
    ``restart_mode``          after eviction, recompute the memento's KV without its
                              block (the paper's ablation)
    ========================  ======================================================

    Other keys the fork knows (``require_assistant_section``, ``max_block_tokens``, ``debug``)
    pass through `extra`; ``keep_last_block_for_answer`` comes from the mask. The fork's
    restart mode evicts ``<|block_start|>`` .. ``<|block_end|>`` with the content whatever
    ``mask_delimiters`` says, then re-prefills the memento (SPEC section 2): kvprobe's restart
    mask with ``mask_delimiters=True``; restart with the delimiters visible is a kvprobe-only
    control and raises ValueError here, as does restart mode without eviction
    (``keep_last_n_blocks = -1``). With keep N > 0 the fork's restart re-prefills the newest
    memento while the N kept blocks are still cached: the teacher-forced mask that matches it
    sets ``restart_sees_kept_blocks``.
    """
    if mask.restart_mode and mask.keep_last_n_blocks == -1:
        raise ValueError(
            "restart mode with keep_last_n_blocks=-1 has no equivalent in the vLLM fork "
            "(its restart mode works on evicted blocks); use keep_last_n_blocks >= 0"
        )
    if mask.restart_mode and not mask.mask_delimiters:
        raise ValueError("restart with the delimiters visible (restart-delims-visible) is a kvprobe-only control: "
                         "the vLLM fork's restart evicts <|block_start|>..<|block_end|> whatever mask_delimiters says")
    config: dict[str, Any] = {
        "enable": mask.keep_last_n_blocks != -1,
        "keep_last_n_blocks": mask.keep_last_n_blocks,
        "mask_delimiters": mask.mask_delimiters,
        "compact_on_summary_end": compact_on_summary_end,
        "restart_mode": mask.restart_mode,
    }
    if mask.keep_last_block_for_answer:
        config["keep_last_block_for_answer"] = True
    config.update(extra)
    return config


def serve_command(
    model_path: str,
    mask: MaskConfig = MaskConfig(),
    *,
    served_model_name: str = "memento",
    port: int = 8010,
    max_model_len: int = 32768,
    gpu_memory_utilization: float = 0.9,
    chat_template: str | None = "chat_templates/memento_nosys.jinja",
    trust_remote_code: bool = False,
    extra_args: Sequence[str] = (),
    **config_extra: Any,
) -> list[str]:
    """The argv that starts the fork's OpenAI-compatible server for `model_path` under `mask`.

    Prefix caching is switched off: the fork requires it and does not do it itself.
    `chat_template` is relative to the fork's ``vllm/`` directory (None to use the
    checkpoint's own template). `config_extra` goes into the block-masking config.
    ``--trust-remote-code`` is passed only when asked for (Memento checkpoints are plain
    Qwen3/OLMo-3/Phi-4 architectures and need none).
    """
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", served_model_name,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--no-enable-prefix-caching",
    ]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if chat_template:
        argv += ["--chat-template", chat_template]
    argv += ["--block-masking-config", json.dumps(block_masking_config(mask, **config_extra))]
    return argv + list(extra_args)
