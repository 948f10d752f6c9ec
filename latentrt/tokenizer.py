"""Small word-level tokenizers built with the ``tokenizers`` library (tests, built-in models)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|pad|>"]
LATENT_MARKERS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]


def word_tokenizer(words: Iterable[str], *, markers: bool = False) -> Tokenizer:
    """Whitespace/punctuation word tokenizer; unknown words map to <|endoftext|> (id 0), <|pad|> is 1,
    then the markers (if asked), then the words in the order given (duplicates dropped)."""
    vocab: dict[str, int] = {}
    for w in [*SPECIALS, *(LATENT_MARKERS if markers else []), *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    # words, '###' (the answer separator of the Coconut data format) and single punctuation marks
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"###|[^\w\s]"), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="\u2581\u2581", cleanup=True)  # no continuation pieces here
    tok.add_special_tokens(SPECIALS)
    if markers:
        tok.add_tokens(LATENT_MARKERS)
    return tok
