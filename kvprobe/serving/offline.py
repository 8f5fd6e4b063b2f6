"""Generate traces in-process with the fork's offline `vllm.LLM` engine (vLLM is imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from ..memento.masks import MaskConfig
from .client import parse_generation, prompt_seed, warn_if_never_evicted
from ..data.chat import check_template_choice, prompt_text, resolve_chat_template
from .checks import check_at_least, check_sampling
from .fork import block_masking_config
from .generations import Generation, Prompt, _check_unique, _Writer, completed_ids


def _vllm() -> Any:
    """The vllm module; ImportError saying how to install the fork when it is missing."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "generate_offline needs vLLM with the Memento block-masking overlay, which is not installed: "
            "`pip install vllm==0.13.0`, then `bash install_overlay.sh` in the vllm/ directory of "
            "microsoft/memento (a CUDA GPU is required). Without it, serve the model elsewhere and use "
            "generate_traces"
        ) from e
    return vllm


def generate_offline(
    prompts: Iterable[Prompt],
    model_path: str,
    output: str | Path | None = None,
    *,
    mask: MaskConfig = MaskConfig(),
    chat: bool = True,
    chat_template: str = "memento",
    max_tokens: int = 16384,
    temperature: float = 0.6,
    top_p: float = 0.95,
    top_k: int = 20,
    seed: int | None = 0,
    max_model_len: int = 32768,
    chunk_size: int = 256,
    llm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Generate traces with the fork's offline engine (``vllm.LLM`` with ``block_masking_config``).

    Needs vLLM 0.13 with the Memento overlay installed; imported here only, so kvprobe
    works without it. With `chat`, each prompt's text is wrapped in `chat_template`
    (`kvprobe.data.chat`; default the fork's `memento_nosys.jinja`, what its server applies)
    with the generation prompt. Prompts run in chunks of `chunk_size`; with an
    `output` file, each chunk is appended when done and prompts already there are skipped,
    as in `generate_traces`. Returns the generations of this call. Same per-prompt seeds.
    Settings vLLM would refuse, a mask the fork does not serve and a chat template that is no
    choice or .jinja file are refused (ServingError, ChatTemplateError) before vLLM loads.
    """
    check_sampling(max_tokens, temperature, top_p, top_k)
    check_at_least("max_model_len", max_model_len, 1)
    check_at_least("chunk_size", chunk_size, 1)
    if chat:
        check_template_choice(chat_template)
    fork_config = block_masking_config(mask)
    vllm = _vllm()
    prompts = list(prompts)
    _check_unique(prompts)
    if not chat:  # sent verbatim, as on the completions endpoint
        warn_if_never_evicted(prompts, "completions")
    done = completed_ids(output) if output is not None else set()  # a cut-off last line does not count
    todo = [p for p in prompts if p.prompt_id not in done]
    try:
        llm = vllm.LLM(model=model_path, block_masking_config=fork_config,
                       max_model_len=max_model_len, enable_prefix_caching=False, **(llm_kwargs or {}))
    except TypeError as e:
        if "block_masking_config" in str(e):
            raise ImportError("this vLLM does not know block_masking_config: apply the Memento overlay "
                              "(microsoft/memento, vllm/install_overlay.sh)") from e
        raise
    writer = _Writer(Path(output)) if output is not None else None  # opened once the engine is up
    try:
        tokenizer = llm.get_tokenizer()
        template = resolve_chat_template(chat_template, tokenizer) if chat else None
        results: list[Generation] = []
        for start in tqdm(range(0, len(todo), chunk_size), desc="generate (vLLM)", unit="chunk", disable=not progress):
            chunk = todo[start : start + chunk_size]
            texts = [prompt_text(p.text, tokenizer, template) if template is not None else p.text for p in chunk]
            params = [vllm.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                          seed=prompt_seed(seed, p.prompt_id), skip_special_tokens=False)
                      for p in chunk]
            for prompt, out in zip(chunk, llm.generate(texts, params)):
                completion = out.outputs[0]
                generation = parse_generation(prompt, completion.text, completion.finish_reason, None,
                                              list(out.prompt_token_ids), list(completion.token_ids))
                results.append(generation)
                if writer is not None:
                    writer.write(generation)
        return results
    finally:
        if writer is not None:
            writer.close()
