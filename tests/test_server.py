"""The HTTP server on a loopback port, talked to with the official openai client and with raw HTTP: every
request equals generate() alone, streaming and not, and every fault gets its status and message."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from conftest import WORDS, tiny_coconut, tiny_recurrent

import latentrt
from latentrt.checkpoint import save_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from latentrt.chat import ChatTemplate  # noqa: E402
from latentrt.serve import Engine  # noqa: E402
from latentrt.serve.app import create_app  # noqa: E402
from latentrt.serve.protocol import parse_completion  # noqa: E402
from tools.soak import loopback  # noqa: E402

TEMPLATE = ChatTemplate("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(
    model, name: str = "tiny", template=None, api_key=None, tool_call_parser=None, responses_store=0, **engine_kw
):
    """A real uvicorn server on a loopback port, in a thread; yields (base url, engine)."""
    engine = Engine(model, **engine_kw)
    app = create_app(
        engine,
        name,
        chat_template=template,
        api_key=api_key,
        tool_call_parser=tool_call_parser,
        responses_store=responses_store,
    )
    with loopback(app) as url:
        yield url, engine


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def recurrent_server():
    model = tiny_recurrent(seed=3)
    with serving(model, template=TEMPLATE, max_batch=8) as (url, engine):
        yield url, engine, model


def mixed_requests(n: int) -> list[dict]:
    """Request bodies of mixed prompts (text and ids) and options."""
    out = []
    for i in range(n):
        body = dict(max_tokens=2 + i % 9, temperature=0.0 if i % 3 else 0.8, seed=100 + i)
        body["prompt"] = (
            " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7)) if i % 2 else [5 + i % 30] * (1 + i % 11)
        )
        extra = {}
        if i % 4 == 1:
            extra.update(adaptive=True, num_steps=3 + i % 8, exit_criterion="latent-diff", exit_threshold=0.3)
        elif i % 4 == 2:
            extra.update(adaptive=True, exit_criterion="kl", exit_threshold=1e-3, kv_sharing="shared")
        elif i % 4 == 3:
            extra.update(num_steps=1 + i % 5, kv_sharing="ring-2", top_k=5)
        if i % 5 == 0:
            extra.update(default_stops=False)
        body["extra"] = extra
        out.append(body)
    return out


def complete(url: str, body: dict, **kw):
    """The openai client's completion of a ``mixed_requests`` body (``kw``: stream, stream_options)."""
    return client(url).completions.create(
        model="tiny",
        prompt=body["prompt"],
        max_tokens=body["max_tokens"],
        temperature=body["temperature"],
        seed=body["seed"],
        extra_body=body["extra"],
        **kw,
    )


def generate_alone(model, body: dict):
    kw = dict(body["extra"], max_new_tokens=body["max_tokens"], temperature=body["temperature"], seed=body["seed"])
    return latentrt.generate(model, body["prompt"], **kw)


# ------------------------------------------------------------------------------ the openai client
def test_completions_equal_generate_alone(recurrent_server):
    url, _, model = recurrent_server
    for body in mixed_requests(6):
        r = complete(url, body)
        alone = generate_alone(model, body)
        choice = r.choices[0]
        assert choice.text == alone.text and choice.finish_reason == alone.finish_reasons[0]
        assert choice.latentrt == {"token_ids": alone.tokens, "steps": alone.steps}
        assert r.usage.completion_tokens == len(alone.tokens)
        assert r.usage.latent_iterations == sum(alone.steps)


def test_a_request_without_temperature_samples_at_the_models_default_or_openais(recurrent_server, tmp_path):
    """vLLM's rule: a request that gives no temperature gets the model's generation_config.json default
    (with its other sampling defaults, as generate() applies them), else OpenAI's 1."""
    url, _, model = recurrent_server
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "seed": 11, "default_stops": False}
    want = latentrt.generate(model, [5, 6, 7], max_new_tokens=8, seed=11, default_stops=False, temperature=1.0)
    choice = lambda url: httpx.post(f"{url}/v1/completions", json=dict(body, model="tiny")).json()["choices"][0]  # noqa: E731
    assert choice(url)["latentrt"]["token_ids"] == want.tokens
    save_checkpoint(tiny_recurrent(seed=3), tmp_path, tie_key="lm_head.weight")
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.4, "top_k": 3}))
    sampler = latentrt.load(tmp_path, device="cpu")
    with serving(sampler) as (url2, _):
        got = choice(url2)["latentrt"]["token_ids"]
    alone = latentrt.generate(
        model, [5, 6, 7], max_new_tokens=8, seed=11, default_stops=False, temperature=0.4, top_k=3
    )
    assert got == alone.tokens != want.tokens
    # vLLM's top_k -1 (or 0) is "no top-k": it overrides the model's default top_k (it was a 400)
    with serving(sampler) as (url2, _):
        for off in (-1, 0):
            r = httpx.post(f"{url2}/v1/completions", json=dict(body, model="tiny", top_k=off)).json()
            no_top_k = latentrt.generate(
                model, [5, 6, 7], max_new_tokens=8, seed=11, default_stops=False, temperature=0.4
            )
            assert r["choices"][0]["latentrt"]["token_ids"] == no_top_k.tokens != alone.tokens
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))  # max_tokens: vLLM's rule
    with serving(latentrt.load(tmp_path, device="cpu")) as (url3, _):
        short = {k: v for k, v in body.items() if k != "max_tokens"}
        r = httpx.post(f"{url3}/v1/completions", json=dict(short, model="tiny", temperature=0)).json()
        assert r["usage"]["completion_tokens"] == 3
        r = httpx.post(f"{url3}/v1/completions", json=dict(body, model="tiny", temperature=0)).json()
        assert r["usage"]["completion_tokens"] == 8


def test_server_wide_defaults_sit_between_the_request_and_openais():
    """``--override-generation-config`` (``server_defaults``): any generate() option as every request's default,
    over the model's generation_config.json; a request's own fields win, and OpenAI's defaults (temperature 1,
    16 completion tokens) apply only where neither gives one. Bad defaults fail at startup with generate()'s
    messages."""
    from latentrt.serve import server_defaults

    model = tiny_recurrent(seed=3)
    model.generation_defaults = {"repetition_penalty": 1.5}  # as if from generation_config.json
    override = {"num_steps": 3, "temperature": 0.0, "max_new_tokens": 5, "kv_sharing": "shared", "init_scale": 0.0}
    defaults = server_defaults(model, override)
    assert defaults == {"repetition_penalty": 1.5, **override}
    for bad, message in (
        ({"hooks": [print]}, "cannot be server defaults"),
        ({"logits_processors": [print]}, r"\['logits_processors'\] cannot be server defaults"),
        ({"num_thoughts": 1}, "num_thoughts does not apply"),
        ({"temprature": 0.5}, "did you mean 'temperature'"),
        ({"temperature": -1}, "temperature must be"),
        ({"kv_sharing": "ring-x"}, "kv_sharing must be"),
    ):
        with pytest.raises(latentrt.InputError, match=message):
            server_defaults(model, bad)
    with pytest.raises(latentrt.InputError, match=r"\['published_recompute'\] cannot be server defaults"):
        server_defaults(tiny_coconut(), {"published_recompute": True})
    model.generation_defaults = defaults
    plain = tiny_recurrent(seed=3)
    with serving(model) as (url, _):
        post = lambda body: httpx.post(f"{url}/v1/completions", json=dict(body, model="tiny")).json()  # noqa: E731
        got = post({"prompt": [5, 6, 7], "default_stops": False})["choices"][0]["latentrt"]
        want = latentrt.generate(plain, [5, 6, 7], default_stops=False, **defaults)
        assert (got["token_ids"], got["steps"]) == (want.tokens, want.steps) and len(want.tokens) == 5
        mine = dict(num_steps=2, max_tokens=3, temperature=0.8, seed=4, default_stops=False)
        got = post(dict(mine, prompt=[5, 6, 7]))["choices"][0]["latentrt"]
        want = latentrt.generate(
            plain,
            [5, 6, 7],
            **dict(defaults, num_steps=2, max_new_tokens=3, temperature=0.8, seed=4),
            default_stops=False,
        )
        assert (got["token_ids"], got["steps"]) == (want.tokens, want.steps)
    with serving(plain) as (url, _):  # no defaults: OpenAI's (16 tokens for completions)
        got = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "model": "tiny", "default_stops": False})
        assert len(got.json()["choices"][0]["latentrt"]["token_ids"]) == 16


def test_streaming_equals_generate_alone(recurrent_server):
    url, _, model = recurrent_server
    body = mixed_requests(6)[5]
    chunks = list(complete(url, body, stream=True, stream_options={"include_usage": True}))
    alone = generate_alone(model, body)
    tokens = [c.choices[0].latentrt["token_id"] for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert tokens == alone.tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text
    assert chunks[-2].choices[0].finish_reason == alone.finish_reasons[0]
    assert chunks[-1].usage.completion_tokens == len(alone.tokens)


def test_chat_with_the_models_template(recurrent_server):
    url, _, model = recurrent_server
    messages = [{"role": "user", "content": "Tom is a cat"}, {"role": "assistant", "content": "yes"}]
    r = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, seed=4)
    ids = model.tokenizer.encode("user : Tom is a cat . assistant : yes . ", add_special_tokens=False).ids
    alone = latentrt.generate(model, ids, max_new_tokens=6, seed=4)
    assert r.choices[0].message.content == alone.text and r.choices[0].message.role == "assistant"
    stream = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, seed=4, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone.text
    assert chunks[0].choices[0].delta.model_dump(exclude_unset=True) == {"role": "assistant", "content": ""}
    # a null max_completion_tokens is absent: the deprecated max_tokens counts (vLLM's reading)
    body = dict(model="tiny", messages=messages, temperature=0, seed=4, max_completion_tokens=None, max_tokens=3)
    raw = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    assert raw["choices"][0]["latentrt"]["token_ids"] == alone.tokens[:3]


def test_chat_continues_the_final_message_as_vllm_does(recurrent_server):
    """vLLM's chat fields: continue_final_message with add_generation_prompt false runs the conversation
    ending inside the last message (an assistant prefix), /tokenize gives the same ids; both true, or
    template variables that clash with the request's, are 400s naming the problem."""
    url, _, model = recurrent_server
    messages = [{"role": "user", "content": "Tom is a cat"}, {"role": "assistant", "content": "yes Tom"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"x": 1}}
    r = client(url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, seed=4, extra_body=fields
    )
    ids = model.tokenizer.encode("user : Tom is a cat . assistant : yes Tom", add_special_tokens=False).ids
    assert r.choices[0].message.content == latentrt.generate(model, ids, max_new_tokens=4, temperature=0, seed=4).text
    h = httpx.Client(base_url=url)
    assert h.post("/tokenize", json={"messages": messages, **fields}).json()["tokens"] == ids
    for extra, message in [
        ({"continue_final_message": True}, "continue_final_message and add_generation_prompt cannot both be true"),
        ({"chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs cannot set ['messages']"),
    ]:
        bad = h.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **extra})
        assert bad.status_code == 400 and message in bad.json()["error"]["message"], bad.text


def test_usage_counts_a_prompt_once_whatever_its_choices(recurrent_server):
    """``n`` choices of a prompt share it: its tokens count once in ``usage.prompt_tokens`` (OpenAI's billing,
    vLLM's count), each prompt of a batch once, streamed or not; every choice's tokens count."""
    url, _, model = recurrent_server
    one, two = (len(model.tokenizer.encode(t).ids) for t in ("Tom is a cat", "Bob is a dog ."))
    kw = dict(model="tiny", max_tokens=3, temperature=1.0, seed=4)
    r = client(url).completions.create(prompt="Tom is a cat", n=3, **kw)
    assert r.usage.prompt_tokens == one and r.usage.completion_tokens == sum(
        len(c.latentrt["token_ids"]) for c in r.choices
    )
    r = client(url).completions.create(prompt=["Tom is a cat", "Bob is a dog ."], n=2, **kw)
    assert len(r.choices) == 4 and r.usage.prompt_tokens == one + two
    assert r.usage.total_tokens == one + two + r.usage.completion_tokens
    same = client(url).completions.create(prompt=["Tom is a cat", "Tom is a cat"], **kw)  # two prompts: twice
    assert same.usage.prompt_tokens == 2 * one
    messages = [{"role": "user", "content": "Tom is a cat"}]
    alone = client(url).chat.completions.create(messages=messages, **kw)
    chunks = list(
        client(url).chat.completions.create(
            messages=messages, n=3, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert chunks[-1].usage.prompt_tokens == alone.usage.prompt_tokens and chunks[-1].choices == []
    # each choice's first chunk gives its role, as OpenAI's (the client joins a choice's deltas by index)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    # vLLM's continuous_usage_stats: each chunk also carries its choice's usage so far (its tokens sent)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client(url).completions.create(prompt="Tom is a cat", n=2, stream=True, stream_options=options, **kw))
    seen = {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c.choices
        seen[choice.index] += (getattr(choice, "latentrt", None) or {}).get("token_id") is not None
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (one, seen[choice.index])
        assert c.usage.total_tokens == one + seen[choice.index]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(seen.values()) > 2
    only = {"continuous_usage_stats": True}  # (read with include_usage only, as vLLM reads it)
    chunks = list(client(url).completions.create(prompt="Tom is a cat", stream=True, stream_options=only, **kw))
    assert all(c.usage is None and c.choices for c in chunks)
    for options in (None, {"include_usage": False}):  # no usage asked: no usage chunk
        chunks = list(client(url).completions.create(prompt="Tom is a cat", stream=True, stream_options=options, **kw))
        assert all(c.usage is None and c.choices for c in chunks)


def test_choices_sample_with_seed_plus_their_index_as_a_generate_batch(recurrent_server):
    """``n`` choices of each prompt of a list: choice i samples with seed + i, as sequence i of a generate()
    batch does (so the n choices of a prompt differ)."""
    url, _, model = recurrent_server
    prompts, kw = ["Tom is a cat", "Alex is a dog ."], dict(max_new_tokens=6, temperature=1.5)
    r = client(url).completions.create(model="tiny", prompt=prompts, n=3, max_tokens=6, temperature=1.5, seed=40)
    got = [c.latentrt["token_ids"] for c in r.choices]
    assert got == [
        latentrt.generate(model, prompts[k], seed=40 + 3 * k + j, **kw).tokens for k in (0, 1) for j in range(3)
    ]
    assert len({tuple(t) for t in got[:3]}) > 1
    assert r.usage.latent_iterations == sum(sum(c.latentrt["steps"]) for c in r.choices)  # every choice's


def test_tokenize_and_detokenize_as_the_generation_routes_encode(recurrent_server):
    """vLLM's /tokenize and /detokenize: a prompt's ids are those /v1/completions runs (its usage counts them),
    a conversation's those /v1/chat/completions runs; /detokenize inverts; bad bodies are 400s."""
    url, _, model = recurrent_server
    h = httpx.Client(base_url=url)
    got = h.post("/tokenize", json={"model": "tiny", "prompt": "Tom is a cat"}).json()
    r = client(url).completions.create(model="tiny", prompt="Tom is a cat", max_tokens=1, temperature=0)
    assert got["tokens"] == model.tokenizer.encode("Tom is a cat").ids and got["count"] == r.usage.prompt_tokens
    assert got["max_model_len"] == model.config.block_size
    messages = [{"role": "user", "content": "Tom is a cat"}]
    chat = h.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == model.tokenizer.encode("user : Tom is a cat . ", add_special_tokens=False).ids
    c = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)
    assert chat["count"] == c.usage.prompt_tokens
    back = h.post("/detokenize", json={"model": "tiny", "tokens": got["tokens"]}).json()
    assert back == {"prompt": model.tokenizer.decode(got["tokens"], skip_special_tokens=False)}
    special = [i for i, t in model.tokenizer.get_added_tokens_decoder().items() if t.special][:1] + got["tokens"]
    back = h.post("/detokenize", json={"tokens": special}).json()["prompt"]  # special tokens kept, as vLLM's
    assert back == model.tokenizer.decode(special, skip_special_tokens=False) != model.tokenizer.decode(special)
    for route, body, message in [
        ("/tokenize", {"prompt": "a", "messages": messages}, "one of 'prompt' (text) or 'messages'"),
        ("/tokenize", {"prompt": [1, 2]}, "prompt must be a string"),
        ("/tokenize", {"prompt": "a", "extra": 1}, "unknown field(s) ['extra'] for /tokenize"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens must be a list of token ids"),
        ("/detokenize", {"tokens": [model.config.vocab_size]}, f"in [0, {model.config.vocab_size})"),
        ("/detokenize", {"tokens": [-1]}, "tokens must be a list of token ids"),
    ]:
        bad = h.post(route, json=body)
        assert bad.status_code == 400 and message in bad.json()["error"]["message"], bad.text
    assert h.post("/tokenize", json={"model": "other", "prompt": "a"}).status_code == 404


def test_tokenize_takes_vllms_add_special_tokens():
    """vLLM's ``add_special_tokens`` on /tokenize: a prompt's ids with the tokenizer's BOS (true, the default:
    as /v1/completions runs it) or the text's tokens alone (false); a conversation's template places its own."""
    from tokenizers import Tokenizer, processors

    from latentrt.serve.protocol import parse_tokenize

    plain = latentrt.load("builtin:recurrent").tokenizer
    wrapped = Tokenizer.from_str(plain.to_str())
    bos, eos = plain.token_to_id("<|pad|>"), plain.token_to_id("<|endoftext|>")
    wrapped.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A <|endoftext|>", special_tokens=[("<|pad|>", bos), ("<|endoftext|>", eos)]
    )
    ids = plain.encode("Alex is a wumpus").ids
    for extra, want in (
        ({}, [bos, *ids]),
        ({"add_special_tokens": True}, [bos, *ids]),
        ({"add_special_tokens": False}, ids),
    ):
        assert parse_tokenize({"prompt": "Alex is a wumpus", **extra}, None, wrapped) == want, extra
        with pytest.warns(latentrt.UnknownWordsWarning, match="Westeros"):  # either way, unknown words named
            parse_tokenize({"prompt": "Alex is Westeros", **extra}, None, wrapped)
    with pytest.raises(latentrt.InputError, match="this model has no tokenizer.json: nothing to tokenize with"):
        parse_tokenize({"prompt": "a"}, None, None)
    for body, message in (
        ({"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens must be true or false"),
        ({"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True}, "applies to a prompt"),
    ):
        with pytest.raises(latentrt.InputError, match=message):
            parse_tokenize(body, None, wrapped)


def _logprobs_alone(model, prompt, k: int, **kw) -> list[tuple[int, float, list]]:
    """Per generated token of generate() alone: (id, log-prob, the k best (id, log-prob)) from its logits."""
    alone = latentrt.generate(model, prompt, return_logits=True, **kw)
    lp = alone.logits[:, : model.config.vocab_size].float().log_softmax(-1)
    best = lp.topk(k, -1)
    return [
        (t, lp[i, t].item(), list(zip(best.indices[i].tolist(), best.values[i].tolist())))
        for i, t in enumerate(alone.tokens)
    ]


def test_logprobs_are_the_models_distribution(recurrent_server):
    """Completions ``logprobs: k`` and chat ``logprobs`` + ``top_logprobs``, streamed and not: each token's
    log-prob and the k best equal the log-softmax of generate()'s logits for the request alone (sampled with
    a temperature: the log-probs are the model's, before temperature)."""
    url, _, model = recurrent_server
    text = lambda t: model.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    prompt, kw = "Tom is a cat", dict(max_new_tokens=5, temperature=0.7, seed=11)
    want = _logprobs_alone(model, prompt, 3, **kw)
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.7, seed=11, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].latentrt["token_ids"] == [t for t, _, _ in want]
    assert lp.tokens == [text(t) for t, _, _ in want]
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in want], abs=1e-5)
    for top, (_, _, best) in zip(lp.top_logprobs, want):  # (a dict: tokens with one text collide, as OpenAI's)
        assert top == pytest.approx({text(t): v for t, v in best}, abs=1e-5)
    chunks = [
        c.choices[0]
        for c in client(url).completions.create(
            model="tiny", prompt=prompt, max_tokens=5, temperature=0.7, seed=11, logprobs=3, stream=True
        )
        if c.choices[0].logprobs is not None
    ]
    assert [c.logprobs.token_logprobs[0] for c in chunks] == lp.token_logprobs
    starts = [sum(len(c.text) for c in chunks[:i]) for i in range(len(chunks))]  # where each token's text starts
    assert [c.logprobs.text_offset[0] for c in chunks] == starts == lp.text_offset
    plain = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0.7, seed=11)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == r.choices[0].text

    messages = [{"role": "user", "content": "Tom is a cat"}]
    ids = model.tokenizer.encode("user : Tom is a cat . ", add_special_tokens=False).ids
    want = _logprobs_alone(model, ids, 2, max_new_tokens=4, temperature=0.0, seed=4)
    args = dict(model="tiny", messages=messages, max_tokens=4, temperature=0, seed=4, logprobs=True, top_logprobs=2)
    content = client(url).chat.completions.create(**args).choices[0].logprobs.content
    streamed = [
        c.choices[0].logprobs.content[0]
        for c in client(url).chat.completions.create(stream=True, **args)
        if c.choices and c.choices[0].logprobs is not None
    ]
    for got in (content, streamed):
        assert [e.token for e in got] == [text(t) for t, _, _ in want]
        assert [e.logprob for e in got] == pytest.approx([v for _, v, _ in want], abs=1e-5)
        assert [e.bytes for e in got] == [list(text(t).encode()) for t, _, _ in want]
        for e, (_, _, best) in zip(got, want):
            assert [x.token for x in e.top_logprobs] == [text(t) for t, _ in best]
            assert [x.logprob for x in e.top_logprobs] == pytest.approx([v for _, v in best], abs=1e-5)
    only = client(url).chat.completions.create(**dict(args, top_logprobs=None)).choices[0].logprobs.content
    assert [e.top_logprobs for e in only] == [[]] * len(want)


def test_penalties_and_logit_bias_as_openai_and_vllm_take_them(recurrent_server):
    """OpenAI's ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (token ids as strings) and vLLM's
    ``repetition_penalty``, ``min_p`` (extra fields): the tokens of generate() alone with the same options,
    streamed or not; out-of-range values are 400s with the API's message."""
    url, _, model = recurrent_server
    args = dict(model="tiny", prompt="Tom is a cat", max_tokens=8, temperature=0.8, seed=3)
    pen = dict(presence_penalty=1.2, frequency_penalty=0.6, logit_bias={"6": 2.5, "9": -100})
    extra = {"repetition_penalty": 1.7, "min_p": 0.1, "min_tokens": 5}
    alone = latentrt.generate(
        model, "Tom is a cat", max_new_tokens=8, temperature=0.8, seed=3, logit_bias={6: 2.5, 9: -100.0},
        presence_penalty=1.2, frequency_penalty=0.6, repetition_penalty=1.7, min_p=0.1, min_new_tokens=5,
    )  # fmt: skip
    plain = latentrt.generate(model, "Tom is a cat", max_new_tokens=8, temperature=0.8, seed=3)
    assert alone.tokens != plain.tokens and 9 not in alone.tokens
    r = client(url).completions.create(extra_body=extra, **pen, **args)
    assert r.choices[0].latentrt["token_ids"] == alone.tokens and r.choices[0].text == alone.text
    chunks = list(client(url).completions.create(stream=True, extra_body=extra, **pen, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text
    h = httpx.Client(base_url=url)
    for bad, message in [
        (dict(presence_penalty=3), "presence_penalty must be in [-2, 2]"),
        (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={"5": 500}), "logit_bias[5] must be in [-100, 100]"),
        (dict(repetition_penalty=-1), "repetition_penalty must be in [1e-30, 1e+30]"),
        (dict(min_p=7), "min_p must be in [0, 1]"),
        (dict(min_tokens=9), "min_tokens must be an integer in [0, max_tokens=8]"),
    ]:
        got = h.post("/v1/completions", json=dict(args, **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], got.text


def test_the_published_dry_penalty_as_extra_fields(recurrent_server):
    """``dry_multiplier``, ``dry_base``, ``dry_allowed_length``: generate() alone's tokens; with
    ``repetition_penalty`` a 400 with the API's message."""
    url, _, model = recurrent_server
    # init_scale 0 (no drawn state: torch 2.11 and 2.13 draw it differently); a prompt whose answer repeats
    dry = dict(dry_multiplier=2.5, dry_base=1.5, dry_allowed_length=1, init_scale=0.0)
    prompt = "a cat is a cat is a"
    args = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=0, seed=8)
    alone = latentrt.generate(model, prompt, max_new_tokens=8, seed=8, **dry)
    assert alone.tokens != latentrt.generate(model, prompt, max_new_tokens=8, seed=8, init_scale=0.0).tokens
    r = client(url).completions.create(extra_body=dry, **args)
    assert r.choices[0].latentrt["token_ids"] == alone.tokens
    got = httpx.post(f"{url}/v1/completions", json=dict(args, **dry, repetition_penalty=1.3))
    assert got.status_code == 400 and "dry_multiplier and repetition_penalty are exclusive" in got.text


def test_stop_strings_end_the_text_before_them(recurrent_server):
    """OpenAI's ``stop``: the returned text never contains the stop sequence (it may span tokens), streamed
    or not, and equals generate() alone's."""
    url, _, model = recurrent_server
    kw = dict(max_new_tokens=10, temperature=0.0, seed=5, default_stops=False)
    text = latentrt.generate(model, "Tom is a cat", **kw).text
    stop = text[3:8]
    alone = latentrt.generate(model, "Tom is a cat", stop=[stop], **kw)
    assert alone.finish_reasons == ["stop"] and stop not in alone.text
    args = dict(model="tiny", prompt="Tom is a cat", max_tokens=10, temperature=0, seed=5, stop=[stop, "never"])
    extra = {"default_stops": False}
    r = client(url).completions.create(extra_body=extra, **args)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (alone.text, "stop")
    assert r.choices[0].latentrt["token_ids"] == alone.tokens
    chunks = list(client(url).completions.create(stream=True, extra_body=extra, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text
    # more than OpenAI's 4, as vLLM takes them (a bound keeps the matching cheap)
    many = dict(args, stop=[f"never{i}" for i in range(7)] + [stop], **extra)
    r = httpx.post(f"{url}/v1/completions", json=many).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (alone.text, "stop")
    too_many = httpx.post(f"{url}/v1/completions", json=dict(many, stop=["x"] * 257))
    assert too_many.status_code == 400 and "stop takes at most 256 strings, got 257" in too_many.text


def test_vllms_stop_and_text_fields(recurrent_server):
    """vLLM's ``stop_token_ids`` (generate()'s stop ids), ``ignore_eos`` (``default_stops=False``),
    ``include_stop_str_in_output`` and ``skip_special_tokens``: generate() alone's tokens and text, streamed
    or not; bad values are 400s."""
    url, _, model = recurrent_server
    kw = dict(max_new_tokens=10, temperature=0.0, seed=5)
    base = latentrt.generate(model, "Tom is a cat", default_stops=False, **kw)
    stop, stop_id = base.text[3:8], base.tokens[6]
    args = dict(model="tiny", prompt="Tom is a cat", max_tokens=10, temperature=0, seed=5)
    pad = {"1": 4.0}  # a bias toward the special token <|pad|>
    cases = [
        (dict(stop_token_ids=[stop_id], ignore_eos=True), dict(stop=[stop_id], default_stops=False)),
        (dict(stop=[stop], include_stop_str_in_output=True), dict(stop=[stop], include_stop_str_in_output=True)),
        (dict(stop=[stop], stop_token_ids=[stop_id]), dict(stop=[stop, stop_id])),  # both: whichever comes first
        (dict(logit_bias=pad), dict(logit_bias={1: 4.0})),
        (dict(logit_bias=pad, skip_special_tokens=False), dict(logit_bias={1: 4.0}, skip_special_tokens=False)),
    ]
    assert parse_completion(dict(args, ignore_eos=True)).options[0]["default_stops"] is False  # (no eos here)
    texts = []
    for fields, options in cases:
        alone = latentrt.generate(model, "Tom is a cat", **kw, **options)
        body = dict(args, **fields)
        r = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
        assert (r["text"], r["latentrt"]["token_ids"]) == (alone.text, alone.tokens), fields
        chunks = list(client(url).completions.create(stream=True, extra_body=fields, **args))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text, fields
        texts.append(alone.text)
    # each option changes the answer; both stops end it where the first of them does (which one comes first
    # depends on the tiny model's weights: torch 2.11 draws them otherwise than 2.13)
    at_string = latentrt.generate(model, "Tom is a cat", **kw, stop=[stop]).text
    assert len({texts[i] for i in (0, 1, 3, 4)}) == 4 and texts[2] in (texts[0], at_string)
    for bad, message in [
        (dict(stop_token_ids=[1, "x"]), "stop_token_ids must be a list of token ids"),
        (dict(stop_token_ids=[10**6]), "stop token id 1000000 is not in the vocabulary"),
        (dict(ignore_eos=1), "ignore_eos must be true or false"),
        (dict(ignore_eos=True, default_stops=True), "ignore_eos: true contradicts default_stops: true"),
        (dict(skip_special_tokens="no"), "skip_special_tokens must be True or False"),
    ]:
        got = httpx.post(f"{url}/v1/completions", json=dict(args, **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], got.text


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(recurrent_server):
    """lm-evaluation-harness's log-likelihood request (token ids, ``echo``, ``logprobs: 1``, ``max_tokens: 1``,
    greedy): the prompt's tokens' log-probs (the first has none) are the log-softmax of one forward of the
    prompt at ``num_steps`` (``model.logits``), and the generated token's is the same forward's last position
    (no initial-state noise: both paths start from zeros)."""
    url, _, model = recurrent_server
    ids = [5, 9, 14, 3, 22, 7, 11]
    extra = {"num_steps": 3, "init_scale": 0.0}
    r = client(url).completions.create(
        model="tiny", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=3, extra_body=extra
    )
    choice, V = r.choices[0], model.config.vocab_size
    lp = model.logits(torch.tensor([ids]), num_steps=3, init_scale=0.0)[0, :, :V].log_softmax(-1)
    token = choice.latentrt["token_ids"][0]
    got = choice.logprobs
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None and len(got.tokens) == len(ids) + 1
    want = [lp[i, t].item() for i, t in enumerate(ids[1:] + [token])]
    assert got.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert [max(top, key=top.get) for top in got.top_logprobs[1:]] == [
        model.tokenizer.decode([t], skip_special_tokens=False) for t in lp.argmax(-1).tolist()
    ]
    prompt_text = model.tokenizer.decode(ids, skip_special_tokens=True)
    completion = latentrt.generate(model, ids, max_new_tokens=1, seed=3, **extra)
    # the completion reads after the prompt as the tokenizer joins them (below: a word tokenizer's space), and the
    # generated token's text (its space first) starts where the prompt's ends
    assert choice.text == model.tokenizer.decode(ids + completion.tokens)
    assert got.text_offset[len(ids)] == len(prompt_text)
    scored = (
        client(url)
        .completions.create(
            model="tiny", prompt=ids, max_tokens=0, logprobs=1, echo=True, temperature=0, seed=3, extra_body=extra
        )
        .choices[0]
    )  # OpenAI's scoring request: the prompt only, no token generated
    assert (scored.text, scored.finish_reason, scored.latentrt["token_ids"]) == (prompt_text, "length", [])
    assert scored.logprobs.token_logprobs == got.token_logprobs[: len(ids)]
    # a random initial state: the prompt's forward draws it from the request's seed, as model.logits(seed=) does
    noisy = dict(extra, init_scale=1.0)
    seeded = client(url).completions.create(
        model="tiny", prompt=ids, max_tokens=0, logprobs=1, echo=True, temperature=0, seed=3, extra_body=noisy
    )
    lp = model.logits(torch.tensor([ids]), num_steps=3, init_scale=1.0, seed=3)[0, :, :V].log_softmax(-1)
    want = [lp[i, t].item() for i, t in enumerate(ids[1:])]
    assert seeded.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert seeded.choices[0].logprobs.token_logprobs != got.token_logprobs[: len(ids)]
    ask = dict(model="tiny", prompt="Tom is a cat", max_tokens=2, temperature=0, seed=3, extra_body=extra)
    plain, alone = client(url).completions.create(**ask, echo=True), client(url).completions.create(**ask)
    assert alone.choices[0].text and plain.choices[0].logprobs is None
    assert plain.choices[0].text == f"Tom is a cat {alone.choices[0].text}"  # (it was fused: "Tom is a catbird")


def test_many_concurrent_requests_each_equal_generate_alone(recurrent_server):
    url, engine, model = recurrent_server
    bodies = mixed_requests(40)
    steps_before = engine.metrics.steps

    def one(body):
        if body["max_tokens"] % 2:  # half of them streamed
            chunks = list(complete(url, body, stream=True))
            return [ch.choices[0].latentrt["token_id"] for ch in chunks if ch.choices[0].finish_reason is None]
        return complete(url, body).choices[0].latentrt["token_ids"]

    with ThreadPoolExecutor(40) as pool:
        served = list(pool.map(one, bodies))
    for body, tokens in zip(bodies, served):
        assert tokens == generate_alone(model, body).tokens, body
    assert engine.metrics.steps > steps_before and max(engine.metrics.resident, 0) == 0


def test_concurrent_requests_under_asynchronous_scheduling_each_equal_generate_alone():
    """The server with ``--async-scheduling`` (each step launches before it reads the last one's exits):
    concurrent requests, half streamed, each equal to generate() alone; every row freed at the end."""
    model = tiny_recurrent(seed=3)
    bodies = mixed_requests(24)

    def one(url, body):
        if body["max_tokens"] % 2:
            chunks = list(complete(url, body, stream=True))
            return [ch.choices[0].latentrt["token_id"] for ch in chunks if ch.choices[0].finish_reason is None]
        return complete(url, body).choices[0].latentrt["token_ids"]

    with serving(model, max_batch=6, async_scheduling=True) as (url, engine), ThreadPoolExecutor(24) as pool:
        served = list(pool.map(lambda body: one(url, body), bodies))
        assert engine.async_scheduling and engine.metrics.steps > 0
    for body, tokens in zip(bodies, served):
        assert tokens == generate_alone(model, body).tokens, body
    assert not engine.resident and engine.program.pool.bytes_in_use() == 0


def test_coconut_server_thoughts():
    model = tiny_coconut(seed=2)
    with serving(model, max_batch=4) as (url, engine):
        for k in (0, 2, 4):
            r = client(url).completions.create(
                model="tiny", prompt="Tom is a cat", max_tokens=5, temperature=0, extra_body={"num_thoughts": k}
            )
            alone = latentrt.generate(model, "Tom is a cat", max_new_tokens=5, num_thoughts=k)
            assert r.choices[0].latentrt["token_ids"] == alone.tokens
            assert r.usage.latent_iterations == alone.num_thoughts == k
        # a prompt whose latent markers are malformed is refused when submitted (400), as generate() refuses
        # it before any work; it was found in the engine's step and failed as a 500
        h = httpx.Client(base_url=url)
        r = h.post("/v1/completions", json={"prompt": [[5, 6, 7], [5, 6, 3]], "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "prompt 1: end-latent marker at token 2 without a start marker"
        # an option the server's passes do not run is refused, not ignored
        r = h.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 2, "published_recompute": True})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "published_recompute=True runs in generate() only, not in the server"


# ------------------------------------------------------------------------------ raw HTTP and faults
def test_routes_and_bad_input(recurrent_server):
    url, engine, model = recurrent_server
    h = httpx.Client(base_url=url)
    assert h.get("/health").json()["status"] == "ok"
    assert h.get("/version").json() == {"version": latentrt.__version__}  # vLLM's route
    card = h.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["max_model_len"] == 96  # (the tiny model's context)
    assert (
        client(url).models.retrieve("tiny").model_dump(exclude_unset=True) == card
    )  # OpenAI's retrieve, through its client
    assert h.get("/v1/models/gpt-4").status_code == 404
    assert "not served here" in h.get("/v1/models/acme/gpt-4").json()["error"]["message"]
    metrics = h.get("/metrics").text
    for name in (
        "latentrt_queue_length",
        "latentrt_resident_sequences",
        "latentrt_tokens_per_second",
        "latentrt_iterations_per_token",
        "latentrt_kv_bytes_in_use",
        "latentrt_passes_total",
        "latentrt_weight_reads_total",
        "latentrt_graph_passes_total",
        "latentrt_time_to_first_token_seconds_bucket",
        "latentrt_token_latent_iterations_count",
        "latentrt_requests_ended_total",
    ):
        assert name in metrics

    chat = dict(path="/v1/chat/completions")

    def error(body, path="/v1/completions", status=400, raw=None):
        r = h.post(path, content=raw) if raw is not None else h.post(path, json=body)
        assert r.status_code == status, r.text
        return r.json()["error"]["message"]

    assert "not valid JSON" in error(None, raw=b'{"prompt": ')
    # a JSON escape can carry a lone surrogate, which the tokenizer refused with a TypeError (a 500)
    surrogate = {"messages": [{"role": "user", "content": "a \ud800"}]}
    assert "messages[0].content is not valid Unicode text" in error(None, raw=json.dumps(surrogate).encode(), **chat)
    two = json.dumps({"prompt": ["a", "b \udcff"]}).encode()
    assert "prompt 1 is not valid Unicode text" in error(None, raw=two)  # the request's index, not 0
    # any error about one prompt of several names it; the options' errors name none; one prompt is not named
    vocab = model.config.vocab_size
    assert error({"prompt": ["a", [1, vocab]]}).startswith("prompt 1: token id out of range")
    assert error({"prompt": [[1], ""]}).startswith("prompt 1: empty prompt")
    assert error({"prompt": [[1, 2], [1, True]]}).startswith("prompt 1 must be a string or a list of token ids")
    too_long = "prompt 1: prompt (90 tokens) + max_tokens (16) = 106 exceeds the model's context (block_size=96)"
    submitted, submit = [], engine.submit
    engine.submit = lambda *a, **kw: submitted.append(submit(*a, **kw)) or submitted[-1]
    try:
        assert error({"prompt": [[1], [1] * 90]}) == too_long
    finally:
        del engine.submit
    assert len(submitted) == 1 and submitted[0].cancelled  # prompt 0, queued before prompt 1 failed: cancelled
    assert error({"prompt": [[1, vocab]]}).startswith("token id out of range")
    assert error({"prompt": ["a", "b"], "temperature": -1}).startswith("temperature must be")
    # choice i samples with seed + i: the bound says so (it said 'got 2**63', a seed the client never sent)
    big = {"prompt": "a", "n": 2, "seed": 2**63 - 1}
    assert "seed must be in [0, 2**63 - 2] for 2 choices (choice i samples with seed + i)" in error(big)
    assert "unknown field(s) ['bogus']" in error({"prompt": "a", "bogus": 1})
    assert "logprobs must be an integer in [0, 20]" in error({"prompt": "a", "logprobs": 21})
    assert "logprobs must be an integer in [0, 20]" in error({"prompt": "a", "logprobs": True})
    assert "echo is not available with stream" in error({"prompt": "a", "echo": True, "stream": True})
    assert "top_logprobs needs logprobs: true" in error(
        {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, **chat
    )
    assert "top_logprobs must be" in error(
        {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 99}, **chat
    )
    assert "not served here" in error({"prompt": "a", "model": "gpt-4"}, status=404)
    # option values: the Python API's messages, naming the request's fields (max_tokens, not max_new_tokens)
    for extra in ({"num_steps": 0}, {"exit_criterion": "nope"}, {"kv_sharing": "ring-0"}, {"temperature": -1}):
        with pytest.raises(latentrt.InputError) as api:
            latentrt.generate(model, "a", **extra)
        assert error({"prompt": "a", **extra}) == str(api.value)
    with pytest.raises(latentrt.InputError) as api:
        latentrt.generate(model, [5] * 90, max_new_tokens=10)
    assert error({"prompt": [5] * 90, "max_tokens": 10}) == str(api.value).replace("max_new_tokens", "max_tokens")
    assert error({"prompt": "a", "max_tokens": 0}) == "max_tokens must be an integer >= 1, got 0"
    # a request's iterations per token are bounded as its tokens are (num_steps=10**9 held a row for ever)
    assert error({"prompt": "a", "num_steps": 257, "kv_sharing": "shared"}) == (
        "num_steps=257 is above this server's limit of 256 latent iterations per token (its max_num_steps)"
    )
    assert error({"prompt": "a", "max_tokens": 2, "min_tokens": 5}).startswith(
        "min_tokens must be an integer in [0, max_tokens=2]"
    )
    talk = {"messages": [{"role": "user", "content": "a"}]}
    assert error({**talk, "max_completion_tokens": 0}, **chat).startswith("max_completion_tokens must be")
    assert error({**talk, "max_tokens": 0}, **chat).startswith("max_tokens must be")
    assert error({**talk, "max_completion_tokens": None, "max_tokens": 0}, **chat).startswith("max_tokens must be")
    assert error({**talk, "min_tokens": 99}, **chat).startswith(
        "min_tokens must be an integer in [0, max_completion_tokens=64]"
    )
    assert error({"max_tokens": 2}).startswith("prompt is required")
    assert error({"prompt": "a", "model": 3}).startswith("model must be a string")
    assert error({"prompt": "a", "user": 3}).startswith("user must be a string")
    assert (
        error({"prompt": "a", "stop_token_ids": [vocab]})
        == f"stop token id {vocab} is not in the vocabulary (ids 0 to {vocab - 1})"
    )
    assert "messages" in error({"messages": []}, path="/v1/chat/completions")
    assert "runs in generate() only" in error({"prompt": "a", "decoding": "wavefront"})
    # the request's shape: a body that is no object, the choices it asks for, OpenAI fields latentrt lacks
    assert error(["a"]) == "the request body must be a JSON object, got list"
    assert error({"prompt": ["a"] * 17}) == "at most 16 prompts per request, got 17"
    assert error({"prompt": ["a"] * 4, "n": 5}) == "at most 16 choices (prompts x n) per request, got 20"
    assert error({"prompt": "a", "best_of": 3}) == "best_of is not supported by latentrt (leave it out)"
    assert h.post("/v1/completions", json={"prompt": "a", "best_of": 2, "n": 2, "max_tokens": 1}).status_code == 200
    bad_options = {"prompt": "a", "stream": True, "stream_options": {"include_usage": True, "x": 1}}
    assert error(bad_options).startswith("stream_options must be {'include_usage': true|false, 'continuous_usage")
    bad_options["stream_options"] = {"include_usage": "false"}  # (a string would be true: refused, not read)
    assert error(bad_options) == "stream_options.include_usage must be true or false, got 'false'"
    assert error({"prompt": "a", "stream_options": {}}) == "stream_options is only allowed with stream=true"


def test_allowed_token_ids_and_bad_words_as_vllm_takes_them(recurrent_server):
    """vLLM's extra fields ``allowed_token_ids`` and ``bad_words``: the tokens of generate() alone with the same
    options, streamed or not, completions and chat; bad values are 400s with the API's message."""
    url, _, model = recurrent_server
    args = dict(model="tiny", prompt="Tom is a cat", max_tokens=8, temperature=0.8, seed=3)
    word_ids = [i for i in range(model.config.vocab_size) if (model.tokenizer.id_to_token(i) or "<").isalpha()]
    extra = {"allowed_token_ids": word_ids, "bad_words": ["cat", "is a"]}
    alone = latentrt.generate(model, "Tom is a cat", max_new_tokens=8, temperature=0.8, seed=3, **extra)
    plain = latentrt.generate(model, "Tom is a cat", max_new_tokens=8, temperature=0.8, seed=3)
    assert alone.tokens != plain.tokens and set(alone.tokens) <= set(word_ids)
    r = client(url).completions.create(extra_body=extra, **args)
    assert r.choices[0].latentrt["token_ids"] == alone.tokens and r.choices[0].text == alone.text
    chunks = list(client(url).completions.create(stream=True, extra_body=extra, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == alone.text
    h = httpx.Client(base_url=url)
    for bad, message in [
        (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list of token ids"),
        (dict(allowed_token_ids=[999]), "allowed_token_ids must be ids of the vocabulary [0, 40), got [999]"),
        (dict(bad_words="cat"), "bad_words must be a list of strings"),
        (dict(bad_words=["cat jabberwock"]), "bad_words[0] 'cat jabberwock': ['jabberwock'] not in the tokenizer's"),
        (dict(bad_words=["cat"] * 257), "bad_words takes at most 256 strings, got 257"),
        (dict(allowed_token_ids=[6], bad_words=["is"]), "allowed_token_ids [6]: bad_words exclude every one of them"),
        (dict(logits_processors=["print"]), "unknown field(s) ['logits_processors']"),
    ]:
        got = h.post("/v1/completions", json=dict(args, **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], got.text


def test_guided_choice_and_structured_outputs_choice_as_vllm_takes_them(recurrent_server):
    """vLLM's ``guided_choice`` and ``structured_outputs: {"choice": [...]}``: one of the choices, the tokens of
    generate() alone, completions and chat (the others: tests/test_structured.py; this model's word-level tokenizer
    is one llguidance does not read, a 400 saying so)."""
    url, _, model = recurrent_server
    choices = ["Tom is a cat", "Ann is a dog", "no"]
    args = dict(model="tiny", max_tokens=8, temperature=0.8, seed=3)
    extra = {"stop_token_ids": [0]}  # (the tiny model names no eos: a choice ends with this stop)
    alone = latentrt.generate(model, "every cat is", max_new_tokens=8, temperature=0.8, seed=3, stop=[0])
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        want = latentrt.generate(
            model, "every cat is", max_new_tokens=8, temperature=0.8, seed=3, stop=[0], guided_choice=choices
        )
        assert want.text in choices and want.tokens != alone.tokens
        r = client(url).completions.create(prompt="every cat is", extra_body=dict(extra, **body), **args)
        assert r.choices[0].latentrt["token_ids"] == want.tokens and r.choices[0].text == want.text
        chat = [{"role": "user", "content": "every cat is"}]
        r = client(url).chat.completions.create(messages=chat, extra_body=dict(extra, **body), **args)
        assert r.choices[0].message.content in choices
    h = httpx.Client(base_url=url)
    for bad, message in [
        (dict(structured_outputs={"json": {"type": "object"}}, stop_token_ids=[0]), "need a tokenizer llguidance"),
        (dict(structured_outputs={"choice": ["no"]}, guided_choice=["no"]), "give one kind of structured output"),
        (dict(guided_json={"type": "object"}, stop_token_ids=[0]), "need a tokenizer llguidance reads"),
        (dict(response_format={"type": "json_object"}, stop_token_ids=[0]), "need a tokenizer llguidance reads"),
        (dict(guided_choice=["no"]), "guided_choice must end with a stop token and there is none"),
        (dict(guided_choice="no", stop_token_ids=[0]), "guided_choice must be a non-empty list of strings"),
        (dict(guided_choice=["a"] * 257, stop_token_ids=[0]), "guided_choice takes at most 256 strings, got 257"),
    ]:
        got = h.post("/v1/completions", json=dict(args, prompt="every cat is", **bad))
        assert got.status_code == 400 and message in got.json()["error"]["message"], got.text
    # a choice min_tokens holds open: no token left after it (known only then): a 400, or mid-stream its event
    held = dict(args, prompt="every cat is", guided_choice=["no"], stop_token_ids=[0], min_tokens=2)
    got = h.post("/v1/completions", json=held)
    assert got.status_code == 400 and "no token left to choose for new token 1" in got.json()["error"]["message"]
    with h.stream("POST", "/v1/completions", json=dict(held, stream=True)) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[0]["choices"][0]["text"] == "no"
    assert events[-1]["error"]["type"] == "invalid_request_error" and "no token left" in events[-1]["error"]["message"]


def test_a_body_nested_past_pythons_json_reader_is_a_400(recurrent_server):
    """json.loads raises RecursionError there (it gave a 500): the body is bad JSON, as any other."""
    url, _, _ = recurrent_server
    h = httpx.Client(base_url=url)
    for body in (
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": "a", "guided_json": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
    ):
        got = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert got.status_code == 400, got.text
        assert "the request body is not valid JSON: nested too deeply" in got.json()["error"]["message"]
    assert h.get("/health").status_code == 200


def test_every_field_with_values_of_every_json_type_gets_an_answer_or_a_4xx_never_a_500(recurrent_server):
    """Each field of both routes set, one at a time, to values of every JSON type (lists and objects where a
    name is expected, huge and negative numbers, nulls): each body gets 200 or a 4xx naming the problem; the
    server stays healthy and holds nothing afterwards. (A list as exit_criterion once answered 500.)"""
    url, engine, _ = recurrent_server
    fields = [
        *("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop", "seed", "logprobs", "echo"),
        *("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "min_tokens", "stop_token_ids"),
        *("num_steps", "adaptive", "exit_criterion", "exit_threshold", "kv_sharing", "min_steps", "init_scale"),
        *("continuous", "decoding", "decoding_options", "num_thoughts", "stream_options", "ignore_eos", "user"),
        *("include_stop_str_in_output", "skip_special_tokens", "response_format", "tools", "chat_template_kwargs"),
        *("add_generation_prompt", "continue_final_message", "top_logprobs", "max_completion_tokens", "suffix"),
        *("messages", "prompt", "model", "allowed_token_ids", "bad_words", "guided_choice", "structured_outputs"),
    ]
    values = [None, True, -1, 3, 0.5, 1e30, 2**63, "", "kl", [1, 2], ["a"], {"5": 100}, [{"role": 3}]]
    h = httpx.Client(base_url=url, timeout=60)
    for i, (field, value) in enumerate((f, v) for f in fields for v in values):
        chat = i % 2 == 1
        body = {"max_tokens": 1, **({"messages": [{"role": "user", "content": "a"}]} if chat else {"prompt": "a"})}
        r = h.post("/v1/chat/completions" if chat else "/v1/completions", json={**body, field: value})
        assert r.status_code == 200 or (400 <= r.status_code < 500 and r.json()["error"]["message"]), (
            field,
            value,
            r.text,
        )
    assert h.get("/health").status_code == 200
    deadline = time.time() + 10
    while (engine.resident or engine.queue) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.resident and not engine.queue


def test_chat_without_a_template_is_400():
    with serving(tiny_recurrent(), max_batch=2) as (url, _):
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}])


def test_queue_full_is_429_with_retry_after():
    model = tiny_recurrent()
    gate = threading.Event()
    with serving(model, max_batch=1, max_queue=1) as (url, engine):
        step = engine.step
        engine.step = lambda: (gate.wait(), step())  # a busy device: nothing is admitted until the gate opens
        h = httpx.Client(base_url=url, timeout=30)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(h.post, "/v1/completions", json={"prompt": "a", "max_tokens": 2})
            while not engine.queue:
                time.sleep(0.01)
            r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert "queue is full (1 requests waiting)" in r.json()["error"]["message"]
            gate.set()
            assert first.result().status_code == 200


def test_a_stopped_engine_answers_503_and_takes_nothing_more():
    """Once the engine stops taking requests (``Engine.stop``: a drain, e.g. a Ray replica going away while its
    HTTP proxy still routes to it), a request is a 503 saying so, and /health says so too."""
    with serving(tiny_recurrent(), max_batch=2) as (url, engine):
        h = httpx.Client(base_url=url, timeout=30)
        assert h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
        engine.stop()
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down", r.text
        health = h.get("/health")
        assert health.status_code == 503 and health.json()["error"]["message"] == "shutting down"
        assert not engine.queue and not engine.resident
    engine = Engine(tiny_recurrent(), max_batch=2)
    engine.run_forever = lambda: None  # the engine's thread ends at once, as one that died would
    with loopback(create_app(engine, "tiny")) as url:
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["error"]["message"] == "the engine thread stopped"


def test_disconnect_mid_stream_frees_the_slot_within_one_step():
    model = tiny_recurrent()
    with serving(model, max_batch=2) as (url, engine):
        cancelled_at = {}
        cancel = engine.cancel

        def recording_cancel(req):
            cancelled_at.setdefault(req.id, engine.metrics.steps)
            cancel(req)

        engine.cancel = recording_cancel
        body = {"prompt": "a", "max_tokens": 80, "temperature": 0, "stream": True, "default_stops": False}
        with httpx.Client(base_url=url, timeout=30) as h, h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            req = engine.resident[0]
        assert req.done.wait(10)  # set once the engine has retired it (finish_reason comes first: a race)
        assert req.finish_reason == "cancelled" and len(req.tokens) < 80
        steps_at_finish = req.times["finished_step"]
        assert steps_at_finish - cancelled_at[req.id] <= 1
        assert not engine.resident and engine.program.pool.bytes_in_use() == 0


def test_a_client_gone_before_its_answer_cancels_its_request():
    """A request not streamed whose client goes away before the answer (here its timeout, while the request
    waits in the queue) is cancelled: its wait polls the connection (``POLL_SECONDS``), the engine drops it
    at its next step without a token, and serves the next one."""
    model = tiny_recurrent()
    gate = threading.Event()
    with serving(model, max_batch=1) as (url, engine):
        step = engine.step
        engine.step = lambda: (gate.wait(), step())  # a busy device: nothing is admitted until the gate opens
        with httpx.Client(base_url=url, timeout=1.0) as h, pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json={"prompt": "a", "max_tokens": 40})
        deadline = time.time() + 10
        while not engine.queue:  # (queued well before the client gave up, unless this machine crawls)
            assert time.time() < deadline, "the request was never queued"
            time.sleep(0.02)
        req = engine.queue[0]
        while not req.cancelled:
            assert time.time() < deadline, "the request was not cancelled"
            time.sleep(0.02)
        gate.set()
        assert req.done.wait(10) and req.finish_reason == "cancelled" and req.tokens == []
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and not engine.queue and engine.program.pool.bytes_in_use() == 0


def test_text_held_back_for_a_stop_string_is_streamed_when_a_stop_token_ends_it():
    """Streamed text that might begin a stop string is held back; when a stop token that is not part of the
    output (Coconut's ``published_eos``) ends the request instead, the held text comes as a chunk of its own,
    so the streamed text equals the text returned whole (the built-in Coconut model ends its answer '.' then
    EOS; the stop string '.X' holds the '.' back)."""
    model = latentrt.load("builtin:coconut")
    prompt = "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?"
    alone = latentrt.generate(model, prompt, max_new_tokens=12, temperature=0.0, stop=[".X"], published_eos=True)
    assert alone.finish_reasons == ["stop"] and alone.text.endswith(".")
    assert model.tokenizer.token_to_id("<|endoftext|>") not in alone.tokens
    with serving(model, "builtin", max_batch=2) as (url, _):
        args = dict(model="builtin", prompt=prompt, max_tokens=12, temperature=0, stop=[".X"])
        extra = {"published_eos": True}
        whole = client(url).completions.create(extra_body=extra, **args).choices[0]
        usage = {"include_usage": True, "continuous_usage_stats": True}
        raw = list(client(url).completions.create(stream=True, stream_options=usage, extra_body=extra, **args))
    chunks = [c.choices[0] for c in raw[:-1]]
    assert (whole.text, whole.finish_reason) == (alone.text, "stop")
    assert "".join(c.text for c in chunks) == alone.text and chunks[-2].text == "."  # (then the finish chunk)
    # the held text's chunk carries no token: the choice's usage so far (vLLM's continuous_usage_stats) counts none
    assert getattr(chunks[-2], "latentrt", None) is None
    n = len(alone.tokens)
    assert [c.usage.completion_tokens for c in raw[:-1]] == [*range(1, n + 1), n, n]
    assert raw[-1].usage.completion_tokens == len(alone.tokens)


def test_a_failing_request_is_500_and_the_others_are_served():
    model = tiny_recurrent(seed=3)
    with serving(model, max_batch=4) as (url, _):
        good = [{"prompt": [5 + i] * (2 + i), "max_tokens": 6, "temperature": 0, "seed": i} for i in range(6)]
        bad = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "init_scale": 1e39}
        h = httpx.Client(base_url=url, timeout=60)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(h.post, "/v1/completions", json=b) for b in good[:3] + [bad] + good[3:]]
            streamed_bad = pool.submit(h.post, "/v1/completions", json=dict(bad, stream=True))
        results = [f.result() for f in futures]
        assert results[3].status_code == 500 and "non-finite latent state" in results[3].json()["error"]["message"]
        assert streamed_bad.result().status_code == 500
        for body, r in zip(good, results[:3] + results[4:]):
            alone = latentrt.generate(model, body["prompt"], max_new_tokens=6, seed=body["seed"])
            assert r.status_code == 200 and r.json()["choices"][0]["latentrt"]["token_ids"] == alone.tokens


def serve_process(tmp_path, model, *extra: str, verify=True) -> tuple[subprocess.Popen, str]:
    """`latentrt serve` on ``model`` saved as a checkpoint folder (with the flags ``extra``), in a process of its
    own, once healthy: (the process, its URL; https with ``--ssl-certfile``, its certificate ``verify``). Its
    output (stdout and stderr) is ``proc.stdout``."""
    save_checkpoint(model, tmp_path / "m", tie_key="lm_head.weight")
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = ["serve", str(tmp_path / "m"), "--port", str(port), "--backend", "torch", "--log-level", "warning"]
    argv += list(extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentrt.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    url = f"{'https' if '--ssl-certfile' in extra else 'http'}://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/health", verify=verify).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the server did not start")
        time.sleep(0.2)


def test_cli_serve_drains_on_sigterm(tmp_path):
    """`latentrt serve` on a checkpoint folder: a streaming request in flight when SIGTERM arrives still
    gets every token and [DONE]; then the process exits 0. (SIGTERM follows the first token: the other 23
    take ~3 s, far longer than the signal takes to arrive.)"""
    model = tiny_recurrent(seed=3)
    proc, url = serve_process(tmp_path, model)
    try:
        body = {
            "prompt": [5, 6],
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "default_stops": False,
            "num_steps": 32,
            "seed": 7,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [first] + list(lines)
        data = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] == "length"
        tokens = [d["choices"][0]["latentrt"]["token_id"] for d in data if d["choices"][0]["finish_reason"] is None]
        assert (
            tokens
            == latentrt.generate(model, [5, 6], max_new_tokens=24, default_stops=False, num_steps=32, seed=7).tokens
        )
        # uvicorn re-raises the signal once drained (so supervisors see it): killed by SIGTERM, nothing lost
        assert proc.wait(60) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert "Traceback" not in out and "serving" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_serve_a_second_ctrl_c_ends_it_at_once_in_one_line(tmp_path):
    """A first Ctrl-C drains (as SIGTERM); a second during the drain ends the process at once: exit 130 and
    one line saying how many requests were cut short. (uvicorn's own forced exit tore the event loop down under
    the running engine: tracebacks, a plain-text 500, then a C++ 'terminate called'.)"""
    proc, url = serve_process(tmp_path, tiny_recurrent(seed=3))
    try:
        body = {"prompt": [5, 6], "max_tokens": 90, "stream": True, "default_stops": False, "num_steps": 64}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(httpx.HTTPError):
                list(lines)
        assert proc.wait(30) == 130
        out = proc.stdout.read()
        assert "latentrt: forced exit (1 request(s) cut short)" in out, out
        assert "Traceback" not in out and "terminate called" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_key_guards_the_model_routes_and_a_template_file_gives_a_model_chat(tmp_path):
    """``api_key`` (``latentrt serve --api-key``): the openai client with the key is served, a wrong or missing
    key is a 401 on /v1 and the tokenizer routes, /health stays open. A template file (``--chat-template``)
    lets a model without one chat: the prompt is its rendering."""
    from latentrt.chat import chat_template_file

    model = tiny_coconut(seed=2)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    with serving(model, template=chat_template_file(tmp_path / "t.jinja"), api_key="s3cret", max_batch=2) as (url, _):
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        messages = [{"role": "user", "content": "Tom is a cat"}]
        r = keyed.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
        ids = model.tokenizer.encode("Tom is a cat ", add_special_tokens=False).ids
        assert r.choices[0].message.content == latentrt.generate(model, ids, max_new_tokens=3).text
        with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
            client(url).completions.create(model="tiny", prompt="Tom", max_tokens=1)
        h = httpx.Client(base_url=url)
        assert h.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 1}).status_code == 401
        assert h.post("/tokenize", json={"prompt": "Tom"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert h.post("/tokenize", json={"prompt": "Tom"}, headers=auth).json()["count"] == 1
        for near in ("Bearer s3cretX", "Bearer s3cre", "bearer s3cret", "s3cret"):  # the whole header, exactly
            assert h.post("/tokenize", json={"prompt": "Tom"}, headers={"Authorization": near}).status_code == 401
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
    (tmp_path / "empty.jinja").write_text(" ")
    with pytest.raises(latentrt.InputError, match="is empty"):
        chat_template_file(tmp_path / "empty.jinja")


def test_cli_serve_passes_the_template_file_and_the_key(tmp_path, monkeypatch):
    from latentrt.cli import api_key_from as cli_api_key_from
    from latentrt.cli import main

    seen = {}

    def run_server(engine, name, *a, sock, **kw):
        seen.update(kw, name=name, port=sock.getsockname()[1])

    monkeypatch.setattr("latentrt.serve.app.run_server", run_server)
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    port = ["--port", str(free_port())]
    assert (
        main(["serve", *port, "--chat-template", str(tmp_path / "t.jinja"), "--api-key", "k1", "builtin:coconut"]) == 0
    )
    assert seen["chat_template"].source == "{{ messages[0]['content'] }}" and seen["api_key"] == "k1"
    assert seen["port"] == int(port[1])  # served on the socket taken before the model loaded
    monkeypatch.setenv("LATENTRT_API_KEY", "k2")
    assert main(["serve", *port, "builtin:coconut"]) == 0
    assert seen["chat_template"] is None and seen["api_key"] == "k2" and seen["tool_call_parser"] is None
    assert seen["responses_store"] == 0
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert main(["serve", *port, *tools, "builtin:coconut"]) == 0 and seen["tool_call_parser"] == "llama3_json"
    store = ["--enable-responses-api-store"]
    for flags, kept in ((store, 1000), ([*store, "--responses-store-size", "5"], 5)):
        assert main(["serve", *port, *flags, "builtin:coconut"]) == 0 and seen["responses_store"] == kept
    seen.clear()
    assert main(["serve", *port, *store, "--responses-store-size", "0", "builtin:coconut"]) == 2 and not seen
    assert main(["serve", *port, "--responses-store-size", "5", "builtin:coconut"]) == 2 and not seen
    # an empty key (--api-key "$UNSET", an exported empty variable) is refused, not served without a key
    for argv, source in ((["--api-key", " "], "--api-key"), ([], "LATENTRT_API_KEY")):
        monkeypatch.setenv("LATENTRT_API_KEY", "")
        with pytest.raises(latentrt.InputError, match=f"{source} is empty: give a key, or leave it unset"):
            cli_api_key_from(argv[1] if argv else None)
        seen.clear()
        assert main(["serve", *port, *argv, "builtin:coconut"]) == 2 and not seen
    with pytest.raises(latentrt.InputError, match="api_key must be a non-empty string or None"):
        create_app(Engine(tiny_recurrent(), max_batch=1), "tiny", api_key="")
    # create_app's own arguments (a model where the engine goes: an AttributeError before)
    with pytest.raises(latentrt.InputError, match="engine must be a latentrt.serve.Engine"):
        create_app(tiny_recurrent(), "tiny")
    for bad in (3, [], ["a", ""], ["a", 3]):
        with pytest.raises(latentrt.InputError, match="model_name must be a non-empty string"):
            create_app(Engine(tiny_recurrent(), max_batch=1), bad)


def test_cli_serve_passes_every_engine_flag(monkeypatch):
    """``latentrt serve``'s flags reach the engine and the app as given (each one of them was once a keyword
    the command could drop without a test noticing)."""
    from latentrt.cli import main

    seen = {}

    def run_server(engine, name, *a, sock, **kw):
        seen.update(engine=engine, name=name)

    monkeypatch.setattr("latentrt.serve.app.run_server", run_server)
    argv = ["--max-batch", "3", "--max-queue", "7", "--max-len", "40", "--kv-slots", "20", "--scheduler", "token"]
    argv += [
        "--edge-cost",
        "2.5",
        "--async-scheduling",
        "--served-model-name",
        "mine",
        "--scheduling-policy",
        "priority",
    ]
    argv += ["--override-generation-config", '{"temperature": 0.5, "num_steps": 3}', "--backend", "torch"]
    assert main(["serve", "--port", str(free_port()), *argv, "builtin:recurrent"]) == 0
    engine = seen["engine"]
    assert (engine.max_batch, engine.max_queue, engine.max_len, engine.program.pool.slot_rows) == (3, 7, 40, 20)
    assert (engine.scheduler, engine.edge_cost, engine.async_scheduling) == ("token", 2.5, True)
    assert engine.scheduling_policy == "priority"
    assert seen["name"] == ["mine"] and engine.model.generation_defaults == {"temperature": 0.5, "num_steps": 3}
    assert main(["serve", "--port", str(free_port()), "--backend", "torch", "builtin:recurrent"]) == 0
    engine = seen["engine"]
    assert (engine.edge_cost, engine.async_scheduling, seen["name"]) == (None, False, ["builtin:recurrent"])
    assert engine.scheduling_policy == "fcfs"
    names = ["--served-model-name", "a", "--served-model-name", "b"]
    assert main(["serve", "--port", str(free_port()), *names, "builtin:recurrent"]) == 0
    assert seen["name"] == ["a", "b"]


def test_cli_serve_errors(capsys, monkeypatch):
    from latentrt import cli

    port = ["--port", str(free_port())]
    assert cli.main(["serve", *port, "--chat-template", "/no/such.jinja", "builtin:recurrent"]) == 2
    assert "--chat-template '/no/such.jinja' is not a file" in capsys.readouterr().err

    assert cli.main(["serve", *port, "builtin:nope"]) == 2
    assert cli.main(["serve", *port, "--max-batch", "0", "builtin:recurrent"]) == 2
    assert cli.main(["serve", *port, "--edge-cost", "-1", "builtin:recurrent"]) == 2
    capsys.readouterr()
    with socket.socket() as taken:  # a port in use: the error before the weights load, not after
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the port was taken"))
        assert cli.main(["serve", "--port", str(busy), "builtin:recurrent"]) == 2
    assert f"cannot listen on 127.0.0.1:{busy}" in capsys.readouterr().err


def test_published_top_p_reaches_the_api_the_cli_and_the_server(recurrent_dir, capsys):
    """published_top_p (its draws are checked against the published sampler in test_published.py) is an
    option of generate(), a flag of the CLI and a field of the server, each giving the same tokens; without
    top_p it does nothing and says so."""
    from latentrt.cli import main

    model = latentrt.load(recurrent_dir, device="cpu")
    kw = dict(max_new_tokens=8, init_scale=0.0, temperature=1.5, top_p=0.5, seed=4, default_stops=False)
    want = latentrt.generate(model, [5, 6, 7], published_top_p=True, **kw).tokens
    flags = ["--max-new-tokens", "8", "--init-scale", "0", "--temperature", "1.5", "--top-p", "0.5", "--seed", "4"]
    assert (
        main(["generate", str(recurrent_dir), "every cat", "--json", "--no-default-stops", *flags, "--published-top-p"])
        == 0
    )
    prompt = model.tokenizer.encode("every cat").ids
    assert (
        json.loads(capsys.readouterr().out)["tokens"]
        == latentrt.generate(model, prompt, published_top_p=True, **kw).tokens
    )
    with serving(model) as (url, _):
        body = dict(prompt=[5, 6, 7], max_tokens=8, init_scale=0.0, temperature=1.5, top_p=0.5, seed=4)
        r = httpx.post(f"{url}/v1/completions", json=dict(body, default_stops=False, published_top_p=True)).json()
    assert r["choices"][0]["latentrt"]["token_ids"] == want
    with pytest.warns(UserWarning, match="^published_top_p acts only with top_p < 1 when sampling"):
        latentrt.generate(model, [5, 6, 7], max_new_tokens=2, temperature=1.0, published_top_p=True)
    with pytest.raises(latentrt.InputError, match="published_top_p must be True or False"):
        latentrt.generate(model, [5, 6, 7], published_top_p="yes")


def test_an_app_that_is_gone_keeps_no_engine_alive():
    """FastAPI caches up to 4,096 route functions module-wide; a route that closed over the engine kept every
    app's model and K/V pool alive after the app was gone (run_batch makes an app per call: ~55 MB a call for
    the built-in model, found by tools.fuzz's memory). The routes read the engine from the request instead."""
    import gc
    import weakref

    from fastapi.testclient import TestClient

    engine = Engine(tiny_recurrent(), max_batch=1)
    refs = [weakref.ref(engine), weakref.ref(engine.model), weakref.ref(engine.program)]
    app = create_app(engine, "tiny", chat_template=TEMPLATE, api_key="k")
    with TestClient(app) as client:  # every route, once
        auth = {"authorization": "Bearer k"}
        assert client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, headers=auth).status_code == 200
        body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "stream": True}
        assert "[DONE]" in client.post("/v1/chat/completions", json=body, headers=auth).text
        assert client.post("/tokenize", json={"prompt": "a"}, headers=auth).json()["count"] >= 1
        assert client.post("/detokenize", json={"tokens": [5]}, headers=auth).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        for path in ("/v1/models", "/v1/models/tiny", "/health", "/version", "/metrics"):
            assert client.get(path, headers=auth).status_code == 200, path
    del app, engine, client
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_an_app_run_without_its_lifespan_starts_its_engine_on_the_first_request():
    """Mounted where no lifespan runs (a sub-application, a test client used without ``with``), the app starts its
    engine's thread on the first request instead of waiting for ever."""
    from fastapi.testclient import TestClient

    engine = Engine(tiny_recurrent(), max_batch=1)
    client = TestClient(create_app(engine, "tiny"))  # (no ``with``: no lifespan)
    answer = {}
    asking = threading.Thread(
        target=lambda: answer.update(r=client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})),
        daemon=True,
    )
    asking.start()
    asking.join(60)
    assert not asking.is_alive(), "the request never finished: no engine thread"
    assert answer["r"].status_code == 200 and answer["r"].json()["usage"]["completion_tokens"] == 2
    engine.stop()


def test_cors_lets_the_allowed_origins_call_and_no_other(recurrent_server):
    """``allowed_origins`` (``--allowed-origins``): Starlette's CORS middleware, outermost, so a browser's preflight
    (which carries no key) is answered even with an API key; another origin gets no CORS header; without it (the
    default) no origin does."""
    from fastapi.testclient import TestClient

    _, engine, _ = recurrent_server
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    body = {"model": "tiny", "prompt": "every cat is", "max_tokens": 2}
    app = create_app(Engine(engine.model), "tiny", api_key="k", allowed_origins=["https://app.example"])
    with TestClient(app) as c:
        ok = c.options("/v1/completions", headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/v1/completions", headers={"Origin": "https://evil.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/completions", json=body, headers={"Origin": "https://app.example", **auth})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/v1/completions", json=body, headers={"Origin": "https://evil.example", **auth})
        assert "access-control-allow-origin" not in r.headers
        assert c.post("/v1/completions", json=body, headers={"Origin": "https://app.example"}).status_code == 401
    with TestClient(create_app(Engine(engine.model), "tiny")) as c:
        r = c.options("/v1/completions", headers={"Origin": "https://app.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
    for bad, message in [
        ("https://a.example", "allowed_origins must be a list of origins"),
        (["a.example"], "allowed origin 'a.example' is neither '\\*' nor scheme://host"),
        (["https://a.example/path"], "neither '\\*' nor scheme://host\\[:port\\] \\(no path\\)"),
        ([3], "allowed origin 3 is neither"),
    ]:
        with pytest.raises(latentrt.InputError, match=message):
            create_app(Engine(engine.model), "tiny", allowed_origins=bad)


def self_signed(tmp_path, name: str = "") -> tuple[str, str]:
    """A key and its self-signed certificate for 127.0.0.1 (PEM files), made with the openssl command."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command here to make a certificate")
    key, cert = tmp_path / f"key{name}.pem", tmp_path / f"cert{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return str(key), str(cert)


def test_cli_serve_speaks_https_with_a_key_and_certificate(tmp_path):
    """``--ssl-keyfile`` / ``--ssl-certfile`` (uvicorn's): the server answers over TLS, its certificate verified,
    with --allowed-origins in the same process; plain HTTP gets no answer."""
    key, cert = self_signed(tmp_path)
    extra = ["--ssl-keyfile", key, "--ssl-certfile", cert, "--allowed-origins", "https://app.example"]
    proc, url = serve_process(tmp_path, tiny_recurrent(seed=3), *extra, verify=cert)
    try:
        assert url.startswith("https://")
        body = {"model": str(tmp_path / "m"), "prompt": "every cat is", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=body, verify=cert, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # (uvicorn re-raises the SIGTERM once drained, so supervisors see it)
    assert proc.returncode in (0, -signal.SIGTERM) and "on https://127.0.0.1:" in out and "Traceback" not in out, out


def test_cli_serve_refuses_bad_tls_origin_and_tool_parser_flags_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from latentrt.cli import main

    monkeypatch.setattr(latentrt.loader, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    key, cert = self_signed(tmp_path)
    other_key, _ = self_signed(tmp_path, "2")
    port = str(free_port())
    for flags, message in [
        (["--ssl-keyfile", key], "--ssl-keyfile and --ssl-certfile go together"),
        (["--ssl-keyfile", key, "--ssl-certfile", str(tmp_path / "none.pem")], "none.pem"),
        (["--ssl-keyfile", cert, "--ssl-certfile", cert], f"--ssl-certfile {cert!r} / --ssl-keyfile {cert!r}: "),
        (["--ssl-keyfile", other_key, "--ssl-certfile", cert], "KEY_VALUES_MISMATCH"),
        (["--allowed-origins", "app.example"], "allowed origin 'app.example' is neither '*' nor scheme://host"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser NAME (one of ['hermes',"),
        (["--tool-call-parser", "hermes"], "--tool-call-parser is read for tool_choice 'auto': give --enable-auto"),
        (["--enable-auto-tool-choice", "--tool-call-parser", "x"], "--tool-call-parser 'x' is not one of ['hermes'"),
    ]:
        assert main(["serve", "builtin:recurrent", "--port", port, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("latentrt: error: ") and message in err and err.count("\n") == 1, (flags, err)


def test_a_model_served_under_several_names_answers_to_each():
    """vLLM's ``--served-model-name a b``: a request may name any of them, answers carry the first; /v1/models
    lists each; another name is a 404 listing them."""
    model = tiny_recurrent(seed=3)
    with serving(model, ["tiny", "alias"], max_batch=2) as (url, _):
        c = client(url)
        r = c.completions.create(model="alias", prompt="Tom is a cat", max_tokens=2, temperature=0, seed=5)
        alone = latentrt.generate(model, "Tom is a cat", max_new_tokens=2, seed=5)
        assert r.model == "tiny" and r.choices[0].latentrt["token_ids"] == alone.tokens
        assert [m.id for m in c.models.list().data] == ["tiny", "alias"] and c.models.retrieve("alias").id == "alias"
        with pytest.raises(openai.NotFoundError, match=r"this server serves one of \['tiny', 'alias'\]"):
            c.completions.create(model="other", prompt="a", max_tokens=1)


def test_a_requests_priority_reaches_the_engine_of_its_policy():
    """vLLM's ``priority`` field: taken by a server under the priority policy (on each route), a 400 naming the
    policy under fcfs (the default), and a 400 when it is not an integer."""
    model = tiny_recurrent(seed=3)
    body = dict(model="tiny", prompt="Tom is a cat", max_tokens=2, temperature=0, seed=5, priority=-2)
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Tom"}], max_tokens=2, priority=4)
    with serving(model, template=TEMPLATE, max_batch=2, scheduling_policy="priority") as (url, _):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        alone = latentrt.generate(model, "Tom is a cat", max_new_tokens=2, seed=5)
        assert r.status_code == 200 and r.json()["choices"][0]["latentrt"]["token_ids"] == alone.tokens
        assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        bad = httpx.post(url + "/v1/completions", json=dict(body, priority="high"), timeout=60)
        assert bad.status_code == 400 and "priority must be an integer" in bad.text
    with serving(model, template=TEMPLATE, max_batch=2) as (url, _):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "priority=-2 is read under the priority scheduling policy" in r.text
        r = httpx.post(url + "/v1/completions", json=dict(body, priority=0), timeout=60)
        assert r.status_code == 200
