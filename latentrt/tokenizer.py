"""Small word-level tokenizers built with the ``tokenizers`` library (tests, built-in models)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|pad|>"]
LATENT_MARKERS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]


def word_tokenizer(words: Iterable[str], *, markers: bool = False) -> Tokenizer:
    """Whitespace/punctuation word tokenizer: id 0 is <|endoftext|>, 1 <|pad|>, then the markers (if
    asked), then the words in the order given (duplicates dropped)."""
    vocab: dict[str, int] = {}
    for w in [*SPECIALS, *(LATENT_MARKERS if markers else []), *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    if markers:
        tok.add_tokens(LATENT_MARKERS)
    return tok
