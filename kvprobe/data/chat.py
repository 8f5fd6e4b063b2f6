"""Chat templates: the text a trace's prompt becomes before <think>.

The paper trains Memento models in ChatML and the Memento vLLM fork serves them with
`vllm/chat_templates/memento_nosys.jinja` (microsoft/memento, MIT licence), copied below:
one user turn, no system prompt, then the assistant turn, which the model opens with
<think>. Captured KV depends on every token before it, so a capture renders the prompt the
way the model was trained and served. The choices (`CHAT_TEMPLATES`, the config field
`data.chat_template`):

    memento     the fork's template, as served            <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    tokenizer   the tokenizer's own `chat_template`
    none        no template                               {prompt}\\n
    auto        memento when the tokenizer has the ChatML tokens <|im_start|> and <|im_end|>, else none
    PATH        a Jinja file

A template is applied with the tokenizer's own `apply_chat_template` (one user message,
`add_generation_prompt=True`, not tokenized); nothing here renders Jinja itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATES", "MEMENTO_NOSYS", "prompt_text", "resolve_chat_template"]

CHAT_TEMPLATES = ("auto", "memento", "tokenizer", "none")

# vllm/chat_templates/memento_nosys.jinja of microsoft/memento, verbatim
MEMENTO_NOSYS = (
    "{# Memento chat template for Qwen3-8B (no system prompt) #}\n"
    "{# This model was trained WITHOUT a system prompt. #}\n"
    "{# Any system messages from the API are silently ignored. #}\n"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>\n"
    "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n"
    "'}}{% endif %}\n"
)

_CHATML = ("<|im_start|>", "<|im_end|>")


def resolve_chat_template(choice: str, tokenizer: Any) -> str | None:
    """The Jinja text a choice names (see the module docstring), or None for no template.

    Raises ValueError naming the problem: a tokenizer without a template, a missing file."""
    if choice == "none":
        return None
    if choice == "memento":
        return MEMENTO_NOSYS
    if choice == "auto":
        vocab = tokenizer.get_vocab()
        return MEMENTO_NOSYS if all(t in vocab for t in _CHATML) else None
    if choice == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ValueError(f"chat_template 'tokenizer': {type(tokenizer).__name__} has no chat template of its own; "
                             "use 'memento', 'none' or a .jinja file")
        return own
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"chat_template {choice!r}: not one of {', '.join(CHAT_TEMPLATES)} and no such file")
    return path.read_text(encoding="utf-8")


def prompt_text(prompt: str, tokenizer: Any, template: str | None) -> str:
    """What stands before <think>: `{prompt}\\n` (no template; nothing for an empty prompt) or
    the template applied to one user turn with the assistant's generation prompt."""
    if template is None:
        return prompt + "\n" if prompt else ""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
