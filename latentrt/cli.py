"""Command line: ``latentrt generate MODEL PROMPT``, ``latentrt info MODEL``, ``latentrt eval MODEL DATA``,
``latentrt train MODEL DATA --out DIR``, ``latentrt save MODEL OUT``, ``latentrt serve [MODEL]``,
``latentrt run-batch MODEL -i IN -o OUT``.

Every generate() option the user gives is passed on as given (the flags: latentrt/cli_flags.py); options that
do not apply to the model's family are errors (the same message as the Python API, naming the flags typed).
Errors print ``latentrt: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .cli_flags import (
    ENGINE_FLAGS,
    UNSET,
    add_chat_args,
    add_engine_args,
    add_generate_args,
    add_latent_args,
    add_model_args,
    add_serve_args,
    check_chat_args,
    check_counts,
    engine_options,
    generate_options,
    in_flags,
    json_object,
    lora_options,
    model_options,
    name_options_as_flags,
    responses_store,
    token_ids,
    tool_call_parser,
)
from .errors import InputError, LatentRTError, renamed
from .train.command import add_train_args
from .version import __version__

# `latentrt --help` (the module's docstring above is for its readers)
DESCRIPTION = """Run language models that reason in latent space (recurrent depth, continuous thought):
generate, chat, evaluate, train and serve them, or answer a file of requests. `latentrt COMMAND --help` lists a
command's options; every generate() option has a flag. Errors print `latentrt: error: ...` and exit 2."""
EXAMPLES = """examples:
  latentrt generate builtin:recurrent "Alex is a wumpus. Is Alex a wumpus or rompus?" --adaptive
  latentrt info builtin:coconut
  latentrt serve builtin:recurrent --port 8000
  latentrt run-batch builtin:recurrent -i requests.jsonl -o results.jsonl"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentrt",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"latentrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text and print the recurrence steps per token")
    add_model_args(g)
    g.add_argument("prompt", nargs="+", help="one or more prompts (several run as a batch); - reads one from stdin")
    add_generate_args(g)
    add_chat_args(g, "prompt")
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
    name_options_as_flags(g)

    c = sub.add_parser("chat", help="talk to a model: each line of input is a user message, answers stream")
    add_model_args(c)
    add_generate_args(c)
    c.add_argument("--system", default=None, help="a system message opening the conversation")
    c.add_argument("--chat-template", default=None, metavar="FILE", help="a jinja template file")
    name_options_as_flags(c)

    i = sub.add_parser("info", help="print the config, parameter count and KV bytes per token")
    add_model_args(i)
    i.add_argument("--steps", "--num-steps", type=int, default=None, help="recurrence depth for the KV figures")

    v = sub.add_parser(
        "save",
        help="write the model as a checkpoint folder (save_pretrained): --weights, --adapter, --hf-overrides and "
        "--dtype baked in",
    )
    add_model_args(v)
    v.add_argument("out", help="the folder to write (replaced whole; one holding other files needs --overwrite)")
    v.add_argument("--max-shard-size", default=None, help="shards of at most this size: bytes, 5GB, 2GiB")
    v.add_argument("--overwrite", action="store_true", help="replace a folder that holds other files")

    e = sub.add_parser(
        "eval", help="accuracy per difficulty on a JSON (or JSON Lines) file of {question, steps, answer} records"
    )
    add_model_args(e)
    e.add_argument(
        "data",
        help="JSON list or JSON Lines of {question, steps, answer} records, or the Hub's GSM8k {question, answer}",
    )
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    add_latent_args(e)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=UNSET,
        help="per answer (Coconut: 64 on a 'gsm' file, else 128, as its run.py; recurrent depth: 16; --chat: 96)",
    )
    e.add_argument(
        "--thoughts",
        "--num-thoughts",
        type=int,
        default=UNSET,
        help="Coconut: continuous thoughts in the coconut / pause formats (default: the trained count, training.json)",
    )
    add_chat_args(e, "question")
    e.add_argument(
        "--modes",
        default=None,
        help="comma list of prompt formats (Coconut: coconut, cot, nocot, pause, nothoughts; default: the format the "
        "model was trained with)",
    )
    e.add_argument("--json", action="store_true", help="print each format's table as a JSON line (for scripts)")
    name_options_as_flags(e)

    t = sub.add_parser("train", help="train a model on a JSON / JSON Lines file of records (README)")
    add_model_args(t)
    add_train_args(t)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra)")
    add_model_args(s, default="builtin:recurrent")
    add_serve_args(s)
    s.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="HTTPS: the server's private key (PEM)")
    s.add_argument("--ssl-certfile", default=None, metavar="FILE", help="HTTPS: its certificate (PEM)")

    b = sub.add_parser(
        "run-batch",
        help="answer a file of OpenAI Batch API requests (JSON Lines) through the server's routes, in-process "
        "(vLLM's run-batch; needs the 'serve' extra)",
    )
    add_model_args(b)
    b.add_argument(
        "-i",
        "--input-file",
        required=True,
        help="JSON Lines: {custom_id, method, url, body} a line (-: standard input)",
    )
    b.add_argument("-o", "--output-file", required=True, help="JSON Lines: {id, custom_id, response, error} a line")
    add_engine_args(b)
    return parser


def _load(args):
    from .loader import load

    return load(args.model, **model_options(args))  # (its hf_overrides: load's own keyword)


def published_dtype(args) -> str | None:
    """The dtype ``train`` and ``eval`` load the model in: --dtype's, else on a GPU the one the published code
    trains and evaluates its family in (``Family.published_dtype``: Coconut's fp32), else load's default."""
    if args.dtype is not None:
        return args.dtype
    from .loader import parse_device, read_model_config

    if parse_device(args.device).type != "cuda":
        return None
    _, _, family = read_model_config(args.model, args.revision, **json_object(args.hf_overrides, "--hf-overrides"))
    return family.published_dtype


def cmd_generate(args) -> int:
    from .chat import chat_template_for
    from .engine import generate
    from .families import family_for

    check_chat_args(args)
    if args.ids and args.chat:
        raise InputError("--ids and --chat do not go together (a conversation is text)")
    given = _read_stdin_prompt(args.prompt)
    if args.ids:
        given = [token_ids(p) for p in given]
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
    kwargs = generate_options(args)
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
        out = {f: getattr(result, f) for f in fields}
        if result.logprobs is not None:  # (each token's: {token, logprob, top: [[id, logprob], ...]})
            per_sequence = result.logprobs if batch_of(result) else [result.logprobs]
            rows = [[{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in seq] for seq in per_sequence]
            out["logprobs"] = rows if batch_of(result) else rows[0]
        print(json.dumps(out))
        return 0
    batch = batch_of(result)
    texts = result.text if batch else [result.text]
    if model.tokenizer is None:  # no text: each sequence's ids
        texts = [" ".join(map(str, t)) for t in (result.tokens if batch else [result.tokens])]
    for n, text in enumerate(texts):
        if not args.stream or len(texts) > 1:
            print(f"[{n}] {text}" if len(texts) > 1 else text)
    if result.logprobs is not None:
        for n, seq in enumerate(result.logprobs if batch else [result.logprobs]):
            lps = [lp.logprob for lp in seq]
            where = f"[{n}] " if batch else ""
            print(f"{where}log-prob per token: {[round(v, 3) for v in lps]} (sum {sum(lps):.3f})")
    for line in family_for(model).decoder.report(result):
        print(line)
    print(f"KV cache: {result.kv_bytes / 2**20:.2f} MiB, backend {result.backend}")
    applied = _model_defaults_applied(model, kwargs)
    if applied:
        print(f"sampling defaults from generation_config.json: {applied} (a flag overrides: --temperature 0 is greedy)")
    return 0


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
    kwargs = generate_options(args)
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


def batch_of(result) -> bool:
    """Whether a GenerationResult holds a batch (a list per field) or one sequence."""
    return bool(result.tokens) and isinstance(result.tokens[0], list)


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
    if model.adapter is not None:
        print(f"LoRA adapter merged: {model.adapter}")
    print(f"backend: {model.backend.name}; {model.backend.reason}")
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


def cmd_save(args) -> int:
    from .checkpoint import shard_bytes

    size = args.max_shard_size
    size = int(size) if size is not None and size.strip().isdigit() else size  # (bytes, or "5GB")
    try:
        shard_bytes(size)  # (a bad size is an error before the weights load)
        model = _load(args)
        out = model.save_pretrained(args.out, max_shard_size=size, overwrite=args.overwrite)
    except LatentRTError as exc:  # (save_pretrained's keywords named as this command's flags)
        message = str(exc).replace("max_shard_size", "--max-shard-size").replace("overwrite=True", "--overwrite")
        raise type(exc)(message) from None
    print(f"latentrt: saved {args.model} ({model.family}, {model.dtype}) to {out}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve.app import check_origins, check_tls, listening_socket
    except ImportError as exc:
        raise InputError(f"serving needs the 'serve' extra (pip install 'latentrt[serve]'): {exc}") from None
    override = checked_engine_flags(args)
    api_key = api_key_from(args.api_key)
    check_tls(args.ssl_keyfile, args.ssl_certfile)
    if args.allowed_origins is not None:
        check_origins(args.allowed_origins)
    sock = listening_socket(args.host, args.port)  # before the weights load: a port in use fails at once
    try:
        return _serve(args, sock, override, api_key)
    finally:
        sock.close()


def checked_engine_flags(args) -> dict:
    """``serve``'s and ``run-batch``'s flags checked before the model loads: the chat template is a file, the
    request defaults a JSON object (returned)."""
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise InputError(f"--chat-template {args.chat_template!r} is not a file")
    tool_call_parser(args)
    lora_options(args)
    if hasattr(args, "enable_responses_api_store"):  # (serve's, not run-batch's)
        responses_store(args)
    return json_object(args.override_generation_config, "--override-generation-config")


def engine_from_flags(args, override: dict):
    """The model loaded into an Engine as ``serve``'s and ``run-batch``'s flags say, and the chat template."""
    from .chat import chat_template_file
    from .serve.app import load_engine

    try:
        engine = load_engine(
            args.model,
            **model_options(args),
            **lora_options(args),
            generation_config=override,
            **engine_options(args),
        )
    except InputError as exc:  # the Engine's own checks (max_len against the context...) name its flags
        raise InputError(renamed(str(exc), {name: "--" + name.replace("_", "-") for name in ENGINE_FLAGS})) from None
    template = None if args.chat_template is None else chat_template_file(args.chat_template, engine.model.folder)
    return engine, template


def _serve(args, sock, override: dict, api_key: str | None) -> int:
    from .serve.app import run_server

    engine, template = engine_from_flags(args, override)
    model = engine.model
    name = args.served_model_name or [args.model]
    scheme = "https" if args.ssl_certfile else "http"
    print(
        f"latentrt: serving {', '.join(name)} ({model.family}, backend {model.backend.name}) on "
        f"{scheme}://{args.host}:{args.port}"
    )
    if model.adapter_bank is not None:
        print(f"latentrt: LoRA adapters served as models: {', '.join(model.adapter_bank.names)}")
    applied = _model_defaults_applied(model, {})
    if applied:  # as vLLM says it: the defaults of every request that leaves them out
        print(f"latentrt: request defaults (generation_config.json, --override-generation-config): {applied}")
    run_server(
        engine,
        name,
        args.host,
        args.port,
        args.log_level,
        chat_template=template,
        api_key=api_key,
        sock=sock,
        allowed_origins=args.allowed_origins,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        tool_call_parser=tool_call_parser(args),
        responses_store=responses_store(args),
        runtime_lora_updating=args.allow_runtime_lora_updating,
    )
    return 0


def cmd_run_batch(args) -> int:
    try:
        from .serve.batch import check_output, read_batch, run_batch
    except ImportError as exc:
        raise InputError(f"run-batch needs the 'serve' extra (pip install 'latentrt[serve]'): {exc}") from None
    override = checked_engine_flags(args)
    requests = read_batch(args.input_file)  # (every line checked, and the output's place, before the weights load)
    check_output(args.output_file)
    engine, template = engine_from_flags(args, override)
    name = args.served_model_name or [args.model]
    counts = run_batch(engine, name, requests, args.output_file, template, tool_call_parser(args))
    answered = ", ".join(f"{n} with status {status}" for status, n in sorted(counts.items()))
    print(f"latentrt: {len(requests)} request(s) answered ({answered}); results in {args.output_file}")
    return 0


def cmd_train(args) -> int:
    from .train.command import run_train

    args.dtype = published_dtype(args)  # (on a GPU, the published script's precision unless --dtype)
    return run_train(_load(args), args)


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    check_chat_args(args)
    args.dtype = published_dtype(args)  # (on a GPU, the published evaluation's precision unless --dtype)
    return run_eval(_load(args), args, generate_options(args))


def api_key_from(flag: str | None) -> str | None:
    """The server's key: ``--api-key``'s, else $LATENTRT_API_KEY's, else None (no key). An empty one is an error:
    ``--api-key "$UNSET_VARIABLE"`` would otherwise serve without a key, silently."""
    for source, value in (("--api-key", flag), ("LATENTRT_API_KEY", os.environ.get("LATENTRT_API_KEY"))):
        if value is not None:
            if not value.strip():
                raise InputError(f"{source} is empty: give a key, or leave it unset to serve without one")
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error prints ``latentrt: error: ...`` and exits 2 (argparse's own errors too),
    never a traceback (LATENTRT_DEBUG=1 shows one for an unexpected error)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores Python's display when main() returns (tests call it in-process)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: _show_warning(
            message, args, file
        )
        return _run(args)


def _show_warning(message, args: argparse.Namespace, file=None) -> None:
    """A warning as a command line tool says it: ``latentrt: warning: ...`` (no file, line or source), the
    options it names as the flags given (``in_flags``)."""
    print(f"latentrt: warning: {in_flags(str(message), args)}", file=file or sys.stderr)


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
            "save": cmd_save,
            "run-batch": cmd_run_batch,
        }
        return commands[args.command](args)
    except InputError as exc:
        print(f"latentrt: error: {in_flags(str(exc), args)}", file=sys.stderr)
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
