"""latentrt/train/examples.py: the recurrent trainer's records (question-answer, conversations, texts) as ids
and labels; conversations masked as transformers masks the assistant's tokens (the oracle)."""

import re

import pytest
import torch
from conftest import recurrent_config
from test_chat import GENERATION_BLOCK_TEMPLATE

from latentrt.chat import ChatTemplate
from latentrt.errors import InputError
from latentrt.families import build_model
from latentrt.train.common import TrainOptions
from latentrt.train.data import build_tokenizer, generate_dataset
from latentrt.train.examples import encode_qa, training_examples
from latentrt.train.recurrent import train_recurrent

TEMPLATE = ChatTemplate(GENERATION_BLOCK_TEMPLATE, "<s>", "</s>")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Alex is a wumpus. Is Alex a wumpus?"},
    {"role": "assistant", "content": " Yes, Alex is a wumpus. "},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Every wumpus is!"},
]


def _bpe():
    """A byte-level BPE whose merges cross the template's text (tokens may straddle a turn's edge), with the
    template's markers as special tokens; no <|endoftext|> (as Huginn-0125's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Alex is a wumpus. Yes, Alex is a wumpus. Every wumpus is! Why? Be brief."] * 4
    special = ["<s>", "</s>", "<h>", "</h>", "<e>", "<|pad|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=alphabet, show_progress=False),
    )
    return tok


def test_a_conversation_trains_on_the_tokens_transformers_marks_as_the_assistants():
    """ids = transformers' apply_chat_template(add_generation_prompt=False); the labels keep exactly the
    tokens of its return_assistant_tokens_mask (the published fine-tuning script's loss), or all of them."""
    transformers = pytest.importorskip("transformers")
    tok = _bpe()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    for conversation in (CONVERSATION, CONVERSATION[1:3]):
        want = hf.apply_chat_template(
            conversation,
            chat_template=GENERATION_BLOCK_TEMPLATE,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=False,
        )
        [(ids, labels)] = training_examples([{"messages": conversation}], tok, chat_template=TEMPLATE)
        assert ids == want["input_ids"]
        assert [label != -100 for label in labels] == [bool(m) for m in want["assistant_masks"]]
        assert [label for label in labels if label != -100] == [t for t, m in zip(ids, want["assistant_masks"]) if m]
        assert 0 < sum(want["assistant_masks"]) < len(ids)
        [(ids_all, labels_all)] = training_examples(
            [{"messages": conversation}], tok, chat_template=TEMPLATE, loss_on="all"
        )
        assert ids_all == ids and labels_all == ids


def test_texts_and_question_answer_records():
    tok = _bpe()
    [(ids, labels)] = training_examples([{"text": "Alex is a wumpus."}], tok)
    assert ids == tok.encode("Alex is a wumpus.").ids and labels == ids
    rec = {"question": "Is Alex a wumpus?", "steps": [], "answer": "Yes"}
    [(ids, labels)] = training_examples([rec], tok, eos_token_id=[1, 4])  # no <|endoftext|>: the model's eos
    assert ids[-1] == 1 and labels[-1] == 1 and labels[0] == -100
    with pytest.raises(InputError, match="no <|endoftext|> and the model no eos_token_id"):
        training_examples([rec], tok)
    words = build_tokenizer()  # the built-in models' tokenizer has <|endoftext|>: used as before
    qa = generate_dataset(1)[0]
    assert training_examples([qa], words, eos_token_id=5) == [encode_qa(words, qa, words.token_to_id("<|endoftext|>"))]


def test_records_that_cannot_be_trained_on_are_named():
    tok = _bpe()
    no_assistant = {"messages": CONVERSATION[:2]}
    cases = [
        ([{"text": "Alex is a wumpus."}, no_assistant], TEMPLATE, "record 1 has no token under the loss (no assistant"),
        ([{"text": "a"}], TEMPLATE, "record 0 has no token under the loss (a text of 1 token(s), none to predict)"),
        ([{"messages": CONVERSATION}], None, "record 0: this model has no chat template"),
        ([{"messages": CONVERSATION}], ChatTemplate("{{ messages[0]['content'] }}"), "has no {% generation %} block"),
        ([{"messages": []}], TEMPLATE, "record 0: messages must be a non-empty list"),
        ([{"text": ""}], TEMPLATE, "record 0: 'text' must be a non-empty string"),
        (
            [{"text": "Alex is a wumpus."}, {"text": "a \udcff b"}],
            TEMPLATE,
            "record 1: 'text' is not valid Unicode text",
        ),
        (
            [{"messages": [{"role": "user", "content": "\ud800"}]}],
            TEMPLATE,
            "record 0: messages[0].content is not valid",
        ),
        ([{"prompt": "x"}], TEMPLATE, "record 0 has none of 'question', 'messages', 'text'"),
        ([{"question": "x", "answer": "y"}], TEMPLATE, "record 0 has no 'steps'"),
        ([7], TEMPLATE, "record 0 is not an object"),
        ({"text": "x"}, TEMPLATE, "records must be a list of records"),
    ]
    for records, template, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            training_examples(records, tok, eos_token_id=1, chat_template=template)
    with pytest.raises(InputError, match="loss_on must be 'assistant' or 'all'"):
        training_examples([{"text": "x"}], tok, loss_on="everything")
    # all tokens of a template without a generation block
    [(ids, labels)] = training_examples(
        [{"messages": CONVERSATION}], tok, chat_template=ChatTemplate("{{ messages[0]['content'] }}"), loss_on="all"
    )
    assert ids == labels == tok.encode("Be brief.", add_special_tokens=False).ids


def test_the_recurrent_trainer_fine_tunes_on_conversations_in_micro_batches(tmp_path):
    """The published fine-tuning recipe end to end on a tiny model: conversations through the chat
    template, the loss on the assistant's tokens, micro-batches with a depth each; the loss falls."""
    tok = _bpe()
    model = build_model(recurrent_config(vocab_size=tok.get_vocab_size(), block_size=128), seed=0)
    model.eos_token_id = tok.token_to_id("</s>")
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"text": "Every wumpus is!"}]
    opts = TrainOptions.huginn_published(steps=30, lr=3e-3, batch_size=4, micro_batch_size=2, progress=False)
    log = train_recurrent(model, tok, records, opts, chat_template=TEMPLATE)
    assert all(isinstance(e["depth"], list) and len(e["depth"]) == 2 for e in log)
    assert sum(e["loss"] for e in log[-5:]) < 0.5 * sum(e["loss"] for e in log[:5])
    assert not any(torch.isnan(p).any() for p in model.parameters())
