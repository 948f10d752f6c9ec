"""Llama 3.1/3.2's JSON tool-call format: the whole answer is calls, each a JSON object ``{"name": ...,
"parameters": {...}}`` (or ``"arguments"``), separated by ``;``, optionally after ``<|python_tag|>``. As vLLM's
``llama3_json`` parser reads it: an answer that does not begin with ``{`` or ``<|python_tag|>`` is text, and one
that does but does not parse as calls is text too; calls have no content."""

from __future__ import annotations

import json

TAG = "<|python_tag|>"
DECODER = json.JSONDecoder()


class Llama3JsonParser:
    name = "llama3_json"

    def split(self, text: str) -> tuple[int, bool]:
        if text.startswith(TAG) or text.startswith("{"):
            return 0, True
        if TAG.startswith(text):  # (nothing yet, or the tag's beginning: wait)
            return 0, False
        return len(text), False

    def extract(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        if not (text.startswith(TAG) or text.startswith("{")):
            return text, []
        at, calls = len(TAG) if text.startswith(TAG) else 0, []
        try:
            while True:
                call, at = DECODER.raw_decode(text, at)
                args = call["arguments"] if "arguments" in call else call["parameters"]
                if not isinstance(call["name"], str):
                    raise TypeError("a call's name is text")
                calls.append((call["name"], json.dumps(args, ensure_ascii=False)))
                rest = text[at:].lstrip()
                if not rest:
                    return None, calls
                if not rest.startswith(";"):
                    raise ValueError("calls are separated by ';'")
                at = len(text) - len(rest[1:].lstrip())
        except (ValueError, TypeError, KeyError, RecursionError):
            return text, []
