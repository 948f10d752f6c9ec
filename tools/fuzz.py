"""Bad-input fuzzing: random malformed input through the Python API, the command line, the server and run-batch,
which must each answer with a result or a clear error, never an unexpected exception, a 5xx or a hang.

    python -m tools.fuzz [--seconds 60 | --cases N] [--checks api,cli,http,batch] [--model builtin:recurrent]
                         [--backend auto] [--case-seconds 30] [--show-accepted] [--seed 0]

The guide's rule (bad input gets a clear error naming the problem, from the API, the CLI and the server) is
pinned by the tests on chosen inputs; this tool draws the inputs nobody chose. Each case draws, from its own
seed, a valid request (the soak's draw: ``tools.soak.draw_options`` / ``http_body``) and sets 0-2 of its
options or fields (by their names in that layer) to values from ``ODD_VALUES`` (wrong types, NaN and
infinities, huge and negative numbers, empty and malformed containers, ids past the vocabulary, lone
surrogates); a third of the prompts are odd too (``BAD_PROMPTS``). The checks take turns:

- ``api``: ``latentrt.generate`` (plain or streamed), ``Engine.generate`` (vLLM's offline API),
  ``apply_chat_template`` then ``generate``, ``model.logits`` and ``latentrt.load`` (odd keyword values, config
  overrides, conversations): a result, or a
  ``LatentRTError`` (``InputError`` and its kin; ``NonFiniteStateError`` where the options make the state
  overflow). Any other exception (a ``TypeError``, ``IndexError``, ``RuntimeError`` from deep inside) is a
  finding;
- ``cli``: ``latentrt generate`` / ``chat`` / ``info`` / ``save`` / ``eval`` / ``train`` (one step; its records
  file drawn too, some records odd) with flags set to their choices, plausible numbers or odd
  texts, in-process: exit 0, or exit 2 with ``error: ...`` on stderr. Exit 1 (the CLI's "unexpected failure"
  path), an exception or a traceback is a finding;
- ``http``: ``/v1/completions``, ``/v1/chat/completions``, ``/tokenize`` and ``/detokenize`` (odd field values;
  sometimes a body that is no JSON object): 200, or a 4xx whose JSON names the problem. A 5xx, or a stream's
  error event other than a bad request's, is a finding unless its message is the non-finite state's (a request
  that overflows fails alone, as the README says);
- ``batch``: ``latentrt run-batch`` over a file of such requests, some lines malformed: exit 0 (each request's
  answer or refusal in its line), or exit 2 naming the file's problem.

A case still running after ``--case-seconds`` is a finding too (an input that should have been refused, or a
missing bound). A finding prints the case's seed, what was sent and what came back, and the run exits 1; the
summary counts the outcomes (``--show-accepted``: the odd values a call answered with, and the commands'
most frequent refusals, to review by eye: a value accepted silently is a finding no rule here can see).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

import latentrt
from latentrt.backends import CHOICES
from latentrt.errors import LatentRTError
from latentrt.lora import add_lora, save_adapter
from latentrt.lora_serving import serve_adapters
from latentrt.options import GenerateOptions
from latentrt.serve.protocol import CHAT_FIELDS, COMPLETION_FIELDS
from latentrt.serve.responses import FIELDS as RESPONSE_FIELDS

from . import case_parser, parsed_checks, soak, warnings_silenced

CHECKS = ("api", "cli", "http", "batch")
LOAD_KEYWORDS = [
    "device",
    "dtype",
    "weights",
    "backend",
    "revision",
    "hf_overrides",
    "torch_dtype",
    "device_map",
    "adapter",
]
ROUTE_FIELDS = {  # the body fields of the routes that are not OpenAI's (latentrt/serve/protocol.py)
    "/tokenize": ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "chat_template_kwargs"),
    "/detokenize": ("model", "tokens"),
    "/v1/load_lora_adapter": ("lora_name", "lora_path", "load_inplace"),
    "/v1/unload_lora_adapter": ("lora_name", "lora_int_id"),
    "/v1/responses": tuple(sorted(RESPONSE_FIELDS)),
}
# how an error event shows in a route's answer (a response object holds "error": null when all is well)
ERROR_MARK = {"/v1/responses": '"type": "error"'}
NON_FINITE = "non-finite"  # what NonFiniteStateError's messages say (latentrt/recurrence.py, decode/)

# values no option takes as they are, or takes only at its edge
ODD_VALUES = (
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    7,
    -(2**31),
    2**31,
    2**63,
    10**30,
    0.0,
    -0.0,
    0.5,
    -0.5,
    1.5,
    1e-300,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    " ",
    "0",
    "-1",
    "nan",
    "abc",
    "kl",
    "full",
    "ring-0",
    "ring-3",
    "anchor-0",
    "ring-99999",
    "\ud800",
    "é\u2028\x00",
    [],
    [0],
    [-1],
    [10**9],
    [0, 1, 2],
    [[]],
    ["a"],
    ["", ""],
    [None],
    [1.5],
    {},
    {"0": 1},
    {"0": float("nan")},
    {"-1": 5},
    {"99999999": 1},
    {"a": 1},
    {"lookahead": 0},
    {"lookahead": "x"},
    [{"role": "user"}],  # conversations of odd messages (and, for other fields, odd lists of objects)
    [{"role": 3, "content": "a"}],
    [{"role": "user", "content": ["a", None]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "tool", "content": "a", "tool_call_id": 1}],
    "(ab",  # structured outputs: a bad regex, one past llguidance's limits, bad and empty schemas, bad grammars
    "a{1000000}",
    {"type": "nonsense"},
    {"$ref": "#"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "start: foo",
    'root ::= "x"',
)
# the values a CLI flag gets (its text)
ODD_TEXTS = (
    "",
    " ",
    "0",
    "1",
    "-1",
    "2",
    "3",
    "0.5",
    "-0.5",
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "-inf",
    "999999999999999999999999",
    "abc",
    "kl",
    "full",
    "shared",
    "ring-0",
    "ring-2",
    "anchor-0",
    "5=1",
    "x=1",
    "-5=2",
    "0=nan",
    "lookahead=4",
    "lookahead=-1",
    "{",
    "[1, 2]",
    '{"mean_recurrence": 0}',
    '{"mean_recurrence": "x"}',
    '{"nope": 1}',
    "é\u2028",
)
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"  # nested past Python's JSON reader
BAD_PROMPTS = (
    "",
    " ",
    "\ud800",
    "x" * 5000,
    [],
    [[]],
    [""],
    [0, 1, 2],
    [-1],
    [10**9],
    [[1, 2], [3]],
    [[1], "a"],
    [1.5],
    [True],
    None,
    3,
    {"a": 1},
    b"bytes",
)


def odd(rng: random.Random):
    """One value from ``ODD_VALUES``."""
    return rng.choice(ODD_VALUES)


def draw_prompt(rng: random.Random, model):
    """An odd prompt (a third of the cases), else a valid one (text, or the soak's ids)."""
    if rng.random() < 1 / 3:
        return rng.choice(BAD_PROMPTS)
    if rng.random() < 0.5:
        return "Alex is a wumpus. Is Alex a wumpus or rompus?"
    return soak.draw_prompt(rng, model)


def draw_options(rng: random.Random, model, names: list[str]) -> tuple[dict, list[str]]:
    """A valid option set (the soak's draw, ``tools.soak.draw_options``) with 0-2 of ``names`` set to odd values
    (one in most cases: several odd values at once mostly test which error comes first); and those names."""
    kw = soak.draw_options(rng, model, seed=rng.randrange(1000))
    odd_names = rng.sample(names, rng.choices([0, 1, 2], weights=[2, 6, 2])[0])
    for name in odd_names:
        kw[name] = odd(rng)
    return kw, odd_names


def shown(value) -> str:
    """``value`` as a short, printable repr (a 5,000-character prompt as its length)."""
    text = repr(value)
    return text if len(text) <= 300 else text[:140] + f"...<{len(text)} chars>..." + text[-40:]


class Fuzz:
    """The checks' state: the model, the server's client, and the findings so far."""

    def __init__(self, model_name: str, checks: list[str], backend: str = "auto") -> None:
        # (a folder's path made absolute: the commands run in the cases' folder)
        self.model_name = str(Path(model_name).resolve()) if Path(model_name).exists() else model_name
        self.backend = backend  # (the commands' too, unless a case draws its own --backend)
        self.model = latentrt.load(model_name, backend=backend)
        self.options = sorted(f.name for f in GenerateOptions.__dataclass_fields__.values())
        self.findings: list[str] = []
        self.counts = {c: 0 for c in checks}
        self.outcomes: Counter = Counter()  # "CHECK answered" / "CHECK refused"
        self.accepted: Counter = Counter()  # the odd values a call answered with ("name=value")
        self.refusals: Counter = Counter()  # the command line's error messages (their start)
        self.client = None
        self._offline = None  # (``offline``)
        self.tmp = Path(tempfile.mkdtemp(prefix="latentrt-fuzz-"))
        if "http" in checks:
            from fastapi.testclient import TestClient

            from latentrt.serve.app import create_app
            from latentrt.serve.engine import Engine

            # (with a tool-call parser: a body whose tools pass leaves the choice to the model, which is answered)
            # (and a store: previous_response_id is looked up; and a LoRA adapter served as "lora", on a model of
            # its own: the served one runs on the torch backend)
            # (with room for a second, loaded and unloaded at runtime by the LoRA routes' cases)
            served = latentrt.load(model_name, backend=backend)
            self.adapter_path = str(self._adapter(model_name))
            serve_adapters(served, {"lora": self.adapter_path}, max_loras=2, targets=type(served).LORA_TARGETS)
            engine = Engine(served, max_batch=4)
            app = create_app(
                engine, model_name, tool_call_parser="hermes", responses_store=16, runtime_lora_updating=True
            )
            self.client = TestClient(app, raise_server_exceptions=False).__enter__()  # (its lifespan runs)

    def _adapter(self, model_name: str) -> Path:
        """A LoRA adapter of the model, its updates drawn small (a case's answer stays a model's)."""
        model = add_lora(latentrt.load(model_name, device="cpu"), rank=2, seed=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        return save_adapter(model, self.tmp / "adapter")

    def offline(self):
        """The Engine the ``engine`` calls run on (a new one after a case was cut short inside it)."""
        if self._offline is None:
            from latentrt.serve.engine import Engine

            self._offline = Engine(self.model, max_batch=4)
        return self._offline

    def close(self) -> None:
        """Stop the server (its lifespan drains the engine) and remove the cases' files."""
        if self.client is not None:
            self.client.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def found(self, check: str, seed: int, what: str, detail: str) -> None:
        self.findings.append(f"[{check}] seed {seed}: {what}\n    {detail}")
        print(f"FINDING [{check}] seed {seed}: {what}\n    {detail}", flush=True)

    def run(self, check: str, seed: int, limit: float) -> None:
        """One case; a case still running after ``limit`` seconds is a finding (an input that should have been
        refused, or a bound missing: a request that never ends)."""
        rng = random.Random(f"fuzz {check} {seed}")
        self.current = "(the case)"  # what it sends, once drawn

        def overdue(signum, frame):
            raise Overdue

        previous = signal.signal(signal.SIGALRM, overdue)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            getattr(self, f"check_{check}")(rng, seed)
        except Overdue:
            self.found(check, seed, self.current, f"still running after {limit:g} s")
            self._offline = None  # (it may hold the cut case's requests)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        self.counts[check] += 1

    # ------------------------------------------------------------ api
    def check_api(self, rng: random.Random, seed: int) -> None:
        prompt = draw_prompt(rng, self.model)
        kw, odd_names = draw_options(rng, self.model, self.options)
        call = rng.choices(["generate", "stream", "logits", "load", "engine", "chat"], weights=[4, 2, 2, 1, 2, 1])[0]
        if call == "load":  # config fields (overrides) and load()'s keywords
            names = [f.name for f in dataclasses.fields(self.model.config)] + LOAD_KEYWORDS
            odd_names = rng.sample(names, rng.randrange(1, 3))
            kw = {name: odd(rng) for name in odd_names}
            prompt = self.model_name
        elif call == "chat":  # a conversation (odd or not) through the chat template, then generate()
            prompt = rng.choice([[{"role": "user", "content": "Alex is a wumpus."}], odd(rng)])
        elif call == "logits":
            names = [n for n in inspect.signature(self.model.logits).parameters if n != "input_ids"]
            odd_names = rng.sample(names, rng.randrange(0, 3))
            kw = {name: odd(rng) for name in odd_names}
            prompt = prompt if isinstance(prompt, list) and prompt else [prompt]
        self.current = f"{call}(model, {shown(prompt)}, **{shown(kw)})"
        try:
            if call == "generate":
                latentrt.generate(self.model, prompt, **kw)
            elif call == "stream":
                for _ in latentrt.generate(self.model, prompt, stream=True, **kw):
                    pass
            elif call == "engine":  # vLLM's offline LLM.generate: the server's path, in-process
                self.offline().generate([prompt], **kw)
            elif call == "chat":
                latentrt.generate(self.model, latentrt.apply_chat_template(self.model, prompt), **kw)
            elif call == "logits":
                self.model.logits(prompt, **kw)
            else:
                latentrt.load(prompt, **kw)
        except LatentRTError:
            self.outcomes["api refused"] += 1
        except Exception as exc:
            self.found("api", seed, self.current, "".join(traceback.format_exception_only(exc)).strip() + where(exc))
        else:
            self.outcomes["api answered"] += 1
            self.accepted.update(f"{name}={kw[name]!r}" for name in odd_names)

    # ------------------------------------------------------------ cli
    def command(self, check: str, seed: int, argv: list[str], stdin: str = "") -> None:
        """``latentrt ARGV`` in-process: exit 0, or 2 with ``latentrt: error: ...``; anything else is a finding."""
        from latentrt.cli import main

        out, err, real_stdin = io.StringIO(), io.StringIO(), sys.stdin
        try:
            sys.stdin = io.StringIO(stdin)
            # (in the cases' folder: an odd flag value may name a file the command writes, e.g. --log nan)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(self.tmp):
                rc = main(argv)
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
        except Exception as exc:
            rc = "an exception: " + "".join(traceback.format_exception_only(exc)).strip() + where(exc)
        finally:
            sys.stdin = real_stdin
        text = err.getvalue()
        self.outcomes[f"{check} exit {rc if isinstance(rc, int) else 'raised'}"] += 1
        if rc not in (0, 2) or (rc == 2 and "latentrt: error:" not in text and "error:" not in text):
            self.found(check, seed, self.current, f"exit {rc}: {text.strip()[-600:]}")
        elif rc == 2:
            self.refusals[text.strip().split("error: ", 1)[-1][:60]] += 1

    def check_cli(self, rng: random.Random, seed: int) -> None:
        from latentrt.cli import build_parser

        subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = rng.choice(["generate", "generate", "generate", "chat", "info", "save", "eval", "train"])
        actions = [a for a in subcommands[command]._actions if a.option_strings and a.dest != "help"]
        argv = [command, self.model_name]
        if command == "generate":
            argv.append(rng.choice(["Alex is a wumpus. Is Alex a wumpus or rompus?", "", "-", "é\u2028", "5,6,7"]))
        elif command == "save":
            argv.append(str(self.tmp / f"save-{seed}"))
        elif command in ("eval", "train"):  # a records file, some records (or the file) odd
            data = self.tmp / f"records-{seed}.json"
            data.write_text(draw_records(rng), encoding="utf-8")
            argv.append(str(data))
            argv += ["--limit", "2"] if command == "eval" else ["--out", str(self.tmp / f"train-{seed}"), "--max-steps"]
            argv += ["1"] if command == "train" else []
        for action in rng.sample(actions, min(len(actions), rng.randrange(0, 4))):
            argv.append(rng.choice(action.option_strings))
            if action.nargs != 0:
                argv += [
                    flag_value(rng, action) for _ in range(1 if action.nargs in (None, "?") else rng.randrange(1, 3))
                ]
        if command in ("generate", "chat") and "--max-new-tokens" not in argv:
            argv += ["--max-new-tokens", "3"]
        if "--backend" not in argv:
            argv += ["--backend", self.backend]
        self.current = "latentrt " + " ".join(map(shown, argv))
        self.command("cli", seed, argv, stdin=rng.choice(["Alex is a wumpus.", "", "\n\n"]))

    # ------------------------------------------------------------ http
    def check_http(self, rng: random.Random, seed: int) -> None:
        routes = ["/v1/completions", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
        route = rng.choice([*routes, "/v1/responses", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
        fields = sorted(ROUTE_FIELDS.get(route, ()) or (CHAT_FIELDS if "chat" in route else COMPLETION_FIELDS))
        if route == "/tokenize":
            body: object = rng.choice(
                [{"prompt": "Alex is a wumpus."}, {"messages": [{"role": "user", "content": "a"}]}]
            )
        elif route == "/detokenize":
            body = {"tokens": [rng.randrange(self.model.config.vocab_size) for _ in range(rng.randrange(0, 6))]}
        elif "lora_adapter" in route:  # (a second adapter, "x", comes and goes; "lora" is in use or not)
            body = {"lora_name": rng.choice(["x", "x", "lora"])}
            if route == "/v1/load_lora_adapter":
                body["lora_path"] = self.adapter_path
        elif route == "/v1/responses":
            body = {
                "input": rng.choice(["Alex is a wumpus.", [{"role": "user", "content": "a"}]]),
                "max_output_tokens": 4,
            }
            body["stream"] = rng.random() < 0.3
        else:  # a valid request (the soak's), then odd values
            body = soak.http_body(rng, self.model, chat="chat" in route)
            body["max_tokens"] = min(body.get("max_tokens", 4), 4)
            body["stream"] = rng.random() < 0.3
        if isinstance(body, dict) and "lora_adapter" not in route and rng.random() < 0.3:
            body["model"] = "lora"  # (the served adapter)
        for name in rng.sample(fields, rng.choices([0, 1, 2], weights=[1, 6, 2])[0]):
            body[name] = odd(rng)
        self.current = f"POST {route} {shown(body)}"
        data = json.dumps(body, allow_nan=True)  # (NaN and Infinity as Python's json writes them)
        if rng.random() < 0.05:  # a body that is no JSON object
            data = rng.choice(["", "{", "[1, 2]", "null", "3", "\xff\xfe", '{"prompt": "a",}', DEEP])
            self.current = f"POST {route} {shown(data)}"
        try:
            response = self.post(route, data)
        except Exception as exc:
            self.found("http", seed, self.current, "the client raised " + repr(exc))
            return
        status, text = response.status_code, response.text
        self.outcomes[f"http {status}"] += 1
        if status >= 500 and NON_FINITE not in text:
            self.found("http", seed, self.current, f"{status}: {text[:600]}")
        elif status >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = None
            if not message:
                self.found("http", seed, self.current, f"{status} without an error message: {text[:600]}")
            else:
                self.refusals[message[:60]] += 1
        elif (
            ERROR_MARK.get(route, '"error"') in text and "invalid_request_error" not in text and NON_FINITE not in text
        ):
            self.found("http", seed, self.current, f"a stream's error event: {text[-600:]}")

    def post(self, route: str, data: str):
        """The server's answer to ``data`` (a JSON text) at ``route``."""
        return self.client.post(route, content=data.encode(), headers={"content-type": "application/json"})

    # ------------------------------------------------------------ batch
    def check_batch(self, rng: random.Random, seed: int) -> None:
        lines = []
        for i in range(rng.randrange(1, 5)):
            chat = rng.random() < 0.3
            body = soak.http_body(rng, self.model, chat=chat)
            body["max_tokens"] = min(body.get("max_tokens", 4), 4)
            fields = sorted(CHAT_FIELDS if chat else COMPLETION_FIELDS)
            body.update({name: odd(rng) for name in rng.sample(fields, rng.choices([0, 1, 2], weights=[2, 6, 2])[0])})
            url = "/v1/chat/completions" if chat else "/v1/completions"
            request = {"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}
            if rng.random() < 0.1:  # a line the file check refuses
                request[rng.choice(["custom_id", "method", "url", "body"])] = odd(rng)
            line = json.dumps(request, allow_nan=True)
            lines.append(rng.choices([line, line[:-3], "", "[]", DEEP], weights=[20, 1, 1, 1, 1])[0])
        source, target = self.tmp / f"batch-{seed}.jsonl", self.tmp / f"batch-{seed}.out.jsonl"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.current = f"run-batch of {shown(lines)}"
        argv = ["run-batch", self.model_name, "-i", str(source), "-o", str(target), "--backend", self.backend]
        self.command("batch", seed, argv)


RECORD = {
    "question": "Alex is a wumpus. Is Alex a wumpus or rompus?",
    "steps": ["Alex is a wumpus."],
    "answer": "wumpus",
}


def draw_records(rng: random.Random) -> str:
    """A records file's text (``latentrt eval`` / ``train``): 1-4 records, each valid (ProsQA's shape, or the
    other shapes train takes) or with an odd field, as a JSON list or JSON Lines; sometimes no valid JSON."""
    records = []
    for _ in range(rng.randrange(1, 5)):
        record = dict(
            rng.choice([RECORD, {"text": "Alex is a wumpus."}, {"messages": [{"role": "user", "content": "a"}]}])
        )
        if rng.random() < 0.5:
            record[rng.choice(["question", "steps", "answer", "text", "messages", "extra"])] = odd(rng)
        records.append(record)
    if rng.random() < 0.1:
        return rng.choice(["", "[", "{}", "[1, 2]", "null", '[{"question": "a"}'])
    if rng.random() < 0.5:
        return json.dumps(records, allow_nan=True)
    return "\n".join(json.dumps(r, allow_nan=True) for r in records) + "\n"


def flag_value(rng: random.Random, action: argparse.Action) -> str:
    """A value for a command-line flag: one of its choices, a plausible number of its type, or an odd text."""
    draw = rng.random()
    if action.choices and draw < 0.4:
        return str(rng.choice(list(action.choices)))
    if action.type in (int, float) and draw < 0.6:
        return rng.choice(["1", "2", "3"]) if action.type is int else rng.choice(["0.5", "0.9", "1e-3"])
    return rng.choice(ODD_TEXTS)


class Overdue(BaseException):
    """A case ran past its time limit (a BaseException: the code under test catches no such thing)."""


def where(exc: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame in latentrt that the exception passed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "latentrt" in f.filename]
    return f" (at {frames[-1].filename.split('latentrt/', 1)[-1]}:{frames[-1].lineno})" if frames else ""


@warnings_silenced
def main(argv: list[str] | None = None) -> int:
    p = case_parser("python -m tools.fuzz", __doc__, CHECKS)
    p.add_argument("--backend", default="auto", choices=CHOICES, help="the model's backend, in every check")
    p.add_argument("--case-seconds", type=float, default=30.0, help="a case running longer is a finding (30)")
    p.add_argument("--show-accepted", action="store_true", help="list the odd option values a call answered with")
    args = p.parse_args(argv)
    checks = parsed_checks(p, args, CHECKS)
    if not args.case_seconds > 0:
        p.error(f"--case-seconds must be > 0, got {args.case_seconds}")
    fuzz = Fuzz(args.model, checks, args.backend)
    start, i = time.monotonic(), 0
    try:
        while (args.cases is None and time.monotonic() - start < args.seconds) or (
            args.cases is not None and i < args.cases
        ):
            fuzz.run(checks[i % len(checks)], args.seed + i, args.case_seconds)
            i += 1
    finally:
        fuzz.close()
    counts = ", ".join(f"{c} {n}" for c, n in fuzz.counts.items())
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(fuzz.outcomes.items())))
    if args.show_accepted:
        for value, n in sorted(fuzz.accepted.items()):
            print(f"  answered with {value} ({n}x)")
        for message, n in fuzz.refusals.most_common(40):
            print(f"  refused: {message} ({n}x)")
    print(f"{i} cases in {time.monotonic() - start:.0f} s ({counts}): {len(fuzz.findings)} finding(s)")
    return 1 if fuzz.findings else 0


if __name__ == "__main__":
    sys.exit(main())
