"""latentrt/serve/tools.py: OpenAI function calling on the chat route through the official client. A named or
required tool choice makes the answer calls whose arguments follow the functions' schemas (structured outputs),
each choice's tokens those of generate() alone on the prompt the template renders with the tools and the
schema vLLM asks; streamed as OpenAI streams calls; 'none' answers text; 'auto' and bad tools are 400s."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recurrent
from test_structured import TOKENIZER

import latentrt
from latentrt.chat import ChatTemplate
from latentrt.serve.tools import ToolChoice

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TEMPLATE = ChatTemplate(
    "{% if tools %}functions: {% for t in tools %}{{ t.function.name }} {% endfor %}. {% endif %}"
    "{% for m in messages %}{{ m.role }}: {% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}call {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    " . {% endfor %}assistant:"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # (no parameters: an empty object)
CHAT = [{"role": "user", "content": "Alex is"}]
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
}
# a call of get_weather and its answer, as a conversation's history holds them
CALLED = [
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
STEPS = {"stop_token_ids": [0], "num_steps": 3, "init_scale": 0.0}


@pytest.fixture(scope="module")
def tool_server():
    from test_server import serving

    model = tiny_recurrent(seed=3, vocab_size=TOKENIZER.get_vocab_size(), block_size=256)  # (room for the tools)
    model.tokenizer = TOKENIZER
    with serving(model, template=TEMPLATE, max_batch=4) as (url, engine):
        yield url, model


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def alone(model, tools, schema, messages=CHAT, **kw):
    """generate() alone on the conversation rendered with ``tools``, its text held to ``schema``."""
    prompt = latentrt.apply_chat_template(model, messages, TEMPLATE, tools=tools)
    options = dict(stop=[0], num_steps=3, init_scale=0.0, disable_any_whitespace=True, **kw)
    return latentrt.generate(model, prompt, guided_json=schema, **options)


def test_a_named_function_is_called_with_arguments_of_its_schema(tool_server):
    url, model = tool_server
    named = {"type": "function", "function": {"name": "get_weather"}}
    args = dict(model="tiny", messages=CHAT, max_tokens=40, temperature=0.8, seed=3)
    r = client(url).chat.completions.create(
        tools=[WEATHER, CLOCK], tool_choice=named, extra_body=dict(STEPS, **COMPACT), **args
    )
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "stop" and choice.message.content is None  # (OpenAI's, for a forced call)
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Rome") and set(arguments) <= {"city", "days"}
    want = alone(model, [WEATHER, CLOCK], WEATHER["function"]["parameters"], max_new_tokens=40, temperature=0.8, seed=3)
    assert choice.latentrt["token_ids"] == want.tokens and call.function.arguments == want.text
    plain = latentrt.apply_chat_template(model, CHAT, TEMPLATE)
    assert r.usage.prompt_tokens == len(latentrt.apply_chat_template(model, CHAT, TEMPLATE, tools=[WEATHER, CLOCK]))
    assert r.usage.prompt_tokens > len(plain)  # the template showed the tools

    # streamed: the call's id and name first, its arguments as they come; the same call
    stream = client(url).chat.completions.create(
        tools=[WEATHER, CLOCK], tool_choice=named, extra_body=dict(STEPS, **COMPACT), stream=True, **args
    )
    deltas = [c.choices[0].delta for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].tool_calls[0]
    assert first.id.startswith("call_") and first.function.name == "get_weather" and first.type == "function"
    assert all(d.tool_calls[0].id is None and d.tool_calls[0].index == 0 for d in deltas[1:])
    assert "".join(d.tool_calls[0].function.arguments for d in deltas) == call.function.arguments


def test_required_calls_name_functions_of_the_tools_with_their_schemas(tool_server):
    url, model = tool_server
    args = dict(model="tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=5)
    tools = [WEATHER, CLOCK]
    r = client(url).chat.completions.create(
        tools=tools, tool_choice="required", extra_body=dict(STEPS, **COMPACT), **args
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert arguments["city"] in ("Paris", "Rome")
        else:
            assert call.function.name == "get_time" and isinstance(arguments, dict)
    schema = ToolChoice(tuple(tools), required=True).guided_json()
    assert schema["minItems"] == 1 and "maxItems" not in schema
    want = alone(model, tools, schema, max_new_tokens=60, temperature=1.0, seed=5)
    assert choice.latentrt["token_ids"] == want.tokens
    made = json.loads(want.text)
    assert [c.function.name for c in choice.message.tool_calls] == [c["name"] for c in made]
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [c["parameters"] for c in made]

    stream = client(url).chat.completions.create(
        tools=tools, tool_choice="required", extra_body=dict(STEPS, **COMPACT), stream=True, **args
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    got = [(c.index, c.function.name, c.function.arguments) for c in deltas[0].tool_calls]
    assert got == [(k, c.function.name, c.function.arguments) for k, c in enumerate(choice.message.tool_calls)]

    one = ToolChoice(tuple(tools), required=True, parallel=False).guided_json()
    r = client(url).chat.completions.create(
        tools=tools, tool_choice="required", parallel_tool_calls=False, extra_body=dict(STEPS, **COMPACT), **args
    )
    assert one["maxItems"] == 1 and len(r.choices[0].message.tool_calls) == 1
    assert (
        r.choices[0].latentrt["token_ids"]
        == alone(model, tools, one, max_new_tokens=60, temperature=1.0, seed=5).tokens
    )


def test_none_answers_text_with_the_tools_shown_and_a_history_of_calls_renders(tool_server):
    url, model = tool_server
    r = client(url).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, tools=[WEATHER], tool_choice="none", extra_body=STEPS
    )
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls
    history = [*CHAT, *CALLED]
    ids = httpx.post(url + "/tokenize", json={"model": "tiny", "messages": history}).json()["tokens"]
    text = model.tokenizer.decode(ids)
    assert 'assistant: call get_weather {"city": "Rome"} . tool: sunny . assistant:' in text  # (arguments an object)
    r = client(url).chat.completions.create(
        model="tiny", messages=history, max_tokens=4, tools=[WEATHER], tool_choice="none", extra_body=STEPS
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_call_cut_by_max_tokens_keeps_its_text(tool_server):
    url, model = tool_server
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = dict(model="tiny", messages=CHAT, max_tokens=3, tools=[WEATHER], extra_body=dict(STEPS, **COMPACT))
    r = client(url).chat.completions.create(tool_choice=named, **body)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls[0].function.arguments
    r = client(url).chat.completions.create(tool_choice="required", **body)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("[")


def test_bad_tools_and_choices_are_400s(tool_server):
    url, _ = tool_server
    h = httpx.Client(base_url=url)
    base = dict(model="tiny", messages=CHAT, max_tokens=2, **STEPS)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for bad, message in [
        (dict(tools=[WEATHER]), "tool_choice 'auto' (the default with tools) needs a parser"),
        (dict(tools=[WEATHER], tool_choice="auto"), "give tool_choice 'required' or"),
        (dict(tool_choice="required"), "tool_choice 'required' needs tools"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}), "names 'x', which is"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice must be 'none', 'auto', 'required' or"),
        (dict(tools=[{"type": "function"}], tool_choice="none"), "tools[0] must be {'type': 'function', 'function'"),
        (dict(tools=[{"type": "function", "function": {"x": 1}}], tool_choice="none"), "tools[0].function takes"),
        (dict(tools=[{"type": "code", "function": {}}], tool_choice="none"), "tools[0] must be {'type': 'function'"),
        (dict(tools=[WEATHER, WEATHER], tool_choice="none"), "tools[1]: a second function named 'get_weather'"),
        (dict(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="none"), "must be 1-64 letters"),
        (dict(tools=[{"type": "function", "function": {"name": "a", "parameters": 3}}], tool_choice="none"), "a JSON"),
        (dict(tools=WEATHER, tool_choice="none"), "tools must be a list of"),
        (dict(tools=[WEATHER] * 129, tool_choice="none"), "tools takes at most 128 functions, got 129"),
        (dict(tools=[WEATHER], tool_choice=named, parallel_tool_calls="yes"), "parallel_tool_calls must be true or"),
        (dict(tools=[WEATHER], tool_choice=named, guided_regex="a"), "tool_choice sets the structured output"),
        (
            dict(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]),
            "messages[0].tool_calls[0].function.arguments is not JSON",
        ),
        (dict(messages=[{"role": "assistant", "tool_calls": 3}]), "messages[0].tool_calls must be a list of calls"),
    ]:
        got = h.post("/v1/chat/completions", json=dict(base, **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], (bad, got.text)
    got = h.post("/v1/completions", json=dict(model="tiny", prompt="a", max_tokens=2, tools=[WEATHER]))
    assert got.status_code == 400 and "tools=" in got.json()["error"]["message"]


def test_a_slow_grammar_compiles_off_the_event_loop_and_the_steps_of_others(tool_server):
    """A grammar whose first allowed set takes llguidance seconds (a 20,000-rule chain, which it then refuses): the
    request is a 400 naming it, and while it compiles the server answers others and streams go on (the compile
    runs on a thread of its own, not on the event loop nor on the thread that follows running sequences)."""
    import threading
    import time

    url, _ = tool_server
    chain = "start: r0\n" + "\n".join(f'r{i}: r{i + 1} | "x"' for i in range(20_000)) + '\nr20000: "y"'
    slow = dict(model="tiny", prompt="Alex", max_tokens=2, guided_grammar=chain, **STEPS)
    answer = {}
    sender = threading.Thread(
        target=lambda: answer.update(r=httpx.post(url + "/v1/completions", json=slow, timeout=120))
    )
    started = time.time()
    sender.start()
    time.sleep(0.5)
    quick = []
    while sender.is_alive() and len(quick) < 5:
        t = time.time()
        r = httpx.post(url + "/v1/completions", json=dict(model="tiny", prompt="Alex", max_tokens=2, **STEPS))
        assert r.status_code == 200
        quick.append(time.time() - t)
    sender.join()
    assert answer["r"].status_code == 400 and "guided_grammar: llguidance stopped" in answer["r"].text
    assert len(quick) >= 2 and max(quick) < (time.time() - started) / 2, quick  # (answered while it compiled)


def test_the_offline_engine_chat_shows_the_tools_and_takes_a_schema(tool_server):
    """``Engine.chat(..., tools=)`` (vLLM's ``LLM.chat``): the prompt the template renders with the tools, the
    tokens of generate() alone with the schema a named call asks."""
    from latentrt.serve import Engine

    _, model = tool_server
    schema = WEATHER["function"]["parameters"]
    kw = dict(max_new_tokens=30, stop=[0], num_steps=3, init_scale=0.0, disable_any_whitespace=True)
    (got,) = Engine(model).chat(CHAT, template=TEMPLATE, tools=[WEATHER], guided_json=schema, **kw)
    assert got.tokens == alone(model, [WEATHER], schema, max_new_tokens=30).tokens
    assert json.loads(got.text)["city"] in ("Paris", "Rome")


# "auto": the model decides, in its own format (Hermes' here), which the server's parser reads. The tiny model has
# no format of its own, so a regex holds its answer to one: a call after some text, or text alone.
CALLS = r'Sure\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'
TEXT = r"(Paris|Rome) is sunny\."


@pytest.fixture(scope="module")
def auto_server():
    from test_server import serving

    model = tiny_recurrent(seed=3, vocab_size=TOKENIZER.get_vocab_size(), block_size=256)
    model.tokenizer = TOKENIZER
    with serving(model, template=TEMPLATE, max_batch=4, tool_call_parser="hermes") as (url, engine):
        yield url, model


def regex_alone(model, regex: str, **kw):
    """generate() alone on the conversation rendered with the tools, its text held to ``regex``."""
    prompt = latentrt.apply_chat_template(model, CHAT, TEMPLATE, tools=[WEATHER, CLOCK])
    return latentrt.generate(model, prompt, guided_regex=regex, stop=[0], num_steps=3, init_scale=0.0, **kw)


def test_auto_answers_the_calls_the_model_writes_in_its_format(auto_server):
    """tool_choice left out (OpenAI's default with tools: auto): the text before the call is the message's content,
    the call its name and arguments as written (``finish_reason`` "tool_calls"); streamed, the content goes out as it
    comes (no piece of ``<tool_call>``) and the call whole at the end; the tokens are generate()'s alone."""
    import re

    url, model = auto_server
    args = dict(model="tiny", messages=CHAT, max_tokens=120, temperature=1.0, seed=7, tools=[WEATHER, CLOCK])
    want = regex_alone(model, CALLS, max_new_tokens=120, temperature=1.0, seed=7)
    city = re.fullmatch(CALLS, want.text).group(1)
    r = client(url).chat.completions.create(extra_body=dict(STEPS, guided_regex=CALLS), **args)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city} and r.usage.completion_tokens == len(want.tokens)

    chunks = list(client(url).chat.completions.create(extra_body=dict(STEPS, guided_regex=CALLS), stream=True, **args))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Sure."
    (calls,) = [d.tool_calls for d in deltas if d.tool_calls]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, "get_weather", call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the model answering in text: the message is its text (finish "stop"), streamed as it comes
    text = regex_alone(model, TEXT, max_new_tokens=40, temperature=1.0, seed=9).text  # (the route's temperature)
    said = dict(model="tiny", messages=CHAT, max_tokens=40, tools=[WEATHER, CLOCK])
    said["extra_body"] = dict(STEPS, guided_regex=TEXT, seed=9)
    r = client(url).chat.completions.create(**said)
    assert r.choices[0].message.content == text and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    stream = client(url).chat.completions.create(stream=True, **said)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and len(pieces) > 1


def test_auto_on_the_responses_route_gives_the_message_then_the_call(auto_server):
    url, model = auto_server
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    args = dict(model="tiny", input="Alex is", max_output_tokens=120, tools=[tool])
    extra = dict(STEPS, guided_regex=CALLS, seed=7)  # (the route samples at temperature 1 unless told)
    r = client(url).responses.create(extra_body=extra, **args)
    message, call = r.output
    assert message.type == "message" and message.content[0].text == "Sure." and r.status == "completed"
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")

    events = list(client(url).responses.create(extra_body=extra, stream=True, **args))
    texts = [e.delta for e in events if e.type == "response.output_text.delta"]
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert "".join(texts) == "Sure." and added == [(0, "message"), (1, "function_call")]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert events[-1].type == "response.completed" and [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[0].id == events[2].item.id and final.output[1].arguments == call.arguments

    # text whose end might have begun a call (held back while streaming) goes out when the answer ends
    held = dict(STEPS, guided_regex=r"(Paris|Rome) is <tool", seed=7)
    r = client(url).responses.create(extra_body=held, **args)
    events = list(client(url).responses.create(extra_body=held, stream=True, **args))
    (message,) = r.output
    assert message.content[0].text.endswith(" is <tool") and events[-1].response.output_text == r.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
