"""``latentrt run-batch`` (latentrt/serve/batch.py): a file of OpenAI Batch API requests answered through the
server's routes in-process, each answer the server's (and generate()'s alone), the output written whole."""

from __future__ import annotations

import io
import json
import random

import pytest

import latentrt
from latentrt.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

MODEL = "builtin:recurrent"
WORDS = "Alex Bob is a wumpus yumpus rompus zumpus Every . ?".split()


def _line(custom_id: str, url: str, body: dict, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def _requests(n: int, seed: int = 0) -> list[dict]:
    """Completions and chat requests with their own options (greedy or seeded: one answer each)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 12)))
        options = dict(max_tokens=rng.randrange(1, 10), temperature=rng.choice([0, 0.8]), seed=i)
        options.update(rng.choice([{}, {"num_steps": rng.randrange(1, 8)}, {"adaptive": True, "num_steps": 8}]))
        if i % 3 == 0:
            body = dict(model=MODEL, messages=[{"role": "user", "content": text}], **options)
            out.append({"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": body})
        else:
            out.append(
                {"custom_id": f"r{i}", "url": "/v1/completions", "body": dict(model=MODEL, prompt=text, **options)}
            )
    return out


def test_every_request_is_answered_in_order_as_generate_alone(tmp_path, capsys):
    """20 requests at a max batch of 3 (the others queued): each 200 answer's tokens are generate()'s for it alone,
    refusals are the server's 400 / 404 answers in their place, and the lines keep the input's order."""
    requests = _requests(20)
    requests.insert(5, {"custom_id": "bad", "url": "/v1/completions", "body": dict(model=MODEL, prompt="a", top_p=3)})
    requests.insert(9, {"custom_id": "other", "url": "/v1/completions", "body": dict(model="gpt-4", prompt="a")})
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(r["custom_id"], r["url"], r["body"]) for r in requests) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out), "--max-batch", "3"]) == 0
    said = capsys.readouterr().out
    assert (
        f"22 request(s) answered (20 with status 200, 1 with status 400, 1 with status 404); results in {out}" in said
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in requests]
    assert len({x["id"] for x in lines}) == len(lines) and all(x["error"] is None for x in lines)
    model = latentrt.load(MODEL)
    for line, request in zip(lines, requests):
        response, body = line["response"], request["body"]
        if request["custom_id"] == "bad":
            assert (
                response["status_code"] == 400
                and "top_p must be in (0, 1], got 3" in response["body"]["error"]["message"]
            )
            continue
        if request["custom_id"] == "other":
            assert (
                response["status_code"] == 404 and "'gpt-4' is not served here" in response["body"]["error"]["message"]
            )
            continue
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        options = {k: v for k, v in body.items() if k not in ("model", "prompt", "messages", "max_tokens")}
        if "messages" in body:
            prompt = latentrt.apply_chat_template(model, body["messages"])
            assert response["body"]["object"] == "chat.completion"
        else:
            prompt = body["prompt"]
        alone = latentrt.generate(model, prompt, max_new_tokens=body["max_tokens"], **options)
        choice = response["body"]["choices"][0]
        assert choice["latentrt"]["token_ids"] == alone.tokens and choice["latentrt"]["steps"] == alone.steps
        text = choice["message"]["content"] if "messages" in body else choice["text"]
        assert text == alone.text


def test_standard_input_and_the_engines_flags(tmp_path, capsys, monkeypatch):
    body = dict(model="mine", prompt="Alex is a wumpus . Is Alex a wumpus or rompus ?", max_tokens=3)
    monkeypatch.setattr("sys.stdin", io.StringIO(_line("one", "/v1/completions", body)))
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", MODEL, "-i", "-", "-o", str(out), "--served-model-name", "mine"]
    argv += ["--override-generation-config", '{"num_steps": 2}', "--scheduler", "token"]
    assert main(argv) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    steps = line["response"]["body"]["choices"][0]["latentrt"]["steps"]
    assert line["response"]["status_code"] == 200 and set(steps) == {2}


BAD_LINES = [
    ("not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: a request is a JSON object, got list"),
    (_line("a", "/v1/completions", {}, extra=1), "line 2: unknown field(s) ['extra']"),
    (_line("", "/v1/completions", {}), "line 2: custom_id must be a non-empty string, got ''"),
    (_line("first", "/v1/completions", {}), "line 2: custom_id 'first' is also line 1's (each must be unique)"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}), "line 2: method must"),
    (_line("a", "/v1/embeddings", {}), "line 2: url must be one of ['/v1/completions', '/v1/chat/completions']"),
    (_line("a", "/v1/completions", []), "line 2: body must be a JSON object"),
    (_line("a", "/v1/completions", {"prompt": "x", "stream": True}), "line 2: stream is not supported in a batch"),
    # (written back into the output: it failed there, after every request had run; found by tools.fuzz)
    (_line("\ud800", "/v1/completions", {}), "line 2: custom_id is not valid Unicode text (surrogates not allowed"),
    ("[" * 100_000 + "]" * 100_000, "line 2: not JSON (nested too deeply)"),  # (json.loads' RecursionError)
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_a_bad_line_is_an_error_naming_it_before_the_model_loads(tmp_path, capsys, monkeypatch, bad, message):
    monkeypatch.setattr(latentrt.loader, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    source = tmp_path / "in.jsonl"
    source.write_text(_line("first", "/v1/completions", {"prompt": "x"}) + "\n" + bad + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"latentrt: error: {source}, ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_files_that_cannot_be_used_are_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(latentrt.loader, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    good = tmp_path / "in.jsonl"
    good.write_text(_line("a", "/v1/completions", {"prompt": "x"}))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    cases = [
        (["-i", str(tmp_path / "missing.jsonl"), "-o", "o.jsonl"], "input file '.*missing.jsonl' does not exist"),
        (["-i", str(tmp_path / "empty.jsonl"), "-o", "o.jsonl"], "holds no request"),
        (["-i", str(good), "-o", str(tmp_path)], "is a folder"),
        (["-i", str(good), "-o", str(tmp_path / "no" / "o.jsonl")], "its folder .* does not exist"),
        (["-i", str(good), "-o", "o.jsonl", "--chat-template", "nope.jinja"], "--chat-template 'nope.jinja' is not"),
        (["-i", str(good), "-o", "o.jsonl", "--enable-auto-tool-choice"], "needs --tool-call-parser NAME"),
    ]
    for flags, message in cases:
        assert main(["run-batch", MODEL, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentrt: error: ") and pytest.importorskip("re").search(message, err), err


def test_values_json_cannot_hold_reach_the_route_and_are_refused_there(tmp_path, capsys):
    """Python's JSON reads NaN and Infinity, and a lone surrogate from its escape; a line with them is refused by its
    route (400, the server's message for that body) while the others are answered (found by tools.fuzz: the
    in-process client could not encode such a body, and the run ended in a traceback, writing nothing)."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bodies = [
        {"prompt": "Alex is a wumpus.", "max_tokens": 2, "echo": float("inf")},
        {"prompt": "Alex is a wumpus.", "max_tokens": 2, "temperature": float("nan")},
        {"prompt": "Alex is a \ud800 wumpus.", "max_tokens": 2},
        {"prompt": "Alex is a wumpus.", "max_tokens": 2},
    ]
    source.write_text("\n".join(_line(f"r{i}", "/v1/completions", b) for i, b in enumerate(bodies)) + "\n")
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    messages = [x["response"]["body"].get("error", {}).get("message") for x in lines]
    assert messages == [
        "echo must be true or false, got inf",
        "temperature must be a finite number >= 0, got nan",
        "prompt 0 is not valid Unicode text (surrogates not allowed at 10)",
        None,
    ]
    assert [x["response"]["status_code"] for x in lines] == [400, 400, 400, 200]
    assert "3 with status 400" in capsys.readouterr().out


def test_the_output_is_written_whole_or_not_at_all(tmp_path):
    """A failure while writing (here a line that is no JSON) leaves the previous output file as it was and no
    partial file beside it; a whole write replaces it."""
    from latentrt.serve.batch import write_lines

    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(TypeError):
        write_lines(out, [{"a": 1}, object()])
    assert out.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    write_lines(out, [{"a": 1}, {"b": "é"}])
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_without_the_serve_extra_it_says_which_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "latentrt.serve.batch", raising=False)
    monkeypatch.setitem(sys.modules, "httpx", None)  # (an import of it raises ImportError)
    assert main(["run-batch", MODEL, "-i", "-", "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentrt: error: run-batch needs the 'serve' extra (pip install 'latentrt[serve]')"), err


def test_the_whole_batch_is_queued_at_once_whatever_the_engines_queue(tmp_path):
    """run_batch on an engine that queues one request: none of eight lines (14 choices) is refused as a full
    queue (429)."""
    from latentrt.serve import Engine
    from latentrt.serve.batch import run_batch

    requests = [dict(r, method="POST") for r in _requests(8, seed=3)]
    for r in requests[:3]:
        r["body"]["n"] = 3  # (a line's n choices are n requests of the engine)
    engine = Engine(latentrt.load(MODEL), max_batch=2, max_queue=1)
    counts = run_batch(engine, MODEL, requests, tmp_path / "out.jsonl")
    assert counts == {200: 8}
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [len(x["response"]["body"]["choices"]) for x in lines] == [3, 3, 3, 1, 1, 1, 1, 1]


def test_a_run_keeps_no_engine_alive(tmp_path):
    """Each run_batch call makes an app; once it returns, its engine, model and K/V pool are freed (a notebook's
    sweep of batches grew by every call's pool before)."""
    import gc
    import weakref

    from latentrt.serve import Engine
    from latentrt.serve.batch import read_batch, run_batch

    source = tmp_path / "in.jsonl"
    source.write_text(_line("a", "/v1/completions", {"prompt": "Alex is a wumpus.", "max_tokens": 2}) + "\n")
    refs = []
    for _ in range(2):
        engine = Engine(latentrt.load(MODEL), max_batch=2)
        refs.append(weakref.ref(engine.program))
        assert run_batch(engine, MODEL, read_batch(source), tmp_path / "out.jsonl") == {200: 1}
        del engine
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_a_route_that_fails_unexpectedly_is_that_lines_500(tmp_path, capsys, monkeypatch):
    """An exception in a route (a bug) is its request's 500 line, as a server's client would get it; the other
    lines are answered and the run ends normally (the framework's plain-text 500 ended it with a traceback and no
    output: tools.fuzz)."""
    import latentrt.serve.app as app

    real = app.parse_completion

    def fails_for_one(body):
        if body.get("prompt") == "Bob is a rompus.":
            raise RuntimeError("a bug")
        return real(body)

    monkeypatch.setattr(app, "parse_completion", fails_for_one)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["Alex is a wumpus.", "Bob is a rompus.", "Alex is a yumpus."]
    source.write_text(
        "\n".join(_line(f"r{i}", "/v1/completions", {"prompt": p, "max_tokens": 2}) for i, p in enumerate(prompts))
    )
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["response"]["status_code"] for x in lines] == [200, 500, 200]
    assert lines[1]["response"]["body"]["error"]["type"] == "server_error"
    assert "1 with status 500" in capsys.readouterr().out


def test_the_tool_call_parser_flags_reach_the_routes(tmp_path, capsys):
    """A chat request with tools and no tool_choice (OpenAI's default: auto) is answered with the parser flags, a
    400 naming them without."""
    tool = {"type": "function", "function": {"name": "get_weather"}}
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Alex is"}], max_tokens=3, tools=[tool])
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(_line("a", "/v1/chat/completions", body) + "\n")
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out)]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["response"]["status_code"] == 400 and "--enable-auto-tool-choice" in json.dumps(line["response"])
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert main(["run-batch", MODEL, "-i", str(source), "-o", str(out), *flags]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    message = line["response"]["body"]["choices"][0]["message"]
    assert line["response"]["status_code"] == 200 and message["content"] and not message.get("tool_calls")
