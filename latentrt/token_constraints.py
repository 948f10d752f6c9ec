"""Tokens a sequence may not choose next: vLLM's ``allowed_token_ids``, ``bad_words`` and ``guided_choice``
(latentrt/choices.py), and HF-style ``logits_processors``, applied to the next-token logits after the
penalties and ``min_new_tokens``' mask, before temperature and the filters (latentrt/sampling.py), as HF runs
custom processors after its own.

- ``allowed_token_ids``: a list of token ids; every other token's logit is -inf (vLLM's).
- ``bad_words``: a list of strings, each encoded as vLLM encodes it (the word with its leading spaces
  stripped, and again after one space where that gives another first token and as many tokens; no special
  tokens). A word of one token is never chosen; for a longer one, the token that would complete it after
  the sequence's last generated tokens is not (vLLM's rule: the generated tokens only, not the prompt).
- ``guided_choice``: a list of strings; the tokens follow one of them, then a stop token (latentrt/choices.py).
- ``guided_json``, ``guided_regex``, ``guided_grammar``: the text follows a JSON schema, a regular expression or
  a grammar, then a stop token (latentrt/structured.py).
- ``logits_processors``: callables with transformers' ``LogitsProcessor`` signature,
  ``processor(input_ids, scores) -> scores``, called in order for each running sequence on its own:
  ``input_ids`` [1, L] its prompt and the tokens generated so far, ``scores`` [1, W] float32 (the head's
  width; columns past the vocabulary are -inf and stay so). transformers' own processors work as they are.

The allowed set and the bad words run on the logits' device without reading it (the recent tokens the longer words
are matched against are kept there); choices, grammars and processors run on the host, so their sequences' tokens
are read when they are applied. A sequence left with no token to choose (every one excluded, or a processor's NaN)
is flagged on the device (``empty``) and read with the token: generate() raises, it never picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .choices import ChoiceTrie, check_choices
from .errors import InputError, check_unicode
from .prompts import unknown_words
from .structured import NAMES as GRAMMARS
from .structured import Grammar, GrammarState, check_structured, compile_grammar
from .structured import active as grammar_active

NAMES = ("allowed_token_ids", "bad_words", "guided_choice", *GRAMMARS, "logits_processors")
NO_TOKEN_LEFT = 4  # the flag bit (beside 1: latent state, 2: logits) of a sequence with nothing to choose


def check_constraints(
    allowed_token_ids, bad_words, guided_choice, logits_processors, guided_json=None, guided_regex=None,
    guided_grammar=None,
) -> None:  # fmt: skip
    """The options' types (the ids against the vocabulary, and the words against the tokenizer, are checked by
    ``TokenConstraints.build``, which generate() calls before the prompt)."""
    if allowed_token_ids is not None:
        if not isinstance(allowed_token_ids, (list, tuple, set, frozenset)) or not allowed_token_ids:
            raise InputError(f"allowed_token_ids must be a non-empty list of token ids, got {allowed_token_ids!r}")
        for t in allowed_token_ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise InputError(f"allowed_token_ids must hold token ids (integers), got {t!r}")
    if bad_words is not None:
        if isinstance(bad_words, str) or not isinstance(bad_words, (list, tuple)):
            raise InputError(f"bad_words must be a list of strings, got {bad_words!r}")
        for i, w in enumerate(bad_words):
            if not isinstance(w, str) or not w.strip():
                raise InputError(f"bad_words[{i}] must be a string with a word in it, got {w!r}")
            check_unicode(f"bad_words[{i}]", w)
    check_choices(guided_choice)
    check_structured(guided_json, guided_regex, guided_grammar, guided_choice)
    if logits_processors is not None:
        items = [logits_processors] if callable(logits_processors) else logits_processors
        if not isinstance(items, (list, tuple)) or not all(callable(p) for p in items):
            raise InputError(
                "logits_processors must be a callable or a list of callables (input_ids [1, L], scores [1, V]) -> "
                f"scores, as transformers' LogitsProcessor; got {logits_processors!r}"
            )


def active(options) -> bool:
    """Whether ``options`` set any of these."""
    return any(getattr(options, n) not in (None, [], ()) for n in NAMES)


def processors_of(options) -> list[Callable]:
    p = options.logits_processors
    return [] if p is None else [p] if callable(p) else list(p)


def bad_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each word's token sequences, as vLLM's ``update_from_tokenizer`` encodes them: ``word.lstrip()``, and
    ``" " + word.lstrip()`` where that gives a different first token and as many tokens (a word at the start
    of a text and one inside it). A word the tokenizer does not know (it became the unknown token) is an
    error: banning the unknown token is not what was asked."""
    if tokenizer is None:
        raise InputError("bad_words needs a tokenizer (this model has none); use allowed_token_ids or logit_bias")
    out: list[list[int]] = []
    for i, word in enumerate(words):
        for spaced in (False, True):
            text = (" " if spaced else "") + word.lstrip()
            enc = tokenizer.encode(text, add_special_tokens=False)
            unknown = unknown_words(tokenizer, text, enc)
            if unknown:
                raise InputError(f"bad_words[{i}] {word!r}: {sorted(set(unknown))} not in the tokenizer's vocabulary")
            if not enc.ids:
                raise InputError(f"bad_words[{i}] {word!r} has no tokens")
            if not spaced or (enc.ids[0] != out[-1][0] and len(enc.ids) == len(out[-1])):
                out.append(list(enc.ids))
    return out


class TokenConstraints:
    """The allowed set, bad words and processors of one generate() call (or one served request), with what
    each sequence holds."""

    def __init__(
        self, options, words: list[list[int]], choices: ChoiceTrie | None, grammar: Grammar | None, ids: Tensor,
        mask: Tensor, vocab: int, stop_ids: Sequence[int],
    ) -> None:  # fmt: skip
        device, batch = ids.device, ids.shape[0]
        self.vocab = vocab
        blocked = torch.zeros(vocab, dtype=torch.bool)
        if options.allowed_token_ids is not None:
            blocked[:] = True
            blocked[sorted(options.allowed_token_ids)] = False
        for w in words:
            if len(w) == 1:
                blocked[w[0]] = True
        self.blocked = blocked.to(device) if blocked.any() else None
        longer = [w for w in words if len(w) > 1]
        self.recent = self.prefixes = self.last = None
        if longer:  # prefixes right-aligned against the recent tokens; -2 matches any (never a real id nor -1)
            held = max(len(w) for w in longer) - 1
            prefixes = torch.full((len(longer), held), -2, dtype=torch.long)
            for j, w in enumerate(longer):
                prefixes[j, held - len(w) + 1 :] = torch.tensor(w[:-1])
            self.prefixes = prefixes.to(device)
            self.last = torch.tensor([w[-1] for w in longer], device=device)
            self.recent = torch.full((batch, held), -1, dtype=torch.long, device=device)  # -1: no token yet
        self.processors = processors_of(options)
        self.choices = choices
        self.grammar = None if grammar is None else GrammarState(grammar, batch)
        self.stop_ids = sorted(stop_ids)
        real = mask.bool().cpu()
        # (what needs each sequence's tokens on the host)
        on_host = self.processors or self.choices is not None or self.grammar is not None
        self.history = [row[keep].tolist() for row, keep in zip(ids.cpu(), real)] if on_host else []
        self.prompt_lengths = [len(h) for h in self.history]
        self.pending: list[Tensor] = []  # tokens recorded, not read yet (host history only)
        self.empty: Tensor | None = None  # [B] bool: rows the last apply left nothing to choose

    @classmethod
    def build(cls, options, tokenizer, vocab: int, stop_ids: Sequence[int]) -> Callable | None:
        """For a call's (validated) options, before its prompts: the ids checked against the vocabulary, the words
        and choices encoded and checked against the tokenizer (an allowed set that the one-token bad words, and
        before ``min_new_tokens`` the stop tokens, empty is an error here rather than at a token; so is a choice
        with no stop token to end it). None when none is set; else ``make(ids, mask)``: the constraints of the
        prompts ``ids`` [B, S] (``mask``: their real positions)."""
        if not active(options):
            return None
        words = bad_word_ids(tokenizer, options.bad_words) if options.bad_words else []
        choices = ChoiceTrie(tokenizer, options.guided_choice) if options.guided_choice else None
        grammar = compile_grammar(options, tokenizer, vocab, stop_ids) if grammar_active(options) else None
        cls._check(options, words, vocab, set(stop_ids))
        return lambda ids, mask: cls(options, words, choices, grammar, ids, mask, vocab, stop_ids)

    @staticmethod
    def _check(options, words: list[list[int]], vocab: int, stop_ids: set[int]) -> None:
        if options.guided_choice:
            if not stop_ids:
                why = "the model names no end-of-text token" if options.default_stops else "default_stops=False"
                raise InputError(f"guided_choice must end with a stop token and there is none ({why}): give stop=[id]")
        allowed = options.allowed_token_ids
        bad = sorted(t for t in allowed or () if not 0 <= t < vocab)
        if bad:
            raise InputError(f"allowed_token_ids must be ids of the vocabulary [0, {vocab}), got {bad[:5]}")
        banned = {w[0] for w in words if len(w) == 1}
        held_stops = stop_ids if options.min_new_tokens else set()
        if allowed is not None and not set(allowed) - banned - held_stops:
            why = "bad_words" + (" and the stop tokens min_new_tokens holds back" if held_stops else "")
            raise InputError(f"allowed_token_ids {sorted(allowed)[:10]}: {why} exclude every one of them")

    def apply(self, logits: Tensor, rows: list[bool] | None = None) -> Tensor:
        """logits [B, W] -> fp32 logits with the excluded tokens at -inf and the processors run on the running
        rows (``rows``; None: all); sets ``empty``."""
        x = logits.float()
        vocab = x[:, : self.vocab]
        if self.blocked is not None:
            vocab = vocab.masked_fill(self.blocked, float("-inf"))
        if self.recent is not None:  # longer bad words: their last token where the recent tokens end the rest
            hit = ((self.recent[:, None, :] == self.prefixes) | (self.prefixes == -2)).all(-1)  # [B, words]
            ban = torch.zeros_like(vocab).scatter_add_(1, self.last.expand(len(x), -1), hit.float())
            vocab = vocab.masked_fill(ban > 0, float("-inf"))
        x = torch.cat([vocab, x[:, self.vocab :]], -1)
        if self.history:
            self._read_pending()
        if self.choices is not None:
            x = self._choose(x)
        if self.grammar is not None:
            x = self._follow_grammar(x, rows)
        if self.processors:
            x = self._process(x, rows)
        vocab = x[:, : self.vocab]
        self.empty = vocab.isnan().any(-1) | (vocab == float("inf")).any(-1) | (vocab == float("-inf")).all(-1)
        # a flagged row draws from even scores over the vocabulary: a token of it (the server's log-probs and the
        # next prelude read it), never used (the flag is read with it and raises)
        return torch.cat([torch.where(self.empty[:, None], 0.0, vocab), x[:, self.vocab :]], -1)

    def _read_pending(self) -> None:
        for tokens in self.pending:  # (a row that stopped gets tokens too: it is not asked any more)
            for b, t in enumerate(tokens.tolist()):
                self.history[b].append(t)
        self.pending = []

    def _choose(self, x: Tensor) -> Tensor:
        """Each row's scores where its tokens so far continue a choice (and at the stop tokens where they hold
        one); -inf elsewhere (a row that stopped, off the choices, has none left: it is asked nothing)."""
        out = torch.full_like(x, float("-inf"))
        for b in range(len(x)):
            nxt, whole = self.choices.allowed(self.history[b][self.prompt_lengths[b] :])
            keep = torch.tensor(nxt + (self.stop_ids if whole else []), dtype=torch.long, device=x.device)
            out[b, keep] = x[b, keep]
        return out

    def _follow_grammar(self, x: Tensor, rows: list[bool] | None) -> Tensor:
        """Each running row's scores where its grammar allows the token; -inf elsewhere (a row that stopped is
        asked nothing: it gets none)."""
        asked = {b: self.history[b][self.prompt_lengths[b] :] for b in range(len(x)) if rows is None or rows[b]}
        allowed = torch.zeros(x.shape, dtype=torch.bool, device="cpu")  # (filled on the host, moved once)
        for b, row in self.grammar.allowed(asked).items():
            allowed[b, : self.vocab] = row
        return x.masked_fill(~allowed.to(x.device), float("-inf"))

    def _process(self, x: Tensor, rows: list[bool] | None) -> Tensor:
        out = []
        for b in range(len(x)):
            scores = x[b : b + 1]
            if rows is None or rows[b]:
                ids = torch.tensor([self.history[b]], dtype=torch.long, device=x.device)
                for p in self.processors:
                    scores = p(ids, scores)  # (x is this call's own: a processor may write in place)
                    fits = isinstance(scores, Tensor) and scores.shape == (1, x.shape[1])
                    if not (fits and scores.is_floating_point()):
                        got = f"shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
                        raise InputError(
                            f"logits processor {p!r} must return the scores as a float tensor of shape "
                            f"{(1, x.shape[1])}, got {got}"
                        )
            out.append(scores.float().to(x.device))
        x = torch.cat(out)
        return torch.cat([x[:, : self.vocab], torch.full_like(x[:, self.vocab :], float("-inf"))], -1)

    def record(self, tokens: Tensor) -> None:
        """The sampled ``tokens`` [B] join their sequences (a row that stopped is never asked again: whatever it
        gets changes nothing)."""
        if self.recent is not None:
            self.recent = torch.cat([self.recent[:, 1:], tokens[:, None].long()], 1)
        if self.history:
            self.pending.append(tokens)  # (callers sample a new tensor each token)

    def flags(self, running: Tensor | None = None) -> Tensor | None:
        """``NO_TOKEN_LEFT`` for the rows the last apply left nothing to choose (a [B] long; ``running``: the rows
        that count, a sequence that stopped is asked nothing), or None."""
        if self.empty is None:
            return None
        empty = self.empty if running is None else self.empty & running
        return empty.long() * NO_TOKEN_LEFT
