"""generate(): the generic token loop.

Validate the options, build the batch, prefill, then per generated position: sample, stop, stream, ask
the family's decoder (latentrt/decode/) for the next token's logits; finally assemble the result. The
decoder does everything model-specific; this loop reads the device once per generated position.
Sequences that stop are frozen by masks while the others go on; a sequence's result in a batch equals
its result alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from .distributions import Distributions
from .errors import InputError, NonFiniteStateError, PromptError, check_unicode
from .families import Family, check_applicable, family_for
from .hooks import HookList
from .logprobs import TokenLogprob, logprob_rows, read_logprob_row
from .memory import check_fits
from .models.base import LatentModel
from .options import GenerateOptions
from .penalties import NAMES as PENALTIES
from .penalties import LogitPenalties, check_bias_vocabulary
from .penalties import active as penalties_active
from .prompts import Prompt, make_batch, prompt_texts
from .sampling import SequenceRNG, draw, in_vocabulary, sample
from .sequence_text import SequenceText
from .stop_strings import StopStrings
from .token_constraints import NAMES as CONSTRAINTS
from .token_constraints import TokenConstraints
from .token_constraints import active as constraints_active


@dataclass
class GenerationResult:
    """What generate() returns. For a single prompt (str, list of ids, 1-D tensor) ``tokens``,
    ``steps``, ``text`` and ``num_thoughts`` hold one sequence; for a batch they are lists with one entry per
    prompt."""

    tokens: list = field(default_factory=list)  # new token ids
    steps: list = field(default_factory=list)  # recurrence iterations used per new token (0 for Coconut)
    text: str | list | None = None  # decoded new tokens (None without a tokenizer)
    kv_bytes: int = 0  # K/V storage held by the cache at the end
    finish_reasons: list = field(default_factory=list)  # "stop" or "length" per sequence
    num_thoughts: int | list = 0  # Coconut: continuous thoughts run for the prompt (a batch: per prompt)
    backend: str = "torch"
    logits: list | None = None  # with return_logits=True: fp32 next-token logits [n, V] per sequence
    prefill_steps: list | None = None  # with adaptive_prefill: iterations per prompt position, per sequence
    decoding: dict | None = None  # a multi-token sampler's statistics (decode/speculative.py, wavefront.py)
    logprobs: list | None = None  # with logprobs=k: a TokenLogprob per new token (latentrt/logprobs.py)


@dataclass
class StreamEvent:
    """One generated position: the new token of every (still running) sequence."""

    index: int  # 0 for the first new token
    tokens: int | list  # int for a single prompt; list with None for finished sequences otherwise
    steps: int | list
    text: str | list | None  # decoded text of this token
    # with logprobs=k: this token's TokenLogprob (latentrt/logprobs.py; a list, None for finished sequences)
    logprobs: object = None


class GenerationStream:
    """Iterator of StreamEvents; ``.result`` holds the GenerationResult once exhausted."""

    def __init__(self, events: Iterator) -> None:
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while True:
                yield next(self._events)
        except StopIteration as stop:
            if self.result is None:  # a second iteration yields nothing and keeps the result
                self.result = stop.value


def generate(
    model: LatentModel,
    prompt: Prompt,
    options: GenerateOptions | None = None,
    *,
    stream: bool = False,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> GenerationResult | GenerationStream:
    """Generate from a loaded model. Options (README, *Python API*) come as keyword arguments, as a
    ``GenerateOptions``, or both (keywords replace its fields).

    Returns a GenerationResult, or with ``stream=True`` a GenerationStream yielding one StreamEvent per
    generated position (its ``.result`` is set at the end). All arguments are checked before any work.
    """
    opts = GenerateOptions.build(options, getattr(model, "generation_defaults", None), **kwargs)  # None: refused below
    run = Generation(model, prompt, opts, attention_mask)
    if stream:
        return GenerationStream(run.events(stream=True))
    events = run.events(stream=False)
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


def check_options_for(model: LatentModel, options: GenerateOptions) -> Family:
    """The options checked for the model (generic, applicable to its family, the family's own); its family."""
    family = family_for(model)
    options.validate()
    check_applicable(family, options)
    family.decoder.check_options(model, options)
    return family


class Generation:
    """One generate() call: validated options, the family's decoder, and the token loop."""

    def __init__(self, model, prompt, options: GenerateOptions, attention_mask: Tensor | None = None) -> None:
        # the options against the model first, then the prompt: an error after that point is the prompt's
        # (PromptError), so the server can name which prompt of a request is bad
        family = check_options_for(model, options)
        self.model, self.options = model, options
        hooks = HookList(options.hooks)
        self.decoder = family.decoder(model, options, hooks)
        self.hooks = hooks
        self.stop_ids = self._stop_ids(options.stop)
        self.sampler = self.decoder.sampler
        if self.sampler is not None and (
            penalties_active(options) or constraints_active(options) or options.min_new_tokens
        ):
            given = [n for n in (*PENALTIES, *CONSTRAINTS, "min_new_tokens") if options.is_set(n)]
            verb = "applies" if len(given) == 1 else "apply"
            raise InputError(f"{', '.join(given)} {verb} with decoding='sequential' only, not {options.decoding!r}")
        check_bias_vocabulary(options.logit_bias, model.config.vocab_size)
        make_constraints = TokenConstraints.build(
            options, model.tokenizer, model.config.vocab_size, self.stop_ids.tolist()
        )
        try:
            texts = prompt_texts(prompt)
            if texts is not None and model.tokenizer is not None:
                texts = self.decoder.prepare_text(texts)
                prompt = texts[0] if isinstance(prompt, str) else texts
            batch = make_batch(
                prompt, model.tokenizer, model.config, model.device, attention_mask, strict=options.strict
            )
            self.batch = self.decoder.prepare_prompt(batch)
        except InputError as exc:
            raise PromptError(str(exc)) from None
        B = self.batch.ids.shape[0]
        if self.sampler is not None and B != 1:
            raise InputError(f"decoding={options.decoding!r} takes one prompt (batch 1), got {B}")
        self.rng = None if options.seed is None else SequenceRNG(options.seed, B, model.device)
        self.decoder.rng = self.rng
        self.penalties = LogitPenalties.build(options, self.batch.ids, self.batch.mask, model.config.vocab_size)
        self.constraints = None if make_constraints is None else make_constraints(self.batch.ids, self.batch.mask)
        length = self.batch.ids.shape[1]
        need = length + options.max_new_tokens
        if need > model.config.block_size:
            raise PromptError(
                f"prompt ({length} token{'s' * (length != 1)}) + max_new_tokens ({options.max_new_tokens}) = "
                f"{need} exceeds the model's context ({model.config.context()})"
            )
        per_position = model.cache_layout().bytes_per_position(self.decoder.kv_slots, model.dtype.itemsize)
        what = f"the KV cache ({B} sequences x {need} positions, {self.decoder.kv_slots} slot(s) per looped layer)"
        many = "give fewer prompts a call, or latentrt.serve.Engine(model).generate(prompts): max_batch at once"
        hint = "" if B == 1 else many
        check_fits(per_position * B * need, model.device, what, PromptError, hint)  # (+ a sampler's few extra)
        extra = 0 if self.sampler is None else self.sampler.extra_positions
        self.cache_len = min(need + extra, model.config.block_size)  # a sampler's drafts / window beyond
        model.reserve_positions(self.cache_len)
        tok = model.tokenizer  # each sequence's text (latentrt/sequence_text.py; the server's requests read it too)
        text = (self.stop_strings, options.skip_special_tokens, options.include_stop_str_in_output)
        self.texts = None if tok is None else [SequenceText(tok, *text) for _ in range(B)]

    def _stop_ids(self, stop) -> Tensor:
        """The stop token ids (checked on the device; the token is kept, as HF keeps eos); sets
        ``stop_strings``, the ``stop`` strings (matched on the decoded text, which ends before them, as
        vLLM's and OpenAI's ``stop``: latentrt/stop_strings.py)."""
        ids = self.decoder.default_stop_ids() if self.options.default_stops else set()
        items = [] if stop is None else (list(stop) if isinstance(stop, (list, tuple, set)) else [stop])
        strings = []
        for s in items:
            if isinstance(s, str):
                tok = self.model.tokenizer
                if tok is None:
                    raise InputError(f"stop string {s!r} needs a tokenizer (this model has none); pass token ids")
                if not s:
                    raise InputError("stop strings must not be empty")
                check_unicode(f"stop string {s!r}", s)  # (no decoded text holds a lone surrogate: it never stops)
                strings.append(s)
            elif not isinstance(s, int) or isinstance(s, bool):
                raise InputError(f"stop entries must be token ids or strings, got {s!r}")
            elif not 0 <= s < self.model.config.vocab_size:
                raise InputError(
                    f"stop token id {s} is not in the vocabulary (ids 0 to {self.model.config.vocab_size - 1})"
                )
            else:
                ids.add(s)
        self.stop_strings = StopStrings(strings)
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.model.device)

    # ---------------------------------------------------------------- the loop
    @torch.no_grad()
    def events(self, stream: bool):
        """Yields a StreamEvent per generated position when streaming (None otherwise: decoding the text
        so far every token is only worth it for a stream); returns the GenerationResult."""
        opts, decoder = self.options, self.decoder
        B, S = self.batch.ids.shape
        cache = decoder.new_cache(B, self.cache_len)
        alive = torch.ones(B, dtype=torch.bool, device=self.model.device)
        alive_l = [True] * B
        tokens: list[list[int]] = [[] for _ in range(B)]
        steps: list[list[int]] = [[] for _ in range(B)]
        kept_logits: list[list[Tensor]] = [[] for _ in range(B)]
        scored: list[tuple[Tensor, list[int], list[bool]]] = []  # logprobs=k: (rows [B, 1 + 2k], tokens, kept)
        reasons = ["length"] * B
        live = self.texts is not None and (stream or bool(self.stop_strings))  # decoded as it grows, when read
        proposals = None if self.sampler is None else self.sampler.tokens(self.batch, self._draw)
        out = decoder.prefill(self.batch) if proposals is None else None
        stop_set = set(self.stop_ids.tolist())
        for i in range(opts.max_new_tokens):
            if proposals is None:
                tok = self._pick(self._next_logits(out.logits, i, alive_l), alive_l)
                self._record(tok, alive)
                stopped = torch.isin(tok, self.stop_ids) & alive & decoder.stops_at(i)
                # the one device->host read per token
                tok_l, used_l, stop_l, flags_l = torch.stack(
                    [tok, out.iterations, stopped.long(), self.flags(out.nonfinite, alive)]
                ).tolist()
                logits_l = out.logits
            else:  # a sampler commits the tokens (one prompt): host values already
                p = next(proposals, None)
                if p is None:  # the sampler ended early (its own step limit)
                    break
                tok_l, used_l, flags_l, logits_l = [p.token], [p.steps], [p.nonfinite], [p.logits]
                stop_l = [int(p.token in stop_set and decoder.stops_at(i))]
                stopped = torch.tensor(stop_l, dtype=torch.bool, device=alive.device)
            self._raise_if_nonfinite(flags_l, i)
            decoder.record(used_l, alive_l)
            kept = [a and (decoder.keep_stop_token or not st) for a, st in zip(alive_l, stop_l)]
            if opts.logprobs is not None:  # (read at the end, all at once; a stream reads each token's with it)
                rows = logits_l if proposals is None else torch.stack(logits_l)
                chosen = tok if proposals is None else torch.tensor(tok_l, device=rows.device)
                rows = logprob_rows(rows, chosen, opts.logprobs, self.model.config.vocab_size)
                scored.append((rows.tolist() if stream else rows, tok_l, kept))
            for b in range(B):
                if kept[b]:
                    tokens[b].append(tok_l[b])
                    steps[b].append(used_l[b])
                    if opts.return_logits:
                        kept_logits[b].append(logits_l[b].cpu())
                    if live:  # stop strings: on the text (host), after the token joined it
                        self.texts[b].add(tok_l[b], may_stop=i + 1 >= opts.min_new_tokens)
                        stop_l[b] = int(stop_l[b] or self.texts[b].cut is not None)
            if self.stop_strings and any(kept):
                stopped = torch.tensor(stop_l, dtype=torch.bool, device=alive.device)
            ending = [a and (st or i + 1 == opts.max_new_tokens) for a, st in zip(alive_l, stop_l)]
            yield (
                self._event(i, tok_l, used_l, kept, tokens, ending, scored[-1][0] if scored else None)
                if stream
                else None
            )
            for b in range(B):
                if stop_l[b]:
                    reasons[b] = "stop"
            alive = alive & ~stopped
            alive_l = [a and not st for a, st in zip(alive_l, stop_l)]
            if i + 1 == opts.max_new_tokens or not any(alive_l):
                break
            self.hooks.token_index = i + 1
            if proposals is None:
                out = decoder.next_token(tok, alive, alive_l)
        if proposals is not None:
            proposals.close()
        logits_out = (
            [torch.stack(k) if k else torch.zeros(0, dtype=torch.float32, device="cpu") for k in kept_logits]
            if opts.return_logits
            else None
        )
        return self._result(tokens, steps, reasons, cache.used_bytes(), logits_out, self._logprobs(scored, B))

    def _logprobs(self, scored: list, batch: int) -> list | None:
        """Per sequence, a TokenLogprob per kept token (``logprobs=k``), from the rows kept on the device (a
        stream's: read already, one token's at a time)."""
        if self.options.logprobs is None:
            return None
        if scored and isinstance(scored[0][0], list):
            host = [rows for rows, _, _ in scored]
        else:
            host = torch.stack([rows for rows, _, _ in scored]).tolist() if scored else []
        return [
            [
                TokenLogprob(tok_l[b], *read_logprob_row(host[i][b], self.options.logprobs))
                for i, (_, tok_l, kept) in enumerate(scored)
                if kept[b]
            ]
            for b in range(batch)
        ]

    def _draw(self, logits: Tensor) -> Tensor:
        """Tokens [n] from logits [n, V] of one sequence with the call's sampling settings (a sampler's
        draws, in order, from the sequence's own generator with a seed)."""
        logits = self._in_vocabulary(logits)
        if self.options.temperature == 0:
            return logits.argmax(-1)
        return torch.cat([self._pick(logits[j : j + 1]) for j in range(len(logits))])

    def _pick(self, logits: Tensor, rows: list[bool] | None = None) -> Tensor:
        """Tokens [B] from logits [B, V] with the call's sampling settings (``rows``: the running sequences)."""
        o = self.options
        args = (o.temperature, o.top_k, o.top_p, self.rng, rows, o.min_p, o.published_top_p)
        if not o.temperature:
            return sample(logits, *args)
        with self.distributions.lock:  # (the graphs are the model's: another thread's call would overwrite them)
            return sample(logits, *args, distributions=self.distributions)

    @cached_property
    def distributions(self) -> Distributions:
        """Where sampled tokens' distributions are computed: the model's captured graphs (latentrt/distributions.py;
        on the same launches as sampling_probs' eager ops, so the same bits)."""
        return Distributions.of_model(self.model)

    @property
    def sampling_settings(self) -> tuple:
        """What a sampled token's distribution depends on besides its logits (``sampling_probs``' settings)."""
        o = self.options
        return o.temperature, o.top_k, o.top_p, o.min_p, o.published_top_p

    def draw_from(self, probs: Tensor) -> Tensor:
        """A sequence alone's token [1] from its distribution [1, V] (``sampling_probs``) and its own generator
        (torch's without a seed): ``_pick``'s draw for one sequence."""
        return draw(probs, None if self.rng is None else self.rng[0])

    def _next_logits(self, logits: Tensor, index: int, rows: list[bool] | None = None) -> Tensor:
        """The logits new token ``index`` (0: the first) is chosen from: the vocabulary's, with the call's
        penalties and bias; before ``min_new_tokens`` no stop token (HF's ``min_new_tokens``, vLLM's
        ``min_tokens``); then the allowed tokens, bad words, guided choice and logits processors (of the running
        ``rows``; None: all)."""
        logits = self._in_vocabulary(logits)
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        if self._holds_stops(index):
            logits = logits.index_fill(-1, self.stop_ids, float("-inf"))
        if self.constraints is not None:
            logits = self.constraints.apply(logits, rows)
        return logits

    def _record(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """The sampled ``tokens`` join what the penalties and constraints know of their sequences (``rows``:
        the running ones; None: all)."""
        if self.penalties is not None:
            self.penalties.record(tokens, rows)
        if self.constraints is not None:
            self.constraints.record(tokens)

    def flags(self, nonfinite: Tensor, running: Tensor | None = None) -> Tensor:
        """The flags read with the sampled tokens: the decoder's non-finite flags and the constraints' rows that
        had no token to choose, of the ``running`` ones (None: all; ``_raise_if_nonfinite`` reads them)."""
        extra = None if self.constraints is None else self.constraints.flags(running)
        return nonfinite if extra is None else nonfinite.long() | extra

    def _holds_stops(self, index: int) -> bool:
        """Whether new token ``index`` comes before ``min_new_tokens`` (and there are stop ids to hold back)."""
        return index < self.options.min_new_tokens and len(self.stop_ids) > 0

    def _adjusts_logits(self, index: int) -> bool:
        """Whether ``_next_logits`` changes the logits of new token ``index`` (else the argmax of the
        vocabulary's logits is the greedy token)."""
        return self.penalties is not None or self.constraints is not None or self._holds_stops(index)

    def _in_vocabulary(self, logits: Tensor) -> Tensor:
        """Padding rows of the head (ids >= vocab_size) are never sampled."""
        return in_vocabulary(logits, self.model.config.vocab_size)

    def _raise_if_nonfinite(self, flags: list[int], token: int) -> None:
        """Flags computed on the device (1: latent state, 2: logits non-finite; 4: no token left to choose) -> a
        clear error."""
        if not any(flags):
            return
        if not any(f & 3 for f in flags):
            seqs = [i for i, f in enumerate(flags) if f]
            raise InputError(
                f"no token left to choose for new token {token} in sequence(s) {seqs}: allowed_token_ids, bad_words "
                "and the logits processors exclude every token (or a processor returned NaN or +inf)"
                + (" with min_new_tokens holding back the stop tokens" if self._holds_stops(token) else "")
            )
        flags = [f & 3 for f in flags]
        where = f" at new token {token}" if token else " in the prompt"
        what = "latent state" if any(f & 1 for f in flags) else "logits"
        seqs = [i for i, f in enumerate(flags) if f]
        raise NonFiniteStateError(
            f"non-finite {what}{where} in sequence(s) {seqs}; check the weights, the init_state and any hooks"
        )

    # ---------------------------------------------------------------- output
    def _decode(self, ids: list[int]) -> str | None:
        tok = self.model.tokenizer
        return None if tok is None else tok.decode(ids, skip_special_tokens=self.options.skip_special_tokens)

    def _event(
        self, i: int, tok: list[int], used: list[int], kept: list[bool], tokens, ending, rows=None
    ) -> StreamEvent:
        """The new token of each sequence, with the text it adds (latentrt/sequence_text.py): a character
        that spans tokens comes out whole, and an end that may begin a stop string is held back until the
        next tokens decide; a sequence that ends shows all it held back, so the pieces add up to its text
        (with a stop token that is not kept, as a text without a token); with ``logprobs=k`` (``rows``: this
        position's rows, read), each kept token's TokenLogprob, the one the result will hold."""
        toks = [t if a else None for t, a in zip(tok, kept)]
        st = [u if a else None for u, a in zip(used, kept)]
        k = self.options.logprobs
        lps = [
            None if rows is None or t is None else TokenLogprob(t, *read_logprob_row(rows[b], k))
            for b, t in enumerate(toks)
        ]
        texts = []
        for b, t in enumerate(toks):
            if self.texts is None or (t is None and not ending[b]):
                texts.append(None)
                continue
            piece = self.texts[b].end(tokens[b]) if ending[b] else self.texts[b].show()
            texts.append(piece if t is not None or piece else None)
        if self.batch.single:
            return StreamEvent(i, toks[0], st[0], texts[0], lps[0])
        return StreamEvent(i, toks, st, texts, lps if rows is not None else None)

    def _result(self, tokens, steps, reasons, kv_bytes: int, logits, logprobs=None) -> GenerationResult:
        texts = [None] * len(tokens) if self.texts is None else [x.finish(t) for x, t in zip(self.texts, tokens)]
        prefill = self.decoder.prefill_steps
        if prefill is not None:  # per sequence, its real positions only
            prefill = [[n for n, v in zip(row, m) if v] for row, m in zip(prefill.tolist(), self.batch.mask.tolist())]
        thoughts = self.decoder.thoughts_per_sequence(self.batch)
        if self.batch.single:
            tokens, steps, texts, thoughts = tokens[0], steps[0], texts[0], thoughts[0]
            logits = logits[0] if logits is not None else None
            logprobs = logprobs[0] if logprobs is not None else None
            prefill = prefill[0] if prefill is not None else None
        return GenerationResult(
            tokens=tokens,
            steps=steps,
            text=texts,
            kv_bytes=kv_bytes,
            finish_reasons=reasons,
            num_thoughts=thoughts,
            backend=self.model.backend.name,
            logits=logits,
            prefill_steps=prefill,
            decoding=None if self.sampler is None else dict(self.sampler.stats, sampler=self.sampler.NAME),
            logprobs=logprobs,
        )
