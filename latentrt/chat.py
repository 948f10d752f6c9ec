"""Chat templates as Hugging Face applies them: the model folder's template rendered with jinja2, for the
server's chat route, ``latentrt.apply_chat_template`` and ``latentrt generate --chat``.

The template is ``chat_template.jinja`` or the ``chat_template`` field of ``tokenizer_config.json`` (a
string, or a list of named templates of which ``default`` is used). It is rendered in jinja2's immutable
sandbox (a template is data: it cannot reach Python objects or the file system), with ``messages``,
``add_generation_prompt=True`` and the special tokens transformers passes (``bos_token``, ``eos_token``,
``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``: those tokenizer_config.json or
special_tokens_map.json names, the latter's winning; a token neither names is undefined), then tokenized
without adding special tokens (the template places them). As in transformers, ``{% generation %}`` ...
``{% endgeneration %}`` (the block marking the assistant's tokens for training masks, which Huginn's
template uses) renders its body. A model without a template cannot chat: the API and the CLI say so, the
server answers 400; ``--chat-template FILE`` gives it one.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from .errors import CheckpointError, InputError, check_unicode, json_loads, not_a_model

# transformers' SPECIAL_TOKENS_ATTRIBUTES, each a template variable where the tokenizer names it
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the template text
    bos_token: str | None = None  # None: not a variable of the template (transformers leaves it undefined)
    eos_token: str | None = None
    problem: str = ""  # why the model folder's template cannot be used (a malformed field): raised on use
    other_tokens: tuple[tuple[str, str], ...] = ()  # (name, text) of the other SPECIAL_TOKENS the tokenizer names

    def token_variables(self) -> dict[str, str]:
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, **dict(self.other_tokens)}
        return {name: text for name, text in named.items() if text is not None}


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered: transformers' ``apply_chat_template`` arguments, vLLM's chat request
    fields. ``add_generation_prompt``: end with the header of a new assistant turn; ``continue_final_message``:
    end inside the last message instead, for the model to continue it (an assistant prefix); the two exclude
    each other. ``template_kwargs``: more template variables (vLLM's ``chat_template_kwargs``). ``tools``: the
    functions the model may call, as the template's ``tools`` (OpenAI's ``{"type": "function", "function":
    {...}}`` objects, as transformers passes them)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict | None = None
    tools: list | None = None

    def validate(self) -> None:
        for name in ("add_generation_prompt", "continue_final_message"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.add_generation_prompt and self.continue_final_message:
            raise InputError(
                "continue_final_message and add_generation_prompt cannot both be true: the first continues the "
                "last message, the second starts a new assistant turn (set add_generation_prompt to false)"
            )
        if self.tools is not None and (
            not isinstance(self.tools, list) or not all(isinstance(t, dict) for t in self.tools)
        ):
            raise InputError(f"tools must be a list of objects (JSON schemas of functions), got {self.tools!r:.200}")
        kwargs = self.template_kwargs
        if kwargs is None:
            return
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise InputError(f"chat_template_kwargs must be an object of template variables, got {kwargs!r}")
        reserved = sorted(set(kwargs) & {"messages", "tools", "documents", "add_generation_prompt"})
        if reserved:
            raise InputError(f"chat_template_kwargs cannot set {reserved}: the request sets them")


# what transformers appends to the final message to find where it ends in the rendered text
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}; None: not given."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_files(folder: Path | None) -> tuple[dict, dict]:
    """A model folder's tokenizer_config.json and special_tokens_map.json ({} for one it lacks, both for no
    folder); CheckpointError naming a file that is not a JSON object."""
    if folder is None:
        return {}, {}
    return _tokenizer_config(folder), _json_object(Path(folder) / "special_tokens_map.json")


def _template(source: str, config: dict, mapped: dict) -> ChatTemplate:
    """``source`` with the special tokens transformers renders it with: tokenizer_config.json's (``config``),
    replaced by those special_tokens_map.json (``mapped``) names (transformers reads that file after the
    config)."""
    tokens = {}
    for name in SPECIAL_TOKENS:
        text = _token_text(mapped.get(name))
        tokens[name] = text if text is not None else _token_text(config.get(name))
    others = tuple((name, tokens[name]) for name in SPECIAL_TOKENS[2:] if tokens[name] is not None)
    return ChatTemplate(source, tokens["bos_token"], tokens["eos_token"], other_tokens=others)


def _tokenizer_config(folder: Path | None) -> dict:
    """A model folder's tokenizer_config.json ({} when it has none); CheckpointError when it is not a JSON
    object (its template and bos / eos text would be lost without a word)."""
    return {} if folder is None else _json_object(Path(folder) / "tokenizer_config.json")


def _json_object(path: Path) -> dict:
    """A tokenizer file's JSON object ({} when there is no such file); CheckpointError naming it otherwise."""
    if not path.is_file():
        return {}
    try:
        config = json_loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path.name} must be a JSON object, got {type(config).__name__}")
    return config


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
    return _template(source, *_tokenizer_files(folder))


def find_chat_template(folder: Path | None) -> ChatTemplate | None:
    """The template of a model folder, or None."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        config, mapped = _tokenizer_files(folder)
    except CheckpointError as exc:
        return _unusable(str(exc))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            source = jinja_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return _unusable(f"{jinja_file.name} cannot be read: {exc}")
    else:
        raw = config.get("chat_template")
        if raw is None or raw == "" or raw == []:
            return None
        if isinstance(raw, list):  # transformers' named templates: the one named "default" is used
            named = [t for t in raw if isinstance(t, dict) and isinstance(t.get("name"), str)]
            if len(named) != len(raw) or not all(isinstance(t.get("template"), str) for t in named):
                return _unusable("tokenizer_config.json: chat_template must be a list of {name, template} objects")
            raw = {t["name"]: t["template"] for t in named}.get("default")
            if raw is None:
                names = ", ".join(t["name"] for t in named)
                return _unusable(f"tokenizer_config.json has named chat templates ({names}) and none named 'default'")
        if not isinstance(raw, str):
            return _unusable(f"tokenizer_config.json: chat_template must be a string, got {type(raw).__name__}")
        source = raw
    if not source.strip():
        return None
    return _template(source, config, mapped)


def _unusable(problem: str) -> ChatTemplate:
    """The template of a folder whose template field is malformed: loading and plain prompts work, chatting
    says what is wrong (rather than "no chat template")."""
    return ChatTemplate("", problem=f"this model's chat template cannot be used: {problem}")


def check_messages(messages: object) -> list[dict]:
    """OpenAI chat messages: a non-empty list of {"role": str, "content": str or text parts}; an assistant message
    with ``tool_calls`` may have no content (None), and its calls' JSON ``arguments`` reach the template as
    objects (vLLM's rule: templates render them with ``tojson``)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"messages[{i}] must be an object with a string 'role'")
        check_unicode(f"messages[{i}].role", m["role"])
        content = m.get("content")
        if "tool_calls" in m and m["tool_calls"] is not None:
            m = {**m, "tool_calls": _tool_calls(m["tool_calls"], i)}
            if content is None:
                out.append(m)
                continue
        if isinstance(content, list):  # content parts: text only, joined by newlines as vLLM joins them
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InputError(
                    f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported"
                )
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or a list of text parts")
        check_unicode(f"messages[{i}].content", content)
        out.append({**m, "content": content})
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's ``tool_calls``: {"id", "type": "function", "function": {"name", "arguments": JSON
    text}} each, the arguments parsed (an object, as templates expect)."""
    if not isinstance(calls, list):
        raise InputError(f"messages[{i}].tool_calls must be a list of calls, got {calls!r:.200}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InputError(
                f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', 'function': {{'name', ...}}}}"
            )
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json_loads(arguments)
            except ValueError as exc:
                raise InputError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {exc}") from None
        out.append({**call, "function": {**fn, "arguments": arguments}})
    return out


# The ``{% generation %}`` blocks' character spans while a conversation is rendered for training (None: not
# tracking): the chunks rendered so far and the spans found.
_SPANS: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "latentrt_generation_spans", default=None
)


@cache
def _generation_block():
    """The jinja2 extension of the ``{% generation %}`` block: its body, rendered as is; while a training
    conversation is rendered it also records where the body starts and ends in the output (transformers'
    ``AssistantTracker``, which ``return_assistant_tokens_mask`` reads)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            text = caller()
            tracking = _SPANS.get()
            if tracking is not None:
                rendered, spans = tracking
                start = sum(len(chunk) for chunk in rendered)
                spans.append((start, start + len(text)))
            return text

    return GenerationBlock


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson`` filter (jinja2's own escapes HTML characters; templates render tools with it)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def _environment():
    """The sandboxed environment transformers renders chat templates in: trim_blocks, lstrip_blocks, loop
    controls, the generation block, its ``tojson``, ``raise_exception`` and ``strftime_now``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    extensions = ["jinja2.ext.loopcontrols", _generation_block()]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def system_opening(system: str | None) -> list[dict]:
    """A conversation's opening: ``system`` as its system message, or nothing."""
    return [] if system is None else [{"role": "system", "content": system}]


def require_template(template: ChatTemplate | None) -> ChatTemplate:
    """``template``, or the error a model without one (or with a malformed one) gets when asked to chat."""
    if template is not None and template.problem:
        raise InputError(f"{template.problem}: give one (--chat-template FILE) or use a plain prompt")
    if template is None:
        raise InputError(
            "this model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): "
            "give one (--chat-template FILE) or use a plain prompt (the server: /v1/completions)"
        )
    return template


def _render(template: ChatTemplate | None, messages, options: ChatOptions, spans: list[tuple[int, int]] | None) -> str:
    """The conversation's text; with ``spans`` (a list) the generation blocks' character spans are added to it."""
    template = require_template(template)
    options.validate()
    messages = check_messages(messages)
    final = messages[-1]["content"]
    if options.continue_final_message and not isinstance(final, str):
        raise InputError("continue_final_message: the final message has no text content to continue")
    if options.continue_final_message:  # transformers: tag the final message, cut the text where the tag is
        messages = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE_TAG}]
    import jinja2

    variables = {**template.token_variables(), **(options.template_kwargs or {})}
    variables.update(
        messages=messages,
        tools=options.tools,  # (as transformers passes them: None without tools, "is defined" either way)
        documents=None,
        add_generation_prompt=options.add_generation_prompt,
    )
    try:
        compiled = _environment().from_string(template.source)
        if spans is None:
            text = compiled.render(**variables)
        else:
            rendered: list[str] = []
            token = _SPANS.set((rendered, spans))
            try:
                rendered.extend(compiled.generate(**variables))
            finally:
                _SPANS.reset(token)
            text = "".join(rendered)
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template rejected the conversation: {exc}") from None
    check_unicode("the rendered conversation (a template variable?)", text)
    if not options.continue_final_message:
        return text
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise InputError(
            "continue_final_message: the chat template does not render the final message as written, so the "
            "model cannot continue it"
        )
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def render_chat(template: ChatTemplate | None, messages: list[dict], options: ChatOptions | None = None) -> str:
    """The prompt text of a conversation (a 400-worthy InputError when the model has no template or the
    template rejects the conversation); ``options``: how (default: with the generation prompt)."""
    return _render(template, messages, options or ChatOptions(), None)


def chat_prompt_ids(
    template: ChatTemplate | None, tokenizer: Tokenizer | None, messages: list[dict], options: ChatOptions | None = None
) -> list[int]:
    """A conversation's prompt ids: rendered with ``template`` (and ``options``), tokenized without adding
    special tokens."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer.json: chat needs one")
    ids = tokenizer.encode(render_chat(template, messages, options), add_special_tokens=False).ids
    if not ids:
        raise InputError("the rendered conversation is empty")
    return ids


GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers finds the block in a template
LOSS_ON = ("assistant", "all")  # which tokens of a conversation a fine-tuning loss is on


def check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise InputError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")


def chat_training_ids(
    template: ChatTemplate | None, tokenizer: Tokenizer | None, messages: list[dict], loss_on: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """A conversation as training data, as transformers' ``apply_chat_template(messages,
    add_generation_prompt=False, return_assistant_tokens_mask=True)`` gives it (what Huginn's fine-tuning
    script trains on): the ids (rendered without a generation prompt, tokenized without adding special
    tokens) and which of them the loss is on: with ``loss_on="assistant"`` every token overlapping a
    ``{% generation %}`` block (the assistant's turns in Huginn-0125's template), with ``"all"`` every token."""
    check_loss_on(loss_on)
    if tokenizer is None:
        raise InputError("this model has no tokenizer.json: chat needs one")
    if loss_on == "assistant" and template is not None and not GENERATION_TAG.search(require_template(template).source):
        raise InputError(
            "the chat template has no {% generation %} block marking the assistant's tokens, so there is nothing "
            "to train on with loss_on='assistant' (loss_on='all' trains on every token)"
        )
    spans: list[tuple[int, int]] = []
    rendering = ChatOptions(add_generation_prompt=False)
    encoding = tokenizer.encode(_render(template, messages, rendering, spans), add_special_tokens=False)
    if loss_on == "all":
        return list(encoding.ids), [True] * len(encoding.ids)
    mask, k = [False] * len(encoding.ids), 0
    for i, (start, end) in enumerate(encoding.offsets):  # both in order: one pass
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[i] = end > spans[k][0]
    return list(encoding.ids), mask


class ChatModel(Protocol):
    """What chatting reads of a model (a LatentModel, latentrt/models/base.py, above this module): its
    tokenizer and the folder its template and special tokens come from."""

    tokenizer: Tokenizer | None
    folder: Path | None


def chat_template_for(model: ChatModel, template: ChatTemplate | str | Path | None = None) -> ChatTemplate | None:
    """The template ``model`` chats with: ``template`` (a ``ChatTemplate``, or a template file's path, read
    with the model folder's bos / eos), else the model folder's own (None when it has none)."""
    if not hasattr(model, "tokenizer"):
        raise not_a_model(model)
    if template is not None and not isinstance(template, (ChatTemplate, str, Path)):
        raise InputError(f"template must be a ChatTemplate or a template file's path, got {type(template).__name__}")
    folder = getattr(model, "folder", None)
    if isinstance(template, (str, Path)):
        return chat_template_file(template, folder)
    adapter = getattr(model, "adapter_folder", None)  # a LoRA fine-tune's own template (latentrt train's files)
    if template is None and adapter is not None and (Path(adapter) / "chat_template.jinja").is_file():
        return chat_template_file(Path(adapter) / "chat_template.jinja", folder)
    return template if template is not None else find_chat_template(folder)


def apply_chat_template(
    model: ChatModel,
    messages: list[dict],
    template: ChatTemplate | str | Path | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    **template_kwargs,
) -> list[int]:
    """The prompt ids of a conversation (OpenAI-style ``messages``) for ``model``, as HF's
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` gives them and the server's chat
    route runs them: ``generate(model, apply_chat_template(model, messages))``. ``template``: as
    ``chat_template_for``'s; ``continue_final_message=True`` (with ``add_generation_prompt=False``) ends inside
    the last message, for the model to continue it; ``tools``: the functions the template shows the model (HF's
    ``tools``, as JSON schemas); other keywords are template variables (as HF's)."""
    options = ChatOptions(add_generation_prompt, continue_final_message, template_kwargs or None, tools)
    return chat_prompt_ids(chat_template_for(model, template), model.tokenizer, messages, options)
