"""latentrt/train/examples.py: the recurrent trainer's records (question-answer, conversations, texts) as ids
and labels; conversations masked as transformers masks the assistant's tokens (the oracle)."""

import re

import pytest
import torch
from conftest import recurrent_config, transformers_with_torch
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
    assert training_examples((qa,), words) == training_examples([qa], words)  # (a tuple of records)
    # a tokenizer whose post-processor adds a BOS: once, before the question, not again before the answer
    from tokenizers.processors import TemplateProcessing

    words.post_processor = TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", 1)])
    [(ids, labels)] = training_examples([qa], words)
    assert ids[0] == 1 and ids.count(1) == 1 and labels[0] == -100


def test_a_record_with_messages_trains_on_them_whatever_else_it_holds():
    """A record with ``messages`` is the conversation (a 'question' beside them does not make it a published
    {question, answer} record); a {question, answer} record's turns are stripped, as the published script
    strips them."""
    from latentrt.train.examples import PUBLISHED_SYSTEM_PROMPT, published_conversation

    tok = _bpe()
    both = {"question": "Why?", "answer": "Because.", "messages": CONVERSATION}
    assert training_examples([both], tok, chat_template=TEMPLATE) == training_examples(
        [{"messages": CONVERSATION}], tok, chat_template=TEMPLATE
    )
    assert published_conversation({"question": " Why?\n", "answer": "\tBecause. "}, 0) == [
        {"role": "system", "content": PUBLISHED_SYSTEM_PROMPT},
        {"role": "user", "content": "Why?"},
        {"role": "Huginn", "content": "Because."},
    ]


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
        ([{"question": "x", "answer": "y"}], None, "record 0: a {question, answer} record trains as Huginn's"),
        ([{"question": "x"}], TEMPLATE, "record 0 has no 'answer'"),
        ([{"question": 3, "answer": "y"}], TEMPLATE, "record 0: 'question' must be a string"),
        ([{"question": "x", "answer": "\ud800"}], TEMPLATE, "record 0: 'answer' is not valid Unicode text"),
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


# Huginn-0125's shape: its answer turns in the "Huginn" role inside a generation block
HUGINN_ROLE_TEMPLATE = ChatTemplate(GENERATION_BLOCK_TEMPLATE.replace("== 'assistant'", "== 'Huginn'"), "<s>", "</s>")


def _published_batch(hf, records: list[dict], max_seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What Huginn's published fine-tuning script (finetuning_simple_example.py) trains on for {question, answer}
    records, made as it makes it with transformers: each record a conversation (its system prompt, the question
    stripped, the answer stripped in the "Huginn" role), apply_chat_template padded and truncated to
    max_seq_length + 1, the model's inputs all but the last column, the labels the rest where the assistant
    mask and the attention mask are both set."""
    system = "You are a helpful assistant that can assist users with mathematical reasoning."
    conversations = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": r["question"].strip()},
            {"role": "Huginn", "content": r["answer"].strip()},
        ]
        for r in records
    ]
    enc = hf.apply_chat_template(
        conversations,
        chat_template=HUGINN_ROLE_TEMPLATE.source,
        tokenize=True,
        add_generation_prompt=False,
        return_assistant_tokens_mask=True,
        padding="max_length",
        max_length=max_seq_length + 1,
        return_tensors="pt",
        return_dict=True,
        truncation=True,
    )
    mask = ~(enc["assistant_masks"].bool() & enc["attention_mask"].bool())
    return enc["input_ids"][:, :-1], torch.where(mask[:, 1:], -100, enc["input_ids"][:, 1:])


def test_question_answer_records_train_as_huginns_published_fine_tuning_script_makes_them():
    """A {question, answer} record without steps (the Hub's GSM8k, the script's default data) is the script's
    conversation through the chat template, cut to max_seq_length + 1 tokens (TrainOptions.huginn_published's
    128) and padded to that width as it pads them: latentrt's inputs and targets equal the script's tensors
    (so the random initial state is drawn over the same positions), short records and cut ones alike."""
    transformers = transformers_with_torch()  # (the script's tensors: return_tensors="pt")
    from latentrt.train.recurrent import collate, cut_examples

    tok = _bpe()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.pad_token = "<|pad|>"
    records = [
        {"question": " Alex is a wumpus. Is Alex a wumpus?\n", "answer": "Yes, Alex is a wumpus. "},
        {"question": "Why?", "answer": "Every wumpus is! " * 12},  # longer than the cut
    ]
    assert TrainOptions.huginn_published().max_seq_length == 128
    whole = training_examples(records, tok, chat_template=HUGINN_ROLE_TEMPLATE)
    short, long = (len(x) for x, _ in whole)
    assert long > short + 20
    for max_seq_length in (short + 5, long + 3):  # the second record cut, then neither
        ids, labels = _published_batch(hf, records, max_seq_length)
        if max_seq_length < long:
            with pytest.warns(UserWarning, match=rf"1 of 2 records are longer than max_seq_length \+ 1 = {short + 6} "):
                data = cut_examples(whole, max_seq_length)
        else:
            data = cut_examples(whole, max_seq_length)
        pad = tok.token_to_id("<|pad|>")
        # the trainer's batch (train_recurrent pads to max_seq_length + 1): inputs ids[:, :-1], targets labels[:, 1:]
        ours, our_labels = collate(data, pad, "cpu", max_seq_length + 1)
        assert torch.equal(ours[:, :-1], ids) and torch.equal(our_labels[:, 1:], labels)
        assert bool((labels != -100).any(dim=1).all())


def test_a_cut_record_left_with_no_loss_is_left_out():
    """Cut before its answer begins, a record has nothing to learn: it is left out with a warning (in the
    published run a micro-batch of such rows has a NaN loss); nothing left is an error naming the option."""
    from latentrt.train.recurrent import cut_examples

    tok = _bpe()
    long_question = {"question": "Alex is a wumpus. " * 10, "answer": "Yes"}
    short = {"question": "Why?", "answer": "Every wumpus is!"}
    data = training_examples([long_question, short], tok, chat_template=HUGINN_ROLE_TEMPLATE)
    n = len(data[1][0])
    assert len(data[0][0]) > n + 20
    with pytest.warns(UserWarning, match="1 of 2 records are longer .*; 1 left with no token under the loss are left"):
        assert cut_examples(data, n + 1) == [data[1]]
    with pytest.raises(InputError, match=r"no record has a token under the loss within max_seq_length \+ 1 = 11"):
        cut_examples(data, 10)
    assert cut_examples(data, 10_000) == data
    with pytest.raises(InputError, match="max_seq_length must be an integer >= 1, got 0"):
        TrainOptions(max_seq_length=0).validate()


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
