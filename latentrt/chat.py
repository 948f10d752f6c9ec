"""Chat templates as Hugging Face applies them: the model folder's template rendered with jinja2, for the
server's chat route, ``latentrt.apply_chat_template`` and ``latentrt generate --chat``.

The template is ``chat_template.jinja`` or the ``chat_template`` field of ``tokenizer_config.json`` (a
string, or a list of named templates of which ``default`` is used). It is rendered in jinja2's immutable
sandbox (a template is data: it cannot reach Python objects or the file system), with ``messages``,
``add_generation_prompt=True`` and the tokenizer config's ``bos_token`` / ``eos_token``, then tokenized
without adding special tokens (the template places them). As in transformers, ``{% generation %}`` ...
``{% endgeneration %}`` (the block marking the assistant's tokens for training masks, which Huginn's
template uses) renders its body. A model without a template cannot chat: the API and the CLI say so, the
server answers 400; ``--chat-template FILE`` gives it one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the template text
    bos_token: str = ""
    eos_token: str = ""


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def _tokenizer_config(folder: Path | None) -> dict:
    """A model folder's tokenizer_config.json ({} when it has none or it cannot be read)."""
    cfg_file = None if folder is None else Path(folder) / "tokenizer_config.json"
    if cfg_file is None or not cfg_file.is_file():
        return {}
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def chat_template_file(path: str | Path, folder: Path | None = None) -> ChatTemplate:
    """A jinja template from a file (``latentrt serve --chat-template``), for a model without one or to
    replace its own; bos / eos text from the model folder's tokenizer_config.json where it has one."""
    path = Path(path)
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the chat template {str(path)!r}: {exc}") from None
    if not source.strip():
        raise InputError(f"the chat template {str(path)!r} is empty")
    config = _tokenizer_config(folder)
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def find_chat_template(folder: Path | None) -> ChatTemplate | None:
    """The template of a model folder, or None."""
    if folder is None:
        return None
    folder = Path(folder)
    config = _tokenizer_config(folder)
    source = None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text()
    else:
        raw = config.get("chat_template")
        if isinstance(raw, list):
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
        source = raw if isinstance(raw, str) else None
    if not source:
        return None
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages: a non-empty list of {"role": str, "content": str or text parts}."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InputError(
                    f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


@cache
def _generation_block():
    """The jinja2 extension of the ``{% generation %}`` block: its body, rendered as is (transformers also
    records where it starts and ends, for assistant-token masks; a prompt needs only the text)."""
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


def render_chat(template: ChatTemplate | None, messages) -> str:
    """The prompt text of a conversation (a 400-worthy InputError when the model has no template or the
    template rejects the conversation)."""
    if template is None:
        raise InputError(
            "this model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): "
            "give one (--chat-template FILE) or use a plain prompt (the server: /v1/completions)"
        )
    messages = check_messages(messages)
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    extensions = ["jinja2.ext.loopcontrols", _generation_block()]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template.source).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template rejected the conversation: {exc}") from None


def chat_prompt_ids(template: ChatTemplate | None, tokenizer, messages) -> list[int]:
    """A conversation's prompt ids: rendered with ``template``, tokenized without adding special tokens."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer.json: chat needs one")
    ids = tokenizer.encode(render_chat(template, messages), add_special_tokens=False).ids
    if not ids:
        raise InputError("the rendered conversation is empty")
    return ids


def chat_template_for(model, template: ChatTemplate | str | Path | None = None) -> ChatTemplate | None:
    """The template ``model`` chats with: ``template`` (a ``ChatTemplate``, or a template file's path, read
    with the model folder's bos / eos), else the model folder's own (None when it has none)."""
    folder = getattr(model, "folder", None)
    if isinstance(template, (str, Path)):
        return chat_template_file(template, folder)
    return template if template is not None else find_chat_template(folder)


def apply_chat_template(model, messages, template: ChatTemplate | str | Path | None = None) -> list[int]:
    """The prompt ids of a conversation (OpenAI-style ``messages``) for ``model``, as HF's
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` gives them and the server's chat
    route runs them: ``generate(model, apply_chat_template(model, messages))``. ``template``: as
    ``chat_template_for``'s."""
    return chat_prompt_ids(chat_template_for(model, template), model.tokenizer, messages)
