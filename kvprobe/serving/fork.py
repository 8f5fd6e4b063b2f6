"""The Memento vLLM fork's configuration: its --block-masking-config JSON and its server command line."""

from __future__ import annotations

import difflib
import json
import sys
import warnings
from dataclasses import fields, replace
from typing import Any, Iterable, Sequence

from ..memento.config import MaskConfig
from .checks import ServingError, check_at_least, check_port

__all__ = ["FORK_COMMIT", "FORK_CONFIG_FIELDS", "block_masking_config", "check_fork_keys", "serve_command",
           "served_mask"]

# The fork's `BlockMaskingConfig` fields (microsoft/memento, vllm/vllm/config/block_masking.py), read at
# FORK_COMMIT. The fork's server and `vllm.LLM` silently drop any other key (arg_utils.py, llm.py keep only
# init fields), so kvprobe refuses them here. The private `_block_start_id` ... `_initialized` fields are
# the fork's resolved state, not options, and are left out.
FORK_COMMIT = "d8c10e66ff313844b4b5f063dd4c075d3ea56aab"
FORK_CONFIG_FIELDS = (
    "enable", "keep_last_n_blocks",
    "block_start_token", "block_end_token", "summary_start_token", "summary_end_token",
    "require_assistant_section", "im_start_token", "assistant_token",
    "compact_on_summary_end", "mask_delimiters", "keep_last_block_for_answer", "restart_mode",
    "max_block_tokens", "debug",
)
# the keys block_masking_config derives from the MaskConfig (compact_on_summary_end is its own argument)
_FROM_MASK = ("enable", "keep_last_n_blocks", "mask_delimiters", "restart_mode", "keep_last_block_for_answer")


def check_fork_keys(keys: Iterable[str]) -> None:
    """Refuse (ValueError, one line) a key that is not one of the fork's own options or that the MaskConfig sets.

    A near miss of a fork field gets "did you mean"; the fork itself would drop the key without a word.
    """
    for key in keys:
        if key in _FROM_MASK:
            raise ServingError(f"block-masking key {key!r} comes from the mask (MaskConfig / the mask flags): "
                             "set it there, not as an extra key")
        if key not in FORK_CONFIG_FIELDS:
            close = difflib.get_close_matches(key, FORK_CONFIG_FIELDS, n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"the fork's keys are {', '.join(k for k in FORK_CONFIG_FIELDS if k not in _FROM_MASK)}")
            raise ServingError(f"unknown block-masking key {key!r} (the vLLM fork would ignore it): {hint}")


def served_mask(mask: MaskConfig) -> MaskConfig:
    """The MaskConfig whose teacher-forced mask is what the fork serves under `block_masking_config(mask)`.

    The fork evicts a block as soon as <|summary_end|> is sampled (memento mode:
    ``evict_before_summary_end``), and with keep N > 0 its restart re-prefills the newest memento
    while the N kept blocks are still cached (``restart_sees_kept_blocks``). Options that change
    nothing for `mask` (the timing in restart mode or with ``keep_last_block_for_answer``, the
    kept blocks with keep 0) are left as they are, so an equal `name` means an equal mask.
    Raises ValueError for the masks the fork has no keys for (restart with keep -1 or with the
    delimiters visible).
    """
    if mask.restart_mode and mask.keep_last_n_blocks == -1:
        raise ServingError(
            "restart mode with keep_last_n_blocks=-1 has no equivalent in the vLLM fork "
            "(its restart mode works on evicted blocks); use keep_last_n_blocks >= 0"
        )
    if mask.restart_mode and not mask.mask_delimiters:
        raise ServingError("restart with the delimiters visible (restart-delims-visible) is a kvprobe-only control: "
                         "the vLLM fork's restart evicts <|block_start|>..<|block_end|> whatever mask_delimiters says")
    if mask.keep_last_n_blocks == -1:
        return mask  # causal: nothing is evicted
    if mask.restart_mode:
        return replace(mask, restart_sees_kept_blocks=True) if mask.keep_last_n_blocks > 0 else mask
    if mask.keep_last_block_for_answer:  # evicts at the next <|block_start|>: the timing is moot
        return mask
    return replace(mask, evict_before_summary_end=True)


def _spelled(mask: MaskConfig) -> str:
    """`mask` as the shortest MaskConfig(...) call that builds it, e.g. MaskConfig(1, restart_mode=True)."""
    args = [str(mask.keep_last_n_blocks)]
    for f in fields(MaskConfig)[1:]:
        value = getattr(mask, f.name)
        default = mask.restart_mode if f.name == "mask_delimiters" else f.default
        if value != default:
            args.append(f"{f.name}={value!r}")
    return f"MaskConfig({', '.join(args)})"


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

    Other keys the fork knows (``require_assistant_section``, ``max_block_tokens``, ``debug``,
    the block token strings; `FORK_CONFIG_FIELDS`) pass through `extra`; any other key, or one
    the mask sets, raises ValueError (`check_fork_keys`). ``keep_last_block_for_answer`` comes
    from the mask.

    The served model must be the mask (`served_mask`, SPEC section 2). Refused with ValueError,
    naming the mask that matches: restart with keep N > 0 without ``restart_sees_kept_blocks``
    (the fork's restart re-prefills the newest memento while the N kept blocks are still
    cached: ``restart-keepN-sees-kept``), restart with the delimiters visible (a kvprobe-only
    control), restart with keep -1, and ``compact_on_summary_end=False`` where it would stop all
    eviction. Memento mode with kvprobe's base-rule timing is served, with a warning: the fork
    evicts before <|summary_end|>'s KV is computed, so it serves the ``-evict-at-se`` mask.
    """
    check_fork_keys(extra)
    evicts = mask.keep_last_n_blocks != -1
    # keep_last_block_for_answer evicts on the next <|block_start|> whatever compact_on_summary_end says
    if evicts and not compact_on_summary_end and not mask.keep_last_block_for_answer:
        raise ServingError(f"compact_on_summary_end=False: the vLLM fork then never evicts a block (it compacts only on "
                         f"<|summary_end|>), so it serves causal, not {mask.name}; use MaskConfig(-1) for causal")
    served = served_mask(mask)
    if served.name != mask.name:
        if mask.restart_mode:
            k = mask.keep_last_n_blocks
            raise ServingError(f"{mask.name} is not what the vLLM fork serves: its restart with keep {k} re-prefills the "
                             f"newest memento while the kept blocks are still cached, so the fork's restart with keep "
                             f"{k} is {_spelled(served)}, named {served.name}")
        warnings.warn(f"the vLLM fork evicts a block as soon as <|summary_end|> is sampled, so it serves "
                      f"{served.name}, not {mask.name}: {_spelled(served)} is the mask that matches it",
                      UserWarning, stacklevel=2)
    config: dict[str, Any] = {
        "enable": evicts,
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
    checkpoint's own template). `config_extra` goes into the block-masking config (fork keys
    only, `check_fork_keys`).
    ``--trust-remote-code`` is passed only when asked for (Memento checkpoints are plain
    Qwen3/OLMo-3/Phi-4 architectures and need none). A port outside 1..65535, a max_model_len
    below 1 or a gpu_memory_utilization outside (0, 1] is refused (ServingError) before the
    server would.
    """
    check_port(port)
    check_at_least("max_model_len", max_model_len, 1)
    if not 0 < gpu_memory_utilization <= 1:
        raise ServingError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}",
                           "gpu_memory_utilization")
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
