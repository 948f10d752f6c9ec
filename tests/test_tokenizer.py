"""The word tokenizer (latentrt/tokenizer.py) the built-in models and the trainers' generated problems use."""

import json

from latentrt.checkpoint import BUILTIN_DIR
from latentrt.tokenizer import LATENT_MARKERS, SPECIALS, word_tokenizer
from latentrt.train.data import build_tokenizer


def test_ids_are_specials_then_markers_then_the_words_once_each():
    tok = word_tokenizer(["cat", "a", "cat", "."], markers=True)
    assert tok.get_vocab() == {
        "<|endoftext|>": 0,
        "<|pad|>": 1,
        "<|start-latent|>": 2,
        "<|end-latent|>": 3,
        "<|latent|>": 4,
        "cat": 5,
        "a": 6,
        ".": 7,
    }
    assert word_tokenizer(["cat"]).get_vocab() == {"<|endoftext|>": 0, "<|pad|>": 1, "cat": 2}


def test_text_splits_into_words_punctuation_and_the_answer_separator():
    tok = word_tokenizer(["Tom", "is", "a", "cat", ".", "?", "###", ","], markers=True)
    ids = tok.encode("Tom is a cat. ### Tom?").ids
    assert [tok.id_to_token(i) for i in ids] == ["Tom", "is", "a", "cat", ".", "###", "Tom", "?"]
    assert tok.encode("Tom is a dog").ids[-1] == 0  # an unknown word is <|endoftext|>
    marked = tok.encode("Tom<|start-latent|><|latent|><|latent|><|end-latent|>cat").ids
    assert marked == [tok.token_to_id(t) for t in ["Tom", *LATENT_MARKERS[:1], *LATENT_MARKERS[2:] * 2,
                                                   LATENT_MARKERS[1], "cat"]]  # fmt: skip
    assert tok.decode(tok.encode("Tom is a cat , a cat .").ids) == "Tom is a cat, a cat."  # no space before marks
    assert tok.decode([0, 5, 1], skip_special_tokens=True) == tok.decode([5])  # specials are special


def test_the_shipped_models_tokenizers_are_the_trainers():
    """The built-in models were trained on build_tokenizer()'s ids: the tokenizer.json shipped beside their
    weights has the same vocabulary, so problems generated now encode as the models read them."""
    want = build_tokenizer().get_vocab()
    for name in ("recurrent", "coconut", "coconut-cot", "coconut-nocot"):
        shipped = json.loads((BUILTIN_DIR / name / "tokenizer.json").read_text())
        vocab = dict(shipped["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in shipped["added_tokens"]})
        assert vocab == want, name
    assert sorted(want, key=want.get)[: len(SPECIALS) + len(LATENT_MARKERS)] == [*SPECIALS, *LATENT_MARKERS]
