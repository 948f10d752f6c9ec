"""latentrt/serve/responses.py: OpenAI's Responses API through the official client. A response's text (or calls)
are the tokens of the same conversation on the chat route (and so of generate() alone on the prompt the chat
template renders); instructions, message lists and function-call items become that conversation; streams are
the API's typed events, adding up to the same response; what latentrt does not take is a 400."""

from __future__ import annotations

import json

import pytest
from test_serve_tools import CHAT, COMPACT, STEPS, TEMPLATE, WEATHER, WEATHER_CALL, client, tool_server  # noqa: F401

import latentrt

pytest.importorskip("llguidance")
httpx = pytest.importorskip("httpx")

EXTRA = {"num_steps": 3, "init_scale": 0.0}
JSON = {"content-type": "application/json"}


def chat_alone(model, messages, **kw):
    """generate() alone on the conversation as the chat route renders it."""
    prompt = latentrt.apply_chat_template(model, messages, TEMPLATE, tools=kw.pop("tools", None))
    return latentrt.generate(model, prompt, stop=[0], num_steps=3, init_scale=0.0, **kw)


def test_a_text_response_is_the_chat_routes_answer(tool_server):  # noqa: F811
    url, model = tool_server
    c = client(url)
    r = c.responses.create(
        model="tiny",
        instructions="Be brief",
        input="Alex is",
        max_output_tokens=6,
        temperature=0.8,
        extra_body=dict(EXTRA, seed=4, stop_token_ids=[0]),
    )
    messages = [{"role": "system", "content": "Be brief"}, *CHAT]
    want = chat_alone(model, messages, max_new_tokens=6, temperature=0.8, seed=4)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == want.text
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.output_tokens == len(want.tokens) and r.usage.input_tokens == len(
        latentrt.apply_chat_template(model, messages, TEMPLATE)
    )
    if want.finish_reasons == ["length"]:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None

    # streamed: the typed events, numbered, their deltas the text; the last event the same response
    events = list(
        c.responses.create(
            model="tiny",
            instructions="Be brief",
            input="Alex is",
            max_output_tokens=6,
            temperature=0.8,
            stream=True,
            extra_body=dict(EXTRA, seed=4, stop_token_ids=[0]),
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.text
    assert events[-1].response.output_text == want.text and events[-1].response.status == r.status


def test_message_lists_and_function_call_items_become_the_conversation(tool_server):  # noqa: F811
    """A developer message is a system one; calls in a row are one assistant message's tool_calls; their outputs
    tool messages: the prompt (its length) and the text of the chat route's conversation."""
    url, model = tool_server
    rome = '{"city": "Rome"}'
    items = [
        {"role": "developer", "content": "Be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "Alex is"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": rome},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"},
    ]
    r = client(url).responses.create(
        model="tiny", input=items, max_output_tokens=4, extra_body=dict(EXTRA, stop_token_ids=[0], temperature=0)
    )
    clock = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "Be brief"},
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, clock]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    assert r.usage.input_tokens == len(latentrt.apply_chat_template(model, messages, TEMPLATE))
    assert r.output_text == chat_alone(model, messages, max_new_tokens=4).text


def test_json_formats_and_function_tools(tool_server):  # noqa: F811
    url, model = tool_server
    c = client(url)
    schema = WEATHER["function"]["parameters"]
    fmt = {"format": {"type": "json_schema", "name": "weather", "schema": schema}}
    args = dict(model="tiny", input="Alex is", max_output_tokens=40, temperature=0.8)
    extra = dict(EXTRA, seed=3, stop_token_ids=[0], **COMPACT)
    r = c.responses.create(text=fmt, extra_body=extra, **args)
    want = chat_alone(
        model, CHAT, max_new_tokens=40, temperature=0.8, seed=3, guided_json=schema, disable_any_whitespace=True
    )
    assert r.output_text == want.text and json.loads(r.output_text)["city"] in ("Paris", "Rome")

    tool = {"type": "function", **WEATHER["function"]}  # (the Responses API's flat function tool)
    r = c.responses.create(
        tools=[tool], tool_choice={"type": "function", "name": "get_weather"}, extra_body=extra, **args
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    want = chat_alone(
        model, CHAT, tools=[WEATHER], max_new_tokens=40, temperature=0.8, seed=3, guided_json=schema,
        disable_any_whitespace=True,
    )  # fmt: skip
    assert call.arguments == want.text and json.loads(call.arguments)["city"] in ("Paris", "Rome")

    events = list(
        c.responses.create(
            tools=[tool], tool_choice={"type": "function", "name": "get_weather"}, stream=True, extra_body=extra, **args
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done[0].arguments == call.arguments and events[-1].response.output[0].name == "get_weather"

    r = c.responses.create(tools=[tool], tool_choice="required", extra_body=extra, **dict(args, max_output_tokens=150))
    assert (
        r.status == "completed"
        and r.output
        and all(o.type == "function_call" and o.name == "get_weather" for o in r.output)
    )


def test_what_latentrt_does_not_take_is_a_400(tool_server):  # noqa: F811
    url, _ = tool_server
    h = httpx.Client(base_url=url)
    base = dict(model="tiny", input="Alex is", max_output_tokens=2)
    for bad, message in [
        (dict(previous_response_id="resp_1"), "this server stores no responses (start it with --enable-responses-api"),
        (dict(store="yes"), "store must be true or false, got 'yes'"),
        (dict(truncation="auto"), "truncation='auto' is not supported"),
        (dict(background=True), "background responses are not supported"),
        (dict(tools=[{"type": "web_search"}]), "tools[0]: only function tools are supported, got 'web_search'"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "no images"),
        (dict(input=[]), "input must be a text or a non-empty list of messages"),
        (dict(input=[{"type": "reasoning"}]), "input[0] must be a message"),
        (dict(text={"format": {"type": "xml"}}), "text.format must be"),
        (dict(instructions=3), "instructions must be a string"),
        (dict(nope=1), "unknown field(s) ['nope'] for /v1/responses"),
        (dict(tools=[{"type": "function", "name": "f"}]), "tool_choice 'auto' (the default with tools)"),
        (dict(max_output_tokens=-1), "max_output_tokens must be"),
        (dict(user="\ud800"), "user is not valid Unicode text"),
        (dict(metadata={"a": 3}), "metadata must be an object of strings"),
    ]:
        got = h.post("/v1/responses", content=json.dumps(dict(base, **bad)), headers=JSON)  # (ASCII: surrogates too)
        assert got.status_code == 400 and message in got.json()["error"]["message"], (bad, got.text)
    # no store: nothing to fetch or delete (404s naming why)
    for method in (h.get, h.delete):
        got = method("/v1/responses/resp_1")
        assert got.status_code == 404 and "response 'resp_1' not found: this server stores no responses" in got.text
    # what the response echoes, as given (ASCII JSON: a lone surrogate in a tool's description answered 500)
    tool = {"type": "function", "name": "f", "description": "\ud800"}
    got = h.post(
        "/v1/responses", content=json.dumps(dict(base, tools=[tool], tool_choice="none", **STEPS)), headers=JSON
    )
    assert got.status_code == 200 and got.json()["tools"] == [tool]
