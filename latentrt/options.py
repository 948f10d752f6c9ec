"""The options of one generate() call as one dataclass, validated before any work.

Generic options (length, sampling, stopping, hooks) are checked here; the family-specific ones are checked
by the family's decoder (latentrt/decode/), which names the ones it takes (``OPTIONS``): an option some
family takes but the model's family does not is an error when set to anything but its default.

A checkpoint's generation_config.json may carry sampling defaults (``generation_defaults``): they fill the
options a call leaves unset, as HF's generate and the published Huginn sampler read that file.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from .caller import warn_at_caller
from .dry import check_dry
from .errors import ConfigError, InputError, as_float, check_bool, check_int, plain_scalar
from .logprobs import MAX_TOP_LOGPROBS
from .penalties import check_penalties
from .sampling import MAX_SEED, check_sampling
from .token_constraints import check_constraints


@dataclass
class GenerateOptions:
    """See README (Python API) for the meaning of each option."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # no stop token nor stop string ends a sequence before this many new tokens
    # recurrent depth
    adaptive: bool = False
    num_steps: int | None = None
    exit_criterion: str = "kl"
    exit_threshold: float | None = None
    min_steps: int = 0
    check_criterion_every_n_steps: int = 1
    do_not_exit_in_prefill: bool = False
    adaptive_prefill: bool = False
    kv_sharing: Any = "full"
    continuous: bool = False
    init_scale: float = 1.0
    decoding: str = "sequential"  # or a sampler committing several tokens per pass: speculative, wavefront
    decoding_options: Any = None  # that sampler's options (a dict; README)
    # Coconut
    num_thoughts: int | None = None
    append_thoughts: bool = True  # False: a prompt without markers runs as it is (the CoT / no-CoT formats)
    published_eos: bool = False
    published_recompute: bool = False  # each answer token after the first from the whole sequence run anew
    # sampling and stopping
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    published_top_p: bool = False  # the published Huginn sampler's top_p rule (sampling.dropped)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Any = None  # {token id: bias}
    allowed_token_ids: Any = None  # vLLM's: only these token ids are chosen (latentrt/token_constraints.py)
    bad_words: Any = None  # vLLM's: words never generated
    guided_choice: Any = None  # vLLM's: the text is one of these strings (latentrt/choices.py)
    guided_json: Any = None  # vLLM's: the text follows this JSON schema (latentrt/structured.py)
    guided_regex: Any = None  # vLLM's: the text matches this regular expression
    guided_grammar: Any = None  # vLLM's: the text follows this Lark or GBNF grammar
    disable_any_whitespace: bool = False  # vLLM's: guided_json's JSON without whitespace between its items
    logits_processors: Any = None  # transformers' LogitsProcessor callables, (input_ids, scores) -> scores
    dry_multiplier: float = 0.0  # the published sampler's DRY penalty (latentrt/dry.py); 0: none
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    seed: int | None = None
    stop: Any = None
    default_stops: bool = True
    include_stop_str_in_output: bool = False  # the text ends after the stop string that ended it (vLLM's)
    skip_special_tokens: bool = True  # the text leaves special tokens out (HF's decode, vLLM)
    # input
    strict: bool = False  # words the tokenizer does not know are an error (else a warning naming them)
    # observation
    hooks: Any = None
    return_logits: bool = False
    logprobs: int | None = None  # vLLM's: each token's log-prob and the k most likely tokens' (latentrt/logprobs.py)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars (a sweep's np.arange) as Python numbers
            value = plain_scalar(getattr(self, f.name))
            if f.type in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
                value = as_float(value)  # (an int past a float's range, e.g. a JSON body's 10**30, raised in torch)
            setattr(self, f.name, value)

    @classmethod
    def build(
        cls, options: GenerateOptions | None = None, model_defaults: dict | None = None, **kwargs
    ) -> GenerateOptions:
        """``options`` (or the defaults) with ``kwargs`` replacing fields; unknown names are an error.
        ``model_defaults`` (a model's ``generation_defaults``) fill the fields neither sets (a field of
        ``options`` left at latentrt's default counts as unset: give such a value as a keyword)."""
        given = set(kwargs) | {
            f.name for f in dataclasses.fields(cls) if options is not None and options.is_set(f.name)
        }
        if model_defaults:
            unset = {k: v for k, v in model_defaults.items() if not (options is not None and options.is_set(k))}
            kwargs = {**unset, **kwargs}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            hints = [difflib.get_close_matches(u, names, n=1) for u in unknown]
            hint = "; ".join(
                f"{u!r}: {TRANSFORMERS_GENERATE[u]}" if u in TRANSFORMERS_GENERATE else f"{u!r}: did you mean {h[0]!r}?"
                for u, h in zip(unknown, hints)
                if h or u in TRANSFORMERS_GENERATE
            )
            raise InputError(
                f"unknown generate() option(s) {unknown}" + (f" ({hint})" if hint else "") + f"; known: {sorted(names)}"
            )
        if options is not None and not isinstance(options, GenerateOptions):
            raise InputError(f"options must be a GenerateOptions, got {type(options).__name__}")
        built = dataclasses.replace(options if options is not None else cls(), **kwargs)
        _warn_unused(built, given)
        return built

    def is_set(self, name: str) -> bool:
        """Whether the caller gave ``name`` a value other than its default."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        return getattr(self, name) != default

    def validate(self) -> None:
        """The generic options; family options are checked by the family's decoder."""
        n = self.max_new_tokens
        check_int("max_new_tokens", n, 1)
        check_int("min_new_tokens", self.min_new_tokens, 0, n, high_label=f"max_new_tokens={n}")
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        check_penalties(self.repetition_penalty, self.presence_penalty, self.frequency_penalty, self.logit_bias)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        check_constraints(
            self.allowed_token_ids, self.bad_words, self.guided_choice, self.logits_processors, self.guided_json,
            self.guided_regex, self.guided_grammar,
        )  # fmt: skip
        check_dry(self.dry_multiplier, self.dry_base, self.dry_allowed_length, self.repetition_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        for name in (
            "default_stops",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "published_top_p",
            "strict",
            "return_logits",
            "disable_any_whitespace",
        ):
            check_bool(name, getattr(self, name))


# transformers' generate() keywords that are no option here, and what to give instead (named in the error)
TRANSFORMERS_GENERATE = {
    "do_sample": "latentrt samples when temperature > 0 (do_sample=False is temperature=0, the default; "
    "do_sample=True is temperature=1.0, or yours)",
    "max_length": "give max_new_tokens (max_length counts the prompt too)",
    "num_beams": "latentrt has no beam search (decoding= 'sequential', 'speculative' or 'wavefront')",
    "num_return_sequences": "give the prompt n times in a batch, with seed=s (row i draws with s + i)",
    "pad_token_id": "latentrt pads a batch itself (a padded tensor takes attention_mask=)",
    "eos_token_id": "stop=[ids] adds stop tokens; default_stops=False leaves out the model's",
    "stop_strings": "stop=['text', ...] takes stop strings (and token ids)",
    "tokenizer": "stop strings need no tokenizer argument: stop=['text', ...]",
    "streamer": "stream=True returns a GenerationStream of events",
    "use_cache": "latentrt always decodes with its KV cache (kv_sharing= picks its mode)",
    "return_dict_in_generate": "the result is a GenerationResult; return_logits=True adds the logits",
    "output_scores": "logprobs=k gives each token's log-prob and the k best; return_logits=True the logits",
    "output_logits": "return_logits=True",
    "logits_processor": "logits_processors=[...] takes transformers' LogitsProcessor callables (a "
    "LogitsProcessorList too)",
    "bad_words_ids": "bad_words=['text', ...] takes words (vLLM's); for token ids, logits_processors=[transformers' "
    "NoBadWordsLogitsProcessor(ids)]",
    "stopping_criteria": "stop=[ids, 'strings'] ends sequences (a rule of your own: a logits processor leaving only a "
    "stop token)",
    "prefix_allowed_tokens_fn": "logits_processors=[...] see each sequence's ids and may mask any token; or "
    "guided_choice=[...] / allowed_token_ids=[...]",
    "sequence_bias": "logit_bias={id: bias} biases tokens; bad_words=['text', ...] bans sequences",
    "output_hidden_states": "hooks=[...] see every latent state (LatentEvent.state, each iteration or thought)",
    "suppress_tokens": "logits_processors=[transformers' SuppressTokensLogitsProcessor(ids)], or bad_words=['text']",
}

# options that act only under another: (their names, the test that they are unused, why); a caller's value other
# than the option's default or neutral value (top_p 1) under that test gets a warning, as HF's generate warns
# of top_p given with do_sample=False (a checkpoint's defaults never do: the caller did not give them)
ACT_ONLY_WHEN = (
    (("top_k", "top_p", "min_p"), lambda o: o.temperature == 0, "when sampling (temperature > 0); with temperature=0"),
    (("dry_base", "dry_allowed_length"), lambda o: not o.dry_multiplier, "with DRY (dry_multiplier > 0); without it"),
    (("published_top_p",), lambda o: not o.temperature or o.top_p in (None, 1), "with top_p < 1 when sampling; here"),
    (("disable_any_whitespace",), lambda o: o.guided_json is None, "with guided_json; without it"),
)
NEUTRAL = {"top_p": 1, "top_k": 0}


def _warn_unused(options: GenerateOptions, given: set[str]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    for names, unused, why in ACT_ONLY_WHEN:
        set_here = [n for n in names if n in given and getattr(options, n) not in (defaults[n], NEUTRAL.get(n))]
        if set_here and unused(options):
            try:  # an invalid value is its error, raised when the options are checked, not a warning first
                options.validate()
            except InputError:
                return
            warn_at_caller(unused_message(set_here, why))


def unused_message(names: list[str], only: str) -> str:
    """The warning for options given where they do nothing: "``names`` act(s) only ``only`` they are (it is)
    unused" (``only`` says where they act and what happens here)."""
    verb, pronoun = ("acts", "it is") if len(names) == 1 else ("act", "they are")
    return f"{', '.join(names)} {verb} only {only} {pronoun} unused"


def generation_defaults(gen_cfg: dict, source: str) -> dict:
    """generate() defaults from a checkpoint's generation_config.json (``gen_cfg``), read as the published
    Huginn sampler reads it (``_sample_next_token`` on the model's generation config): ``repetition_penalty``
    always; with ``do_sample`` true ``temperature`` (absent, null or 0: 1, as its ``if temperature:``),
    ``top_k``, ``top_p``, ``min_p``; fields absent, null or neutral give nothing (no implicit top_k of 50: a
    transformers 4 default, gone in 5). ``max_new_tokens`` too, as HF's generate and vLLM (its default
    max_tokens) read it (``max_length``, a total length, is not read). A value generate() would refuse is a
    ConfigError naming the file."""
    out = {}
    if gen_cfg.get("max_new_tokens") is not None:
        out["max_new_tokens"] = gen_cfg["max_new_tokens"]
    if gen_cfg.get("do_sample") not in (None, True, False):
        raise ConfigError(f"{source}: do_sample must be true or false, got {gen_cfg['do_sample']!r}")
    rep = gen_cfg.get("repetition_penalty")
    if rep is not None and rep != 1:
        out["repetition_penalty"] = rep
    if gen_cfg.get("do_sample") is True:
        out["temperature"] = gen_cfg.get("temperature") or 1.0
        top_k, top_p, min_p = (gen_cfg.get(name) for name in ("top_k", "top_p", "min_p"))
        if top_k not in (None, 0):
            out["top_k"] = top_k
        if top_p is not None and top_p != 1:
            out["top_p"] = top_p
        if min_p not in (None, 0):
            out["min_p"] = min_p
    try:
        GenerateOptions(**out).validate()
    except InputError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    unread = sorted(
        k for k, neutral in UNREAD_GENERATION_FIELDS.items() if gen_cfg.get(k, neutral) not in (None, neutral, [], {})
    )
    if unread:
        warn_at_caller(
            f"{source}: not read as defaults: {', '.join(f'{k}={gen_cfg[k]!r}' for k in unread)} (HF's generate or "
            "the published sampler would apply them); pass the generate() option where there is one",
        )
    return out


# generation_config.json fields that change the tokens HF's generate (or, dry_*, the published Huginn sampler)
# makes, which generation_defaults does not read, with their neutral values: set to anything else, the file
# asks for something a latentrt default does not do, and the load says so rather than ignore it silently.
UNREAD_GENERATION_FIELDS = {
    "min_new_tokens": 0,
    "min_length": 0,
    "stop_strings": None,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "renormalize_logits": False,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
    "penalty_alpha": None,
    "guidance_scale": 1.0,
    "num_return_sequences": 1,
    "watermarking_config": None,
    "dry_multiplier": 0.0,
}
