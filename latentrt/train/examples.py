"""The recurrent trainer's data: each record as (ids, labels), the labels -100 where there is no loss.

A record is one of:

- ``{question, steps, answer}`` (a ``Record``; ProsQA / ProntoQA / GSM8k files): the question, then
  ``### answer`` and the end-of-text token, the loss on the answer part (Coconut's format, the built-in
  models' data);
- ``{question, answer}`` without ``steps`` (the Hub's GSM8k, the default data of Huginn's published
  fine-tuning script): the conversation that script makes of it (``published_conversation``: its system
  prompt, the question as the user's turn, the answer as the ``Huginn`` turn, both stripped) through the chat
  template, the loss as for a conversation's;
- ``{"messages": [...]}``: a conversation rendered with the model's chat template without a generation
  prompt, the loss on the assistant's tokens (the template's ``{% generation %}`` blocks: transformers'
  assistant-token mask, what Huginn's published fine-tuning script trains on) or, with ``loss_on="all"``, on
  every token (that script's ``take_loss_over_all_tokens``);
- ``{"text": ...}``: the text as the tokenizer encodes it (with the special tokens its post-processor adds),
  the loss on every token.
"""

from __future__ import annotations

from ..chat import ChatTemplate, chat_training_ids, check_loss_on
from ..config import eos_ids
from ..errors import InputError, check_unicode
from ..prompts import prompt_ids
from ..records import Record, as_record

# Huginn's published fine-tuning script (finetuning_simple_example.py): its system prompt, and the role of the
# answer's turn (the one Huginn-0125's template prompts for)
PUBLISHED_SYSTEM_PROMPT = "You are a helpful assistant that can assist users with mathematical reasoning."
PUBLISHED_ANSWER_ROLE = "Huginn"


def published_conversation(rec: dict, i: int, source: str = "records") -> list[dict]:
    """A ``{question, answer}`` record as the published fine-tuning script's conversation: its system prompt,
    the question stripped as the user's turn, the answer stripped as the ``Huginn`` turn."""
    for key in ("question", "answer"):
        if key not in rec:
            raise InputError(f"{source}: record {i} has no {key!r}")
        if not isinstance(rec[key], str):
            raise InputError(f"{source}: record {i}: {key!r} must be a string")
        check_unicode(f"{source}: record {i}: {key!r}", rec[key])
    return [
        {"role": "system", "content": PUBLISHED_SYSTEM_PROMPT},
        {"role": "user", "content": rec["question"].strip()},
        {"role": PUBLISHED_ANSWER_ROLE, "content": rec["answer"].strip()},
    ]


def end_of_text_id(tokenizer, eos_token_id) -> int:
    """The token that ends a question-answer example: ``<|endoftext|>`` where the tokenizer has it (GPT-2's,
    the built-in models'), else the model's (first) eos id (Huginn-0125's ``<|end_text|>``)."""
    token = tokenizer.token_to_id("<|endoftext|>")
    if token is None:
        ids = eos_ids(eos_token_id)
        token = ids[0] if ids else None
    if not isinstance(token, int):
        raise InputError(
            "question-answer records need an end-of-text token: the tokenizer has no <|endoftext|> "
            "and the model no eos_token_id"
        )
    return token


def encode_qa(tokenizer, rec: Record, eos: int) -> tuple[list[int], list[int]]:
    """question -> '### answer <eos>'; loss only on the answer part."""
    q = prompt_ids(tokenizer.encode(rec.question))
    a = tokenizer.encode("### " + rec.answer, add_special_tokens=False).ids + [eos]
    return q + a, [-100] * len(q) + a


def training_examples(
    records,
    tokenizer,
    *,
    eos_token_id=None,
    chat_template: ChatTemplate | None = None,
    loss_on: str = "assistant",
    source: str = "records",
) -> list[tuple[list[int], list[int]]]:
    """Every record as (ids, labels); an InputError names the first record that cannot be trained on (a bad
    record, a conversation without a template, one with no token under the loss)."""
    if not isinstance(records, (list, tuple)):
        raise InputError(f"{source} must be a list of records, got {type(records).__name__}")
    check_loss_on(loss_on)
    out, eos = [], None
    for i, rec in enumerate(records):
        published = isinstance(rec, dict) and "question" in rec and "steps" not in rec and "messages" not in rec
        if published:
            if chat_template is None:
                raise InputError(
                    f"{source}: record {i}: a {{question, answer}} record trains as Huginn's published fine-tuning "
                    "script makes it, a conversation through the chat template, and there is none (pass one, or "
                    "give the record 'steps' for the '### answer' format)"
                )
            rec = {"messages": published_conversation(rec, i, source)}
        if isinstance(rec, dict) and "messages" in rec:
            try:
                ids, mask = chat_training_ids(chat_template, tokenizer, rec["messages"], loss_on)
            except InputError as exc:
                raise InputError(f"{source}: record {i}: {exc}") from None
            labels = [t if m else -100 for t, m in zip(ids, mask)]
        elif isinstance(rec, dict) and "text" in rec:
            if not isinstance(rec["text"], str) or not rec["text"]:
                raise InputError(f"{source}: record {i}: 'text' must be a non-empty string")
            check_unicode(f"{source}: record {i}: 'text'", rec["text"])
            ids = list(tokenizer.encode(rec["text"]).ids)
            labels = list(ids)
        else:
            if isinstance(rec, dict) and "question" not in rec:
                raise InputError(f"{source}: record {i} has none of 'question', 'messages', 'text'")
            qa = as_record(rec, i, source)
            eos = end_of_text_id(tokenizer, eos_token_id) if eos is None else eos
            ids, labels = encode_qa(tokenizer, qa, eos)
        if all(label == -100 for label in labels[1:]):  # the first label is never predicted
            why = (
                f"its answer is the published script's {PUBLISHED_ANSWER_ROLE!r} turn, which the chat template does "
                "not mark as the assistant's: give it as messages in the role the template marks"
                if published
                else "no assistant tokens to learn"
                if "messages" in rec
                else f"a text of {len(ids)} token(s), none to predict"
            )
            raise InputError(f"{source}: record {i} has no token under the loss ({why})")
        out.append((ids, labels))
    return out
