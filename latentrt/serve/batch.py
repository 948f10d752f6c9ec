"""``latentrt run-batch``: a file of OpenAI Batch API requests run through the server's own routes, in-process
(no socket), as ``vllm run-batch`` runs one; the answers written as the Batch API's output lines.

Input: JSON Lines (a file, or "-": standard input), one request a line, ``{"custom_id": ..., "method": "POST",
"url": "/v1/completions" or "/v1/chat/completions", "body": {...}}`` (the body as a client would send it to that
route). Every line is checked before any runs (an error names the line). The requests go to the routes at once,
as many as the engine holds and queues, so they are batched as a server's concurrent clients are.

Output: JSON Lines in the input's order, ``{"id": "batch_req_...", "custom_id": ..., "response": {"status_code":
..., "request_id": ..., "body": {...}}, "error": null}``: a route's answer with its status, a refusal (400, 404)
included, as the server would have answered it. The file is written whole or not at all (a temporary file
renamed into place), so a run cut short never leaves half a result file.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import httpx

from ..errors import InputError, check_unicode, json_loads, os_errors_as
from .protocol import error_body

ROUTES = ("/v1/completions", "/v1/chat/completions")


def read_batch(path: str | os.PathLike) -> list[dict]:
    """The requests of a batch input file ("-": standard input), each checked (InputError naming its line
    otherwise)."""
    if os.fspath(path) == "-":
        text, path = sys.stdin.read(), "<stdin>"
    else:
        with os_errors_as(InputError, f"input file {str(path)!r}"):
            exists = Path(path).is_file()
        if not exists:
            raise InputError(f"input file {str(path)!r} does not exist")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read input file {str(path)!r}: {exc}") from None
    requests, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            request = json_loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(request, dict):
            raise InputError(f"{where}: a request is a JSON object, got {type(request).__name__}")
        unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise InputError(f"{where}: unknown field(s) {unknown}; a request has custom_id, method, url and body")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InputError(f"{where}: custom_id must be a non-empty string, got {custom_id!r}")
        check_unicode(f"{where}: custom_id", custom_id)  # (it is written back into the output file)
        if custom_id in seen:
            raise InputError(f"{where}: custom_id {custom_id!r} is also line {seen[custom_id]}'s (each must be unique)")
        seen[custom_id] = number
        if request.get("method") != "POST":
            raise InputError(f"{where}: method must be 'POST', got {request.get('method')!r}")
        if request.get("url") not in ROUTES:
            raise InputError(f"{where}: url must be one of {list(ROUTES)}, got {request.get('url')!r}")
        if not isinstance(request.get("body"), dict):
            raise InputError(f"{where}: body must be a JSON object (the route's request), got {request.get('body')!r}")
        if request["body"].get("stream"):
            raise InputError(f"{where}: stream is not supported in a batch (each answer is written whole)")
        requests.append(request)
    if not requests:
        raise InputError(f"input file {str(path)!r} holds no request")
    return requests


def check_output(path: str | os.PathLike) -> None:
    """Before the model loads: the output file's folder exists and the path is not a folder."""
    target = Path(path)
    with os_errors_as(InputError, f"output file {str(path)!r}"):
        is_dir, parent_ok = target.is_dir(), target.parent.is_dir()
    if is_dir:
        raise InputError(f"output file {str(path)!r} is a folder")
    if not parent_ok:
        raise InputError(f"output file {str(path)!r}: its folder {str(target.parent)!r} does not exist")


async def _answers(app, requests: list[dict]) -> list[dict]:
    """Every request through ``app``'s route at once, as output lines in the requests' order."""
    # (an exception in a route is its 500 answer, as a server's client would get it, not the end of the batch)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:

        async def one(request: dict) -> dict:
            # the body as the line wrote it: JSON's escapes for text that is no valid Unicode (a lone surrogate)
            # and Python's NaN / Infinity, which httpx's json= cannot encode, reach the route to be refused there
            body = json.dumps(request["body"], allow_nan=True).encode()
            headers = {"content-type": "application/json"}
            reply = await client.post(request["url"], content=body, headers=headers)
            try:
                answer = reply.json()
            except ValueError:  # (a route's unexpected exception: the framework's plain-text 500)
                answer = error_body(reply.text or f"status {reply.status_code}", "server_error")
            return {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": request["custom_id"],
                "response": {
                    "status_code": reply.status_code,
                    "request_id": f"req_{uuid.uuid4().hex}",
                    "body": answer,
                },
                "error": None,
            }

        return await asyncio.gather(*(one(r) for r in requests))


def write_lines(path: str | os.PathLike, lines: list[dict]) -> None:
    """``lines`` as JSON Lines at ``path``, whole or not at all (a temporary file beside it, renamed)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_batch(
    engine,
    model_name: str | list[str],
    requests: list[dict],
    output: str | os.PathLike,
    chat_template=None,
    tool_call_parser: str | None = None,
) -> Counter:
    """Answer ``requests`` (``read_batch``) with ``engine`` served as ``model_name``, write the output lines to
    ``output``; the count of answers per status code (``tool_call_parser``: as ``create_app``)."""
    from .app import create_app

    engine.max_queue = sys.maxsize  # every request (each of a line's n choices) queued at once: none is a 429
    app = create_app(engine, model_name, chat_template=chat_template, tool_call_parser=tool_call_parser)
    runner = app.state.runner
    runner.start()  # (an in-process client runs no lifespan: the engine's thread is started here)
    try:
        lines = asyncio.run(_answers(app, requests))
    finally:
        runner.stop()
    write_lines(output, lines)
    return Counter(line["response"]["status_code"] for line in lines)
