"""latentrt/serve/tool_parsers/: each parser reads its format as vLLM's parser of the same name does (the content
before the calls, a last call left open, a call that does not parse making the whole answer text), and a
streamed choice adds up to the same message whatever pieces its text comes in: the content streamed is the
message's content exactly (no piece of a marker leaks out), and the calls come whole at the end."""

from __future__ import annotations

import json
import random

import pytest

from latentrt.errors import InputError
from latentrt.serve.tool_parsers import PARSERS, tool_parser
from latentrt.serve.tool_parsers.base import held_suffix
from latentrt.serve.tools import parse_tools

WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ROME = '{"name": "get_weather", "arguments": {"city": "Rome"}}'

# (text, content, [(name, arguments)]): what the parser makes of a whole answer
CASES = {
    "hermes": [
        ("It is sunny.", "It is sunny.", []),
        ("", "", []),
        (f"<tool_call>\n{ROME}\n</tool_call>", None, [("get_weather", '{"city": "Rome"}')]),
        (f"Let me look.\n<tool_call>{ROME}</tool_call>", "Let me look.\n", [("get_weather", '{"city": "Rome"}')]),
        (  # two calls, the last left open (the answer ended first: vLLM counts it)
            f'<tool_call>{ROME}</tool_call>\n<tool_call>{{"name": "get_time", "arguments": {{}}}}',
            None,
            [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")],
        ),
        ('<tool_call>{"name": "f", "arguments": {"s": "é<"}}</tool_call>', None, [("f", '{"s": "é<"}')]),
        ('<tool_call>{"name": "f", "arguments": "x"}</tool_call>', None, [("f", '"x"')]),  # (as the model wrote it)
        # a call that does not parse: no calls, the whole answer is text
        (f'<tool_call>{ROME}</tool_call><tool_call>{{"name": "g", "argu', None, None),
        ('<tool_call>{"name": "f"}</tool_call>', None, None),  # (no arguments)
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', None, None),
        ("<tool_call>[1, 2]</tool_call>", None, None),
        ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", None, None),  # (too deep for json)
        ("a <tool_call but no call", "a <tool_call but no call", []),
        ("</tool_call> alone", "</tool_call> alone", []),
    ],
    "llama3_json": [
        ("It is sunny.", "It is sunny.", []),
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", '{"city": "Rome"}')]),
        ('<|python_tag|>{"name": "f", "arguments": {}}', None, [("f", "{}")]),
        (
            '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
            None,
            [("a", '{"x": 1}'), ("b", "{}")],
        ),
        ('{"name": "a", "parameters": {}} ;{"name": "b", "parameters": {}}', None, [("a", "{}"), ("b", "{}")]),
        ('{"name": "a", "parameters": {}} {"name": "b", "parameters": {}}', None, None),  # (no separator)
        ('{"name": "a", "parameters": {}} x{"name": "b", "parameters": {}}', None, None),  # (another one)
        ('{"name": "a", "parameters": {}};', None, None),
        ('{"name": "a"}', None, None),
        ('{"city": "Rome"} is what I would send', None, None),
        ('I would call {"name": "a", "parameters": {}}', 'I would call {"name": "a", "parameters": {}}', []),
        ("<|python", "<|python", []),
    ],
}


def expected(text: str, content, calls):
    """(content, calls) as the parser must give them: None calls mean none parse and the text is the content."""
    return (text, []) if calls is None else (content if calls else text, calls)


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_answers_read_as_vllms_parser_reads_them(name):
    parser = tool_parser(name)
    for text, content, calls in CASES[name]:
        assert parser.extract(text) == expected(text, content, calls), text[:80]


@pytest.mark.parametrize("name", sorted(CASES))
def test_what_goes_out_stays_out_as_the_text_grows(name):
    """``split`` over each prefix of each answer: its end never falls, and once the calls began they stay begun."""
    parser = tool_parser(name)
    for text, _, _ in CASES[name]:
        last_end, begun = 0, False
        for k in range(len(text) + 1):
            end, now = parser.split(text[:k])
            assert last_end <= end <= k and (now or not begun), (text[:k], end, now)
            last_end, begun = end, now


def pieces(text: str, rng: random.Random) -> list[str]:
    out, at = [], 0
    while at < len(text):
        k = rng.choice([1, 1, 2, 3, 5, 8, 13])
        out.append(text[at : at + k])
        at += k
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_streamed_choice_adds_up_to_its_message(name):
    choice = parse_tools({"tools": [WEATHER]}, tool_parser(name))
    assert choice.auto and not choice.calls
    rng = random.Random(5)
    for text, _, _ in CASES[name]:
        message, finish = choice.message(text, "stop")
        for split in [list(text), [text], *(pieces(text, rng) for _ in range(6))]:
            stream, content, calls = choice.stream(), "", []
            for piece in split:
                delta = stream.delta(piece)
                if delta is not None:
                    assert set(delta) == {"content"} and delta["content"], delta  # (calls come at the end only)
                    content += delta["content"]
            last, got_finish = stream.end("stop")
            if last is not None:
                content += last.get("content", "")
                calls = last.get("tool_calls", [])
            assert got_finish == finish and content == (message["content"] or "")
            got = [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
            want = [
                (k, c["function"]["name"], c["function"]["arguments"])
                for k, c in enumerate(message.get("tool_calls") or [])
            ]
            assert got == want, text[:80]
            assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


def test_the_message_holds_the_calls_and_the_text_before_them():
    choice = parse_tools({"tools": [WEATHER]}, tool_parser("hermes"))
    message, finish = choice.message(f"Looking.<tool_call>{ROME}</tool_call>", "stop")
    assert finish == "tool_calls" and message["role"] == "assistant" and message["content"] == "Looking."
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert choice.message("plain", "length") == ({"role": "assistant", "content": "plain"}, "length")
    # cut by max_tokens after a whole call: the calls (vLLM's finish reason with calls made)
    assert choice.message(f"<tool_call>{ROME}", "length")[1] == "tool_calls"


def test_held_text_is_the_longest_end_that_may_begin_the_marker():
    texts = ["", "a", "a<", "a<tool", "<tool_call", "a<tox", "<<", "a<tool_call>"]
    assert [held_suffix(t, "<tool_call>") for t in texts] == [0, 0, 1, 5, 10, 0, 1, 0]  # (a whole marker is found)
    assert held_suffix("xaa", "aab") == 2  # (the longest of two)


def test_the_registry_names_each_parser_and_refuses_others():
    assert sorted(PARSERS) == ["hermes", "llama3_json"]
    assert all(tool_parser(name).name == name for name in PARSERS)
    with pytest.raises(InputError, match=r"tool-call parser 'mistral' is not one of \['hermes', 'llama3_json'\]"):
        tool_parser("mistral")


def test_auto_without_a_parser_names_the_flags_and_none_stays_text():
    with pytest.raises(InputError, match="start the server with --enable-auto-tool-choice --tool-call-parser NAME"):
        parse_tools({"tools": [WEATHER]})
    with pytest.raises(InputError, match="--enable-auto-tool-choice"):
        parse_tools({"tools": [WEATHER], "tool_choice": "auto"})
    none = parse_tools({"tools": [WEATHER], "tool_choice": "none"}, tool_parser("hermes"))
    assert not none.auto and not none.calls
    named = parse_tools(
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        tool_parser("hermes"),
    )
    assert named.calls and not named.auto  # (a named call is held to its schema, parser or not)
