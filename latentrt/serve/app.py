"""The HTTP server: OpenAI-compatible routes over an ``Engine``, with FastAPI and uvicorn (the ``serve`` extra).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events), ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``, ``GET /metrics`` (Prometheus text
format), and vLLM's ``POST /tokenize`` / ``POST /detokenize`` (the server's own tokenization, for clients
that count tokens).

Status codes: 400 for a body that is not JSON, an unknown field or a bad option (the Python API's message);
404 for a model name other than the served one; 429 with ``Retry-After`` when the queue is full; 503 while
shutting down; 500 for a request that failed while running (e.g. its latent state became NaN), alone:
the others go on. A client that disconnects cancels its request, which leaves the engine at its next step.
The engine runs on its own thread; uvicorn's graceful shutdown (SIGTERM, Ctrl-C) lets in-flight requests
finish before the engine stops.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..chat import chat_template_for
from ..errors import InputError, LatentRTError, PromptError, json_loads, renamed
from ..version import __version__
from . import responses
from .engine import Engine, QueueFull, ShuttingDown, server_defaults
from .protocol import (
    check_model,
    chunk_body,
    completion_body,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_lora_update,
    parse_tokenize,
    token_text,
    usage,
    with_openai_defaults,
)
from .response_store import ResponseNotFound, ResponseStore
from .tool_parsers import tool_parser

POLL_SECONDS = 0.1  # how often a waiting non-streaming request checks that its client is still there


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


def failure(error: Exception) -> tuple[int, str, str]:
    """(status, message, error type) of a request that failed while it ran: its own options' doing (an
    InputError: no token left to choose) is a 400, as if refused up front; anything else (a non-finite state,
    a failed step) a 500."""
    if isinstance(error, InputError):
        return 400, str(error), "invalid_request_error"
    return 500, str(error), "server_error"


class EngineThread:
    """The engine's stepping thread, started once (by the app's lifespan or its first request)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.engine.run_forever, name="latentrt-engine", daemon=True)
                self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        self.engine.stop()
        if self.thread is not None:
            self.thread.join(timeout)


@dataclass
class Served:
    """What the routes serve: an app's engine and its settings, kept in ``app.state.served``. The routes read it
    from the request (``request.app.state.served``) rather than close over it: FastAPI keeps every route
    function in a module-level cache of up to 4,096 callables, so a route that held the engine would keep each
    app's model and K/V pool alive after the app is gone (``run_batch`` makes an app per call)."""

    engine: Engine
    runner: EngineThread
    model_name: str  # the name answers carry (the first of ``names``)
    template: object  # the chat template (latentrt/chat.py), or None
    text_of: object  # a token id -> its text as log-probs name it
    started: int  # when the app was made (the model card's ``created``)
    tool_parser: object = None  # the reader of the model's tool-call format ("auto" tool choice), or None
    responses: ResponseStore | None = None  # the Responses API's store, or None (none kept)
    names: tuple[str, ...] = ()  # every name a request may give (``model_name`` first)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The served LoRA adapters' names (now: runtime loading changes them): a request giving one runs with it."""
        bank = self.engine.model.adapter_bank
        return () if bank is None else tuple(bank.names)

    def answer_name(self, reqs) -> str:
        """The model an answer names: the adapter its requests ran with, else the model's (vLLM's)."""
        return reqs[0].adapter or self.model_name if reqs else self.model_name

    @property
    def model(self):
        return self.engine.model


def create_app(
    engine: Engine,
    model_name: str | list[str],
    chat_template=None,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    tool_call_parser: str | None = None,
    responses_store: int = 0,
    runtime_lora_updating: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name`` (or as each of a list of names, any of which a request
    may give; answers carry the first: vLLM's ``--served-model-name a b``); ``chat_template`` (a ``ChatTemplate`` or
    a file's path, latentrt/chat.py) defaults to the model folder's; with ``api_key`` the model routes (``/v1/...``,
    ``/tokenize``, ``/detokenize``) answer only requests with ``Authorization: Bearer <api_key>`` (401 otherwise, as
    OpenAI's and vLLM's), while ``/health``, ``/version`` and ``/metrics`` stay open for probes and scrapers.
    ``allowed_origins``: the web origins a browser page may call it from (CORS, Starlette's middleware; ``["*"]``
    any; None, the default: none, where vLLM allows any); ``tool_call_parser``: the name of the model's tool-call
    format (serve/tool_parsers/: "hermes", "llama3_json"), which lets chat requests leave the choice between text
    and calls to the model (``tool_choice: "auto"``, OpenAI's default with tools; vLLM's ``--enable-auto-tool-choice
    --tool-call-parser``); None, the default: such requests are 400s; ``responses_store``: how many finished
    responses ``/v1/responses`` keeps in memory for ``GET`` and ``previous_response_id`` (serve/response_store.py;
    0, the default: none); ``runtime_lora_updating``: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
    routes, which change the served LoRA adapters (latentrt/lora_serving.py; the model must serve some: vLLM's
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
    if not isinstance(engine, Engine):
        raise InputError(
            f"engine must be a latentrt.serve.Engine (Engine(latentrt.load(...))), got {type(engine).__name__}"
        )
    names = [model_name] if isinstance(model_name, str) else model_name
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(
            f"model_name must be a non-empty string (the name clients send), or a list of them, got {model_name!r}"
        )
    model = engine.model
    parser = None if tool_call_parser is None else tool_parser(tool_call_parser)
    served = Served(
        engine,
        EngineThread(engine),
        names[0],
        chat_template_for(model, chat_template),
        partial(token_text, model.tokenizer),
        int(time.time()),
        parser,
        ResponseStore(responses_store) if responses_store else None,
        tuple(dict.fromkeys(names)),
    )
    clash = set(served.names) & set(served.adapters)
    if clash:
        raise InputError(f"{sorted(clash)[0]!r} names both the model and a served LoRA adapter: rename one")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner = app.state.served.runner
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)  # drains: queued and resident requests finish first

    app = FastAPI(title="latentrt", lifespan=lifespan)
    app.state.served, app.state.engine, app.state.runner = served, engine, served.runner

    if api_key is not None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise InputError(f"api_key must be a non-empty string or None (no key), got {api_key!r}")
        app.middleware("http")(partial(_require_key, f"Bearer {api_key}".encode()))
    if allowed_origins is not None:  # (added last, so outermost: a browser's preflight carries no key)
        from fastapi.middleware.cors import CORSMiddleware

        origins = check_origins(allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])

    # (the routes hold nothing of this app: each reads it from its request, see ``Served``)
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request.app.state.served, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request.app.state.served, request, chat=True)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        return await _handle_responses(request.app.state.served, request)

    @app.get("/v1/responses/{rid}")
    async def get_response(request: Request, rid: str):
        return _stored(request.app.state.served, rid, lambda store: store.response(rid))

    @app.delete("/v1/responses/{rid}")
    async def delete_response(request: Request, rid: str):
        return _stored(
            request.app.state.served,
            rid,
            lambda store: store.delete(rid) or {"id": rid, "object": "response", "deleted": True},
        )

    if runtime_lora_updating:
        if model.adapter_bank is None:
            raise InputError("runtime_lora_updating needs a model that serves LoRA adapters (--enable-lora)")

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            return await _lora_update(request.app.state.served, request, load=True)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            return await _lora_update(request.app.state.served, request, load=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _quick(request.app.state.served, request, _tokenized)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _quick(request.app.state.served, request, _detokenized)

    @app.get("/v1/models")
    async def models(request: Request):
        served = request.app.state.served
        cards = [_model_card(served, name) for name in served.names + served.adapters]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")  # OpenAI's retrieve (client.models.retrieve); a Hub id holds a '/'
    async def one_model(request: Request, name: str):
        served = request.app.state.served
        try:
            check_model({"model": name}, served.names + served.adapters)
        except LookupError as exc:
            return _error(404, str(exc), "model_not_found")
        return _model_card(served, name)

    @app.get("/health")
    async def health(request: Request):
        served = request.app.state.served
        if served.engine.draining:
            return _error(503, "shutting down", "server_shutting_down")
        if served.runner.thread is not None and not served.runner.alive:
            return _error(503, "the engine thread stopped", "server_error")
        return {"status": "ok", "model": served.model_name, "pid": os.getpid()}  # pid: which replica answered

    @app.get("/version")  # vLLM's: which latentrt answers (open, as /health)
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics(request: Request):
        from .prometheus import render

        return PlainTextResponse(render(request.app.state.served.engine), media_type="text/plain; version=0.0.4")

    return app


async def _require_key(expected: bytes, request: Request, call_next):
    """The API key's middleware: the model routes answer only ``Authorization: <expected>``."""
    guarded = request.url.path.startswith("/v1/") or request.url.path in ("/tokenize", "/detokenize")
    given = request.headers.get("authorization", "").encode()
    if guarded and not hmac.compare_digest(given, expected):
        return _error(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error")
    return await call_next(request)


async def _body_of(request: Request):
    try:
        return json_loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON: {exc}") from None


def _submit_all(served: Served, parsed, on_event_for, adapter: str | None = None) -> list:
    """Submit one engine request per choice (with the served LoRA ``adapter`` the request named, if any); on a
    failure, cancel the ones already queued."""
    engine = served.engine
    served.runner.start()
    reqs = []
    try:
        for i, (prompt, opts) in enumerate(zip(parsed.prompts, parsed.options)):
            reqs.append(
                engine.submit(
                    prompt,
                    on_event=on_event_for(i),
                    top_logprobs=parsed.top_logprobs,
                    echo=parsed.echo,
                    score_only=parsed.score_only,
                    priority=parsed.priority,
                    adapter=adapter,
                    text_per_token=parsed.stream,  # a response that is not streamed reads the text at the end
                    **with_openai_defaults(opts, parsed.openai_defaults, engine.model.generation_defaults),
                )
            )
    except Exception as exc:
        for r in reqs:
            engine.cancel(r)
        if not isinstance(exc, InputError):
            raise
        message = renamed(str(exc), parsed.field_names)  # the request's fields, not generate()'s names
        if isinstance(exc, PromptError) and parsed.several_prompts:
            message = f"prompt {parsed.prompt_index[len(reqs)]}: {message}"
        raise InputError(message) from None
    return reqs


async def _handle(served: Served, request: Request, chat: bool):
    def parse(body):
        if not chat:
            return parse_completion(body)
        return parse_chat(body, served.template, served.model.tokenizer, served.tool_parser)

    submitted = await _submitted(served, request, parse)
    if isinstance(submitted, JSONResponse):
        return submitted
    _, parsed, reqs, events = submitted
    rid = new_id("chatcmpl" if chat else "cmpl")
    if parsed.stream:
        return await _stream(served, request, rid, reqs, events, chat, parsed)
    return await _complete(served, request, rid, reqs, events, chat, parsed)


async def _submitted(served: Served, request: Request, parse):
    """The request's body read, ``parse``d and submitted: (body, parsed, engine requests, their events' queue), or
    the error response."""
    try:
        body = await _body_of(request)
        check_model(body, served.names + served.adapters)
        named = body.get("model") if isinstance(body, dict) else None  # (a body of another type: parse's 400)
        adapter = named if named in served.adapters else None
        parsed = parse(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        on_event_for = lambda i: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))  # noqa: E731
        # (off the event loop: a request's validation, a long prompt's tokens or a grammar's compile take their
        # time while the other requests' streams go on)
        reqs = await asyncio.to_thread(_submit_all, served, parsed, on_event_for, adapter)
    except InputError as exc:
        return _error(400, str(exc))
    except LookupError as exc:
        return _error(404, str(exc), getattr(exc, "kind", "model_not_found"))
    except QueueFull as exc:
        return _error(429, str(exc), "rate_limit_exceeded", headers={"Retry-After": "1"})
    except ShuttingDown as exc:
        return _error(503, str(exc), "server_shutting_down")
    return body, parsed, reqs, events


async def _lora_update(served: Served, request: Request, load: bool):
    """vLLM's runtime LoRA routes: ``{"lora_name", "lora_path"}`` loads an adapter, ``{"lora_name"}`` unloads one;
    answered in vLLM's words (plain text), off the event loop (the change waits for the running step)."""
    try:
        body = await _body_of(request)
        name, path = parse_lora_update(body, load)
        if load and name in served.names:  # (an adapter's name taken already: the bank's own error)
            raise InputError(f"the name {name!r} is served already (the model's): choose another")
        if load:
            await asyncio.to_thread(served.engine.load_adapter, name, path)
        else:
            await asyncio.to_thread(served.engine.unload_adapter, name)
    except LatentRTError as exc:  # (a bad request, or an adapter folder that cannot be read: CheckpointError)
        return _error(400, str(exc))
    except LookupError as exc:
        return _error(404, str(exc), getattr(exc, "kind", "model_not_found"))
    done = "added" if load else "removed"
    return Response(f"Success: LoRA adapter '{name}' {done} successfully.", media_type="text/plain")


def _stored(served: Served, rid: str, answer):
    """A stored response's route: ``answer(store)``, or a 404 (no such response, or no store)."""
    if served.responses is None:
        return _error(404, f"response {rid!r:.100} not found: this server stores no responses", "invalid_request_error")
    try:  # (ASCII JSON: a response echoes its request's fields, which may hold what UTF-8 cannot encode)
        return Response(json.dumps(answer(served.responses)), media_type="application/json")
    except ResponseNotFound as exc:
        return _error(404, str(exc), exc.kind)


async def _handle_responses(served: Served, request: Request):
    """``/v1/responses``: the body as a chat request (serve/responses.py), answered as a response object or its
    stream of typed events; kept in the store (if the server has one and the request did not say ``store:
    false``) with its conversation."""
    made = {}

    def parse(body):
        store, previous = served.responses, body.get("previous_response_id") if isinstance(body, dict) else None
        history = None
        if store is not None and previous is not None:
            if not isinstance(previous, str):
                raise InputError(f"previous_response_id must be a response's id, got {previous!r:.100}")
            history = store.conversation(previous)  # (a ResponseNotFound: 404)
        made["chat"] = chat = responses.to_chat(body, history)
        parsed = parse_chat(chat, served.template, served.model.tokenizer, served.tool_parser)
        parsed.field_names["max_new_tokens"] = "max_output_tokens"  # (its errors name the request's fields)
        return parsed

    submitted = await _submitted(served, request, parse)
    if isinstance(submitted, JSONResponse):
        return submitted
    body, parsed, reqs, events = submitted
    rid, req = responses.new_item_id("resp"), reqs[0]
    stored = served.responses is not None and body.get("store") is not False

    def keep(answer: dict) -> None:
        if stored:
            served.responses.put(answer, responses.conversation_of(body, made["chat"], answer["output"]))

    if not parsed.stream:
        while True:
            got = await _next_event(served, request, reqs, events)
            if got is None:
                return _error(499, "client closed the request")
            if got[1].kind in ("done", "error"):
                break
        if req.error is not None:
            return _error(*failure(req.error))
        output = responses.output_items(req, parsed.tool_choice)
        name = served.answer_name(reqs)
        answer = responses.response_body(rid, name, body, int(time.time()), req, output, stored=stored)
        keep(answer)
        # (ASCII JSON: the body echoes the request's fields, which may hold what UTF-8 cannot encode)
        return Response(json.dumps(answer), media_type="application/json")
    stream = responses.ResponseEvents(rid, served.answer_name(reqs), body, parsed.tool_choice, stored=stored)

    async def events_out():
        try:
            for event in stream.start():
                yield _sse(event)
            while True:
                got = await _next_event(served, request, reqs, events)
                if got is None:
                    return
                ev = got[1]
                if ev.kind in ("token", "text"):
                    for event in stream.delta(ev.text or ""):
                        yield _sse(event)
                elif ev.kind == "done":
                    closing = stream.end(req)
                    keep(closing[-1]["response"])  # (kept before the client reads it: a next turn may follow)
                    for event in closing:
                        yield _sse(event)
                    return
                else:
                    yield _sse(stream.error(*failure(req.error)))
                    return
        finally:
            if not req.finished:  # (a client gone mid-stream: its request ends)
                served.engine.cancel(req)

    return StreamingResponse(events_out(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n"


async def _next_event(served: Served, request: Request, reqs, events: asyncio.Queue):
    """The next (choice, event), or None when the client went away (its requests are cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                for r in reqs:
                    served.engine.cancel(r)
                return None


async def _complete(served: Served, request: Request, rid: str, reqs, events, chat: bool, parsed):
    open_ = len(reqs)
    while open_:
        got = await _next_event(served, request, reqs, events)
        if got is None:
            return _error(499, "client closed the request")
        if got[1].kind in ("done", "error"):
            open_ -= 1
    failed = [r for r in reqs if r.error is not None]
    if failed:
        for r in reqs:
            served.engine.cancel(r)
        return _error(*failure(failed[0].error))
    body = completion_body(
        rid, served.answer_name(reqs), reqs, chat, served.text_of, parsed.prompt_index, tool_choice=parsed.tool_choice
    )
    return JSONResponse(body)


async def _stream(served: Served, request: Request, rid: str, reqs, events, chat: bool, parsed):
    engine, model_name = served.engine, served.answer_name(reqs)
    include_usage, prompt_index = parsed.include_usage, parsed.prompt_index
    # (with a tool choice each choice's text goes out as its calls' deltas: serve/tools.py)
    calls = None if parsed.tool_choice is None else [parsed.tool_choice.stream() for _ in reqs]
    first = await _next_event(served, request, reqs, events)
    if first is None:
        return _error(499, "client closed the request")
    if first[1].kind == "error":  # failed before its first token: a plain error answer
        for r in reqs:
            engine.cancel(r)
        return _error(*failure(reqs[first[0]].error))

    sent = [0] * len(reqs)  # per choice: the tokens its chunks carried so far

    def sse(obj) -> str:
        if parsed.continuous_usage and obj["choices"]:  # (vLLM's continuous_usage_stats: the choice's so far)
            i = obj["choices"][0]["index"]
            prompt = reqs[i].prompt_tokens
            obj["usage"] = {"prompt_tokens": prompt, "completion_tokens": sent[i], "total_tokens": prompt + sent[i]}
        return f"data: {json.dumps(obj)}\n\n"

    async def body():
        got, open_ = first, len(reqs)
        try:
            if chat:
                for i in range(len(reqs)):
                    yield sse(chunk_body(rid, model_name, i, True, role=True))
            while True:
                i, ev = got
                sent[i] += ev.kind == "token"
                delta = None if calls is None or ev.kind not in ("token", "text") else calls[i].delta(ev.text or "")
                if calls is not None and ev.kind == "token":  # (a call's deltas; its token and log-prob still)
                    yield sse(
                        chunk_body(rid, model_name, i, chat, event=ev, token_text=served.text_of, delta=delta or {})
                    )
                elif calls is not None and ev.kind == "text":
                    if delta is not None:
                        yield sse(chunk_body(rid, model_name, i, chat, delta=delta))
                elif ev.kind == "token":
                    yield sse(chunk_body(rid, model_name, i, chat, text=ev.text, event=ev, token_text=served.text_of))
                elif ev.kind == "text":  # held back while it might have begun a stop string
                    yield sse(chunk_body(rid, model_name, i, chat, text=ev.text))
                elif ev.kind == "done":
                    finish = reqs[i].finish_reason
                    if calls is not None:
                        last, finish = calls[i].end(finish)
                        if last is not None:
                            yield sse(chunk_body(rid, model_name, i, chat, delta=last))
                    yield sse(chunk_body(rid, model_name, i, chat, finish=finish))
                    open_ -= 1
                else:
                    yield sse(error_body(*failure(reqs[i].error)[1:]))
                    open_ -= 1
                if not open_:
                    break
                got = await events.get()
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": model_name,
                        "choices": [],
                        "usage": usage(reqs, prompt_index),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response task is cancelled) or the stream ended
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)

    return StreamingResponse(body(), media_type="text/event-stream")


async def _quick(served: Served, request: Request, respond):
    """A route whose work is quick and needs no engine: ``respond(served, body)``'s JSON, or its error's status."""
    try:
        body = await _body_of(request)
        check_model(body, served.names)
        return respond(served, body)
    except InputError as exc:
        return _error(400, str(exc))
    except LookupError as exc:
        return _error(404, str(exc), "model_not_found")


def _tokenized(served: Served, body) -> dict:
    ids = parse_tokenize(body, served.template, served.model.tokenizer)
    return {"count": len(ids), "max_model_len": served.engine.max_len, "tokens": ids}  # (as /v1/models says)


def _detokenized(served: Served, body) -> dict:
    model = served.model
    ids = parse_detokenize(body, model.config.vocab_size)
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer.json: nothing to detokenize with")
    return {"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)}


def _model_card(served: Served, name: str) -> dict:
    """OpenAI's model object of one of the served names, with vLLM's ``max_model_len`` (the positions a request
    may use here) and, for a LoRA adapter, vLLM's ``root`` (its folder) and ``parent`` (the model's name)."""
    card = {
        "id": name,
        "object": "model",
        "created": served.started,
        "owned_by": "latentrt",
        "max_model_len": served.engine.max_len,
    }
    if name in served.adapters:
        card.update(root=served.model.adapter_bank.sources[name], parent=served.model_name)
    return card


def load_engine(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    revision: str | None = None,
    weights: str | None = None,
    hf_overrides: dict | None = None,
    adapter: str | None = None,
    lora_modules: dict[str, str] | None = None,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    runtime_lora_updating: bool = False,
    generation_config: dict | None = None,
    **engine_kw,
) -> Engine:
    """Load a model (as ``latentrt.load``, ``hf_overrides`` its config overrides) and wrap it in an Engine
    (``engine_kw``); ``lora_modules``: LoRA adapters served beside it, name -> adapter folder or Hub id (a request
    names one as its ``model``: latentrt/lora_serving.py), with room for ``max_loras`` of rank ``max_lora_rank`` at
    most (``runtime_lora_updating``: on the family's default LoRA layers, for adapters loaded later);
    ``generation_config``: every request's defaults over the model's generation_config.json (``server_defaults``:
    ``latentrt serve --override-generation-config``)."""
    from ..loader import load

    loaded = load(
        model,
        device=device,
        dtype=dtype,
        backend=backend,
        weights=weights,
        revision=revision,
        hf_overrides=hf_overrides,
        adapter=adapter,
    )
    if lora_modules or runtime_lora_updating:  # (runtime loading: room on the family's default LoRA layers)
        from ..lora_serving import serve_adapters

        targets = type(loaded).LORA_TARGETS if runtime_lora_updating else None
        serve_adapters(loaded, lora_modules or {}, max_loras=max_loras, max_lora_rank=max_lora_rank, targets=targets)
    if generation_config:
        loaded.generation_defaults = server_defaults(loaded, generation_config)
    return Engine(loaded, **engine_kw)


def check_origins(origins) -> list[str]:
    """CORS origins: a list of ``scheme://host[:port]`` strings, or ``*`` (any)."""
    if isinstance(origins, str) or not isinstance(origins, (list, tuple)):
        raise InputError(f"allowed_origins must be a list of origins (or ['*']), got {origins!r}")
    for origin in origins:
        if not isinstance(origin, str) or not (origin == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin)):
            raise InputError(f"allowed origin {origin!r} is neither '*' nor scheme://host[:port] (no path)")
    return list(origins)


def check_tls(keyfile: str | None, certfile: str | None) -> ssl.SSLContext | None:
    """``--ssl-keyfile`` and ``--ssl-certfile`` read before the model loads: both or neither, and a certificate
    and key that load (a bad one would stop uvicorn with a traceback, after the weights)."""
    if keyfile is None and certfile is None:
        return None
    if keyfile is None or certfile is None:
        raise InputError("--ssl-keyfile and --ssl-certfile go together (HTTPS needs the key and its certificate)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:  # (ssl.SSLError is an OSError: a file that is no PEM, a key not the certificate's)
        raise InputError(f"--ssl-certfile {certfile!r} / --ssl-keyfile {keyfile!r}: {exc.strerror or exc}") from None
    return context


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, taken before the model loads (as vLLM does): a port in use or a
    host that does not resolve is an error at once, not after the weights are read."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds a host
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_server(
    engine: Engine,
    model_name: str | list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    chat_template=None,
    api_key: str | None = None,
    sock: socket.socket | None = None,
    allowed_origins: list[str] | None = None,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    tool_call_parser: str | None = None,
    responses_store: int = 0,
    runtime_lora_updating: bool = False,
) -> None:
    """Serve until SIGTERM / Ctrl-C, then drain (``chat_template``, ``api_key``, ``allowed_origins``,
    ``tool_call_parser``, ``responses_store``, ``runtime_lora_updating``: as ``create_app``); on ``sock`` when given
    (``listening_socket``), else on ``host``:``port``; HTTPS with ``ssl_keyfile`` and ``ssl_certfile`` (PEM
    files, uvicorn's)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose first Ctrl-C (or SIGTERM) drains; a second Ctrl-C during the drain ends the
        process at once with one line (uvicorn would skip the drain and tear the loop down under the running
        engine: tracebacks, 500s in plain text, a C++ abort)."""

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                left = len(engine.resident) + len(engine.queue)
                print(f"latentrt: forced exit ({left} request(s) cut short)", file=sys.stderr, flush=True)
                os._exit(130)
            super().handle_exit(sig, frame)

    check_tls(ssl_keyfile, ssl_certfile)
    app = create_app(
        engine,
        model_name,
        chat_template=chat_template,
        api_key=api_key,
        allowed_origins=allowed_origins,
        tool_call_parser=tool_call_parser,
        responses_store=responses_store,
        runtime_lora_updating=runtime_lora_updating,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=None,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
    )
    Server(config).run(sockets=None if sock is None else [sock])


__all__ = [
    "check_origins",
    "check_tls",
    "create_app",
    "listening_socket",
    "load_engine",
    "run_server",
    "EngineThread",
    "LatentRTError",
]
