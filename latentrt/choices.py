"""vLLM's ``guided_choice``: the generated text is one of the given strings, then a stop token.

Each choice is encoded as the text that continues the prompt (no special tokens) and the choices' token
sequences form a trie: a sequence may choose only a token that continues a choice it has followed so far,
and a stop token once it holds a whole choice (so a choice that is the start of another may end there or go
on). vLLM's grammar backends accept any tokenization of a choice; here a choice is its tokenizer's own
encoding, the one a text prompt holding it would have. latentrt/token_constraints.py applies it with the
other constraints.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError, check_unicode
from .prompts import unknown_words


def check_choices(choices) -> None:
    """The option's type: None or a non-empty list of non-empty strings."""
    if choices is None:
        return
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
        raise InputError(f"guided_choice must be a non-empty list of strings, got {choices!r}")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise InputError(f"guided_choice[{i}] must be a non-empty string, got {c!r}")
        check_unicode(f"guided_choice[{i}]", c)


class ChoiceTrie:
    """The choices' token sequences as a trie: node 0 is the start; ``children[n]`` maps a token to the next
    node, ``whole[n]`` says a choice ends at node n."""

    def __init__(self, tokenizer, choices: Sequence[str]) -> None:
        if tokenizer is None:
            raise InputError("guided_choice needs a tokenizer (this model has none); use allowed_token_ids")
        self.children: list[dict[int, int]] = [{}]
        self.whole = [False]
        for i, choice in enumerate(choices):
            enc = tokenizer.encode(choice, add_special_tokens=False)
            unknown = unknown_words(tokenizer, choice, enc)
            if unknown:
                raise InputError(
                    f"guided_choice[{i}] {choice!r}: {sorted(set(unknown))} not in the tokenizer's vocabulary"
                )
            if not enc.ids:
                raise InputError(f"guided_choice[{i}] {choice!r} has no tokens")
            node = 0
            for t in enc.ids:
                if t not in self.children[node]:
                    self.children[node][t] = len(self.children)
                    self.children.append({})
                    self.whole.append(False)
                node = self.children[node][t]
            self.whole[node] = True

    def allowed(self, generated: Sequence[int]) -> tuple[list[int], bool]:
        """After the tokens ``generated`` (which followed the trie): the tokens that continue a choice, and whether
        they hold a whole choice (a stop token may come next)."""
        node = 0
        for t in generated:
            node = self.children[node].get(t, -1)
            if node < 0:  # (a token off the trie: only after a row was flagged with nothing to choose)
                return [], False
        return list(self.children[node]), self.whole[node]
