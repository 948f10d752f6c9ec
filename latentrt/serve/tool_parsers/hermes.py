"""Hermes' tool-call format (NousResearch Hermes 2 Pro and later, Qwen 2.5/3): each call a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``, after the message's text
if any. As vLLM's ``hermes`` parser reads it: the content is the text before the first ``<tool_call>`` (None if
empty), a last call left open (the text ended first) still counts, and if any call's JSON does not parse there
are no calls (the whole text is the content)."""

from __future__ import annotations

import json
import re

from ...errors import json_loads
from .base import held_suffix

START, END = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


class HermesParser:
    name = "hermes"

    def split(self, text: str) -> tuple[int, bool]:
        at = text.find(START)
        if at >= 0:
            return at, True
        return len(text) - held_suffix(text, START), False

    def extract(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        at = text.find(START)
        if at < 0:
            return text, []
        try:
            calls = []
            for closed, left_open in CALL.findall(text):
                call = json_loads(closed or left_open)
                calls.append((_name(call), json.dumps(call["arguments"], ensure_ascii=False)))
        except (ValueError, TypeError, KeyError):
            return text, []
        return text[:at] or None, calls


def _name(call: dict) -> str:
    if not isinstance(call["name"], str):
        raise TypeError("a call's name is text")
    return call["name"]
