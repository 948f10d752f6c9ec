"""Differential soak: random requests through two paths that must agree, for a time budget or a count of cases.

    python -m tools.soak [--seconds 60 | --cases N]
                         [--checks batch,serve,offline,backend,speculative,hooks,score,http,burst]
                         [--model builtin:recurrent] [--backend auto] [--device DEVICE] [--dtype DTYPE] [--seed 0]

Each case draws its prompts (token ids of the model's vocabulary, 1-30 long) and its options (every generic
generate() option and the family's own, ``Decoder.OPTIONS``, so a Coconut model gets thoughts and a recurrent
one depths, exit criteria and KV modes) from its own seed, and runs one check; the checks take turns:

- ``batch``: generate() on 2-4 prompts equals each prompt alone with seed s + i (README, Guarantees): tokens,
  steps, text, finish reason, and the logits to the dtype's rounding (``LOGITS_TOLERANCE``); streamed, the
  batch equals itself (the result, and each sequence's text as the events' pieces joined);
- ``serve``: an Engine of random settings (scheduler, max batch, K/V slots, prefill budget, asynchronous
  scheduling) serving 3-16 requests of their own options, all at once or arriving over its first steps, some
  cancelled at a random step: each equals generate() alone (README, Serving), a cancelled one its first
  tokens; idle, the engine holds nothing (every pool row free, the K/V storage finite);
- ``offline``: ``Engine.generate`` (random engine settings) on 2-8 prompts of their own options: each result
  equals generate() alone, field by field (``kv_bytes``, thoughts, adaptive prefill's per-position steps);
- ``backend``: generate() on ``--backend`` equals the torch backend (skipped where that is torch);
- ``speculative``: greedy speculative decoding (random lookahead and draft depth) equals sequential decoding
  at fixed depth, ``init_scale=0``, full K/V (recurrent-depth models);
- ``hooks``: generate() with a hook that returns nothing equals it without (hooks run iteration by iteration
  where a backend would run a token at once), and the hook sees each row's iterations per token (an adaptive
  prefill's, summed, for the prompt) and thoughts as the result counts them;
- ``score``: the logits generate() chose each token from equal one ``model.logits`` pass over the prompt and the
  tokens (greedy; at fixed depth, ``init_scale=0``, full K/V for recurrent depth; a Coconut prompt's thoughts
  as markers);
- ``http``: the server's streamed answer equals its plain one (texts, finish reasons, usage; completions and
  chat; needs the ``serve`` extra);
- ``burst``: 2-6 requests sent to the server at once, each plain, streamed, or streamed and dropped after a few
  events: each answer equals its answer alone, and the server then goes idle holding no pool row.

An option set a path refuses is not a mismatch: generate() alone refusing it skips the request; an engine may
refuse one generate() takes only for its capacity (K/V slots, context), counted as refused. A mismatch (a case that
raises is one) prints the case's seed and the command that repeats it, and the run exits 1. The tests pin these
properties on chosen cases; this tool searches for the ones they miss, e.g. after a change to the engine or on a
GPU backend. Floating point: a batch's products may round otherwise than one row's, so an exit whose criterion lies
within rounding of its threshold may go one iteration apart, and a token within rounding of its rival otherwise
(README, Guarantees): each mismatch is labelled by what rounding can explain (``describe``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import latentrt
from latentrt import sampling
from latentrt.backends import CHOICES, get_backend
from latentrt.chat import find_chat_template
from latentrt.errors import InputError, LatentRTError
from latentrt.exits import CRITERIA
from latentrt.families import family_for
from latentrt.options import GenerateOptions
from latentrt.serve.engine import SCHEDULERS, Engine
from latentrt.structured import compile_grammar
from latentrt.token_constraints import NAMES as TOKEN_CONSTRAINTS

from . import case_parser, parsed_checks, warnings_silenced, wrapped

KV_MODES = ("full", "shared", "ring-2", "anchor-2", "skip", "always-last")
# the structured outputs a request may ask (refused, and counted so, where the tokenizer is one llguidance does
# not read: the built-in models' word-level one)
STRUCTURED_DRAWS = (
    ("guided_regex", r"[a-z ]{1,12}"),
    ("guided_regex", r"(yes|no|maybe)\.?"),
    ("guided_regex", r"\d{1,4}"),
    ("guided_json", {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}),
    ("guided_json", {"type": "integer"}),
    ("guided_grammar", 'start: "a" ("b" | "c")* "."'),
)
CHECKS = ("batch", "serve", "offline", "backend", "speculative", "hooks", "score", "http", "burst")


def draw_prompt(rng: random.Random, model) -> list[int]:
    """1-30 ids of the vocabulary; a Coconut model's latent markers only as a well-formed group of thoughts (in a
    fifth of the prompts, after the first token: the marker ids drawn at random would make most prompts errors)."""
    markers = [m for m in getattr(model, "marker_ids", ()) if m is not None]
    words = [i for i in range(1, model.config.vocab_size) if i not in markers]
    ids = [rng.choice(words) for _ in range(rng.randrange(1, 31))]
    if len(markers) == 3 and rng.random() < 0.2:
        start, latent, end = model.marker_ids
        at = rng.randrange(1, len(ids) + 1)
        ids[at:at] = [start] + [latent] * rng.randrange(0, 4) + [end]
    return ids


@functools.lru_cache(maxsize=4)
def takes_structured(model) -> bool:
    """Whether the model's tokenizer is one llguidance reads (and llguidance is installed): else its draws would
    all be refused."""
    try:
        compile_grammar(GenerateOptions(guided_regex="a"), model.tokenizer, model.config.vocab_size, [0])
    except InputError:
        return False
    return True


def draw_options(rng: random.Random, model, seed: int) -> dict:
    """One request's generate() options: the generic ones and those the model's family takes."""
    takes = family_for(model).decoder.OPTIONS
    vocab = model.config.vocab_size
    kw: dict = dict(max_new_tokens=rng.randrange(1, 12), seed=seed, default_stops=rng.random() < 0.7)
    if rng.random() < 0.5:
        kw.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]))
        kw.update(min_p=rng.choice([0.0, 0.05]), published_top_p=rng.random() < 0.2)
    if rng.random() < 0.3:
        kw.update(
            presence_penalty=0.5, frequency_penalty=rng.choice([0.0, 1.0]), logit_bias={rng.randrange(vocab): 4.0}
        )
        if rng.random() < 0.5:
            kw["repetition_penalty"] = 1.6
        else:
            kw.update(dry_multiplier=2.0, dry_base=1.5, dry_allowed_length=1)
    if rng.random() < 0.3:  # a stop token, or a stop string (a word, or two words across tokens)
        words = [model.tokenizer.decode([rng.randrange(vocab)]) for _ in range(2)] if model.tokenizer else []
        text = rng.choice([words[0], " ".join(words)]).strip() if words else ""
        kw["stop"] = [text] if text and rng.random() < 0.5 else [rng.randrange(vocab)]
        kw["include_stop_str_in_output"] = rng.random() < 0.3
    if rng.random() < 0.2:
        kw["min_new_tokens"] = rng.randrange(0, kw["max_new_tokens"] + 1)
    own = random.Random(f"constraints {seed}")  # (its own draws: the other options' stay as they were)
    if own.random() < 0.2:  # tokens a sequence may not choose next (latentrt/token_constraints.py)
        if own.random() < 0.5:
            kw["allowed_token_ids"] = own.sample(range(vocab), own.randrange(3, vocab // 2))
        words = [model.tokenizer.decode([own.randrange(vocab)]).strip() for _ in range(2)] if model.tokenizer else []
        if all(words) and words and own.random() < 0.7:
            kw["bad_words"] = [own.choice([words[0], " ".join(words)])]
    if own.random() < 0.2:
        kw["logprobs"] = own.randrange(0, 4)
    if own.random() < 0.1 and model.tokenizer is not None:  # the text one of a few (latentrt/choices.py)
        words = [model.tokenizer.decode([own.randrange(vocab)]).strip() for _ in range(6)]
        choices = [" ".join(w for w in words[j : j + own.randrange(1, 4)] if w) for j in range(own.randrange(1, 4))]
        if all(choices):
            kw.update(guided_choice=choices, default_stops=True)
    elif own.random() < 0.1 and takes_structured(model):  # structured outputs (latentrt/structured.py)
        name, value = own.choice(STRUCTURED_DRAWS)
        kw.update({name: value, "default_stops": True})
        if name == "guided_json" and own.random() < 0.5:
            kw["disable_any_whitespace"] = True
    if "num_steps" in takes:
        kw.update(num_steps=rng.randrange(1, 14), kv_sharing=rng.choice(KV_MODES), init_scale=rng.choice([0.0, 1.0]))
        if rng.random() < 0.6:
            name = rng.choice(sorted(CRITERIA))
            cls = CRITERIA[name]
            threshold = rng.randrange(1, 4) if name == "argmax-stability" else cls.DEFAULT * rng.choice([1, 10, 100])
            kw.update(adaptive=True, exit_criterion=name, exit_threshold=threshold)
            kw.update(min_steps=rng.choice([0, 0, 2]), check_criterion_every_n_steps=rng.choice([1, 1, 2]))
            kw.update(do_not_exit_in_prefill=rng.random() < 0.2, adaptive_prefill=rng.random() < 0.2)
            kw["continuous"] = rng.random() < 0.2
    if "num_thoughts" in takes:
        kw.update(num_thoughts=rng.choice([None, 0, 1, 3, 5]), published_eos=rng.random() < 0.3)
        if kw["num_thoughts"] is None and rng.random() < 0.2:
            kw["append_thoughts"] = False  # the prompt as it is (Coconut's CoT / no-CoT formats)
    if rng.random() < 0.2:
        kw["skip_special_tokens"] = False
    return kw


@dataclass
class Arrival:
    """A served request of the ``serve`` check: what it asks, generate()'s answer alone, and when it comes and
    goes (engine steps)."""

    prompt: list[int]
    kw: dict
    alone: object  # generate()'s result for it alone
    draws: DrawLog | None = None  # the draws of its tokens alone
    arrive: int = 0  # the engine step it is submitted at
    cancel: int | None = None  # the step its client goes away at (None: never)
    request: object = None  # the engine's Request, once submitted


def draw_engine_settings(rng: random.Random) -> dict:
    """The ``serve`` check's Engine: its max batch, scheduler, prefill budget, K/V slots (few enough that some
    requests wait for slots, or are refused as never fitting) and, in three cases of ten, asynchronous
    scheduling."""
    settings = dict(max_batch=rng.choice([1, 2, 3, 5, 8]), scheduler=rng.choice(sorted(SCHEDULERS)))
    settings.update(prefill_budget=rng.choice([1, 4, 16, 2048]), kv_slots=rng.choice([8, 16, 40, 200]))
    settings["async_scheduling"] = rng.random() < 0.3
    return settings


DRAIN_STEPS = 20_000  # a serve case's engine steps at most (its requests need a few hundred)


def draw_arrivals(rng: random.Random, requests: list[Arrival]) -> None:
    """When each request comes and whether its client goes away: all at once (half the cases) or over the
    first 40 steps, so that requests arrive while others decode; in a third of the cases a quarter of them
    are cancelled at a random step (queued, mid-prompt, mid-loop, or after they finished)."""
    staggered, cancelling = rng.random() < 0.5, rng.random() < 0.3
    for a in requests:
        a.arrive = rng.randrange(0, 40) if staggered else 0
        if cancelling and rng.random() < 0.25:
            a.cancel = a.arrive + rng.randrange(0, 60)


def outcome(result, i: int | None = None) -> tuple:
    """(tokens, steps, text, finish reason) of a GenerationResult (row ``i`` of a batch) or a served Request."""
    if hasattr(result, "finish_reason"):  # a served request
        return result.tokens, result.steps, result.text, result.finish_reason
    if i is None:
        return result.tokens, result.steps, result.text, result.finish_reasons[0]
    return result.tokens[i], result.steps[i], result.text[i], result.finish_reasons[i]


# the logits of a sequence in a batch against alone, relative to their largest (README, Guarantees: fp32 under
# 1e-6 relative for attention alone; the loops' products on top): beyond this a state went otherwise
LOGITS_TOLERANCE = {torch.float32: 1e-4}


def logits_error(got, want) -> float:
    """max |got - want| / max |want| over a sequence's logits [n, V]."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


class DrawLog:
    """The numbers of every token drawn while it is active (``with DrawLog() as log``): torch draws a token as
    argmax(p / q), q ~ Exp(1) from the sequence's generator (``sampling.draw``), so two runs of a seeded
    sequence draw the same q at the same token, and a token drawn otherwise in them is a tie within rounding
    where their p lie that close (the tokens' ratios then lie within the runs' difference of each other); a q
    one run drew and the other did not means their generators went apart."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (p [V], q [V]) of each row drawn, in order

    def __enter__(self) -> DrawLog:
        def wrap(real):
            def logged(probs, generator=None):
                q = real(probs, generator)
                self.rows += [(p.detach().float().cpu(), e.detach().float().cpu()) for p, e in zip(probs, q)]
                return q

            return logged

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(wrapped(sampling, "exponentials", wrap))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def drawn_with(self, q: torch.Tensor) -> torch.Tensor | None:
        """The probabilities of the draw that used exponentials ``q`` (None: none did)."""
        return next((p for p, e in self.rows if torch.equal(e, q)), None)


def draws_of(got: DrawLog, want: DrawLog, tokens: int) -> Callable[[int], tuple] | None:
    """``describe``'s ``draws_at`` for a sequence whose ``tokens`` tokens ``want`` drew one a row, in order (a run
    alone), and ``got`` drew among others: token j's (p in got or None, p in want, q)."""
    if len(want.rows) != tokens:
        return None  # not one draw a token (greedy, or another sampler): no draw to match

    def at(j: int) -> tuple:
        p, q = want.rows[j]
        return got.drawn_with(q), p, q

    return at


def drawn_tie(draws: tuple, tokens: tuple[int, int], tolerance: float) -> str:
    """What the draws of one token in two runs (``draws_of``) say of its two outcomes ``tokens`` (got, want)."""
    p_got, p_want, q = draws
    if p_got is None:
        return "the other run never drew with its generator's numbers here: the generators went apart"
    err = float((p_got - p_want).abs().max() / p_want.abs().max().clamp_min(1e-30))
    r_got, r_want = p_got / q, p_want / q
    if int(r_got.argmax()) != tokens[0] or int(r_want.argmax()) != tokens[1]:
        return f"drawn from probabilities {err:.2g} apart (relative), not as the draws say"
    tie = ": a tie within rounding" if err <= tolerance else ""
    return f"drawn from probabilities {err:.2g} apart (relative) with the same exponentials{tie}"


# besides repetition_penalty
PROCESSORS = ("logit_bias", "presence_penalty", "frequency_penalty", "dry_multiplier", *TOKEN_CONSTRAINTS)


def describe(got: tuple, want: tuple, options: dict, logits_at=None, tolerance: float = 0.0, draws_at=None) -> str:
    """Where two outcomes first differ, and whether that may be a tie within rounding (README, Guarantees): an
    exit one check apart, or a greedy token chosen otherwise where the two runs' logits (``logits_at(j)``: both
    rows [V] at position j, where known) lie within ``tolerance`` of each other and the two tokens' within that
    difference of each other, or a sampled token drawn otherwise with the same exponentials from probabilities
    that close (``draws_at(j)``: ``draws_of``; without it only the logits' distance is given: a sampled or
    penalised token is chosen from other numbers)."""
    (t1, s1, *_), (t2, s2, *_) = got, want
    at = next((j for j in range(min(len(s1), len(s2))) if (t1[j : j + 1], s1[j]) != (t2[j : j + 1], s2[j])), None)
    if at is None:
        return "the lengths, texts or finish reasons differ"
    where = f"position {at} (0: the prompt)"
    if t1[:at] == t2[:at] and s1[at] != s2[at] and options.get("adaptive"):
        apart, every = abs(s1[at] - s2[at]), options.get("check_criterion_every_n_steps", 1)
        crit = f"{options['exit_criterion']} at {options['exit_threshold']:g}"
        tie = ": possibly a tie within rounding" if apart == every else ""  # one check apart
        return f"{where} exits {apart} iteration{'s' * (apart > 1)} apart ({crit}){tie}"
    same_before = t1[:at] == t2[:at] and s1[: at + 1] == s2[: at + 1]
    if same_before and draws_at is not None and at < len(t1) and at < len(t2):
        return f"{where}: a sampled token {drawn_tie(draws_at(at), (t1[at], t2[at]), tolerance)}"
    if not same_before or logits_at is None:
        return f"{where} differs"
    l1, l2 = logits_at(at)
    err = logits_error(l1, l2)
    penalised = any(options.get(k) for k in PROCESSORS) or options.get("repetition_penalty", 1.0) != 1.0
    if options.get("temperature") or penalised:  # chosen from other numbers than these logits
        kind = "sampled" if options.get("temperature") else "penalised"
        return f"{where} differs (a {kind} token, from logits {err:.2g} apart, relative)"
    gap = max(abs(float(row[t1[at]] - row[t2[at]])) for row in (l1, l2))
    if err <= tolerance and gap <= 2 * float((l1 - l2).abs().max()):
        return f"{where} chose another token from logits {err:.2g} apart (relative): possibly a tie within rounding"
    return f"{where} differs"


class Soak:
    def __init__(self, model, backend: str, log: Callable[[str], None] = print) -> None:
        self.model, self.backend, self.log = model, backend, log
        self._made = {backend: model.backend}  # one backend object per name (its captured graphs kept)
        self.counts: Counter = Counter()
        self.tolerance = LOGITS_TOLERANCE.get(model.dtype, 5e-2)  # (bf16, fp16: a few units in the last place)
        self.mismatches: list[str] = []

    def _backend(self, name: str):
        if name not in self._made:
            self._made[name] = get_backend(name, self.model)
        return self._made[name]

    def alone(self, prompt, kw: dict, backend: str | None = None):
        """generate() for one prompt on ``backend`` (default the soak's), or None where it refuses the options."""
        self.model.backend = self._backend(backend or self.backend)
        try:
            return latentrt.generate(self.model, prompt, **kw)
        except InputError:
            self.counts["refused options"] += 1
            return None

    def compare(self, check: str, seed: int, got: tuple, want: tuple, kw: dict, logits_at=None, draws_at=None) -> None:
        self.counts[f"{check} compared"] += 1
        if got != want:
            what = describe(got, want, kw, logits_at, self.tolerance, draws_at)
            self.mismatch(check, seed, what, kw, f"\n  got  {got}\n  want {want}")

    def mismatch(self, check: str, seed: int, what: str, kw: dict, detail: str = "") -> None:
        self.mismatches.append(f"{check} seed {seed}: {what}")
        self.log(f"MISMATCH {check} seed {seed}: {what}\n  options {kw}{detail}")

    def batch(self, seed: int) -> None:
        rng = random.Random(seed)
        prompts = [draw_prompt(rng, self.model) for _ in range(rng.randrange(2, 5))]
        kw = draw_options(rng, self.model, seed=seed)
        alone, drawn = [], []
        for i, p in enumerate(prompts):
            with DrawLog() as log:
                alone.append(self.alone(p, dict(kw, seed=seed + i, return_logits=True)))
            drawn.append(log)
        if any(a is None for a in alone):
            return
        with DrawLog() as batched:
            result = latentrt.generate(self.model, prompts, **kw, return_logits=True)
        for i, a in enumerate(alone):
            rows = lambda j, i=i, a=a: (result.logits[i][j], a.logits[j])  # noqa: E731
            draws = draws_of(batched, drawn[i], len(a.tokens))
            self.compare("batch", seed, outcome(result, i), outcome(a), kw, rows, draws)
            if outcome(result, i) == outcome(a):  # the same tokens: the same logits, to the dtype's rounding
                err = logits_error(result.logits[i], a.logits)
                if err > self.tolerance:
                    self.mismatch("batch", seed, f"sequence {i}'s logits differ from alone by {err:.2g}", kw)
        stream = latentrt.generate(self.model, prompts, **kw, stream=True)  # the same batch, streamed
        joined = [""] * len(prompts)
        for event in stream:
            for i, piece in enumerate(event.text or []):
                joined[i] += piece or ""
        for i in range(len(prompts)):
            self.compare("stream", seed, outcome(stream.result, i), outcome(result, i), kw)
            if result.text is not None and joined[i] != result.text[i]:
                self.mismatch("stream", seed, f"its events' text {joined[i]!r} is not its result's", kw)

    def serve(self, seed: int) -> None:
        rng = random.Random(seed)
        settings = draw_engine_settings(rng)
        requests = []
        for i in range(rng.randrange(3, 17)):
            prompt, kw = draw_prompt(rng, self.model), draw_options(rng, self.model, seed=seed + i)
            with DrawLog() as drawn:
                alone = self.alone(prompt, kw)
            if alone is not None:
                requests.append(Arrival(prompt, kw, alone, drawn))
        draw_arrivals(random.Random(f"{seed}:arrivals"), requests)  # (its own draws: the requests stay the seed's)
        engine = self.engine(settings)
        if engine is None:
            return
        with DrawLog() as served:
            if not self._drive(engine, requests, seed, settings):
                return
        for a in requests:
            self.judge(a, seed, settings, served)
        self.check_released("serve", engine, seed, settings)

    def engine(self, settings: dict) -> Engine | None:
        """An Engine of ``settings`` on the soak's backend, or None (counted) where it refuses them (e.g.
        asynchronous scheduling a family's program does not offer)."""
        self.model.backend = self._backend(self.backend)
        try:
            return Engine(self.model, **settings)
        except InputError:
            self.counts["engines refused"] += 1
            return None

    def offline(self, seed: int) -> None:
        """``Engine.generate``: prompts with their own options, each result generate()'s alone field by field
        (outcome, then kv_bytes, thoughts, adaptive prefill's per-position steps, backend); a prompt the engine
        can never fit (its pool, ``kv_pool.never_fits``) is left out, any other refusal is a mismatch."""
        rng = random.Random(seed)
        settings = draw_engine_settings(rng)
        drawn = [
            (draw_prompt(rng, self.model), draw_options(rng, self.model, seed=seed + i))
            for i in range(rng.randrange(2, 9))
        ]
        alone = [(p, kw, self.alone(p, kw)) for p, kw in drawn]
        engine = self.engine(settings)
        if engine is None:
            return
        cases = []
        for p, kw, a in alone:
            if a is None:
                continue
            try:
                engine.request(p, GenerateOptions.build(None, **kw))
            except LatentRTError as exc:
                if "this server" not in str(exc):
                    self.mismatch("offline", seed, f"refused what generate() takes: {exc}", dict(kw, engine=settings))
                    return
                self.counts["refused by the engine"] += 1
                continue
            cases.append((p, kw, a))
        if not cases:
            return
        results = engine.generate([p for p, _, _ in cases], [GenerateOptions.build(None, **kw) for _, kw, _ in cases])
        for result, (_, kw, a) in zip(results, cases):
            kw = dict(kw, engine=settings)
            self.compare("offline", seed, outcome(result), outcome(a), kw)
            extra = ("kv_bytes", "num_thoughts", "prefill_steps", "backend")
            got, want = ([getattr(r, name) for name in extra] for r in (result, a))
            if outcome(result) == outcome(a) and got != want:
                differ = [name for name, g, w in zip(extra, got, want) if g != w]
                self.mismatch(
                    "offline",
                    seed,
                    f"{', '.join(differ)} differ from generate() alone",
                    kw,
                    f"\n  got  {got}\n  want {want}",
                )
            elif outcome(result) == outcome(a) and not same_logprobs(result.logprobs, a.logprobs, self.tolerance):
                got, want = result.logprobs, a.logprobs
                self.mismatch(
                    "offline", seed, "logprobs differ from generate() alone", kw, f"\n  got  {got}\n  want {want}"
                )
        self.check_released("offline", engine, seed, settings)

    def judge(self, a: Arrival, seed: int, settings: dict, served: DrawLog) -> None:
        """A served request against generate() alone: a finished one its whole outcome, a cancelled one the
        tokens and steps it produced before (generate()'s first ones); one that failed or never finished is a
        mismatch, one the engine refused (``request`` None) is skipped."""
        kw = dict(a.kw, engine=settings, arrive=a.arrive, cancel=a.cancel)
        request, draws = a.request, draws_of(served, a.draws, len(a.alone.tokens))
        if request is None:
            return
        if request.error is not None or not request.finished:
            what = f"a request failed: {request.error}" if request.error else "a request never finished"
            self.mismatch("serve", seed, what, kw)
        elif request.finish_reason == "cancelled":  # what it produced before: generate()'s first tokens
            self.counts["serve cancelled"] += 1
            n = len(request.tokens)
            got, want = (request.tokens, request.steps), (a.alone.tokens[:n], a.alone.steps[:n])
            self.compare("serve", seed, got, want, kw, draws_at=draws)
        else:
            self.compare("serve", seed, outcome(request), outcome(a.alone), kw, draws_at=draws)

    def _drive(self, engine: Engine, requests: list[Arrival], seed: int, settings: dict) -> bool:
        """Step ``engine`` until every request has arrived (submitted at its step), been cancelled where it
        asks to be, and the engine is idle; False if it does not drain (a mismatch then)."""
        pending = sorted(requests, key=lambda a: a.arrive)
        to_cancel = sorted((a for a in requests if a.cancel is not None), key=lambda a: a.cancel)
        step = 0
        while pending or engine.busy:
            while pending and pending[0].arrive <= step:
                a = pending.pop(0)
                try:
                    a.request = engine.submit(a.prompt, **a.kw)
                except LatentRTError as exc:
                    if "this server" in str(exc):  # its capacity (kv_pool.never_fits): K/V slots, the context
                        self.counts["refused by the engine"] += 1
                    else:
                        kw = dict(a.kw, engine=settings)
                        self.mismatch("serve", seed, f"refused what generate() takes: {exc}", kw)
            while to_cancel and to_cancel[0].cancel <= step:
                a = to_cancel.pop(0)
                if a.request is not None and not a.request.finished:
                    engine.cancel(a.request)
            if engine.busy:
                engine.step()
            elif pending:  # idle until the next arrival
                step = pending[0].arrive
                continue
            step += 1
            if step > DRAIN_STEPS:
                self.mismatch("serve", seed, f"the engine still busy after {DRAIN_STEPS} steps", settings)
                return False
        return True

    def check_released(self, check: str, engine: Engine, seed: int, settings: dict) -> None:
        """Idle, the engine holds nothing: every row and slot row of its pool is free, no request resident or
        queued, and the K/V storage finite (a cancelled or finished request's entries may stay, zeroed where
        unchecked: a masked NaN would poison the next request's attention)."""
        pool = engine.program.pool
        rows = sorted(set(range(pool.rows)) - set(pool.free_rows))
        slot_rows = sorted(set(range(pool.slot_rows)) - set(pool.free_slot_rows))
        if rows or slot_rows or pool.held or engine.resident or engine.queue:
            what = f"idle, the engine has not given back pool rows {rows} and slot rows {slot_rows}"
            busy = f"{len(engine.resident)} resident, {len(engine.queue)} queued"
            self.mismatch(check, seed, f"{what} ({busy}; held: {sorted(pool.held)})", settings)
        buffers = (pool.plain_k, pool.plain_v, pool.core_k, pool.core_v)
        if not all(bool(torch.isfinite(b).all()) for b in buffers):
            self.mismatch(check, seed, "idle, the K/V pool holds a non-finite value", settings)

    def speculative(self, seed: int) -> None:
        """Greedy, fixed depth, ``init_scale=0``, full K/V: speculative decoding's tokens are sequential
        decoding's, whatever the lookahead and draft depth (README, Samplers)."""
        if "speculative" not in family_for(self.model).decoder.SAMPLERS:
            self.counts["speculative skipped (the family has no such sampler)"] += 1
            return
        rng = random.Random(seed)
        prompt = draw_prompt(rng, self.model)
        kw = dict(max_new_tokens=rng.randrange(1, 16), num_steps=rng.randrange(1, 14), init_scale=0.0)
        kw.update(kv_sharing="full", default_stops=rng.random() < 0.7)
        drafts = dict(lookahead=rng.randrange(1, 9), draft_steps=rng.randrange(1, 33))
        sequential = self.alone(prompt, dict(kw, return_logits=True))
        drafted = self.alone(prompt, dict(kw, decoding="speculative", decoding_options=drafts, return_logits=True))
        if sequential is not None and drafted is not None:
            rows = lambda j: (drafted.logits[j], sequential.logits[j])  # noqa: E731
            self.compare("speculative", seed, outcome(drafted), outcome(sequential), dict(kw, **drafts), rows)

    def hooks(self, seed: int) -> None:
        """A hook that returns nothing changes nothing (on a backend with a token runner, hooks take the iteration
        by iteration path), and it sees each row's iterations and thoughts as the result counts them (README,
        Python API: ``hooks``)."""
        rng = random.Random(seed)
        prompts = [draw_prompt(rng, self.model) for _ in range(rng.randrange(1, 4))]
        kw = dict(draw_options(rng, self.model, seed=seed), return_logits=True)
        plain = self.alone(prompts, kw)
        if plain is None:
            return
        seen: Counter = Counter()

        def count(event) -> None:
            for i in event.active.nonzero().flatten().tolist():
                seen[event.kind, i, event.token_index if event.kind == "recurrence" else 0] += 1

        hooked = latentrt.generate(self.model, prompts, **kw, hooks=[count])
        for i in range(len(prompts)):
            rows = lambda j, i=i: (hooked.logits[i][j], plain.logits[i][j])  # noqa: E731
            self.compare("hooks", seed, outcome(hooked, i), outcome(plain, i), kw, rows)
            steps = list(hooked.steps[i])
            if hooked.prefill_steps is not None:  # the prompt's positions one by one: token 0's events are theirs
                steps[0] = sum(hooked.prefill_steps[i])
            iterations = [seen["recurrence", i, j] for j in range(len(steps))]
            thoughts = hooked.num_thoughts[i] if isinstance(hooked.num_thoughts, list) else hooked.num_thoughts
            if iterations != steps or seen["thought", i, 0] != thoughts:
                what = f"sequence {i}'s hook saw {iterations} iterations and {seen['thought', i, 0]} thoughts"
                self.mismatch("hooks", seed, what, kw, f"; its result counts {steps} and {thoughts}")

    def score(self, seed: int) -> None:
        """The logits generate() chose each token from equal ``model.logits`` over the prompt and the tokens before
        (teacher forcing, one pass): greedy, at fixed depth, ``init_scale=0`` and full K/V for recurrent depth (the
        parallel pass's rule); a Coconut prompt's thoughts given by its markers."""
        rng = random.Random(seed)
        prompt = draw_prompt(rng, self.model)
        kw: dict = dict(max_new_tokens=rng.randrange(1, 12), default_stops=rng.random() < 0.7, return_logits=True)
        scoring: dict = {}
        if "num_steps" in family_for(self.model).decoder.OPTIONS:
            scoring = dict(num_steps=rng.randrange(1, 14), init_scale=0.0)
            kw.update(scoring, kv_sharing="full")
        markers = getattr(self.model, "marker_ids", ())
        if len(markers) == 3 and None not in markers and markers[0] not in prompt:
            start, latent, end = markers
            prompt = prompt + [start] + [latent] * rng.randrange(0, 5) + [end]
        result = self.alone(prompt, kw)
        if result is None:
            return
        self.model.backend = self._backend(self.backend)
        forced = self.model.logits([prompt + result.tokens[:-1]], **scoring)[0, len(prompt) - 1 :]
        self.counts["score compared"] += 1
        err = logits_error(forced, result.logits)
        if err > self.tolerance:
            self.mismatch("score", seed, f"generate()'s logits differ from one pass over its tokens by {err:.2g}", kw)

    def backends(self, seed: int) -> None:
        if self.backend == "torch":
            self.counts["backend skipped (torch against torch)"] += 1
            return
        rng = random.Random(seed)
        prompt, kw = draw_prompt(rng, self.model), draw_options(rng, self.model, seed=seed)
        kw["return_logits"] = True  # where they differ, how far apart the two backends' logits were there
        got, want = self.alone(prompt, kw), self.alone(prompt, kw, backend="torch")
        if got is not None and want is not None:
            rows = lambda j: (got.logits[j], want.logits[j])  # noqa: E731
            self.compare("backend", seed, outcome(got), outcome(want), kw, rows)


@contextlib.contextmanager
def loopback(app):
    """``app`` served by a real uvicorn on a free loopback port, in a thread; yields its base URL (the soak's
    server, and tests/test_server.py's)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def same_logprobs(got: list | None, want: list | None, tolerance: float) -> bool:
    """Two runs' ``logprobs`` of the same tokens agree: the same tokens, log-probs within ``tolerance`` (the runs'
    logits may differ in their last bits; absolute, in nats, at least 1e-4) and the k best's values too (their
    ids may swap on a tie)."""
    if got is None or want is None:
        return got is want
    tol = max(tolerance, 1e-4)
    close = lambda a, b: abs(a - b) <= tol * max(1.0, abs(b))  # noqa: E731
    return len(got) == len(want) and all(
        g.token == w.token
        and close(g.logprob, w.logprob)
        and len(g.top) == len(w.top)
        and all(close(gv, wv) for (_, gv), (_, wv) in zip(g.top, w.top))
        for g, w in zip(got, want)
    )


def http_body(rng: random.Random, model, chat: bool) -> dict:
    """A request body: OpenAI's fields and latentrt's (the options ``draw_options`` draws, by their names)."""
    kw = draw_options(rng, model, seed=rng.randrange(1000))
    kw.pop("logprobs", None)  # (the body's own logprobs field, drawn below)
    renamed = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop": "stop_token_ids"}
    body = {renamed.get(k, k): v for k, v in kw.items()}
    body["n"] = rng.choice([1, 1, 2, 3])
    if "logit_bias" in kw:
        body["logit_bias"] = {str(k): v for k, v in kw["logit_bias"].items()}
    words = [model.tokenizer.decode([rng.randrange(model.config.vocab_size)]) for _ in range(rng.randrange(1, 12))]
    text = " ".join(w for w in words if w.strip()) or "a"
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(words) or "."]
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randrange(0, 3))
    else:
        body["prompt"] = text
        if rng.random() < 0.3:
            body["logprobs"] = rng.randrange(0, 3)
    return body


def http_answers(client, path: str, body: dict, chat: bool):
    """(status, texts by choice, finish reasons by choice, usage) of a plain and of a streamed request."""
    return http_plain(client, path, body, chat), http_streamed(client, path, body, chat)


def http_plain(client, path: str, body: dict, chat: bool) -> tuple:
    """(status, texts by choice, finish reasons by choice, usage) of a plain request; (status, body) if refused."""
    plain = client.post(path, json=body)
    if plain.status_code != 200:
        return plain.status_code, plain.json() if plain.headers.get(
            "content-type"
        ) == "application/json" else plain.text
    choices = plain.json()["choices"]
    texts = {c["index"]: c["message"]["content"] if chat else c["text"] for c in choices}
    return 200, texts, {c["index"]: c["finish_reason"] for c in choices}, plain.json()["usage"]


def http_streamed(client, path: str, body: dict, chat: bool, keep: int | None = None) -> tuple | None:
    """``http_plain`` of the request streamed (the events' pieces joined); ``keep``: the client goes away after
    that many events instead (None returned)."""
    texts, finish, usage = {}, {}, None
    with client.stream("POST", path, json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json() if r.headers.get("content-type") == "application/json" else r.text
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if keep is not None and keep == 0:
                return None  # (leaving the block closes the connection mid-stream)
            keep = None if keep is None else keep - 1
            event = json.loads(line[len("data: ") :])
            if "error" in event:  # failed mid-stream: as the plain answer's status would say
                return 400 if event["error"]["type"] == "invalid_request_error" else 500, event
            usage = event.get("usage") or usage
            for c in event.get("choices", []):
                piece = c["delta"].get("content") if chat else c.get("text")
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
    return 200, texts, finish, usage


def same_answer(got: tuple, want: tuple) -> bool:
    """Two answers of one request agree: the same answer, or the same refusal (status and message, never a 5xx)."""
    return got == want if want[0] == 200 else want[0] < 500 and got[:2] == want[:2]


@warnings_silenced
def main(argv: list[str] | None = None) -> int:
    p = case_parser("python -m tools.soak", __doc__, CHECKS)
    p.add_argument("--backend", default="auto", choices=CHOICES)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="the weights' dtype (load's default: bf16 on CUDA, fp32 on the CPU)")
    args = p.parse_args(argv)
    checks = parsed_checks(p, args, CHECKS)
    try:
        model = latentrt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    except LatentRTError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    soak = Soak(model, model.backend.name)
    runs = dict(batch=soak.batch, serve=soak.serve, offline=soak.offline, backend=soak.backends)
    runs.update(speculative=soak.speculative)
    runs.update(hooks=soak.hooks, score=soak.score)
    stack = contextlib.ExitStack()
    if "http" in checks or "burst" in checks:
        import httpx

        from latentrt.serve.app import create_app

        server = Engine(model, max_batch=4)
        url = stack.enter_context(loopback(create_app(server, "soak")))
        has_template = find_chat_template(model.folder) is not None
        client = stack.enter_context(httpx.Client(base_url=url, timeout=120))

        def http(seed: int) -> None:
            rng = random.Random(seed)
            chat = rng.random() < 0.5 and has_template
            body = http_body(rng, model, chat)
            plain, streamed = http_answers(client, "/v1/chat/completions" if chat else "/v1/completions", body, chat)
            soak.counts["http compared"] += 1
            if not same_answer(streamed, plain):
                soak.mismatch(
                    "http", seed, "the streamed answer differs", body, f"\n  plain    {plain}\n  streamed {streamed}"
                )

        runs["http"] = http

        def burst(seed: int) -> None:
            """2-6 requests at once over HTTP, each plain, streamed, or streamed and dropped after 0-3 events (the
            client goes away): each answer equals its answer alone; then the server goes idle holding nothing (a
            dropped request cancelled, its row freed)."""
            rng = random.Random(seed)
            asks = []  # (path, body, chat, how, events kept before a drop)
            for _ in range(rng.randrange(2, 7)):
                chat = rng.random() < 0.5 and has_template
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body, how = http_body(rng, model, chat), rng.choice(["plain", "stream", "drop"])
                asks.append((path, body, chat, how, rng.randrange(0, 4) if how == "drop" else None))
            alone = [http_plain(client, path, body, chat) for path, body, chat, *_ in asks]

            def ask(path, body, chat, how, keep):
                with httpx.Client(base_url=url, timeout=120) as own:  # (a connection of its own, at once)
                    if how == "plain":
                        return http_plain(own, path, body, chat)
                    return http_streamed(own, path, body, chat, keep)

            with ThreadPoolExecutor(len(asks)) as pool:
                answers = list(pool.map(lambda a: ask(*a), asks))
            for (_, body, _, how, _), got, want in zip(asks, answers, alone):
                if how == "drop":
                    soak.counts["burst dropped"] += 1
                    continue
                soak.counts["burst compared"] += 1
                if got is None or not same_answer(got, want):
                    detail = f"\n  at once {got}\n  alone   {want}"
                    soak.mismatch("burst", seed, f"a request {how} among others differs from alone", body, detail)
            deadline = time.time() + 60
            while time.time() < deadline:  # (idle read under the engine's lock: admission takes a request off the
                with server.lock:  # queue, gives it a row and makes it resident under it, so it is never half done)
                    if not server.busy:
                        break
                time.sleep(0.01)
            soak.check_released("burst", server, seed, {"server": "max_batch 4"})

        runs["burst"] = burst
    start, case = time.time(), 0
    with stack:
        while (case < args.cases) if args.cases is not None else (time.time() - start < args.seconds):
            seed, check = args.seed + case, checks[case % len(checks)]
            try:
                runs[check](seed)
            except Exception as exc:  # noqa: BLE001 (a crash is a finding: its seed, then the next case)
                soak.mismatch(check, seed, f"raised {type(exc).__name__}: {exc}", {}, "\n" + traceback.format_exc())
            case += 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(soak.counts.items()))
    print(f"soak: {case} cases in {time.time() - start:.0f} s on {args.model} ({soak.backend}): {counts}")
    if soak.mismatches:
        print(
            f"{len(soak.mismatches)} mismatches; repeat one with: python -m tools.soak --model {args.model} "
            f"--backend {soak.backend} --checks CHECK --seed SEED --cases 1 (the case's check first)"
        )
        return 1
    print("no mismatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
