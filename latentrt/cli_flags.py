"""The command line's flags: generate()'s options as flags (``generate``, ``chat``, ``eval``), the model flags
every command takes, and the checks the parser cannot make; the options the user gave, read back from the
parsed arguments (``generate_options``), and errors naming the flags typed (``given_flags``)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .backends import CHOICES
from .checkpoint import builtin_names
from .errors import InputError, json_loads, renamed
from .exits import CRITERIA
from .families import decodings
from .lora_serving import DEFAULT_MAX_RANK
from .serve.engine import POLICIES, SCHEDULERS
from .serve.tool_parsers import PARSERS

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
    "published_recompute": "published_recompute",
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
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
    "guided_choice": "guided_choice",
    "guided_json": "guided_json",
    "guided_regex": "guided_regex",
    "guided_grammar": "guided_grammar",
    "disable_any_whitespace": "disable_any_whitespace",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "seed": "seed",
    "logprobs": "logprobs",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "stop": "stop",
    "decoding": "decoding",
    "decoding_option": "decoding_options",
}


UNSET = argparse.SUPPRESS  # an option the user did not give is absent: generate() applies its default


def add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
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
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU; train and eval a Coconut model in "
        "fp32 on GPU, as its published run.py)",
    )
    p.add_argument("--backend", default="auto", choices=CHOICES)
    p.add_argument("--weights", default=None, help="weights file to use instead of the folder's (.safetensors/.pt)")
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a LoRA adapter (PEFT's folder layout, or a Hub id) merged into the weights at load",
    )
    p.add_argument(
        "--hf-overrides",
        default=None,
        metavar="JSON",
        help="config.json fields to replace, as vLLM takes them, e.g. '{\"mean_recurrence\": 32}'",
    )


def json_object(text: str | None, flag: str) -> dict:
    """A flag's JSON object ({} when not given); anything else is a clear error."""
    if text is None:
        return {}
    try:
        value = json_loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


RESPONSES_KEPT = 1000  # --responses-store-size's default

# latentrt serve's flags that configure its Engine (the others: the model's, the server's)
ENGINE_FLAGS = (
    "max_batch",
    "max_queue",
    "max_len",
    "kv_slots",
    "scheduler",
    "edge_cost",
    "async_scheduling",
    "max_num_steps",
    "scheduling_policy",
)


def add_serve_args(p: argparse.ArgumentParser, *, log_level: bool = True) -> None:
    """``latentrt serve``'s flags after the model's; the Ray Serve launcher (latentrt/serve/ray.py) takes them
    too, but the log level (its replicas log through Ray)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_engine_args(p)
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (then 429)")
    p.add_argument(
        "--api-key",
        default=None,
        help="answer /v1 and tokenizer routes only with 'Authorization: Bearer KEY' (default: $LATENTRT_API_KEY)",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="web origins a browser page may call the server from (CORS: https://app.example:8080, or '*'; "
        "default none, where vLLM allows any)",
    )
    p.add_argument(
        "--enable-responses-api-store",
        action="store_true",
        help="keep finished /v1/responses answers in memory, for GET /v1/responses/{id} and previous_response_id "
        "(default: none kept, as vLLM)",
    )
    p.add_argument(
        "--responses-store-size",
        type=int,
        default=None,
        metavar="N",
        help=f"with --enable-responses-api-store: how many are kept, the oldest dropped first ({RESPONSES_KEPT})",
    )
    if log_level:
        p.add_argument("--log-level", default="info")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags of the engine and of the routes in front of it: ``latentrt serve``'s and ``run-batch``'s."""
    p.add_argument("--max-batch", type=int, default=16, help="requests resident at once (rows of the K/V pool)")
    p.add_argument("--max-len", type=int, default=None, help="positions per request (default: context, <= 2048)")
    p.add_argument(
        "--kv-slots",
        type=int,
        default=None,
        help="looped-layer K/V slots shared by the resident requests (default: max-batch x the default depth, "
        "i.e. every request in full mode)",
    )
    p.add_argument("--scheduler", default="depth", choices=SCHEDULERS, help="batching policy (depth)")
    p.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=POLICIES,
        help="which queued request a free row takes: fcfs the first come; priority the one of lowest 'priority' "
        "(a request field, default 0), first come among equals (vLLM's)",
    )
    p.add_argument(
        "--max-num-steps",
        type=int,
        default=None,
        help="the most latent iterations per token a request may ask for (num_steps; default: 256, or the model's "
        "default depth if larger)",
    )
    p.add_argument(
        "--edge-cost",
        type=float,
        default=None,
        help="depth scheduler: what sampling ended units and starting their next tokens costs, in core "
        "iterations; they wait until the iterations lost by waiting reach it (default: from the weights; 0: "
        "every step)",
    )
    p.add_argument(
        "--async-scheduling",
        action="store_true",
        help="launch each step before reading the last one's exits, so the host's work runs while the device "
        "computes (a unit's end is seen a step later; results unchanged)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="the model name clients use (default: MODEL); repeated, several names: a request may give any and "
        "answers carry the first (vLLM's several names; one per flag here, so none is taken for MODEL)",
    )
    p.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a jinja chat template (default: the model folder's)"
    )
    p.add_argument(
        "--override-generation-config",
        default=None,
        metavar="JSON",
        help="defaults of every request's generate() options, over the model's generation_config.json (vLLM's "
        'flag; any option: \'{"temperature": 0.5, "num_steps": 32, "kv_sharing": "shared"}\'); a '
        "request's own fields win",
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters beside the model (--lora-modules; vLLM's flag): a request names one as its model",
    )
    p.add_argument(
        "--lora-modules",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="with --enable-lora: an adapter served as NAME (a PEFT adapter folder or Hub id; or vLLM's JSON form "
        '\'{"name": NAME, "path": PATH}\'); repeated for several, one per flag',
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="with --enable-lora: adapters served at most (default: the --lora-modules given; 1 more with "
        "--allow-runtime-lora-updating)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help=f"with --enable-lora: an adapter's rank at most (default: the largest given; {DEFAULT_MAX_RANK} with "
        "--allow-runtime-lora-updating and none given)",
    )
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="with --enable-lora: vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (its "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); adapters loaded later adapt the model's default LoRA layers",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let chat requests leave the choice between text and tool calls to the model (tool_choice 'auto', "
        "OpenAI's default with tools); needs --tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help=f"the model's tool-call format, read for tool_choice 'auto': {', '.join(sorted(PARSERS))} (vLLM's names)",
    )


def tool_call_parser(args: argparse.Namespace) -> str | None:
    """The tool-call parser's name the flags ask for (None: none), checked: vLLM's two flags go together."""
    name, enabled = args.tool_call_parser, args.enable_auto_tool_choice
    if enabled and name is None:
        raise InputError(f"--enable-auto-tool-choice needs --tool-call-parser NAME (one of {sorted(PARSERS)})")
    if name is not None and not enabled:
        raise InputError("--tool-call-parser is read for tool_choice 'auto': give --enable-auto-tool-choice too")
    if name is not None and name not in PARSERS:
        raise InputError(f"--tool-call-parser {name!r:.100} is not one of {sorted(PARSERS)}")
    return name


def lora_options(args: argparse.Namespace) -> dict:
    """The served adapters' flags as ``load_engine``'s keywords ({} without --enable-lora), checked: the others
    need --enable-lora, which needs adapters or runtime loading."""
    runtime = getattr(args, "allow_runtime_lora_updating", False)
    given = {"--lora-modules": args.lora_modules, "--max-loras": args.max_loras, "--max-lora-rank": args.max_lora_rank}
    if not args.enable_lora:
        stray = [flag for flag, value in given.items() if value is not None] + [
            "--allow-runtime-lora-updating"
        ] * runtime
        if stray:
            raise InputError(f"{stray[0]} is read with --enable-lora: give it too")
        return {}
    if not args.lora_modules and not runtime:
        raise InputError(
            "--enable-lora serves the adapters --lora-modules NAME=PATH names (or loads them while it runs: "
            "--allow-runtime-lora-updating): give at least one"
        )
    modules = lora_modules(args)
    max_loras = args.max_loras if args.max_loras is not None or not runtime else len(modules) + 1
    for flag, value in (("--max-loras", max_loras), ("--max-lora-rank", args.max_lora_rank)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if max_loras is not None and max_loras < len(modules):
        raise InputError(f"--max-loras {max_loras} is fewer than the {len(modules)} adapters --lora-modules names")
    return dict(
        lora_modules=modules,
        max_loras=max_loras,
        max_lora_rank=args.max_lora_rank,
        runtime_lora_updating=runtime,
    )


def lora_modules(args: argparse.Namespace) -> dict[str, str]:
    """The adapters --lora-modules names (name -> path; {} when none)."""
    modules: dict[str, str] = {}
    for text in args.lora_modules or ():
        name, path = _lora_module(text)
        if name in modules:
            raise InputError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def _lora_module(text: str) -> tuple[str, str]:
    """One --lora-modules value: NAME=PATH, or vLLM's JSON object with "name" and "path"."""
    if text.lstrip().startswith("{"):
        value = json_object(text, "--lora-modules")
        name, path = value.get("name"), value.get("path")
        unknown = sorted(set(value) - {"name", "path", "base_model_name"})
        if unknown:
            raise InputError(
                f"--lora-modules {text!r:.100}: unknown field {unknown[0]!r} (name, path, base_model_name)"
            )
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
        raise InputError(f'--lora-modules takes NAME=PATH (or \'{{"name": ..., "path": ...}}\'), got {text!r:.100}')
    return name.strip(), path.strip()


def responses_store(args: argparse.Namespace) -> int:
    """How many finished responses the server keeps (0: none), as the store's flags say."""
    size = args.responses_store_size
    if not args.enable_responses_api_store:
        if size is not None:
            raise InputError("--responses-store-size is read with --enable-responses-api-store: give it too")
        return 0
    return RESPONSES_KEPT if size is None else size


def model_options(args: argparse.Namespace) -> dict:
    """The model flags (``add_model_args``) as ``latentrt.serve.app.load_engine``'s keywords."""
    return dict(
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        weights=args.weights,
        revision=args.revision,
        hf_overrides=json_object(args.hf_overrides, "--hf-overrides"),
        adapter=args.adapter,
    )


def engine_options(args: argparse.Namespace) -> dict:
    """The flags that configure the ``Engine`` (those of them the command has), as its keywords."""
    return {name: getattr(args, name) for name in ENGINE_FLAGS if hasattr(args, name)}


def add_latent_args(p: argparse.ArgumentParser) -> None:
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


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """generate()'s options as flags (``generate`` and ``chat``); one not given is left to generate()."""
    p.add_argument("--max-new-tokens", type=int, default=UNSET, help="tokens to generate (64)")
    p.add_argument(
        "--min-new-tokens", type=int, default=UNSET, help="no stop token or stop string ends it before this many"
    )
    add_latent_args(p)
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
        "--published-recompute",
        action="store_true",
        default=UNSET,
        help="Coconut: compute each answer token after the first from the whole sequence run anew, as the "
        "published generate does (its logits bit for bit; no KV cache: slower)",
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
        "--allowed-token-ids",
        type=int,
        nargs="+",
        default=UNSET,
        metavar="ID",
        help="only these token ids are chosen (vLLM's allowed_token_ids)",
    )
    p.add_argument(
        "--bad-words", nargs="+", default=UNSET, metavar="WORD", help="words never generated (vLLM's bad_words)"
    )
    p.add_argument(
        "--guided-choice",
        nargs="+",
        default=UNSET,
        metavar="TEXT",
        help="the text is one of these, then a stop token (vLLM's guided_choice)",
    )
    p.add_argument(
        "--guided-json",
        default=UNSET,
        metavar="SCHEMA",
        help="the text follows this JSON schema (JSON text, or @FILE), then a stop token (vLLM's guided_json)",
    )
    p.add_argument(
        "--guided-regex", default=UNSET, metavar="REGEX", help="the text matches this regex (vLLM's guided_regex)"
    )
    p.add_argument(
        "--guided-grammar",
        default=UNSET,
        metavar="GRAMMAR",
        help="the text follows this Lark or GBNF grammar (text, or @FILE; vLLM's guided_grammar)",
    )
    p.add_argument(
        "--disable-any-whitespace",
        action="store_true",
        default=UNSET,
        help="--guided-json's JSON has no whitespace between its items (vLLM's disable_any_whitespace)",
    )
    p.add_argument(
        "--dry-multiplier", type=float, default=UNSET, help="the published sampler's DRY penalty (0: none; README)"
    )
    p.add_argument("--dry-base", type=float, default=UNSET, help="DRY's growth per token of a repeat (1.75)")
    p.add_argument("--dry-allowed-length", type=int, default=UNSET, help="repeats DRY lets pass (2)")
    p.add_argument("--seed", type=int, default=UNSET)
    p.add_argument(
        "--logprobs",
        type=int,
        default=UNSET,
        metavar="K",
        help="report each new token's log-prob and the K most likely tokens' (K in [0, 20]; vLLM's logprobs)",
    )


def add_chat_args(p: argparse.ArgumentParser, each: str) -> None:
    """``--chat`` (each prompt or question a user message, through the chat template) and its companions."""
    p.add_argument(
        "--chat", action="store_true", help=f"each {each} is a user message, through the model's chat template"
    )
    p.add_argument("--system", default=None, help=f"with --chat: a system message before each {each}")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="with --chat: a jinja template file")


def check_chat_args(args: argparse.Namespace) -> None:
    if not args.chat and (args.system is not None or args.chat_template is not None):
        raise InputError("--system and --chat-template go with --chat")


def name_options_as_flags(p: argparse.ArgumentParser) -> None:
    """``p``'s errors and warnings name the generate() options the user gave as the flags typed
    (``--threshold must be >= 0``, not ``exit_threshold``; ``in_flags``), each by its first flag; an on/off
    flag also stands for the value it sets (``adaptive=True`` is ``--adaptive``, ``append_thoughts=False``
    ``--no-append-thoughts``)."""
    actions = [a for a in p._actions if a.dest in GENERATE_FLAGS]
    flags = {GENERATE_FLAGS[a.dest]: a.option_strings[0] for a in actions}
    switches = {GENERATE_FLAGS[a.dest]: str(a.const) for a in actions if a.nargs == 0}  # the value it sets
    p.set_defaults(option_flags=flags, option_switches=switches)


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """generate()'s option -> flag, for the options given on this command line (one left to its default keeps
    its name: "in [0, max_new_tokens=64]" is the default's, not a --max-new-tokens the user typed)."""
    return {opt: flag for opt, flag in getattr(args, "option_flags", {}).items() if _given(args, opt)}


def in_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` (an error's or a warning's) with the generate() options given on this command line named as
    their flags (``given_flags``); an on/off flag's ``NAME=VALUE`` (the value it sets) is the flag alone."""
    flags = given_flags(args)
    for opt, value in getattr(args, "option_switches", {}).items():
        if opt in flags:
            message = re.sub(rf"(?<![\w-]){re.escape(opt)}={value}\b", flags[opt], message)
    return renamed(message, flags)


def _given(args: argparse.Namespace, option: str) -> bool:
    return any(hasattr(args, dest) for dest, opt in GENERATE_FLAGS.items() if opt == option)


def generate_options(args: argparse.Namespace) -> dict:
    """The generate() options the user gave on the command line."""
    opts = {opt: getattr(args, flag) for flag, opt in GENERATE_FLAGS.items() if hasattr(args, flag)}
    if hasattr(args, "stop_text"):  # one ``stop`` list: the token ids, then the strings
        opts["stop"] = list(opts.get("stop", [])) + list(args.stop_text)
    if "decoding_options" in opts:
        opts["decoding_options"] = dict(_key_value(item, "--decoding-option") for item in opts["decoding_options"])
    if "logit_bias" in opts:
        opts["logit_bias"] = dict(_token_bias(item) for item in opts["logit_bias"])
    for name in ("guided_json", "guided_grammar"):
        if isinstance(opts.get(name), str) and opts[name].startswith("@"):
            opts[name] = _file_text(opts[name][1:], "--" + name.replace("_", "-"))
    return opts


def _file_text(path: str, flag: str) -> str:
    """The text of ``@FILE`` given to ``flag``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} @{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


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
        return key, json_loads(value)
    except json.JSONDecodeError:
        return key, value


def token_ids(prompt: str) -> list[int]:
    """``--ids``: a prompt of token ids separated by commas or spaces (``5,6,7``, ``"5 6 7"``, ``[5, 6, 7]``)."""
    parts = prompt.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--ids: a prompt must be token ids separated by commas or spaces, got {prompt!r}") from None


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
    ("max_num_steps", 1, None),
    ("replicas", 1, None),
    ("responses_store_size", 1, None),
)


def check_counts(args: argparse.Namespace) -> None:
    """Counts the parser cannot bound: an error naming the flag, before any model is loaded."""
    for flag, low, high in COUNT_BOUNDS:
        value = getattr(args, flag, None)
        if isinstance(value, int) and not (low <= value and (high is None or value <= high)):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise InputError(f"--{flag.replace('_', '-')} must be {rule}, got {value}")
