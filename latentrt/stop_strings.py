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

    def __bool__(self) -> bool:
        return bool(self.strings)

    def cut(self, text: str, new: int = 0, keep: bool = False) -> int | None:
        """Where the text ends at the first stop string in ``text`` that ends after ``new`` (where the text the
        last token added begins: each string is looked for from its own length before it, as vLLM's, so one
        that ended before, while ``min_new_tokens`` held stops back, is not found again): where the string
        begins, or with ``keep`` (vLLM's ``include_stop_str_in_output``) where it ends; None if there is none."""
        found = [(j, -len(s)) for s, j in ((s, text.find(s, max(0, new - len(s) + 1))) for s in self.strings) if j >= 0]
        if not found:
            return None
        begin, minus_length = min(found)  # the first to begin (of two there, the longer: both are complete)
        return begin - minus_length if keep else begin

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` may begin a stop string (a stream holds them back)."""
        held = 0
        for s in self.strings:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held
