"""latentrt/sequence_text.py: the text decoded as it grows equals the whole decode at every token, stop strings
end it where a whole decode after every token would, and a stream's pieces add up to the final text."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from latentrt.sequence_text import SequenceText
from latentrt.stop_strings import StopStrings
from latentrt.tokenizer import word_tokenizer

CORPUS = [
    "Héllo wörld — naïve café, 你好 世界! Ünïcödé and ascii: the cat sat on the mat.",
    "Every wumpus is a yumpus. Alex is a wumpus? Qué? ¿Dónde? 東京 and Zürich.",
]


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE (ids are bytes or merges of them: a random id sequence splits characters
    across tokens and holds invalid UTF-8, as sampled tokens may)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


TOKENIZERS = {"byte-level": byte_level_tokenizer(), "word": word_tokenizer("the cat sat on mat . , ? ! a".split())}


def whole_decode_reference(tok, ids: list[int], stops: list[str], keep=False, skip=True, m=1) -> tuple[int, str]:
    """What decoding the whole text after every token gives: the number of tokens kept (the one completing a
    stop string is kept) and the final text (ending before the stop string; with ``keep``, after it). From
    token ``m`` on (``min_new_tokens``): before it nothing stops, and a string that ended then is not found
    later (vLLM's rule: a token looks for a string only where it ends in that token's new text)."""
    before = ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=skip)
        ends_here = [(s, text.find(s, max(0, len(before) - len(s) + 1))) for s in stops]
        before = text
        found = sorted((j, -len(s)) for s, j in ends_here if j >= 0) if n >= m else []
        if found:
            begin, minus_length = found[0]
            return n, text[: begin - minus_length if keep else begin]
    return len(ids), tok.decode(ids, skip_special_tokens=skip)


def run(tok, ids: list[int], stops: list[str], keep=False, skip=True, m=1) -> tuple[int, str, list[str], SequenceText]:
    """Feed ``ids`` until a stop string ends it, as generate() does (from token ``m`` on): the tokens kept, the
    final text, the stream's pieces."""
    text, pieces = SequenceText(tok, StopStrings(stops), skip, keep), []
    for n, t in enumerate(ids, 1):
        text.add(t, may_stop=n >= m)
        if text.cut is not None or n == len(ids):
            pieces.append(text.end(ids[:n]))
            return n, text.final, pieces, text
        pieces.append(text.show())
        if keep:  # nothing held back but an incomplete character
            assert "".join(pieces) == text.text
        elif m == 1:  # (one that ended before min_new_tokens is text like any other)
            assert not any(s in "".join(pieces) for s in stops)  # a stop string is never shown, even in part ...
    raise AssertionError("unreachable")


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_random_ids_decode_as_the_whole_text(name, skip):
    """(``skip``: skip_special_tokens; each tokenizer has special tokens, which random ids draw)"""
    tok, rng = TOKENIZERS[name], random.Random(0)
    V = tok.get_vocab_size()
    specials = 0
    for _ in range(300):
        ids = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
        kept, final, pieces, text = run(tok, ids, [], skip=skip)
        specials += tok.decode(ids, skip_special_tokens=True) != tok.decode(ids, skip_special_tokens=False)
        assert kept == len(ids) and final == tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == final  # incomplete characters come out at the end
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # ... and never half-shown while running
        assert text.text == final.rstrip("\ufffd")[: len(text.text)]
    assert specials > 10


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_stop_strings_end_where_the_whole_decode_would(name, keep):
    """(``keep``: include_stop_str_in_output, the text ends after the stop string)"""
    tok, rng = TOKENIZERS[name], random.Random(1)
    for line in CORPUS * 10:
        ids = tok.encode(line).ids
        whole = tok.decode(ids, skip_special_tokens=True)
        a = rng.randrange(len(whole))
        stops = [whole[a : a + rng.randint(1, 6)], "never seen", whole[rng.randrange(len(whole)) :][:2]]
        stops = [s for s in stops if s.strip()] or ["never"]
        kept, final, pieces, _ = run(tok, ids, stops, keep)
        assert (kept, final) == whole_decode_reference(tok, ids, stops, keep)
        assert "".join(pieces) == final


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_stop_strings_from_min_new_tokens_on_end_where_the_whole_decode_would(name):
    """Stop strings of several lengths, with ``min_new_tokens`` anywhere: a string that ended before it is not
    found again later, a longer string beside it changes nothing (they once did: each search began the longest
    string's length back), and the stream's pieces add up to the final text."""
    tok, rng = TOKENIZERS[name], random.Random(2)
    held = 0
    for line in CORPUS * 20:
        ids = tok.encode(line).ids
        whole = tok.decode(ids, skip_special_tokens=True)
        a = rng.randrange(len(whole))
        stops = [whole[a : a + rng.randint(1, 3)], "a much longer string never seen"]
        stops = [s for s in stops if s.strip()]
        m = rng.randint(1, len(ids))
        for keep in (False, True):
            kept, final, pieces, _ = run(tok, ids, stops, keep, m=m)
            assert (kept, final) == whole_decode_reference(tok, ids, stops, keep, m=m), (stops, m)
            assert "".join(pieces) == final
        held += whole_decode_reference(tok, ids, stops, m=m) != whole_decode_reference(tok, ids, stops)
    assert held >= 5  # min_new_tokens changes where some of them stop


def test_a_decoder_that_rewrites_earlier_text_falls_back_to_the_whole_decode():
    """DecodeStream refuses a decoder whose text is not a prefix of the next one's: the text is decoded whole
    for that token, and goes on incrementally after it."""
    tok = TOKENIZERS["byte-level"]
    ids = tok.encode(CORPUS[0]).ids
    text = SequenceText(tok, StopStrings([]))

    class Refuses:
        def step(self, tokenizer, token):
            raise Exception("InvalidPrefix")

    for i, t in enumerate(ids):
        if i == 5:
            text._stream = Refuses()
        text.add(t)
        assert text.text == tok.decode(ids[: i + 1]).rstrip("\ufffd")[: len(text.text)]
    assert text.finish(ids) == CORPUS[0] and text.text == CORPUS[0]


class RewritingTokenizer:
    """A decoder whose text is not a prefix of the next one's (a final '!' upper-cases the whole text):
    ``DecodeStream`` cannot follow it (here it refuses the object outright), so SequenceText decodes it all again."""

    WORDS = ["!", "a", "b", "c"]

    def decode(self, ids, skip_special_tokens=True):
        text = " ".join(self.WORDS[i] for i in ids)
        return text.upper() if ids and ids[-1] == 0 else text


def test_a_decoder_that_rewrites_earlier_text_is_decoded_whole_and_its_stop_strings_found():
    tok = RewritingTokenizer()
    text = SequenceText(tok, StopStrings(["B !"]))
    for t in (1, 2):
        text.add(t)
    assert text.text == "a b" and text.show() == "a b" and text.cut is None
    text.add(0)  # the earlier text is now "A B": a stop string that only the rewritten text holds ends it
    assert text.text == "A B !" and text.cut == 2
    assert text.end([1, 2, 0]) == "" and text.final == "A "  # (the stream showed "a b": what the end changed)
    plain = SequenceText(tok, StopStrings(["never"]))
    for t in (3, 1):
        plain.add(t)
    assert plain.text == "c a" and plain.end([3, 1]) == "c a"


def test_the_separator_is_what_a_whole_decode_puts_between_two_parts():
    """An echoed prompt and its completion join as the tokenizer decodes them as one sequence: a word-level
    tokenizer's space, a SentencePiece word's leading space, nothing for byte-level BPE (its tokens carry their
    spaces); nothing where either part is empty."""
    from latentrt.sequence_text import separator

    word = word_tokenizer(["Alex", "is", "a", "wumpus"])
    a, b = word.encode("Alex").ids, word.encode("is a").ids
    assert separator(word, a, b) == " " and word.decode(a) + " " + word.decode(b) == word.decode(a + b)
    metaspace = Tokenizer(models.WordLevel({"<unk>": 0, "▁Alex": 1, "▁is": 2, "▁a": 3}, unk_token="<unk>"))
    metaspace.pre_tokenizer, metaspace.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    assert metaspace.decode([2, 3]) == "is a" and separator(metaspace, [1], [2, 3]) == " "
    bpe = byte_level_tokenizer()
    a, b = bpe.encode("Every wumpus").ids, bpe.encode(" is a yumpus.").ids
    assert separator(bpe, a, b) == "" and bpe.decode(a) + bpe.decode(b) == bpe.decode(a + b)
    assert separator(word, [], b) == separator(word, a, []) == ""
    for _ in range(50):  # random ids either side: the separator completes the whole decode of the two
        rng = random.Random(_)
        x, y = ([rng.randrange(word.get_vocab_size()) for _ in range(rng.randrange(1, 6))] for _ in range(2))
        assert word.decode(x) + separator(word, x, y) + word.decode(y) == word.decode(x + y)
