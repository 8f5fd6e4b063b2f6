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
    PATH        a Jinja file, named *.jinja (`TEMPLATE_SUFFIX`)

A template is applied with the tokenizer's own `apply_chat_template` (one user message,
`add_generation_prompt=True`, not tokenized); nothing here renders Jinja itself. Before use,
`resolve_chat_template` renders a sentinel prompt (`SENTINEL`) with it: a template that does
not render (a Jinja syntax error, an exception it raises) or whose text leaves the prompt out
is refused with one line naming it (`ChatTemplateError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import KVProbeError

__all__ = ["CHAT_TEMPLATES", "MEMENTO_NOSYS", "ChatTemplateError", "check_template_choice", "prompt_text",
           "resolve_chat_template"]

CHAT_TEMPLATES = ("auto", "memento", "tokenizer", "none")
TEMPLATE_SUFFIX = ".jinja"  # a template file's name ends so (the fork's chat_templates/*.jinja)
SENTINEL = "kvprobe-sentinel-prompt-0c5e"  # a prompt every template must carry into its rendering

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


class ChatTemplateError(KVProbeError, ValueError):
    """A chat template kvprobe refuses: not a choice or a .jinja file, not UTF-8, not valid Jinja, failing as
    it renders, or leaving the prompt out. One line naming the template."""


def check_template_choice(choice: str) -> Path | None:
    """The template file `choice` names (None for the built-in choices), refused unless it is a readable
    `.jinja` file: a typo or any other file (a config, /etc/passwd) is never taken for a template."""
    if choice in CHAT_TEMPLATES:
        return None
    path = Path(choice)
    if not path.is_file():
        raise ChatTemplateError(f"chat_template {choice!r}: not one of {', '.join(CHAT_TEMPLATES)} and no such file")
    if path.suffix != TEMPLATE_SUFFIX:
        raise ChatTemplateError(f"chat_template {choice!r}: not one of {', '.join(CHAT_TEMPLATES)} and not a "
                                f"{TEMPLATE_SUFFIX} file")
    return path


def resolve_chat_template(choice: str, tokenizer: Any) -> str | None:
    """The Jinja text a choice names (see the module docstring), or None for no template.

    The template is tried on `tokenizer` with a sentinel prompt: it must render and its rendering must
    hold the prompt. Raises ChatTemplateError naming the problem: a tokenizer without a template, a
    missing or non-.jinja file, a file that is not UTF-8, a Jinja error, a template that drops the prompt."""
    path = check_template_choice(choice)
    if choice == "none":
        return None
    if choice == "memento":
        template = MEMENTO_NOSYS
    elif choice == "auto":
        vocab = tokenizer.get_vocab()
        template = MEMENTO_NOSYS if all(t in vocab for t in _CHATML) else None
    elif choice == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError(f"chat_template 'tokenizer': {type(tokenizer).__name__} has no chat template of "
                                    "its own; use 'memento', 'none' or a .jinja file")
    else:
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"chat_template {choice}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if template is not None and SENTINEL not in _render(SENTINEL, tokenizer, template, f"chat_template {choice}"):
        raise ChatTemplateError(f"chat_template {choice}: its rendering leaves the prompt out (a template must "
                                "put each message's content into the text)")
    return template


def _render(prompt: str, tokenizer: Any, template: str, name: str) -> str:
    """`template` applied to one user turn; ChatTemplateError naming the template when Jinja fails."""
    from jinja2 import TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"{name}: Jinja syntax error at line {e.lineno}: {e.message}") from None
    except Exception as e:  # the template is the user's code: whatever it raises is bad input
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ChatTemplateError(f"{name}: the template fails as it renders: {type(e).__name__}: {detail}") from None


def prompt_text(prompt: str, tokenizer: Any, template: str | None) -> str:
    """What stands before <think>: `{prompt}\\n` (no template; nothing for an empty prompt) or
    the template applied to one user turn with the assistant's generation prompt."""
    if template is None:
        return prompt + "\n" if prompt else ""
    return _render(prompt, tokenizer, template, "chat_template")
