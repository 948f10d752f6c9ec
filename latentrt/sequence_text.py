"""The text of one generated sequence as it grows: what a stream shows and where a stop string ends it.

Each new token is decoded with a few tokens of context (the ``tokenizers`` library's ``DecodeStream``, the
incremental detokenization vLLM does too), so a token costs the same at position 10 and at 10,000; decoding
the whole text again at every token is O(length^2) (0.9 ms a token at 1,200 tokens with the built-in word
tokenizer on a CPU; 13 us incrementally, at any length). A character that spans tokens comes out whole: an
incomplete one is held back until it completes. Stop strings (latentrt/stop_strings.py) are searched only
where the new text can complete one, and a stream is shown the text less an end that may begin one.

The final text is the whole decode, once (``tokenizer.decode(tokens, skip_special_tokens=...)``, up to the
stop string found: what generate() returns); at the end a stream is given what of it was still held back
(an incomplete character, the beginning of a stop string), so its pieces add up to the final text.

Options (generate()'s, as vLLM names them): ``skip_special_tokens`` (default True, as HF's decode and vLLM)
leaves special tokens' text out; ``include_stop_str_in_output`` ends the text after the stop string instead
of before it (nothing is then held back: what may begin a stop string is shown either way).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from .stop_strings import StopStrings

CONTEXT = 8  # tokens of context a restarted decode is given (DecodeStream itself keeps one or two)


class SequenceText:
    """One sequence's text: ``add`` each token it keeps, ``show`` while it runs, ``end`` when it ends;
    ``finish`` gives the final text."""

    def __init__(
        self, tokenizer, stops: StopStrings, skip_special_tokens: bool = True, include_stop_str: bool = False
    ) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.skip_special, self.keep_stop = skip_special_tokens, include_stop_str
        self.ids: list[int] = []
        self.text = ""  # decoded so far (whole characters only)
        self.cut: int | None = None  # where the first stop string begins, once a token completed one
        self._cut_from = 0  # where the new text began at the token that found it (the final text's search too)
        self.shown = 0  # characters a stream has been given
        self.final: str | None = None  # the whole decode, up to the stop string (set by ``finish``)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token: int, may_stop: bool = True) -> None:
        """The sequence keeps ``token``: decode what it adds and look for a stop string it completes (not
        while ``may_stop`` is False: before ``min_new_tokens``, as vLLM's ``min_tokens``, a string completed
        then is not found later)."""
        self.ids.append(token)
        try:
            piece = self._stream.step(self.tokenizer, token)
        except Exception:  # a decoder whose text is not a prefix of the next one's: decode it all again
            piece = self._redecode()
        if not piece:
            return
        start = len(self.text)
        self.text += piece
        if self.stops and self.cut is None and may_stop:
            self.cut, self._cut_from = self.stops.cut(self.text, start, self.keep_stop), start

    def _redecode(self) -> str:
        """The rare decoder that rewrites earlier text (DecodeStream refuses): the whole decode's growth, and
        a fresh incremental decode from here."""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)
        self._stream = DecodeStream(self.ids[-CONTEXT:], skip_special_tokens=self.skip_special)
        piece, self.text = whole[len(self.text) :], whole[: len(self.text)]
        return piece

    def show(self) -> str:
        """What a running stream may show now and has not: the text up to a stop string found, else less an
        end that may begin one."""
        held = 0 if self.keep_stop else self.stops.held(self.text)
        end = self.cut if self.cut is not None else len(self.text) - held
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : end], end
        return piece

    def finish(self, tokens: list[int]) -> str:
        """The final text of the sequence that ended with ``tokens`` (decoded once, then kept in ``final``)."""
        if self.final is None:
            whole = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special)
            cut = self.stops.cut(whole, self._cut_from, self.keep_stop) if self.cut is not None else None
            self.final = whole if cut is None else whole[:cut]
        return self.final

    def end(self, tokens: list[int]) -> str:
        """What of the final text a stream has not been shown (all it held back)."""
        final = self.finish(tokens)
        if self.shown > len(final) or not final.startswith(self.text[: self.shown]):
            return ""  # (only a decoder that rewrites earlier text: the stream showed what the end changed)
        piece, self.shown = final[self.shown :], len(final)
        return piece


def separator(tokenizer, before: list[int], after: list[int], skip_special_tokens: bool = True) -> str:
    """What the tokenizer's decode puts between the text of ``before`` and that of ``after`` when they are one
    sequence: a word-level tokenizer's space, a SentencePiece word's leading space (dropped where a decode
    starts with it); "" where each token carries its own (byte-level BPE: GPT-2, Huginn). A prompt echoed with
    its completion (OpenAI's ``echo``) joins them with it, as vLLM's text decoded in the prompt's context does;
    decoded apart, "Alex" and "is a" fused into "Alexis a". A few tokens either side are enough context."""
    if not before or not after:
        return ""
    head, tail = before[-CONTEXT:], after[:CONTEXT]
    a, b = (tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in (head, tail))
    joined = tokenizer.decode(head + tail, skip_special_tokens=skip_special_tokens)
    if len(joined) >= len(a) + len(b) and joined.startswith(a) and joined.endswith(b):
        return joined[len(a) : len(joined) - len(b)]
    return ""  # (a decoder that merges across the boundary: nothing to insert)
