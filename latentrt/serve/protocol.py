"""The OpenAI completions and chat protocol: request bodies -> generate() options, results -> responses.

No web framework here (app.py is the HTTP layer). Every field is checked: an unknown one, or an OpenAI feature
latentrt does not implement (``suffix``; tools on the completions route) set to anything but its neutral value, is
an InputError naming it (HTTP 400); option values are checked by generate()'s own validation, so the messages are
the Python API's. Log-probabilities (completions ``logprobs: k``, chat ``logprobs: true`` with ``top_logprobs: k``)
are the model's distribution's (log-softmax of the logits, before temperature and top-k/p), each token's and the k
most likely tokens' (serve/engine.py); completions' ``echo`` repeats the prompt, and with ``logprobs`` scores its
tokens too (recurrent depth: one forward at ``num_steps``). latentrt's options are extra body fields with their
generate() names (``num_steps``, ``adaptive``, ``exit_criterion``, ``exit_threshold``, ``kv_sharing``,
``num_thoughts``...), and vLLM's extra fields where latentrt has the option (``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``repetition_penalty``, ``min_p``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``allowed_token_ids``, ``bad_words``, ``guided_choice``, ``guided_json``, ``guided_regex``, ``guided_grammar`` or
the same as ``structured_outputs: {"choice": [...]}`` and its ``json``, ``regex``, ``grammar``, ``json_object``;
OpenAI's ``response_format`` JSON modes are ``guided_json``). ``n`` > 1 or a list of prompts run as separate
requests; with a ``seed``, choice i uses seed + i, as sequence i of a generate() batch does. Chat's ``tools`` and
``tool_choice``: serve/tools.py.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field

from ..chat import ChatOptions, chat_prompt_ids
from ..errors import InputError, check_int, check_unicode
from ..families import FAMILIES
from ..logprobs import MAX_TOP_LOGPROBS
from ..prompts import encode_text
from ..sampling import MAX_SEED
from ..structured import GUIDED
from .tool_parsers import ToolParser
from .tools import ToolChoice, parse_tools

# latentrt's generate() options accepted as extra request fields: every family's options (a family's
# decoder names them), and the sampling / stopping options the OpenAI body has no field for
LATENT_FIELDS = tuple(sorted(set().union(*(f.decoder.OPTIONS for f in FAMILIES.values())))) + (
    "default_stops",
    "top_k",
    "published_top_p",
    "min_p",
    "repetition_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "allowed_token_ids",
    "bad_words",
    "guided_choice",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    "disable_any_whitespace",
)
# OpenAI fields latentrt does not implement, with the only value(s) it accepts
NEUTRAL = {
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
}
COMMON = {"model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user", "max_tokens"} | {
    "structured_outputs",  # vLLM's: {"choice": [...]} is guided_choice, {"json": ...} guided_json...
    "response_format",  # OpenAI's: its JSON modes are guided_json
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_tokens",  # vLLM's: generate()'s min_new_tokens
    "stop_token_ids",  # vLLM's: generate()'s stop ids
    "ignore_eos",  # vLLM's: generate()'s default_stops=False
    "priority",  # vLLM's: the request's place in the queue under --scheduling-policy priority (the engine's)
}
COMPLETION_FIELDS = COMMON | {"prompt", "best_of", "logprobs", "echo"} | set(LATENT_FIELDS) | set(NEUTRAL)
CHAT_RENDERING = {"add_generation_prompt", "continue_final_message", "chat_template_kwargs"}  # vLLM's
CHAT_FIELDS = (
    COMMON
    | {"messages", "max_completion_tokens", "parallel_tool_calls", "logprobs", "top_logprobs"}
    | CHAT_RENDERING
    | set(LATENT_FIELDS)
    | set(NEUTRAL)
)
MAX_CHOICES = 16
MAX_STOP_STRINGS = 256  # stop, bad_words, guided_choice: vLLM takes any number (OpenAI 4); a bound keeps them cheap
# generate()'s options a request field of another name sets (besides max_new_tokens, the route's max_tokens)
RENAMED = {"min_new_tokens": "min_tokens"}


@dataclass
class Parsed:
    """A request as the engine takes it: one prompt per choice and the shared generate() options."""

    prompts: list  # per choice: text or token ids
    options: list[dict]  # per choice: generate() keyword options
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # stream: each chunk carries its choice's usage so far
    priority: int = 0  # the queue's order under the priority scheduling policy (lower first)
    top_logprobs: int | None = None  # None: no log-probs; else the most likely tokens reported per token
    echo: bool = False  # completions: the prompt is repeated (and scored, with log-probs)
    score_only: bool = False  # echo with max_tokens 0: no token is generated
    openai_defaults: dict = field(default_factory=dict)  # OpenAI's value of each option the request left out
    prompt_index: list[int] = field(default_factory=list)  # per choice: its prompt's index in the request
    tool_choice: ToolChoice | None = None  # chat: the functions one of which the answer calls (serve/tools.py)
    # generate()'s option names -> the request's fields for them, for its errors: "max_tokens must be ..."
    field_names: dict[str, str] = field(default_factory=dict)

    @property
    def several_prompts(self) -> bool:
        """A completion's list of prompts: errors about one name its index."""
        return len(set(self.prompt_index)) > 1


def check_fields(
    body, allowed: set[str], what: str, taken: tuple[str, ...] = (), neutral: dict = NEUTRAL, why: dict | None = None
) -> dict:
    """``body`` with only the ``allowed`` fields, and those of ``neutral`` (a route's fields latentrt does not
    implement, with the values it accepts) but the route's ``taken`` ones at their neutral values (``why``: the
    reason each is not supported, said in its error)."""
    if not isinstance(body, dict):
        raise InputError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(f"unknown field(s) {unknown} for {what}; latentrt options: {list(LATENT_FIELDS)}")
    for name, accepted in neutral.items():
        if name in body and name not in taken and body[name] not in accepted:
            if why is None:
                raise InputError(f"{name}={body[name]!r} is not supported by latentrt (leave it out)")
            raise InputError(f"{name}={body[name]!r:.100} is not supported: {why[name]}")
    return body


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")
    return value


def _options(body: dict, max_tokens) -> tuple[dict, int]:
    opts = {name: body[name] for name in LATENT_FIELDS if name in body and body[name] is not None}
    if opts.get("top_k") == -1 and not isinstance(opts["top_k"], bool):  # vLLM's "no top-k" (as is 0)
        opts["top_k"] = 0
    if max_tokens is not None:  # absent: the model's default, else OpenAI's (``with_openai_defaults``)
        opts["max_new_tokens"] = max_tokens
    if body.get("temperature") is not None:  # likewise
        opts["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        opts["top_p"] = body["top_p"]
    if body.get("seed") is not None:
        opts["seed"] = body["seed"]
    if body.get("min_tokens") is not None:  # vLLM's name
        opts["min_new_tokens"] = body["min_tokens"]
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            opts[name] = body[name]
    if body.get("logit_bias") is not None:
        opts["logit_bias"] = _logit_bias(body["logit_bias"])
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InputError(f"stop must be a string or a list of strings, got {stop!r:.200}")
        if len(stops) > MAX_STOP_STRINGS:
            raise InputError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        opts["stop"] = stops
    opts.update(_structured(body))
    for name in ("bad_words", "guided_choice"):
        if isinstance(opts.get(name), list) and len(opts[name]) > MAX_STOP_STRINGS:
            raise InputError(f"{name} takes at most {MAX_STOP_STRINGS} strings, got {len(opts[name])}")
    ids = body.get("stop_token_ids")
    if ids is not None:  # checked against the vocabulary by generate()
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        opts["stop"] = opts.get("stop", []) + ids
    if _flag(body, "ignore_eos"):
        if opts.get("default_stops") is True:
            raise InputError("ignore_eos: true contradicts default_stops: true (ignore_eos is default_stops: false)")
        opts["default_stops"] = False
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InputError(f"user must be a string (an id of the end user), got {body['user']!r}")
    n = body.get("n", 1)
    if n is None:
        n = 1
    check_int("n", n, 1, MAX_CHOICES)
    return opts, n


# vLLM's ``structured_outputs`` keys -> generate()'s options (``json_object: true`` is any JSON object)
STRUCTURED = {"choice": "guided_choice", "json": "guided_json", "regex": "guided_regex", "grammar": "guided_grammar"}
ANY_OBJECT = {"type": "object"}


def _structured(body: dict) -> dict:
    """The guided option ``structured_outputs`` (vLLM's) or ``response_format`` (OpenAI's JSON modes) sets, as
    generate()'s keyword; {} when neither does. Given with another guided field, either is an error (vLLM's rule:
    one kind of guided decoding)."""
    found, options = [], {}
    structured = body.get("structured_outputs")
    if structured is not None:
        keys = {*STRUCTURED, "json_object", "disable_any_whitespace"}
        if not isinstance(structured, dict) or not set(structured) <= keys:
            raise InputError(f"structured_outputs takes one of {sorted(keys)} (latentrt), got {structured!r:.200}")
        for key, value in structured.items():
            if key == "json_object":
                if value not in (None, True, False):
                    raise InputError(f"structured_outputs' json_object must be true or false, got {value!r:.200}")
                if value:
                    found.append(("structured_outputs' json_object", "guided_json", ANY_OBJECT))
            elif key == "disable_any_whitespace":  # (generate()'s option of that name: a bool, checked there)
                if body.get(key) is not None:
                    raise InputError("give disable_any_whitespace or structured_outputs' disable_any_whitespace")
                options[key] = value
            elif value is not None:
                found.append((f"structured_outputs' {key}", STRUCTURED[key], value))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        found.append(("response_format", "guided_json", _response_format(fmt)))
    if len(found) > 1 or (found and any(body.get(n) is not None for n in STRUCTURED.values())):
        given = [f[0] for f in found] + [n for n in STRUCTURED.values() if body.get(n) is not None]
        raise InputError(f"give one kind of structured output, not {len(given)} ({', '.join(given)})")
    return {**options, **{name: value for _, name, value in found}}


def _response_format(fmt) -> dict | str:
    """OpenAI's ``response_format``: ``{"type": "json_object"}`` (any JSON object) or ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}`` (without a schema: any JSON value) -> ``guided_json``."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object" and set(fmt) == {"type"}:
        return ANY_OBJECT
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"}:
        spec = fmt["json_schema"]
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InputError(f"response_format's json_schema must be an object with a name, got {spec!r:.200}")
        unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
        if unknown:
            raise InputError(f"unknown field(s) {unknown} in response_format's json_schema")
        schema = spec.get("schema")
        return {} if schema is None else schema
    raise InputError(
        'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        f'"json_schema": {{"name": ..., "schema": {{...}}}}}}, got {fmt!r:.200}'
    )


def _logit_bias(bias) -> dict:
    """OpenAI's ``logit_bias``: a JSON object from token ids (strings, as JSON keys are) to biases."""
    if not isinstance(bias, dict):
        raise InputError(f"logit_bias must be an object {{token id: bias}}, got {bias!r}")
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InputError(f"logit_bias keys must be token ids, got {key!r}") from None
    return out


def _top_logprobs(body: dict, chat: bool) -> int | None:
    """How many most likely tokens to report with each token's log-prob; None: no log-probs. Completions:
    ``logprobs: k``; chat: ``logprobs: true`` and ``top_logprobs: k`` (default 0)."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise InputError(f"logprobs must be true or false, got {lp!r}")
        if top is not None and not lp:
            raise InputError("top_logprobs needs logprobs: true")
        top = None if not lp else (0 if top is None else top)
        name = "top_logprobs"
    else:
        top, name = lp, "logprobs"
    if top is not None:
        check_int(name, top, 0, MAX_TOP_LOGPROBS)
    return top


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """Whether a stream ends with a usage chunk (``include_usage``), and whether each chunk also carries its
    choice's usage so far (vLLM's ``continuous_usage_stats``, read with ``include_usage`` only, as vLLM does)."""
    so = body.get("stream_options")
    if so is None:
        return False, False
    if not stream:
        raise InputError("stream_options is only allowed with stream=true")
    if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
        raise InputError(
            f"stream_options must be {{'include_usage': true|false, 'continuous_usage_stats': true|false}}, got {so!r}"
        )
    for name, value in so.items():
        if not isinstance(value, bool) and value is not None:
            raise InputError(f"stream_options.{name} must be true or false, got {value!r:.100}")
    include = bool(so.get("include_usage"))
    return include, include and bool(so.get("continuous_usage_stats"))


def _priority(body: dict) -> int:
    """The request's ``priority`` (None: 0); the engine checks it against its policy."""
    value = body.get("priority")
    return 0 if value is None else value


def _per_choice(prompts: list, opts: dict, n: int) -> Parsed:
    """One request per (prompt, copy); with a seed, choice i takes seed + i (generate()'s batch rule)."""
    seed, choices = opts.get("seed"), len(prompts) * n
    seeded = isinstance(seed, int) and not isinstance(seed, bool)  # another type: generate() names it
    if seeded and choices > 1 and seed > MAX_SEED - choices + 1:
        raise InputError(
            f"seed must be in [0, 2**63 - {choices}] for {choices} choices (choice i samples with seed + i), got {seed}"
        )
    out_prompts, out_opts, index = [], [], []
    for k, p in enumerate(prompts):
        for _ in range(n):
            o = dict(opts)
            if seeded:
                o["seed"] = seed + len(out_opts)
            out_prompts.append(p)
            out_opts.append(o)
            index.append(k)
    return Parsed(out_prompts, out_opts, False, False, prompt_index=index)


OPENAI_TEMPERATURE = 1.0  # a request without a temperature samples at 1 (OpenAI's API)


def with_openai_defaults(opts: dict, openai: dict, model_defaults: dict | None) -> dict:
    """A choice's generate() options: the request's; then the model's defaults (its generation_config.json
    and the server's ``--override-generation-config``: ``model_defaults``, which generate() applies itself);
    then OpenAI's (``openai``: temperature 1, the route's max_tokens): vLLM's order."""
    model_defaults = model_defaults or {}
    return {**{k: v for k, v in openai.items() if k not in model_defaults}, **opts}


def parse_completion(body) -> Parsed:
    """A /v1/completions body."""
    body = check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if prompt is None:
        raise InputError("prompt is required: a string, a list of strings, a list of token ids or a list of such lists")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise InputError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")
    if len(prompts) > MAX_CHOICES:
        raise InputError(f"at most {MAX_CHOICES} prompts per request, got {len(prompts)}")
    for i, text in enumerate(prompts):  # here, where the request's index is known (each is submitted alone)
        if isinstance(text, str):
            check_unicode(f"prompt {i}", text)
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
            raise InputError(f"prompt {i} must be a string or a list of token ids (integers), got {text!r:.80}")
    best_of = body.get("best_of")
    if best_of not in (None, 1, body.get("n", 1)):
        raise InputError("best_of is not supported by latentrt (leave it out)")
    stream = _flag(body, "stream")
    opts, n = _options(body, body.get("max_tokens"))
    parsed = _per_choice(prompts, opts, n)
    parsed.openai_defaults = dict(temperature=OPENAI_TEMPERATURE, max_new_tokens=16)  # completions: 16 tokens
    parsed.field_names = dict(RENAMED, max_new_tokens="max_tokens")
    if len(parsed.prompts) > MAX_CHOICES:
        raise InputError(f"at most {MAX_CHOICES} choices (prompts x n) per request, got {len(parsed.prompts)}")
    parsed.stream, (parsed.include_usage, parsed.continuous_usage) = stream, _stream_options(body, stream)
    parsed.priority = _priority(body)
    parsed.top_logprobs = _top_logprobs(body, chat=False)
    parsed.echo = _flag(body, "echo")
    if parsed.echo and stream:
        raise InputError("echo is not available with stream: true")
    max_tokens = body.get("max_tokens")
    if parsed.echo and max_tokens == 0 and not isinstance(max_tokens, bool):  # score the prompt only
        parsed.score_only = True
        for o in parsed.options:
            o["max_new_tokens"] = 1  # what generate() checks; no token is generated
    return parsed


def chat_options(body: dict) -> ChatOptions:
    """How a request's conversation is rendered: vLLM's add_generation_prompt (true), continue_final_message
    (false) and chat_template_kwargs, and the tools the template shows."""
    tools = body.get("tools") or None
    return ChatOptions(
        body.get("add_generation_prompt", True),
        body.get("continue_final_message", False),
        body.get("chat_template_kwargs"),
        None if tools is None else list(tools),
    )


def parse_chat(body, template, tokenizer, tool_parser: ToolParser | None = None) -> Parsed:
    """A /v1/chat/completions body: the conversation rendered with the model's chat template (chat.py),
    tokenized without adding special tokens (the template places them); ``tool_parser``: the server's reader of
    the model's tool-call format (serve/tools.py)."""
    body = check_fields(body, CHAT_FIELDS, "/v1/chat/completions", taken=("tools", "tool_choice"))
    tool_choice = parse_tools(body, tool_parser)
    ids = chat_prompt_ids(template, tokenizer, body.get("messages"), chat_options(body))
    stream = _flag(body, "stream")
    # max_completion_tokens, else the deprecated max_tokens (a null one is absent, as vLLM reads it)
    old_name = body.get("max_completion_tokens") is None and body.get("max_tokens") is not None
    given = "max_tokens" if old_name else "max_completion_tokens"
    opts, n = _options(body, body.get(given))
    if tool_choice is not None and tool_choice.calls:
        guided = [name for name in GUIDED if opts.get(name) is not None]
        if guided:
            raise InputError(f"tool_choice sets the structured output (the call's arguments): drop {guided[0]}")
        opts["guided_json"] = tool_choice.guided_json()
    parsed = _per_choice([ids], opts, n)
    parsed.tool_choice = tool_choice if tool_choice is not None and (tool_choice.calls or tool_choice.auto) else None
    parsed.openai_defaults = dict(temperature=OPENAI_TEMPERATURE, max_new_tokens=64)  # chat: generate()'s
    parsed.field_names = dict(RENAMED, max_new_tokens=given)
    parsed.stream, (parsed.include_usage, parsed.continuous_usage) = stream, _stream_options(body, stream)
    parsed.priority = _priority(body)
    parsed.top_logprobs = _top_logprobs(body, chat=True)
    return parsed


def parse_tokenize(body, template, tokenizer) -> list[int]:
    """vLLM's /tokenize body: ``prompt`` (text, encoded as /v1/completions encodes it; vLLM's
    ``add_special_tokens: false``: the text's tokens alone) or ``messages`` (rendered with the chat template, as
    /v1/chat/completions does: the template places the special tokens) -> token ids."""
    body = check_fields(body, {"model", "prompt", "messages", "add_special_tokens"} | CHAT_RENDERING, "/tokenize")
    if tokenizer is None:
        raise InputError("this model has no tokenizer.json: nothing to tokenize with")
    if ("prompt" in body) == ("messages" in body):
        raise InputError("/tokenize takes one of 'prompt' (text) or 'messages' (a conversation)")
    special = body.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise InputError(f"add_special_tokens must be true or false, got {special!r}")
    if "messages" in body:
        if special:
            raise InputError(
                "add_special_tokens applies to a prompt: a conversation's template places its special tokens"
            )
        return chat_prompt_ids(template, tokenizer, body["messages"], chat_options(body))
    if not isinstance(body["prompt"], str):
        raise InputError(f"prompt must be a string, got {type(body['prompt']).__name__}")
    return encode_text(tokenizer, [body["prompt"]], add_special_tokens=special is not False)[0]


def parse_detokenize(body, vocab: int) -> list[int]:
    """vLLM's /detokenize body: ``tokens``, ids in the vocabulary."""
    body = check_fields(body, {"model", "tokens"}, "/detokenize")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
    ):
        raise InputError(f"tokens must be a list of token ids in [0, {vocab}), got {ids!r}")
    return ids


def parse_lora_update(body, load: bool) -> tuple[str, str | None]:
    """vLLM's load / unload LoRA adapter bodies: (``lora_name``, ``lora_path`` when loading)."""
    if not isinstance(body, dict):
        raise InputError(f"the request body must be a JSON object, got {type(body).__name__}")
    allowed = {"lora_name", "lora_path", "load_inplace"} if load else {"lora_name", "lora_int_id"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} (this route takes {sorted(allowed)})")
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"lora_name must be the adapter's name (a non-empty string), got {name!r:.100}")
    if load and (not isinstance(path, str) or not path.strip()):
        raise InputError(f"lora_path must be the adapter's folder or Hub id (a non-empty string), got {path!r:.100}")
    check_unicode("lora_name", name)  # (a name answers carry: text a response can encode)
    if body.get("load_inplace") not in (None, False):
        raise InputError("load_inplace (replacing a served adapter in place) is not supported: unload it, then load")
    return name, path


def check_model(body, served: str | tuple[str, ...]) -> None:
    """The OpenAI clients name a model in every request; it must be the one served, by any of its names (or
    omitted)."""
    names = (served,) if isinstance(served, str) else tuple(served)
    said = repr(names[0]) if len(names) == 1 else f"one of {list(names)}"
    name = body.get("model") if isinstance(body, dict) else None
    if name is not None and not isinstance(name, str):
        raise InputError(f"model must be a string (the served model's name, {said}), got {name!r}")
    if name is not None and name not in names:
        raise LookupError(f"model {name!r} is not served here; this server serves {said}")


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(reqs, prompt_index: list[int] | None = None) -> dict:
    """OpenAI usage plus the latent work: recurrence iterations (recurrent depth) or thoughts (Coconut) of every
    choice. A prompt's tokens count once however many choices it has (``prompt_index``: each choice's prompt,
    ``Parsed.prompt_index``; None: one prompt a choice), as OpenAI bills them and vLLM counts them."""
    prompts = dict(zip(prompt_index if prompt_index is not None else range(len(reqs)), reqs))
    prompt = sum(r.prompt_tokens for r in prompts.values())
    completion = sum(len(r.tokens) for r in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "latent_iterations": sum(r.latent_work for r in reqs),
    }


def choice_extras(req) -> dict:
    """latentrt's per-choice details: token ids and the latent iterations of each."""
    return {"token_ids": list(req.tokens), "steps": list(req.steps)}


def token_text(tokenizer, token: int) -> str:
    """A token as log-probs name it: its text (special tokens too), or ``token_id:N`` without a tokenizer."""
    return f"token_id:{token}" if tokenizer is None else tokenizer.decode([token], skip_special_tokens=False)


def logprobs_body(entries, chat: bool, text) -> dict:
    """OpenAI's log-probs object for generated tokens (engine ``TokenLogprob``s; ``text``: token id ->
    text): chat's ``content`` list (with UTF-8 bytes), or the completions API's parallel lists."""
    if chat:

        def item(token: int, logprob: float) -> dict:
            s = text(token)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

        content = [dict(item(e.token, e.logprob), top_logprobs=[item(t, lp) for t, lp in e.top]) for e in entries]
        return {"content": content, "refusal": None}
    return {
        "tokens": [text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def completion_body(
    rid: str,
    model: str,
    reqs,
    chat: bool,
    text=str,
    prompt_index: list[int] | None = None,
    tool_choice: ToolChoice | None = None,
) -> dict:
    """The response to a request that is not streamed; ``text``: token id -> text, for log-probs; with
    ``tool_choice``, each message holds the calls its text makes."""
    choices = []
    for i, r in enumerate(reqs):
        c = {"index": i, "finish_reason": r.finish_reason, "latentrt": choice_extras(r)}
        entries = r.logprobs
        if r.echo:  # the prompt's tokens first; the completion's text offsets after the prompt's text
            shift = len(r.prompt_text)  # (a token's offset: where the text it adds starts, its separator too)
            entries = r.prompt_logprobs + [dataclasses.replace(e, offset=e.offset + shift) for e in entries]
        logprobs = logprobs_body(entries, chat, text) if r.top_logprobs is not None else None
        if chat:
            c["message"] = {"role": "assistant", "content": r.text}
            if tool_choice is not None:
                c["message"], c["finish_reason"] = tool_choice.message(r.text, r.finish_reason)
            c["logprobs"] = logprobs
        else:
            c.update(text=r.prompt_text + r.echo_separator + r.text if r.echo else r.text, logprobs=logprobs)
        choices.append(c)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(reqs, prompt_index),
    }


def chunk_body(
    rid: str,
    model: str,
    index: int,
    chat: bool,
    *,
    text=None,
    event=None,
    finish=None,
    role=False,
    token_text=str,
    delta: dict | None = None,
):
    """One server-sent event's object of a stream (``token_text``: token id -> text, for log-probs; ``delta``:
    a chat chunk's delta in place of its text's, a tool call's)."""
    if chat:
        # the first chunk names the role with empty content, as OpenAI's and vLLM's first chunk does
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if event is not None:
        choice["latentrt"] = {"token_id": event.token, "steps": event.steps}
        if event.logprob is not None:
            choice["logprobs"] = logprobs_body([event.logprob], chat, token_text)
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def error_body(message: str, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
