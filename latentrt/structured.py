"""vLLM's structured outputs ``guided_json``, ``guided_regex`` and ``guided_grammar``: the new text follows a JSON
schema, a regular expression or a context-free grammar (Lark, or llama.cpp's GBNF), then a stop token.

The grammar engine is llguidance (what vLLM's ``guidance`` backend, llama.cpp and SGLang run; the optional
``structured`` extra). It compiles the grammar against the tokenizer's vocabulary and gives, after a sequence's
tokens so far, the tokens that keep its text a prefix of a string of the grammar, and the stop tokens once the text
is a whole string of it; where the grammar leaves one way on (bytes it forces), only the tokenizer's own tokens for
them (llguidance's fast-forward, as in vLLM). After a whole string nothing may extend, only a stop token is left.
The JSON grammar allows whitespace between items, as vLLM's does by default (``disable_any_whitespace=True``: none,
vLLM's option). llguidance reads the tokenizers of GPT-2 and Huginn (byte-level BPE) and SentencePiece-style ones;
a word-level tokenizer (the built-in models') is an error naming it. latentrt/token_constraints.py applies each
sequence's allowed set with the other constraints.
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError, check_unicode, json_loads

NAMES = ("guided_json", "guided_regex", "guided_grammar")
GUIDED = ("guided_choice", *NAMES)  # at most one of these (vLLM's rule)
MAX_GRAMMAR_CHARS = 1_000_000  # a schema, regex or grammar this long is a mistake, not a request worth compiling
INSTALL = "pip install 'latentrt[structured]'"


def check_structured(guided_json, guided_regex, guided_grammar, guided_choice=None) -> None:
    """The options' types, and that at most one guided option is set (the grammar itself is checked against
    the tokenizer by ``compile_grammar``)."""
    given = [n for n, v in zip(GUIDED, (guided_choice, guided_json, guided_regex, guided_grammar)) if v is not None]
    if len(given) > 1:
        raise InputError(f"give one of {', '.join(GUIDED)}, not {len(given)} ({', '.join(given)})")
    if guided_json is not None:
        schema_text(guided_json)
    for name, value in (("guided_regex", guided_regex), ("guided_grammar", guided_grammar)):
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"{name} must be a non-empty string, got {value!r:.200}")
        check_unicode(name, value)
        if len(value) > MAX_GRAMMAR_CHARS:
            raise InputError(f"{name} is {len(value):,} characters; at most {MAX_GRAMMAR_CHARS:,}")


def schema_text(schema) -> str:
    """A JSON schema as JSON text: a dict, the text of a JSON object, or a pydantic model class (its
    ``model_json_schema()``, as vLLM's ``guided_json`` takes one)."""
    if isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None)):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        check_unicode("guided_json", schema)
        try:
            parsed = json_loads(schema)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"guided_json is not JSON text ({exc})") from None
        if not isinstance(parsed, dict):
            raise InputError(f"guided_json must be a JSON schema (an object), got {schema!r:.200}")
        text = schema
    elif isinstance(schema, dict):
        try:
            text = json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InputError(f"guided_json must be a JSON schema of JSON values ({exc})") from None
    else:
        raise InputError(f"guided_json must be a JSON schema: a dict or its JSON text, got {schema!r:.200}")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InputError(f"guided_json is {len(text):,} characters of JSON; at most {MAX_GRAMMAR_CHARS:,}")
    return text


def active(options) -> bool:
    return any(getattr(options, n) is not None for n in NAMES)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InputError(f"guided_json, guided_regex and guided_grammar need llguidance: {INSTALL}") from None
    return llguidance


# llguidance's compiler recurses as deep as a grammar's rules nest: a chain of 3,000 rules (or of JSON schema
# ``$ref``s) overflows a thread's 8 MB of stack and kills the process. Every llguidance call runs on a thread with
# 512 MB of stack (address space, touched only as deep as a grammar goes), enough for any grammar of
# MAX_GRAMMAR_CHARS (a 62,000-rule chain of 0.9 MB compiles in 0.5 s on it). Two such threads: one compiles the
# grammars of requests being submitted (and their first allowed sets, seconds for a pathological grammar), one
# follows the running sequences (each token's set), so a request's compile never holds up the others' tokens.
STACK_BYTES = 512 << 20
WORKERS = ("compile", "step")
_workers: dict[str, ThreadPoolExecutor] = {}
_workers_lock = threading.Lock()


os.register_at_fork(after_in_child=_workers.clear)  # (a forked child has no such threads: it starts its own)


def on_grammar_stack(fn, *args, worker: str = "compile"):
    """``fn(*args)`` on the ``worker`` grammar thread (its exceptions raised here)."""
    with _workers_lock:
        if worker not in _workers:
            old = threading.stack_size(STACK_BYTES)
            try:
                _workers[worker] = ThreadPoolExecutor(1, thread_name_prefix=f"latentrt-grammar-{worker}")
                _workers[worker].submit(int).result()  # (the thread starts now, with that stack)
            finally:
                threading.stack_size(old)
        executor = _workers[worker]
    return executor.submit(fn, *args).result()


def _grammar(options) -> tuple[str, str]:
    """(the option's name, its llguidance grammar)."""
    llg = _llguidance()
    try:
        if options.guided_json is not None:
            flexible = not options.disable_any_whitespace
            text = schema_text(options.guided_json)
            return "guided_json", llg.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": flexible}
            )
        if options.guided_regex is not None:
            return "guided_regex", llg.LLMatcher.grammar_from_regex(options.guided_regex)
        # (GBNF is converted to Lark; Lark is taken as it is)
        return "guided_grammar", llg.grammar_from("grammar", options.guided_grammar)
    except ValueError as exc:  # (a schema nested past serde's 128 levels; GBNF that does not convert)
        name = next(n for n in NAMES if getattr(options, n) is not None)
        raise InputError(f"{name} must be a valid {_WHAT[name]}: {exc}") from None


# one llguidance tokenizer per (tokenizer, vocabulary size, stop tokens): building one reads the whole vocabulary
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, vocab: int, stop_ids: Sequence[int]):
    key = (vocab, tuple(stop_ids))
    held = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in held:
        size = tokenizer.get_vocab_size()
        if size > vocab:
            raise InputError(
                f"structured outputs need every token of the tokenizer in the model's vocabulary: the tokenizer has "
                f"{size}, the model {vocab}"
            )
        try:
            held[key] = _llguidance().LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=list(stop_ids))
        except ValueError as exc:  # (a decoder llguidance does not read)
            raise InputError(
                f"structured outputs need a tokenizer llguidance reads (byte-level BPE as GPT-2's and Huginn's, "
                f"or SentencePiece); this model's: {exc}"
            ) from None
    return held[key]


@dataclass
class Grammar:
    """A call's compiled grammar: ``matcher()`` gives a sequence its own state in it (a copy of the compiled one,
    not a compile again; on the grammar thread)."""

    name: str  # the option that set it
    compiled: object  # an llguidance.LLMatcher at the start, never advanced
    vocab: int

    def matcher(self):
        return self.compiled.deep_copy()


def compile_grammar(options, tokenizer, vocab: int, stop_ids: Sequence[int]) -> Grammar:
    """The call's grammar, checked against the tokenizer before any work: an invalid schema, regex or grammar,
    no tokenizer, no stop token to end the text, are InputErrors."""
    if tokenizer is None:
        raise InputError("structured outputs need a tokenizer (this model has none); use allowed_token_ids")
    name, grammar = on_grammar_stack(_grammar, options)
    if not stop_ids:
        why = "the model names no end-of-text token" if options.default_stops else "default_stops=False"
        raise InputError(f"{name} must end with a stop token and there is none ({why}): give stop=[id]")
    ll = on_grammar_stack(_ll_tokenizer, tokenizer, vocab, stop_ids)
    compiled = on_grammar_stack(lambda: _llguidance().LLMatcher(ll, grammar, log_level=0))
    if compiled.is_error():  # (llguidance's matcher never raises: a grammar it cannot compile leaves it in error)
        raise InputError(f"{name} must be a valid {_WHAT[name]}: {_one_line(compiled.get_error(), name)}")
    return Grammar(name, compiled, vocab)


def _one_line(message: str, name: str) -> str:
    """llguidance's error on one line: its excerpt of the grammar it compiled dropped (``   1 | start: /.../``,
    and for a regex or schema the position in that grammar, which is not the caller's text)."""
    lines = []
    for line in message.splitlines():
        if re.match(r"\s*\d+ \| |<state>", line):
            break
        lines.append(line.strip())
    text = " ".join(x for x in lines if x)
    return re.sub(r"^at \d+\(\d+\): ", "", text) if name != "guided_grammar" else text


_WHAT = {"guided_json": "JSON schema", "guided_regex": "regular expression", "guided_grammar": "grammar"}
_BITS = torch.arange(8, dtype=torch.uint8, device="cpu")


class GrammarState:
    """Each sequence's state in a call's grammar: it follows the tokens the sequence generates. Made when the call
    (or the served request) is, with the first allowed set: a grammar llguidance cannot start is an InputError
    then, before any work, and a slow start is spent off the sequences' steps."""

    def __init__(self, grammar: Grammar, batch: int) -> None:
        self.grammar = grammar
        self.matchers, first = on_grammar_stack(self._start, batch)
        self.followed = [0] * batch  # how many of each sequence's new tokens its matcher has taken
        self.last: list[Tensor | None] = [first] * batch  # the allowed set each was last given
        self.off = [False] * batch  # given a token its set had not (a row flagged with none: it raises)

    def _start(self, batch: int) -> tuple[list, Tensor]:
        matchers = [self.grammar.matcher() for _ in range(batch)]
        return matchers, self._mask(matchers[0], 0)

    def allowed(self, generated: dict[int, Sequence[int]]) -> dict[int, Tensor]:
        """Each asked sequence's allowed next tokens [vocab] bool (on the host) after its new tokens
        (``generated``: sequence -> its new tokens); none after a token its last set had not. A token its set
        had that llguidance then refuses (one of its limits hit: a regex of a million states), or a set it cannot
        compute, is an InputError."""
        if all(not tokens for tokens in generated.values()):  # (the first token: the sets made with the state)
            return {b: self.last[b] for b in generated}
        return on_grammar_stack(self._allowed, generated, worker="step")

    def _allowed(self, generated: dict[int, Sequence[int]]) -> dict[int, Tensor]:
        out = {}
        for b, tokens in generated.items():
            m = self.matchers[b]
            if not tokens:
                out[b] = self.last[b]
                continue
            for t in tokens[self.followed[b] :]:
                if not self.off[b] and not m.consume_token(t):
                    if self.last[b] is not None and bool(self.last[b][t]):
                        self._gave_up(m, self.followed[b])
                    self.off[b] = True
                self.followed[b] += 1
            if self.off[b]:
                out[b] = torch.zeros(self.grammar.vocab, dtype=torch.bool, device="cpu")
                continue
            out[b] = self.last[b] = self._mask(m, len(tokens))
        return out

    def _mask(self, matcher, at: int) -> Tensor:
        packed = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
        if matcher.is_error():
            self._gave_up(matcher, at)
        return ((packed[:, None] >> _BITS) & 1).flatten()[: self.grammar.vocab].bool()

    def _gave_up(self, matcher, at: int) -> None:
        error = _one_line(matcher.get_error(), "")
        raise InputError(f"{self.grammar.name}: llguidance stopped following it at new token {at}: {error}")
