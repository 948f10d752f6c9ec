"""latentrt/serve/response_store.py: the Responses API's store, opt-in. Through the official client: a kept
response is fetched as it was answered (streamed ones too), deleted, and continued with ``previous_response_id``:
the next turn's prompt is the conversation so far (its instructions not inherited, the calls with the ids the
client was given), its text generate()'s alone on it; ``store: false`` keeps nothing; unknown ids are 404s."""

from __future__ import annotations

import pytest
from conftest import tiny_recurrent
from test_serve_responses import EXTRA, chat_alone
from test_serve_tools import CHAT, COMPACT, TEMPLATE, WEATHER, client
from test_structured import TOKENIZER

import latentrt
from latentrt.chat import ChatTemplate
from latentrt.serve.response_store import ResponseNotFound, ResponseStore

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

GREEDY = dict(EXTRA, stop_token_ids=[0], temperature=0)
# the tests' template, refusing a system message after the first (as many models' templates do): a conversation
# continued out of order is a 400 (the tiny model's text hardly depends on its prompt's order)
STRICT = ChatTemplate(
    "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('a system message after the first') }}{% endif %}{% endfor %}" + TEMPLATE.source
)


@pytest.fixture(scope="module")
def store_server():
    from test_server import serving

    model = tiny_recurrent(seed=3, vocab_size=TOKENIZER.get_vocab_size(), block_size=256)
    model.tokenizer = TOKENIZER
    with serving(model, template=STRICT, max_batch=4, responses_store=3) as (url, engine):
        yield url, model


def prompt_length(model, messages, **kw) -> int:
    return len(latentrt.apply_chat_template(model, messages, TEMPLATE, **kw))


def test_a_kept_response_is_fetched_continued_and_deleted(store_server):
    url, model = store_server
    c = client(url)
    first = c.responses.create(
        model="tiny", instructions="Be brief", input="Alex is", max_output_tokens=5, extra_body=GREEDY
    )
    assert first.store is True and c.responses.retrieve(first.id).model_dump() == first.model_dump()

    # the next turn: the conversation so far, without the first turn's instructions (OpenAI's rule)
    second = c.responses.create(
        model="tiny", previous_response_id=first.id, input="Bob is", max_output_tokens=5, extra_body=GREEDY
    )
    messages = [*CHAT, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Bob is"}]
    assert second.usage.input_tokens == prompt_length(model, messages)
    assert second.output_text == chat_alone(model, messages, max_new_tokens=5).text
    # and a third on the second, with instructions of its own (a system message first)
    third = c.responses.create(
        model="tiny",
        previous_response_id=second.id,
        instructions="Be kind",
        input="Tom is",
        max_output_tokens=5,
        extra_body=GREEDY,
    )
    messages = [
        {"role": "system", "content": "Be kind"},
        *messages,
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Tom is"},
    ]
    assert third.usage.input_tokens == prompt_length(model, messages)
    assert third.output_text == chat_alone(model, messages, max_new_tokens=5).text

    c.responses.delete(first.id)
    for gone in (lambda: c.responses.retrieve(first.id), lambda: c.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError, match=f"response '{first.id}' not found"):
            gone()
    with pytest.raises(openai.NotFoundError, match=f"response '{first.id}' not found"):
        c.responses.create(model="tiny", previous_response_id=first.id, input="a", extra_body=GREEDY)
    assert c.responses.retrieve(second.id).output_text == second.output_text  # (the others stay)


def test_store_false_keeps_nothing_and_a_stream_is_kept_as_it_ended(store_server):
    url, model = store_server
    c = client(url)
    r = c.responses.create(model="tiny", input="Alex is", max_output_tokens=3, store=False, extra_body=GREEDY)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    events = list(
        c.responses.create(model="tiny", input="Alex is", max_output_tokens=5, stream=True, extra_body=GREEDY)
    )
    final = events[-1].response
    assert events[0].response.store is True and final.store is True
    assert c.responses.retrieve(final.id).model_dump() == final.model_dump()
    nxt = c.responses.create(model="tiny", previous_response_id=final.id, input="Bob", extra_body=GREEDY)
    messages = [*CHAT, {"role": "assistant", "content": final.output_text}, {"role": "user", "content": "Bob"}]
    assert nxt.usage.input_tokens == prompt_length(model, messages)


def test_a_call_is_answered_in_the_next_turn_by_its_id(store_server):
    """The first turn calls a function; the next sends only the call's output, by the call id it was given:
    the prompt holds the call and its output, as the chat route's conversation would."""
    url, model = store_server
    c = client(url)
    tool = {"type": "function", **WEATHER["function"]}
    first = c.responses.create(
        model="tiny",
        input="Alex is",
        max_output_tokens=40,
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        extra_body=dict(GREEDY, **COMPACT),
    )
    (call,) = first.output
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    second = c.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[output],
        tools=[tool],
        tool_choice="none",
        max_output_tokens=4,
        extra_body=GREEDY,
    )
    made = {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    messages = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [made]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]
    assert second.usage.input_tokens == prompt_length(model, messages, tools=[WEATHER])
    assert second.output_text == chat_alone(model, messages, tools=[WEATHER], max_new_tokens=4).text


def test_a_previous_id_that_is_not_text_is_a_400(store_server):
    url, _ = store_server
    h = httpx.Client(base_url=url)
    got = h.post("/v1/responses", json={"model": "tiny", "input": "a", "previous_response_id": 3, **GREEDY})
    assert got.status_code == 400 and "previous_response_id must be a response's id, got 3" in got.text


def test_the_store_keeps_the_newest_and_hands_out_copies():
    store = ResponseStore(2)
    for k in range(3):
        store.put({"id": f"r{k}", "output": [k]}, [{"role": "user", "content": str(k)}])
    assert len(store) == 2
    with pytest.raises(ResponseNotFound, match="response 'r0' not found"):
        store.response("r0")
    got = store.response("r1")
    got["output"].append(9)
    store.conversation("r2")[0]["content"] = "changed"
    assert store.response("r1") == {"id": "r1", "output": [1]}
    assert store.conversation("r2") == [{"role": "user", "content": "2"}]
    store.delete("r1")
    with pytest.raises(ResponseNotFound):
        store.delete("r1")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="holds at least one response"):
            ResponseStore(bad)
