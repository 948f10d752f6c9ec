"""OpenAI function calling on the chat route, as vLLM serves it for any model.

``tools`` reach the chat template as its ``tools`` variable (as transformers passes them), so a template that
shows functions to the model shows these. ``tool_choice``:

- a named function (``{"type": "function", "function": {"name": ...}}``): the model's text is that call's
  arguments, held to the function's ``parameters`` schema by structured outputs (``guided_json``,
  latentrt/structured.py); the message holds the call (``finish_reason`` "stop", OpenAI's for a forced call);
- ``"required"``: the text is a JSON array of one or more ``{"name", "parameters"}`` objects, each a function
  of ``tools`` with its own schema (vLLM's schema; at most one with ``parallel_tool_calls: false``); the message
  holds the calls (``finish_reason`` "tool_calls");
- ``"none"`` (the default without tools): text, as without tools;
- ``"auto"`` (OpenAI's default with tools): the model decides between text and calls, in its own tool-call
  format, which the server's parser reads (``--enable-auto-tool-choice --tool-call-parser NAME``, vLLM's flags;
  serve/tool_parsers/); the message holds the text before the calls as its content and the calls
  (``finish_reason`` "tool_calls"), or the text alone where it makes none or they do not parse. Nothing
  constrains the text. A server started without a parser answers 400 naming the flags (as vLLM does).
  ``parallel_tool_calls`` does not bind it (as in vLLM): the calls are the model's.

A call's text cut by ``max_tokens`` is kept as it is: a named call's arguments (vLLM's), a required one as the
message's content with no calls (it does not parse).

Streamed, a named call's arguments go out as they come; "required" calls whole at the end (a partial JSON array
names no call yet); with "auto" the content goes out as it comes until the calls begin (text that may begin
them, such as a part of ``<tool_call>``, held until it shows which), and the calls whole at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import InputError, json_loads
from .tool_parsers import ToolParser

MAX_TOOLS = 128  # OpenAI's bound
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters takes none


@dataclass(frozen=True)
class ToolChoice:
    """A chat request's tools and how one must be called: ``name`` (one function), ``required`` (any), or as
    the model decides (``parser``: "auto")."""

    tools: tuple[dict, ...]
    name: str | None = None
    required: bool = False
    parallel: bool = True
    parser: ToolParser | None = None

    @property
    def calls(self) -> bool:
        """Whether the answer is calls (else text), held to their schemas."""
        return self.name is not None or self.required

    @property
    def auto(self) -> bool:
        """Whether the model decides between text and calls (which the parser finds: only "auto" has one)."""
        return self.parser is not None

    def guided_json(self) -> dict:
        """The schema the text follows."""
        params = {t["function"]["name"]: t["function"].get("parameters") or EMPTY_PARAMETERS for t in self.tools}
        if self.name is not None:
            return params[self.name]
        one_of = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
            }
            for name, schema in params.items()
        ]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
        return array if self.parallel else {**array, "maxItems": 1}

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message for a choice's text, and its finish reason."""
        if self.name is not None:
            return _message([_call(self.name, text)]), finish_reason
        if self.auto:
            content, found = self.parser.extract(text)
            if not found:
                return {"role": "assistant", "content": text}, finish_reason
            return _message([_call(name, args) for name, args in found], content), "tool_calls"
        made = self._required_calls(text)
        if made is None:  # (cut by max_tokens or a stop string: no whole array)
            return {"role": "assistant", "content": text}, finish_reason
        return _message(made), "tool_calls" if finish_reason == "stop" else finish_reason

    @staticmethod
    def _required_calls(text: str) -> list[dict] | None:
        try:
            return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json_loads(text)]
        except (ValueError, TypeError, KeyError):
            return None

    def stream(self) -> ToolStream:
        """A streamed choice's deltas."""
        return ToolStream(self)


class ToolStream:
    """One streamed choice as OpenAI streams it (the module's docstring says what goes out when)."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.id: str | None = None
        self.text = ""
        self.sent = 0  # (auto: how much of the text went out as content)
        self.begun = False  # (auto: whether the calls began)

    def delta(self, text: str) -> dict | None:
        """The delta for new text (None: nothing to send yet)."""
        self.text += text
        if self.choice.auto:
            return self._content()
        if self.choice.name is None or not text:
            return None
        if self.id is None:
            call = _call(self.choice.name, text)
            self.id = call["id"]
            return {"tool_calls": [{"index": 0, **call}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def _content(self) -> dict | None:
        if self.begun:
            return None
        end, self.begun = self.choice.parser.split(self.text)  # (never below what went out: a parser's rule)
        out, self.sent = self.text[self.sent : end], end
        return {"content": out} if out else None

    def end(self, finish_reason: str) -> tuple[dict | None, str]:
        """The last delta (None: none) and the finish reason, once the choice's text is whole."""
        if self.choice.name is not None:
            first = None if self.id is not None else {"tool_calls": [{"index": 0, **_call(self.choice.name, "")}]}
            return first, finish_reason
        message, finish = self.choice.message(self.text, finish_reason)
        if message.get("tool_calls") is None:
            rest = self.text[self.sent :]
            return ({"content": rest} if rest or not self.choice.auto else None), finish
        return {"tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]}, finish


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _message(calls: list[dict], content: str | None = None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": calls}


def parse_tools(body: dict, parser: ToolParser | None = None) -> ToolChoice | None:
    """A chat body's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked; None without tools.
    ``parser``: the server's reader of the model's tool-call format ("auto" needs one)."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InputError(f"parallel_tool_calls must be true or false, got {parallel!r:.200}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise InputError(f"tool_choice {choice!r:.200} needs tools (the functions to call)")
        return None
    checked = _check_tools(tools)
    names = [t["function"]["name"] for t in checked]
    if choice is None or choice == "auto":
        if parser is not None:
            return ToolChoice(checked, parallel=parallel is not False, parser=parser)
        raise InputError(
            "tool_choice 'auto' (the default with tools) needs a parser of the model's own tool-call format: start "
            "the server with --enable-auto-tool-choice --tool-call-parser NAME, or give tool_choice 'required' or "
            "{'type': 'function', 'function': {'name': ...}} (the call's arguments then follow its parameters' "
            "schema), or 'none'"
        )
    if choice == "none":
        return ToolChoice(checked)
    if choice == "required":
        return ToolChoice(checked, required=True, parallel=parallel is not False)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InputError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}, "
            f"got {choice!r:.200}"
        )
    if name not in names:
        raise InputError(f"tool_choice names {name!r:.100}, which is not among the tools {names}")
    return ToolChoice(checked, name=name)


def _check_tools(tools) -> tuple[dict, ...]:
    if not isinstance(tools, list):
        raise InputError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r:.200}")
    if len(tools) > MAX_TOOLS:
        raise InputError(f"tools takes at most {MAX_TOOLS} functions, got {len(tools)}")
    seen = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) != {"type", "function"}:
            raise InputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r:.200}")
        if not isinstance(fn, dict) or set(fn) - FUNCTION_FIELDS:
            extra = sorted(set(fn) - FUNCTION_FIELDS) if isinstance(fn, dict) else fn
            raise InputError(f"tools[{i}].function takes {sorted(FUNCTION_FIELDS)}, got {extra!r:.200}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r:.100}")
        if name in seen:
            raise InputError(f"tools[{i}]: a second function named {name!r}")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise InputError(f"tools[{i}].function.description must be a string, got {fn['description']!r:.100}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InputError(f"tools[{i}].function.parameters must be a JSON schema (an object)")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise InputError(f"tools[{i}].function.strict must be true or false, got {fn['strict']!r:.100}")
    return tuple(tools)
