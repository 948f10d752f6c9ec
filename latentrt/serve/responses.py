"""OpenAI's Responses API (``POST /v1/responses``), as vLLM serves it, over the chat route's machinery.

A request's ``instructions`` (a system message) and ``input`` (text, or a list of messages and of ``function_call``
/ ``function_call_output`` items) become the conversation the chat template renders; its options become the chat
request's (``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` as ``response_format``, function
``tools`` and ``tool_choice`` as serve/tools.py takes them, latentrt's extra fields, and vLLM's extra sampling and
stopping fields). The answer is a ``response`` object whose ``output`` holds one message of ``output_text``, the
function calls the tool choice made, or (``auto``) the message of the text before the calls, then the calls;
``stream: true`` sends the Responses API's typed events. Nothing is stored
(vLLM's default): ``previous_response_id`` is a 400, and the response says ``store: false``. Built-in tools (web
search...), images and ``truncation: auto`` are 400s.
"""

from __future__ import annotations

import time
import uuid

from ..errors import InputError, check_unicode
from .protocol import LATENT_FIELDS, check_fields
from .tools import ToolChoice

FIELDS = {
    *("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text", "tools"),
    *("tool_choice", "parallel_tool_calls", "store", "metadata", "user", "truncation", "previous_response_id"),
    *("reasoning", "seed", "include", "background", "stream_options"),
} | set(LATENT_FIELDS)
# the chat route's fields a Responses body may carry as they are (vLLM's extra sampling and stopping fields)
PASSED = ("stop", "stop_token_ids", "ignore_eos", "min_tokens", "structured_outputs", "presence_penalty")
PASSED += ("frequency_penalty", "logit_bias", "priority")
FIELDS |= set(PASSED)
NEUTRAL = {
    "truncation": (None, "disabled"),
    "reasoning": (None, {}),
    "include": (None, []),
}
NEUTRAL_WHY = {
    "truncation": "latentrt does not cut conversations: a prompt past the context is a 400",
    "reasoning": "latentrt's models reason in latent space (num_steps, num_thoughts), not in reasoning tokens",
    "include": "latentrt has no extra output to include",
}
TO_CHAT = {name: name for name in ("temperature", "top_p", "stream", "seed", "user", *PASSED)}


def to_chat(body, history: list[dict] | None = None) -> dict:
    """The chat body a Responses body asks for (an InputError naming what latentrt does not take); ``history``:
    the conversation its ``previous_response_id`` continues (the store's), None without a store."""
    check_fields(body, FIELDS, "/v1/responses", neutral=NEUTRAL, why=NEUTRAL_WHY)
    previous = body.get("previous_response_id")
    if previous is not None and history is None:
        raise InputError(
            f"previous_response_id={previous!r:.100} is not supported: this server stores no responses (start it "
            "with --enable-responses-api-store), so send the conversation in input"
        )
    if body.get("store") not in (None, True, False):
        raise InputError(f"store must be true or false, got {body['store']!r:.100}")
    if body.get("background") not in (None, False):
        raise InputError("background responses are not supported: latentrt answers each response as it runs")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(f"metadata must be an object of strings, got {metadata!r:.100}")
    for name, text in [
        ("user", body.get("user")),
        *((f"metadata[{k!r}]", f"{k}{v}") for k, v in (metadata or {}).items()),
    ]:
        if isinstance(text, str):
            check_unicode(name, text)  # (echoed in the response)
    chat = {name: body[name] for name in LATENT_FIELDS if name in body}
    chat.update({TO_CHAT[name]: body[name] for name in TO_CHAT if name in body})
    chat["messages"] = _messages(body.get("instructions"), body.get("input"), history or [])
    if body.get("model") is not None:
        chat["model"] = body["model"]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream_options") is not None:
        chat["stream_options"] = body["stream_options"]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
            raise InputError(f"text must be an object {{'format': {{...}}}}, got {text!r:.100}")
        if text.get("format") is not None:
            chat["response_format"] = _format(text["format"])
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InputError(f"tools must be a list of function tools, got {tools!r:.100}")
    if tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    return chat


def _format(fmt) -> dict:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object") and set(fmt) == {"type"}:
        return {"type": kind}
    if kind == "json_schema" and set(fmt) <= {"type", "name", "schema", "strict", "description"}:
        spec = {k: v for k, v in fmt.items() if k != "type"}
        return {"type": "json_schema", "json_schema": spec}
    raise InputError(
        "text.format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'name': ..., "
        f"'schema': {{...}}}}, got {fmt!r:.200}"
    )


def _tool(tool, i: int) -> dict:
    """A Responses function tool (flat: name, parameters... beside its type) as the chat route's."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise InputError(f"tools[{i}]: only function tools are supported, got {kind!r:.100}")
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def _text(content, where: str) -> str:
    """A message's content: text, or a list of input_text / output_text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in ("input_text", "output_text") and isinstance(p.get("text"), str)
        for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise InputError(f"{where}.content must be text or a list of input_text parts (no images, files or audio)")


def _messages(instructions, items, history: list[dict]) -> list[dict]:
    """The conversation: the instructions as a system message, the turns before (``history``), then the input's
    items (a text is one user message; function calls join an assistant message's tool_calls, their outputs are
    tool messages)."""
    messages = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InputError(f"instructions must be a string, got {instructions!r:.100}")
        messages.append({"role": "system", "content": instructions})
    messages += history
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise InputError("input must be a text or a non-empty list of messages")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments")}
            if not all(isinstance(v, str) for v in (call["id"], item.get("name"), item.get("arguments"))):
                raise InputError(f"{where}: a function_call has string call_id, name and arguments")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise InputError(f"{where}: a function_call_output has string call_id and output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:
            raise InputError(
                f"{where} must be a message {{'role', 'content'}}, a function_call or a function_call_output, got "
                f"{item!r:.200}"
            )
    return messages


def conversation_of(body: dict, chat: dict, output: list[dict]) -> list[dict]:
    """What a stored response keeps for a next turn: its chat messages without its instructions' system message,
    then its answer as one assistant message (its text, and its calls with the ids the client was given)."""
    messages = chat["messages"][1:] if body.get("instructions") is not None else list(chat["messages"])
    text = [part["text"] for item in output if item["type"] == "message" for part in item["content"]]
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    answer = {"role": "assistant", "content": "".join(text) if text else None}
    return [*messages, answer | {"tool_calls": calls} if calls else answer]


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(req, tool_choice: ToolChoice | None) -> list[dict]:
    """A finished request's ``output``: its message, or the calls its text makes (after its message where the
    text before them is one: "auto")."""
    if tool_choice is not None:
        message, _ = tool_choice.message(req.text, req.finish_reason)
        if message.get("tool_calls"):
            calls = [_call_item(c) for c in message["tool_calls"]]
            text = message["content"]
            return calls if text is None else [message_item(new_item_id("msg"), text, "completed"), *calls]
    status = "incomplete" if req.finish_reason == "length" else "completed"
    return [message_item(new_item_id("msg"), req.text, status)]


def message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _call_item(call: dict, status: str = "completed") -> dict:
    fn = call["function"]
    return {
        "type": "function_call",
        "id": new_item_id("fc"),
        "call_id": call["id"],
        "name": fn["name"],
        "arguments": fn["arguments"],
        "status": status,
    }


def response_body(
    rid: str, model: str, body: dict, created: int, req=None, output=None, status=None, stored: bool = False
) -> dict:
    """The response object (``req`` None: one still in progress, for a stream's first events; ``stored``: whether
    the server keeps it)."""
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    out = {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status or "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "output": output or [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "text": {"format": fmt},
        "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "store": stored,
        "user": body.get("user"),
        "usage": None,
    }
    if req is not None:
        out["status"] = status or ("incomplete" if req.finish_reason == "length" else "completed")
        if out["status"] == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        done = len(req.tokens)
        out["usage"] = {
            "input_tokens": req.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": done,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.prompt_tokens + done,
            "latent_iterations": req.latent_work,
        }
    return out


class ResponseEvents:
    """The typed events of a streamed response, numbered (``sequence_number``) as they go out."""

    def __init__(self, rid: str, model: str, body: dict, tool_choice: ToolChoice | None, stored: bool = False) -> None:
        self.rid, self.model, self.body, self.tool_choice, self.stored = rid, model, body, tool_choice, stored
        self.created = int(time.time())
        self.number = 0
        self.item_id = new_item_id("fc" if tool_choice is not None and tool_choice.name else "msg")
        self.call = None if tool_choice is None else tool_choice.stream()
        self.opened = False  # (whether the message item is open: its text streams)

    def _event(self, kind: str, **fields) -> dict:
        self.number += 1
        return {"type": kind, "sequence_number": self.number - 1, **fields}

    def start(self) -> list[dict]:
        """The response created and in progress, its output item and (for text) its content part opened."""
        progress = response_body(self.rid, self.model, self.body, self.created, stored=self.stored)
        out = [
            self._event("response.created", response=progress),
            self._event("response.in_progress", response=progress),
        ]
        if self.tool_choice is not None:  # (calls come as they are known, text with its first delta: tools.py)
            return out
        return out + self._open_message()

    def _open_message(self) -> list[dict]:
        self.opened = True
        item = {**message_item(self.item_id, "", "in_progress"), "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event(
                "response.content_part.added", item_id=self.item_id, output_index=0, content_index=0, part=part
            ),
        ]

    def _text(self, text: str) -> list[dict]:
        out = [] if self.opened else self._open_message()
        delta = dict(item_id=self.item_id, output_index=0, content_index=0, delta=text, logprobs=[])
        return out + [self._event("response.output_text.delta", **delta)]

    def _close_message(self, item: dict) -> list[dict]:
        part, where = item["content"][0], dict(item_id=self.item_id, output_index=0, content_index=0)
        return [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=0, item=item),
        ]

    def delta(self, text: str) -> list[dict]:
        """The events for new text."""
        if not text:
            return []
        if self.tool_choice is None:
            return self._text(text)
        delta = self.call.delta(text)
        if delta is None:
            return []
        if "content" in delta:  # ("auto": the text before any call)
            return self._text(delta["content"])
        call = delta["tool_calls"][0]
        out = []
        if "id" in call:  # (a named call's first text: its item opens)
            item = _call_item(call, "in_progress") | {"id": self.item_id, "arguments": ""}
            out.append(self._event("response.output_item.added", output_index=0, item=item))
        out.append(
            self._event(
                "response.function_call_arguments.delta",
                item_id=self.item_id,
                output_index=0,
                delta=call["function"]["arguments"],
            )
        )
        return out

    def end(self, req) -> list[dict]:
        """The closing events and the completed (or incomplete) response."""
        out = []
        if self.tool_choice is None or self.tool_choice.auto:
            if self.tool_choice is not None:  # (text held back while it might have begun a call)
                last, _ = self.call.end(req.finish_reason)
                if last is not None and last.get("content"):
                    out += self._text(last["content"])
            items = output_items(req, self.tool_choice)
            if self.opened:  # (the streamed message: its own id; its status the finish reason's)
                items[0] |= {"id": self.item_id}
                out += self._close_message(items[0])
            out += self._whole_items(items, 1 if self.opened else 0)
        else:
            items = output_items(req, self.tool_choice)
            if self.tool_choice.name is not None and items[0]["type"] == "function_call":
                items[0]["id"] = self.item_id
                if self.call.id is None:  # (no text came: the item opens now)
                    opened = items[0] | {"status": "in_progress", "arguments": ""}
                    out.append(self._event("response.output_item.added", output_index=0, item=opened))
                out.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=self.item_id,
                        output_index=0,
                        arguments=items[0]["arguments"],
                    )
                )
                out.append(self._event("response.output_item.done", output_index=0, item=items[0]))
            else:  # (required calls, or text the calls did not parse from: each item whole)
                out += self._whole_items(items, 0)
        final = response_body(self.rid, self.model, self.body, self.created, req, items, stored=self.stored)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, response=final))
        return out

    def _whole_items(self, items: list[dict], first: int) -> list[dict]:
        """Each item from ``first`` on, added and done at once."""
        out = []
        for k, item in enumerate(items[first:], start=first):
            out.append(self._event("response.output_item.added", output_index=k, item=item | {"status": "in_progress"}))
            if item["type"] == "function_call":
                out.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=k,
                        arguments=item["arguments"],
                    )
                )
            out.append(self._event("response.output_item.done", output_index=k, item=item))
        return out

    def error(self, status: int, message: str, kind: str) -> dict:
        return self._event("error", code=kind, message=message, param=None)
