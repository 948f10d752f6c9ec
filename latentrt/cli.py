"""Command line: ``latentrt generate MODEL PROMPT``, ``latentrt info MODEL``, ``latentrt eval MODEL DATA``,
``latentrt train MODEL DATA --out DIR``, ``latentrt serve [MODEL]``.

Every generate() option the user gives is passed on as given; options that do not apply to the model's
family are errors (the same message as the Python API). Errors print ``latentrt: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .backends import CHOICES
from .checkpoint import builtin_names
from .errors import InputError, LatentRTError, renamed
from .exits import CRITERIA
from .families import decodings
from .serve.engine import SCHEDULERS
from .train.command import add_train_args

# CLI flag (dest) -> generate() option, for the options both generate and eval take
GENERATE_FLAGS = {
    "adaptive": "adaptive",
    "criterion": "exit_criterion",
    "threshold": "exit_threshold",
    "steps": "num_steps",
    "min_steps": "min_steps",
    "check_every": "check_criterion_every_n_steps",
    "no_exit_in_prefill": "do_not_exit_in_prefill",
    "adaptive_prefill": "adaptive_prefill",
    "kv": "kv_sharing",
    "continuous": "continuous",
    "init_scale": "init_scale",
    "thoughts": "num_thoughts",
    "append_thoughts": "append_thoughts",
    "published_eos": "published_eos",
    "default_stops": "default_stops",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "skip_special_tokens": "skip_special_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "published_top_p": "published_top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "seed": "seed",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "stop": "stop",
    "decoding": "decoding",
    "decoding_option": "decoding_options",
}
UNSET = argparse.SUPPRESS  # an option the user did not give is absent: generate() applies its default


def _add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "model",
        nargs="?" if default else None,
        default=default,
        help=(f"(default {default}) " if default else "")
        + "a checkpoint folder, a Hugging Face Hub id (owner/name), or builtin:NAME, a built-in model: "
        + ", ".join(builtin_names()),
    )
    p.add_argument("--revision", default=None, help="Hub ids: a branch, tag or commit (default: main)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=CHOICES)
    p.add_argument("--weights", default=None, help="weights file to use instead of the folder's (.safetensors/.pt)")
    p.add_argument(
        "--hf-overrides",
        default=None,
        metavar="JSON",
        help="config.json fields to replace, as vLLM takes them, e.g. '{\"mean_recurrence\": 32}'",
    )


def _json_object(text: str | None, flag: str) -> dict:
    """A flag's JSON object ({} when not given); anything else is a clear error."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def _add_latent_args(p: argparse.ArgumentParser) -> None:
    """The recurrence flags; each also takes generate()'s and the server's name for it (--num-steps ...)."""
    p.add_argument(
        "--steps", "--num-steps", type=int, default=UNSET, help="recurrence steps (the maximum when adaptive)"
    )
    p.add_argument("--adaptive", action="store_true", default=UNSET, help="exit the recurrence per token")
    p.add_argument(
        "--criterion", "--exit-criterion", default=UNSET, choices=sorted(CRITERIA), help="exit criterion (kl)"
    )
    p.add_argument(
        "--threshold", "--exit-threshold", type=float, default=UNSET, help="exit threshold (default per criterion)"
    )


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    """generate()'s options as flags (``generate`` and ``chat``); one not given is left to generate()."""
    p.add_argument("--max-new-tokens", type=int, default=UNSET, help="tokens to generate (64)")
    p.add_argument(
        "--min-new-tokens", type=int, default=UNSET, help="no stop token or stop string ends it before this many"
    )
    _add_latent_args(p)
    p.add_argument("--min-steps", type=int, default=UNSET, help="no exit check before this many iterations (0)")
    p.add_argument(
        "--check-every",
        type=int,
        default=UNSET,
        help="check the exit criterion every N iterations (the published check_criterion_every_n_steps; 1)",
    )
    p.add_argument("--no-exit-in-prefill", action="store_true", default=UNSET, help="the prompt runs every step")
    p.add_argument(
        "--adaptive-prefill", action="store_true", default=UNSET, help="the prompt token by token, each exiting"
    )
    p.add_argument(
        "--kv",
        "--kv-sharing",
        default=UNSET,
        help="KV sharing across iterations: full | shared | ring-K | anchor-A | skip | always-last (or a published "
        "name: latest-mL, available-mL, compress-sN, compress-anchor, always-last-mL; README)",
    )
    p.add_argument("--continuous", action="store_true", default=UNSET, help="start from the last state")
    p.add_argument("--init-scale", type=float, default=UNSET, help="scale of the random initial state (1.0)")
    p.add_argument(
        "--thoughts",
        "--num-thoughts",
        type=int,
        default=UNSET,
        help="Coconut: append k continuous thoughts (default: the count the model was trained with, "
        "from its training.json, when the prompt has no latent markers)",
    )
    p.add_argument(
        "--no-append-thoughts",
        dest="append_thoughts",
        action="store_false",
        default=UNSET,
        help="Coconut: a prompt without latent markers runs as it is, no thoughts appended (the CoT / no-CoT formats)",
    )
    p.add_argument(
        "--published-eos",
        action="store_true",
        default=UNSET,
        help="Coconut: never stop on the first answer token; leave out the eos that ends a later one",
    )
    p.add_argument(
        "--no-default-stops",
        dest="default_stops",
        action="store_false",
        default=UNSET,
        help="stop only on --stop ids, not on eos (nor Huginn's end-of-text / end-of-turn tokens)",
    )
    p.add_argument("--stop", type=int, nargs="+", default=UNSET, help="token ids that end a sequence")
    p.add_argument(
        "--stop-text",
        nargs="+",
        default=UNSET,
        help="strings that end a sequence (matched on the text, which ends before them)",
    )
    p.add_argument(
        "--include-stop-str-in-output",
        action="store_true",
        default=UNSET,
        help="the text ends after the --stop-text string that ended it (vLLM's option)",
    )
    p.add_argument(
        "--no-skip-special-tokens",
        dest="skip_special_tokens",
        action="store_false",
        default=UNSET,
        help="keep special tokens' text (e.g. the eos that ended it) in the text",
    )
    p.add_argument(
        "--decoding",
        default=UNSET,
        choices=decodings(),
        help="recurrent models: commit several tokens per pass (README: Samplers)",
    )
    p.add_argument(
        "--decoding-option",
        action="append",
        default=UNSET,
        metavar="KEY=VALUE",
        help="an option of the --decoding sampler, e.g. lookahead=4 (repeatable; VALUE as JSON, else text)",
    )
    p.add_argument("--temperature", type=float, default=UNSET)
    p.add_argument("--top-k", type=int, default=UNSET)
    p.add_argument("--top-p", type=float, default=UNSET)
    p.add_argument(
        "--published-top-p",
        action="store_true",
        default=UNSET,
        help="top-p by the published Huginn sampler's rule (drops the token that crosses p; README)",
    )
    p.add_argument("--min-p", type=float, default=UNSET, help="drop tokens less likely than MIN_P x the likeliest")
    p.add_argument(
        "--repetition-penalty", type=float, default=UNSET, help="HF's / the published sampler's (1: none; README)"
    )
    p.add_argument("--presence-penalty", type=float, default=UNSET, help="OpenAI's, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=UNSET, help="OpenAI's, in [-2, 2]")
    p.add_argument(
        "--logit-bias",
        action="append",
        default=UNSET,
        metavar="ID=BIAS",
        help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)",
    )
    p.add_argument(
        "--dry-multiplier", type=float, default=UNSET, help="the published sampler's DRY penalty (0: none; README)"
    )
    p.add_argument("--dry-base", type=float, default=UNSET, help="DRY's growth per token of a repeat (1.75)")
    p.add_argument("--dry-allowed-length", type=int, default=UNSET, help="repeats DRY lets pass (2)")
    p.add_argument("--seed", type=int, default=UNSET)


def _add_chat_args(p: argparse.ArgumentParser, each: str) -> None:
    """``--chat`` (each prompt or question a user message, through the chat template) and its companions."""
    p.add_argument(
        "--chat", action="store_true", help=f"each {each} is a user message, through the model's chat template"
    )
    p.add_argument("--system", default=None, help=f"with --chat: a system message before each {each}")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="with --chat: a jinja template file")


def _check_chat_args(args) -> None:
    if not args.chat and (args.system is not None or args.chat_template is not None):
        raise InputError("--system and --chat-template go with --chat")


def _name_options_as_flags(p: argparse.ArgumentParser) -> None:
    """``p``'s errors and warnings name the generate() options the user gave as the flags typed
    (``--threshold must be >= 0``, not ``exit_threshold``; ``_given_flags``): each option that takes a
    value, by its first flag (on/off flags keep the option's name: ``--adaptive=True`` is no flag's spelling)."""
    flags = {
        GENERATE_FLAGS[a.dest]: a.option_strings[0] for a in p._actions if a.dest in GENERATE_FLAGS and a.nargs != 0
    }
    p.set_defaults(option_flags=flags)


def _given_flags(args) -> dict[str, str]:
    """generate()'s option -> flag, for the options given on this command line (one left to its default keeps
    its name: "in [0, max_new_tokens=64]" is the default's, not a --max-new-tokens the user typed)."""
    return {opt: flag for opt, flag in getattr(args, "option_flags", {}).items() if _given(args, opt)}


def _given(args, option: str) -> bool:
    return any(hasattr(args, dest) for dest, opt in GENERATE_FLAGS.items() if opt == option)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentrt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text and print the recurrence steps per token")
    _add_model_args(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts (several run as a batch); - reads one from stdin")
    _add_generate_args(g)
    _add_chat_args(g, "prompt")
    g.add_argument(
        "--ids",
        action="store_true",
        help="each prompt is token ids, e.g. 5,6,7 (a model without tokenizer.json); the output is token ids",
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (with --stream, JSON lines: one per generated position, then the result)",
    )
    _name_options_as_flags(g)

    c = sub.add_parser("chat", help="talk to a model: each line of input is a user message, answers stream")
    _add_model_args(c)
    _add_generate_args(c)
    c.add_argument("--system", default=None, help="a system message opening the conversation")
    c.add_argument("--chat-template", default=None, metavar="FILE", help="a jinja template file")
    _name_options_as_flags(c)

    i = sub.add_parser("info", help="print the config, parameter count and KV bytes per token")
    _add_model_args(i)
    i.add_argument("--steps", "--num-steps", type=int, default=None, help="recurrence depth for the KV figures")

    e = sub.add_parser(
        "eval", help="accuracy per difficulty on a JSON (or JSON Lines) file of {question, steps, answer}"
    )
    _add_model_args(e)
    e.add_argument("data", help="JSON list or JSON Lines of {question, steps, answer} records")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    _add_latent_args(e)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=UNSET, help="per answer (16; 96 for cot and --chat)")
    _add_chat_args(e, "question")
    e.add_argument(
        "--modes",
        default=None,
        help="comma list of prompt formats (Coconut: coconut, cot, nocot, pause; default: the format the "
        "model was trained with)",
    )
    e.add_argument("--json", action="store_true", help="print each format's table as a JSON line (for scripts)")
    _name_options_as_flags(e)

    t = sub.add_parser("train", help="train a model on a JSON / JSON Lines file of records (README)")
    _add_model_args(t)
    add_train_args(t)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra)")
    _add_model_args(s, default="builtin:recurrent")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="requests resident at once (rows of the K/V pool)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (then 429)")
    s.add_argument("--max-len", type=int, default=None, help="positions per request (default: context, <= 2048)")
    s.add_argument(
        "--kv-slots",
        type=int,
        default=None,
        help="looped-layer K/V slots shared by the resident requests (default: max-batch x the default depth, "
        "i.e. every request in full mode)",
    )
    s.add_argument("--scheduler", default="depth", choices=SCHEDULERS, help="batching policy (depth)")
    s.add_argument(
        "--edge-cost",
        type=float,
        default=None,
        help="depth scheduler: what sampling ended units and starting their next tokens costs, in core "
        "iterations; they wait until the iterations lost by waiting reach it (default: from the weights; 0: "
        "every step)",
    )
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    s.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a jinja chat template (default: the model folder's)"
    )
    s.add_argument(
        "--api-key",
        default=None,
        help="answer /v1 and tokenizer routes only with 'Authorization: Bearer KEY' (default: $LATENTRT_API_KEY)",
    )
    s.add_argument(
        "--override-generation-config",
        default=None,
        metavar="JSON",
        help="defaults of every request's generate() options, over the model's generation_config.json (vLLM's "
        'flag; any option: \'{"temperature": 0.5, "num_steps": 32, "kv_sharing": "shared"}\'); a '
        "request's own fields win",
    )
    s.add_argument("--log-level", default="info")
    return parser


def _load(args):
    from .loader import load

    return load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        weights=args.weights,
        revision=args.revision,
        **_json_object(args.hf_overrides, "--hf-overrides"),
    )


def _options(args) -> dict:
    """The generate() options the user gave on the command line."""
    opts = {opt: getattr(args, flag) for flag, opt in GENERATE_FLAGS.items() if hasattr(args, flag)}
    if hasattr(args, "stop_text"):  # one ``stop`` list: the token ids, then the strings
        opts["stop"] = list(opts.get("stop", [])) + list(args.stop_text)
    if "decoding_options" in opts:
        opts["decoding_options"] = dict(_key_value(item, "--decoding-option") for item in opts["decoding_options"])
    if "logit_bias" in opts:
        opts["logit_bias"] = dict(_token_bias(item) for item in opts["logit_bias"])
    return opts


def _token_bias(item: str) -> tuple[int, float]:
    """ID=BIAS of --logit-bias (its range is generate()'s to check)."""
    key, value = _key_value(item, "--logit-bias", "ID=BIAS")
    try:
        return int(key), float(value)
    except (TypeError, ValueError):
        raise InputError(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}") from None


def _key_value(item: str, flag: str, form: str = "KEY=VALUE") -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON (numbers, true/false) or else as text."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise InputError(f"{flag} takes {form}, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_generate(args) -> int:
    from .chat import chat_template_for
    from .engine import generate
    from .families import family_for

    _check_chat_args(args)
    if args.ids and args.chat:
        raise InputError("--ids and --chat do not go together (a conversation is text)")
    given = _read_stdin_prompt(args.prompt)
    if args.ids:
        given = [_token_ids(p) for p in given]
    model = _load(args)
    if model.tokenizer is None and not args.ids:
        raise InputError(
            "this model has no tokenizer.json: give the prompts as token ids with --ids (e.g. --ids 5,6,7)"
        )
    if args.chat:
        template = chat_template_for(model, args.chat_template)
        prompts = [_chat_ids(model, p, template, args) for p in given]
    else:
        prompts = given
    prompt = prompts[0] if len(prompts) == 1 else prompts
    kwargs = _options(args)
    if args.stream:
        stream = generate(model, prompt, stream=True, **kwargs)
        for ev in stream:
            if args.json:  # JSON lines: one per generated position, then the result's (a reader parses each)
                print(json.dumps(dict(index=ev.index, tokens=ev.tokens, steps=ev.steps, text=ev.text)), flush=True)
            elif isinstance(ev.tokens, list):  # a batch: a line per position, the sequences' tokens side by side
                print(" | ".join(repr(t) for t in (ev.tokens if model.tokenizer is None else ev.text)), flush=True)
            elif ev.text is not None:
                print(ev.text, end="", flush=True)
            else:  # no tokenizer: the ids, one after another
                print(ev.tokens, end=" ", flush=True)
        if not args.json:
            print()
        result = stream.result
    else:
        result = generate(model, prompt, **kwargs)
    if args.json:
        fields = ("tokens", "steps", "text", "kv_bytes", "finish_reasons", "num_thoughts", "decoding")
        print(json.dumps({f: getattr(result, f) for f in fields}))
        return 0
    batch = isinstance(result.text, list)
    texts = result.text if batch else [result.text]
    if model.tokenizer is None:  # no text: each sequence's ids
        texts = [" ".join(map(str, t)) for t in (result.tokens if batch else [result.tokens])]
    for n, text in enumerate(texts):
        if not args.stream or len(texts) > 1:
            print(f"[{n}] {text}" if len(texts) > 1 else text)
    for line in family_for(model).decoder.report(result):
        print(line)
    print(f"KV cache: {result.kv_bytes / 2**20:.2f} MiB, backend {result.backend}")
    applied = _model_defaults_applied(model, kwargs)
    if applied:
        print(f"sampling defaults from generation_config.json: {applied} (a flag overrides: --temperature 0 is greedy)")
    return 0


def _token_ids(prompt: str) -> list[int]:
    """``--ids``: a prompt of token ids separated by commas or spaces (``5,6,7``, ``"5 6 7"``, ``[5, 6, 7]``)."""
    parts = prompt.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--ids: a prompt must be token ids separated by commas or spaces, got {prompt!r}") from None


def _read_stdin_prompt(prompts: list[str]) -> list[str]:
    """The prompts with ``-`` read from standard input (its text, less one final newline: ``echo ... |``), as
    many command line tools take a file's text; read before the model loads, so a second ``-`` fails first."""
    if prompts.count("-") > 1:
        raise InputError("only one prompt can be - (standard input)")
    if "-" not in prompts:
        return prompts
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise InputError(f"standard input is not UTF-8 text: {exc}") from None
    text = text[:-1] if text.endswith("\n") else text
    return [text if p == "-" else p for p in prompts]


def _model_defaults_applied(model, given: dict) -> str:
    """The model's generate() defaults a command's options left in force, as ``k=v, ...`` ('' if none)."""
    return ", ".join(f"{k}={v}" for k, v in model.generation_defaults.items() if k not in given)


def cmd_chat(args) -> int:
    """A conversation on stdin: each non-empty line a user message, the answer streamed as it is generated
    and kept in the history (through the chat template, as the server's chat route); ``/reset`` starts
    over, end of input or ``/exit`` ends."""
    from .chat import apply_chat_template, chat_template_for, system_opening
    from .engine import check_options_for, generate
    from .options import GenerateOptions

    model = _load(args)
    kwargs = _options(args)
    with warnings.catch_warnings():  # a bad option is named before the first message is read, not after it;
        warnings.simplefilter("ignore")  # an unused one is said by the first turn's generate() (not twice)
        check_options_for(model, GenerateOptions.build(None, model.generation_defaults, **kwargs))
    template = chat_template_for(model, args.chat_template)  # read once, not every turn
    opening = system_opening(args.system)
    history = list(opening)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(opening)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        stream = generate(model, apply_chat_template(model, history, template), stream=True, **kwargs)
        for ev in stream:
            print(ev.text or "", end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": stream.result.text})


def _chat_ids(model, prompt: str, template, args) -> list[int]:
    """``--chat``: the prompt as a user message (after ``--system``'s), through the chat template."""
    from .chat import apply_chat_template, system_opening

    messages = [*system_opening(args.system), {"role": "user", "content": prompt}]
    return apply_chat_template(model, messages, template)


def cmd_info(args) -> int:
    from .backends import availability
    from .kv_modes import SPECS, parse_kv_mode

    model = _load(args)
    cfg = model.config
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {args.model} ({model.family}, model_type {cfg.model_type})")
    print(f"device: {model.device}, dtype: {str(model.dtype).replace('torch.', '')}")
    print(f"backend: {model.backend.name} ({model.backend.reason})")
    for name, why in availability(model).items():
        print(f"  {name}: {why}")
    print(f"parameters: {n_params:,}")
    print(f"sampling defaults (generation_config.json): {_model_defaults_applied(model, {}) or 'none (greedy)'}")
    print("config:")
    for k, v in cfg.to_dict().items():
        print(f"  {k}: {v}")
    layout, el = model.cache_layout(), model.dtype.itemsize
    if layout.looped:
        r = args.steps or model.default_steps()
        print(f"KV bytes per token (r={r}):")
        for mode in (parse_kv_mode(spec, r) for spec in ("full", "ring-4", "shared")):
            print(f"  {mode.name:8s} {layout.bytes_per_position(mode.slots, el):>12,d} B")
        print(f"  (kv_sharing: {SPECS})")
    else:
        print(f"KV bytes per token: {layout.bytes_per_position(1, el):,d} B")
    for line in model.describe():
        print(line)
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve.app import listening_socket
    except ImportError as exc:
        raise InputError(f"serving needs the 'serve' extra (pip install 'latentrt[serve]'): {exc}") from None
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise InputError(f"--chat-template {args.chat_template!r} is not a file")
    override = _json_object(args.override_generation_config, "--override-generation-config")
    api_key = api_key_from(args.api_key)
    sock = listening_socket(args.host, args.port)  # before the weights load: a port in use fails at once
    try:
        return _serve(args, sock, override, api_key)
    finally:
        sock.close()


def _serve(args, sock, override: dict, api_key: str | None) -> int:
    from .chat import chat_template_file
    from .serve import Engine
    from .serve.app import run_server

    model = _load(args)
    if override:
        from .serve import server_defaults

        model.generation_defaults = server_defaults(model, override)
    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_len=args.max_len,
        kv_slots=args.kv_slots,
        scheduler=args.scheduler,
        edge_cost=args.edge_cost,
    )
    template = None if args.chat_template is None else chat_template_file(args.chat_template, model.folder)
    name = args.served_model_name or args.model
    print(f"latentrt: serving {name} ({model.family}, backend {model.backend.name}) on http://{args.host}:{args.port}")
    applied = _model_defaults_applied(model, {})
    if applied:  # as vLLM says it: the defaults of every request that leaves them out
        print(f"latentrt: request defaults (generation_config.json, --override-generation-config): {applied}")
    run_server(engine, name, args.host, args.port, args.log_level, chat_template=template, api_key=api_key, sock=sock)
    return 0


def cmd_train(args) -> int:
    from .train.command import run_train

    return run_train(_load(args), args)


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    _check_chat_args(args)
    return run_eval(_load(args), args, _options(args))


# flag (dest) -> its bounds (None: none above)
COUNT_BOUNDS = (
    ("steps", 1, None),
    ("limit", 1, None),
    ("batch_size", 1, None),
    ("max_steps", 1, None),
    ("micro_batch_size", 1, None),
    ("port", 1, 65535),
    ("max_batch", 1, None),
    ("max_queue", 1, None),
    ("max_len", 2, None),  # a prompt token and a new one (the model's context bounds it above, once loaded)
    ("kv_slots", 1, None),
    ("replicas", 1, None),
)


def api_key_from(flag: str | None) -> str | None:
    """The server's key: ``--api-key``'s, else $LATENTRT_API_KEY's, else None (no key). An empty one is an error:
    ``--api-key "$UNSET_VARIABLE"`` would otherwise serve without a key, silently."""
    for source, value in (("--api-key", flag), ("LATENTRT_API_KEY", os.environ.get("LATENTRT_API_KEY"))):
        if value is not None:
            if not value.strip():
                raise InputError(f"{source} is empty: give a key, or leave it unset to serve without one")
            return value
    return None


def check_counts(args) -> None:
    """Counts the parser cannot bound: an error naming the flag, before any model is loaded."""
    for flag, low, high in COUNT_BOUNDS:
        value = getattr(args, flag, None)
        if isinstance(value, int) and not (low <= value and (high is None or value <= high)):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise InputError(f"--{flag.replace('_', '-')} must be {rule}, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error prints ``latentrt: error: ...`` and exits 2 (argparse's own errors too),
    never a traceback (LATENTRT_DEBUG=1 shows one for an unexpected error)."""
    args = build_parser().parse_args(argv)
    flags = _given_flags(args)
    with warnings.catch_warnings():  # restores Python's display when main() returns (tests call it in-process)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: _show_warning(
            message, flags, file
        )
        return _run(args)


def _show_warning(message, flags: dict, file=None) -> None:
    """A warning as a command line tool says it: ``latentrt: warning: ...`` (no file, line or source), the
    options it names as the command's ``flags``."""
    print(f"latentrt: warning: {renamed(str(message), flags)}", file=file or sys.stderr)


def _run(args) -> int:
    try:
        check_counts(args)
        commands = {
            "generate": cmd_generate,
            "chat": cmd_chat,
            "info": cmd_info,
            "eval": cmd_eval,
            "train": cmd_train,
            "serve": cmd_serve,
        }
        return commands[args.command](args)
    except InputError as exc:
        print(f"latentrt: error: {renamed(str(exc), _given_flags(args))}", file=sys.stderr)
        return 2
    except LatentRTError as exc:
        print(f"latentrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`latentrt ... | head`): stop quietly, as SIGPIPE would
        _silence_stdout()
        return 141  # 128 + SIGPIPE: the status a shell reports for a process the closed pipe ended
    except Exception as exc:  # an unexpected failure: a short message, the traceback only on request
        if os.environ.get("LATENTRT_DEBUG") == "1":
            raise
        print(f"latentrt: error: {type(exc).__name__}: {exc} (LATENTRT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
