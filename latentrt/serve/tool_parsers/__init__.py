"""Parsers of a model's own tool-call format, for ``tool_choice: "auto"`` (vLLM's ``--tool-call-parser``).

With ``auto`` the model decides between text and calls, in the format it was trained on; a parser finds the
calls in its text. One parser per file, registered here by vLLM's name. A parser says two things:

- ``split(text) -> (end, begun)``: how much of the text so far is surely the message's content (streamed as it
  comes), and whether the calls have begun there (then the rest is held until the text ends); where the text's
  end may yet begin the calls (a part of ``<tool_call>``), it is held back until it shows which. As the text
  grows, ``end`` never falls and ``begun`` never turns false (what went out stays out);
- ``extract(text) -> (content, calls)``: the whole text's content (None: none) and calls, each a
  ``(name, arguments as JSON text)``; no calls (and the text as content) where they do not parse.

The calls are taken as the model wrote them: a function that is not among the request's tools is passed on
(as vLLM does; the client decides).
"""

from __future__ import annotations

from ...errors import InputError
from .base import ToolParser
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser

PARSERS: dict[str, type] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
}


def tool_parser(name: str) -> ToolParser:
    """The parser vLLM names ``name``; an InputError listing the names otherwise."""
    if name not in PARSERS:
        raise InputError(f"tool-call parser {name!r:.100} is not one of {sorted(PARSERS)}")
    return PARSERS[name]()
