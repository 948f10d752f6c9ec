"""Stop strings matched on the decoded text: the ``stop`` entries given as strings (token ids are stop
tokens, checked on the device with the sampled ids).

A string, e.g. ``"Question:"`` or ``"\\n\\n"``, one token or several, is matched here, on the host, on each
sequence's generated text after every token (as vLLM's and OpenAI's ``stop``): the sequence stops at the
token that completes the string (its tokens keep that token), and its text ends just before the string.
While streaming, text that might be the beginning of a stop string is held back until the next tokens say
whether it is, so the streamed pieces always add up to the final text (latentrt/sequence_text.py).
"""

from __future__ import annotations


class StopStrings:
    """The stop strings of one generate() call (or one served request)."""

    def __init__(self, strings: list[str]) -> None:
        self.strings = tuple(dict.fromkeys(strings))
        self.longest = max((len(s) for s in self.strings), default=0)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def cut(self, text: str, start: int = 0) -> int | None:
        """Where the first stop string in ``text`` that begins at ``start`` or later begins (the text ends
        there), or None."""
        found = [j for j in (text.find(s, start) for s in self.strings) if j >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` may begin a stop string (a stream holds them back)."""
        held = 0
        for s in self.strings:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held
