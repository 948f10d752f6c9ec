"""What a tool-call parser is (tool_parsers/__init__.py says what its two methods answer), and a helper."""

from __future__ import annotations

from typing import Protocol


class ToolParser(Protocol):
    name: str

    def split(self, text: str) -> tuple[int, bool]: ...

    def extract(self, text: str) -> tuple[str | None, list[tuple[str, str]]]: ...


def held_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (held back: it may be the marker's start)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
