"""Recurrent-depth decoding (Huginn): the prompt and each new token run prelude -> latent loop -> head.

The loop's rules (when the criterion runs, ``min_steps``, freezing, what ``.steps`` counts) are written
once, in latentrt/recurrence.py; the KV lookup rule per mode in latentrt/kv_modes.py. This decoder
validates the options, picks the cache, and runs each unit either through the reference loop (with the
backend's ``core_iteration`` seam, and hooks between iterations) or, for decode tokens without hooks,
through the backend's token runner (one CUDA graph per token on the Triton backend, the persistent kernel
on the CUDA backend), both of which implement the same rules.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..caller import warn_at_caller
from ..errors import InputError, check_bool, check_finite, check_int, is_choice
from ..exits import make_criterion
from ..kernels.reference import nonfinite_flags
from ..kv_modes import parse_kv_mode
from ..models.recurrent import MAX_STEPS, check_steps
from ..options import GenerateOptions, unused_message
from ..prompts import Batch
from ..recurrence import LoopSpec, run_recurrence
from .base import Decoder, TokenOutput
from .speculative import Speculative
from .wavefront import Wavefront


class RecurrentDecoder(Decoder):
    TITLE = "recurrent-depth"
    OPTIONS = frozenset(
        {
            "adaptive",
            "num_steps",
            "exit_criterion",
            "exit_threshold",
            "min_steps",
            "check_criterion_every_n_steps",
            "do_not_exit_in_prefill",
            "adaptive_prefill",
            "kv_sharing",
            "continuous",
            "init_scale",
            "decoding",
            "decoding_options",
        }
    )
    # options that only the adaptive exit test reads (latentrt/recurrence.py); a fixed-depth loop ignores them
    ADAPTIVE_ONLY = (
        "exit_criterion",
        "exit_threshold",
        "min_steps",
        "check_criterion_every_n_steps",
        "do_not_exit_in_prefill",
    )
    # the samplers that commit several tokens per pass (decode/samplers.py): one line each
    SAMPLERS = {"speculative": Speculative, "wavefront": Wavefront}

    @classmethod
    def check_options(cls, model, options: GenerateOptions) -> None:
        r_max = model.default_steps() if options.num_steps is None else check_steps(options.num_steps)
        parse_kv_mode(options.kv_sharing, r_max, model.config.n_layers_in_recurrent_block)
        make_criterion(options.exit_criterion, options.exit_threshold)
        ms = options.min_steps
        check_int("min_steps", ms, 0)
        if ms > r_max and options.adaptive:  # the published loop takes it: no check runs (LoopSpec clamps it)
            warn_at_caller(
                f"min_steps={ms} exceeds num_steps={r_max}: the exit test never runs and every token runs {r_max} "
                "iterations (as the published loop)",
            )
        check_int("check_criterion_every_n_steps", options.check_criterion_every_n_steps, 1, MAX_STEPS, "2**31 - 1")
        for name in ("adaptive", "continuous", "do_not_exit_in_prefill", "adaptive_prefill"):
            check_bool(name, getattr(options, name))
        check_finite("init_scale", options.init_scale, 0)
        cls.sampler_class(options)
        unused = [name for name in cls.ADAPTIVE_ONLY if options.is_set(name)] if not options.adaptive else []
        if unused:  # as HF warns of sampling flags in greedy mode: a sweep of adaptive on/off keeps its kwargs
            only = "on the adaptive exit: without adaptive=True every token runs num_steps iterations and"
            warn_at_caller(unused_message(unused, only))

    @classmethod
    def sampler_class(cls, options: GenerateOptions):
        """The sampler ``options.decoding`` names (None: sequential), its options validated."""
        name = options.decoding
        if name == "sequential":
            if options.decoding_options is not None:
                raise InputError("decoding_options need decoding='speculative' or 'wavefront'")
            return None
        if not is_choice(name, cls.SAMPLERS):
            raise InputError(f"unknown decoding {name!r}; choose one of {['sequential', *cls.SAMPLERS]}")
        sampler = cls.SAMPLERS[name]
        sampler.Options.parse(options.decoding_options)
        sampler.check(options)
        return sampler

    def __init__(self, model, options: GenerateOptions, hooks) -> None:
        super().__init__(model, options, hooks)
        o = options
        r_max = model.default_steps() if o.num_steps is None else o.num_steps
        criterion = make_criterion(o.exit_criterion, o.exit_threshold) if o.adaptive else make_criterion("none")
        # min_steps above r_max checks nothing, as min_steps = r_max does: the backends see at most r_max
        self.spec = LoopSpec(r_max, criterion, min(o.min_steps, r_max), o.check_criterion_every_n_steps)
        # the prompt's loop: no checks with do_not_exit_in_prefill (it runs r_max iterations)
        self.prefill_spec = (
            replace(self.spec, criterion=make_criterion("none")) if o.do_not_exit_in_prefill else self.spec
        )
        sampler = self.sampler_class(o)
        self.sampler = None if sampler is None else sampler(self, sampler.Options.parse(o.decoding_options))
        depth = r_max if self.sampler is None else (self.sampler.kv_depth or r_max)
        kv = o.kv_sharing if self.sampler is None else self.sampler.kv_sharing(o)
        self.kv_mode = parse_kv_mode(kv, depth, model.config.n_layers_in_recurrent_block)
        self.adaptive_prefill = o.adaptive_prefill
        self.continuous, self.init_scale = bool(o.continuous), float(o.init_scale)
        self.last_state: Tensor | None = None  # the previous unit's final state (continuous mode)
        self.started: list[bool] | None = None  # per sequence: has a unit held one of its real positions yet
        self.runner = None

    @property
    def kv_slots(self) -> int:
        return self.kv_mode.slots

    @property
    def max_steps(self) -> int:
        return self.spec.r_max

    SCORES_PROMPTS = True

    def prompt_logits(self, ids: Tensor) -> Tensor:
        """One forward of the prompt at fixed depth ``num_steps`` (how the published model scores text), from
        this call's initial state (``init_scale``, and its ``seed``'s generator)."""
        o = self.options
        return self.model.logits(ids[None], num_steps=self.spec.r_max, init_scale=self.init_scale, seed=o.seed)[0]

    def new_cache(self, batch: int, max_len: int):
        self.cache = self.model.new_cache(batch, max_len, self.kv_mode)
        return self.cache

    def prefill(self, batch: Batch) -> TokenOutput:
        # decode tokens as one fixed launch sequence where the backend has one (not with hooks: they are
        # Python called between iterations)
        self.runner = None if self.hooks else self.backend.token_runner(self.cache, self.spec)
        if self.adaptive_prefill:
            return self._prefill_by_token(batch)
        alive = torch.ones(batch.ids.shape[0], dtype=torch.bool, device=self.model.device)
        return self.unit(batch.ids, batch.mask, alive, self.prefill_spec, batch.lengths())

    def _prefill_by_token(self, batch: Batch) -> TokenOutput:
        """The prompt one position at a time, each with its own latent loop and exit (the published
        ``forward_with_adaptive_compute``; for experiments: a prefill as slow as decoding). The last
        position's iterations are the prompt's entry of ``.steps``; every position's are in
        ``prefill_steps``."""
        per_position = []
        lengths, width = batch.lengths(), batch.ids.shape[1]
        for col in range(width):
            valid = batch.mask[:, col : col + 1]
            rows = [int(col >= width - n) for n in lengths]  # left padding: real from width - length on
            out = self.unit(batch.ids[:, col : col + 1], valid, valid[:, 0], self.prefill_spec, rows)
            per_position.append(out.iterations)
            self.record(out.iterations.tolist(), valid[:, 0].tolist())
        self.prefill_steps = torch.stack(per_position, 1)
        return out

    def next_token(self, tokens: Tensor, alive: Tensor, rows: list[bool]) -> TokenOutput:
        positions = [int(r) for r in rows]
        if self.runner is not None:
            return self._runner_token(tokens, alive, positions)
        return self.unit(tokens[:, None], alive[:, None], alive, self.spec, positions)

    def record(self, iterations: list[int], alive: list[bool]) -> None:
        if self.sampler is None:  # a sampler's rollbacks would make the cache's shortcut unsafe: not recorded
            self.cache.record_iterations(iterations, alive)

    @staticmethod
    def fixed(r: int) -> LoopSpec:
        """A loop of exactly ``r`` iterations (the samplers' fixed depths)."""
        return LoopSpec(r, make_criterion("none"))

    # the published generate paths always stop on <|begin_text|>, <|end_text|>, <|end_turn|> (Huginn-0125's
    # tokenizer), besides the configured eos
    PUBLISHED_STOPS = (65504, 65505, 65508)

    def default_stop_ids(self) -> set[int]:
        """eos, and the published stop tokens that exist in the model's vocabulary."""
        vocab = self.model.config.vocab_size
        return super().default_stop_ids() | {t for t in self.PUBLISHED_STOPS if t < vocab}

    def _initial_state(self, like: Tensor, positions: list[int]) -> Tensor:
        """Random initial states [B, n, d]; with a seed each sequence draws its ``positions[b]`` real (last)
        positions from its own generator (latentrt/sampling.py), as it would alone."""
        if self.rng is None:
            return self.model.initial_state(like, self.init_scale)
        s = torch.zeros_like(like)
        for b, n in enumerate(positions):
            if n:
                s[b, -n:] = self.model.initial_state(like[b : b + 1, -n:], self.init_scale, self.rng[b])[0]
        return s

    def _unit_state(self, e: Tensor, positions: list[int]) -> Tensor:
        """A unit's initial states [B, n, d]: drawn (``_initial_state``), or in continuous mode the previous
        unit's final state, for the sequences that have run a real position before; one whose first real
        position this unit holds (a left-padded prompt run position by position, ``adaptive_prefill``) draws
        its own, as it does alone: it has no previous state, only its padding's."""
        started = self.started or [False] * len(positions)
        self.started = [seen or n > 0 for seen, n in zip(started, positions)]
        if not (self.continuous and self.last_state is not None):
            return self._initial_state(e, positions)
        s0 = self.last_state.expand_as(e).clone()
        first = [0 if seen else n for seen, n in zip(started, positions)]
        if any(first):
            rows = torch.tensor([n > 0 for n in first], device=e.device)[:, None, None]
            s0 = torch.where(rows, self._initial_state(e, first), s0)
        return s0

    def unit(
        self,
        ids: Tensor,
        valid: Tensor,
        alive: Tensor,
        spec: LoopSpec,
        positions: list[int],
        all_logits: bool = False,
    ) -> TokenOutput:
        """One unit (prompt or token) through prelude, the latent loop (latentrt/recurrence.py) and the
        head, on the reference path: the backend's ``core_iteration`` per iteration, hooks in between.
        ``all_logits`` (fixed depth only): the logits of every position [B, n, V], not the last one's."""
        model, cache, backend = self.model, self.cache, self.backend
        chunk = cache.begin(valid)
        rope = model.rope(chunk)
        e = model.prelude(ids, cache, chunk, rope)
        s0 = self._unit_state(e, positions)
        s, used, logits = run_recurrence(
            spec,
            s0,
            alive,
            chunk.valid,
            model.config.padded_vocab_size,
            iterate=lambda s, t, active: backend.core_iteration(s, e, cache, chunk, t, active, rope),
            head=lambda s, active: (
                model.head(s, cache, chunk, active, rope)
                if all_logits
                else model.head(s, cache, chunk, active, rope, last_only=True)[:, -1]
            ),
            mark=lambda t, active: cache.mark_iteration(chunk, t, active),
            exit_ops=backend.exit_ops,
            hooks=self.hooks,
            # with hooks the host runs between iterations anyway: it stops once every sequence has exited, so
            # hooks see the same iterations on every backend (none after the last exit)
            host_may_stop=not backend.sync_free or bool(self.hooks),
        )
        self.last_state = s[:, -1:]
        last = logits[:, -1] if all_logits else logits
        return TokenOutput(logits, used, nonfinite_flags(s, chunk.valid, last, alive))

    def _runner_token(self, tokens: Tensor, alive: Tensor, positions: list[int]) -> TokenOutput:
        """A decode token through the backend's token runner (a CUDA graph on the GPU)."""
        runner = self.runner
        position = self.cache.reserve()
        s0 = self.last_state if self.continuous else self._initial_state(runner.s0[:, None], positions)
        runner.prepare(tokens, alive, s0, position)
        logits, used, flags, s = runner()
        self.last_state = s[:, None]
        return TokenOutput(logits, used, flags)

    @classmethod
    def report(cls, result) -> list[str]:
        steps = result.steps if isinstance(result.text, list) else [result.steps]
        lines = []
        for n, st in enumerate(steps):
            head = f"[{n}] " if len(steps) > 1 else ""
            lines.append(f"{head}steps per token: {st} (mean {sum(st) / max(len(st), 1):.2f})")
        if result.decoding:
            stats = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.decoding.items()]
            lines.append(f"decoding: {', '.join(stats)}")
        return lines
