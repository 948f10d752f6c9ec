"""Serving recurrent-depth models: depth-level continuous batching (the program of decode/serving.py).

Every resident request's current unit is a row of one ``LatentLoop`` (latentrt/recurrence.py: the loop
rules, written once) and of the ``KVPool``. A launch runs the preludes of the units that start, then ONE
core iteration for every running row, each at its own iteration t (its K/V slot t mod K, its own lookup),
with the model's own modules over pool rows, then the checks of the rows whose schedule checks now. A row
whose criterion is met, or which ran its r_max, has ended: its head gives the logits, the scheduler
samples, and the next token's prelude enters the next launch. Rows of different requests never mix: a
request's tokens and steps are those of ``generate()`` for it alone.

A prompt is one unit of many positions (its own loop, advanced an iteration per launch beside the
decode rows, so a long prompt costs one iteration's work per step rather than stalling decode for a
whole prefill); with ``adaptive_prefill`` each prompt position is a unit of its own, as in generate().
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..recurrence import LatentLoop, LoopSpec, Rows
from .base import nonfinite_flags
from .serving import Ended, ServingProgram, ones


@dataclass
class _Prompt:
    """A prompt unit: its own loop over the prompt's positions."""

    loop: LatentLoop
    e: Tensor  # [1, n, d] prelude output
    chunk: object  # the pool chunk of its positions
    rope: tuple


@dataclass
class _Request:
    request: object
    spec: LoopSpec | None = None  # the current unit's loop spec
    prompt_left: list[int] = field(default_factory=list)  # adaptive_prefill: prompt ids still to run
    has_state: bool = False  # a unit ended before (continuous mode starts from its final state)


class RecurrentServing(ServingProgram):
    def __init__(self, model, rows: int, max_len: int, slot_rows: int) -> None:
        super().__init__(model, rows, max_len, slot_rows)
        cfg, dev, dt = model.config, model.device, model.dtype
        self.vocab = cfg.padded_vocab_size
        self.loop = LatentLoop(rows, (1, cfg.n_embd), self.vocab, dev, dt)  # one-position units, per pool row
        self.e = torch.zeros(rows, 1, cfg.n_embd, dtype=dt, device=dev)  # each row's prelude output
        self.last = torch.zeros(rows, 1, cfg.n_embd, dtype=dt, device=dev)  # each row's last final state
        self.position = torch.zeros(rows, dtype=torch.long, device=dev)  # model position of each row's entry
        self.entry = [0] * rows  # host: timeline index of each row's current entry
        self.requests: dict[int, _Request] = {}  # row -> its request
        self.starting: dict[int, tuple[Tensor, LoopSpec]] = {}  # row -> (token, spec) of a unit to begin
        self.running: set[int] = set()  # rows whose one-position unit is in its loop
        self.prompts: dict[int, _Prompt] = {}  # row -> its prompt unit
        self.results: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (logits [V], flags) of an ended unit
        self._launched: list[int] = []
        self._launched_prompts: list[int] = []

    # ---------------------------------------------------------------- units begin
    def admit(self, request) -> None:
        dec, row = request.decoder, request.row
        rec = self.requests[row] = _Request(request)
        self.loop.specs[row], self.loop.t[row] = dec.spec, 0  # the row's decode loop: inactive until a token
        self.entry[row] = 0
        ids = request.batch.ids[0]
        if dec.adaptive_prefill:  # every prompt position its own unit (generate's _prefill_by_token)
            rec.prompt_left = ids.tolist()
            self._next_prompt_position(rec)
            return
        model = self.model
        chunk = self.pool.begin([row], ids.shape[0])
        rope = model.rope(chunk)
        e = model.prelude(ids[None], self.pool, chunk, rope)
        loop = LatentLoop(1, tuple(e.shape[1:]), self.vocab, e.device, e.dtype)
        loop.start(Rows.all(1), dec.prefill_spec, self._initial_state(rec, e))
        self.prompts[row] = _Prompt(loop, e, chunk, rope)

    def _next_prompt_position(self, rec: _Request) -> None:
        token = torch.tensor(rec.prompt_left.pop(0), device=self.model.device)
        self.starting[rec.request.row] = (token, rec.request.decoder.prefill_spec)

    def start(self, request, token: Tensor) -> None:
        self.starting[request.row] = (token, request.decoder.spec)

    def _initial_state(self, rec: _Request, like: Tensor) -> Tensor:
        """The unit's s0 as generate() draws it for the request alone: the previous unit's final state
        (``continuous``), else random from the request's own generator when it has a seed."""
        dec, row = rec.request.decoder, rec.request.row
        if dec.continuous and rec.has_state:
            return self.last[row].expand_as(like[0])[None].clone()
        gen = dec.rng[0] if dec.rng is not None else None
        return self.model.initial_state(like, dec.init_scale, gen)

    def _begin_units(self) -> None:
        """Preludes of the one-position units starting now, batched; their loops start at iteration 0."""
        rows = sorted(self.starting)
        tokens = torch.stack([self.starting[r][0] for r in rows])
        chunk = self.pool.begin(rows, 1)
        e = self.model.prelude(tokens[:, None], self.pool, chunk, self.model.rope(chunk))
        ix = chunk.rows
        self.e[ix] = e
        self.position[ix] = chunk.positions[:, 0]
        by_spec: dict[LoopSpec, list[int]] = {}
        for i, r in enumerate(rows):
            self.entry[r] = chunk.starts[i]
            rec = self.requests[r]
            rec.spec = self.starting[r][1]
            by_spec.setdefault(rec.spec, []).append(i)
        for spec, members in by_spec.items():
            s0 = torch.cat([self._initial_state(self.requests[rows[i]], e[i : i + 1]) for i in members])
            self.loop.start(Rows([rows[i] for i in members], 0, e.device), spec, s0)
        self.running.update(rows)
        self.starting.clear()

    # ---------------------------------------------------------------- one step
    def launch(self, idle: list) -> Tensor:
        if self.starting:
            self._begin_units()
        self._launched = sorted(self.running | {r.row for r in idle if r.row not in self.prompts})
        flags = []
        if self._launched:
            flags.append(self._iterate(Rows(self._launched, 0, self.model.device)))
        self._launched_prompts = sorted(self.prompts)
        for row in self._launched_prompts:
            flags.append(self._iterate_prompt(self.prompts[row]))
        self.launched_rows = len(self._launched) + len(self._launched_prompts)
        return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)

    def _chunk(self, rows: Rows):
        chunk = self.pool.at(rows.list, [self.entry[r] for r in rows.list], self.position[rows.index])
        chunk.iterations = torch.tensor([self.loop.t[r] for r in rows.list], device=self.model.device)
        return chunk

    def _iterate(self, rows: Rows) -> Tensor:
        """One core iteration of the one-position units of ``rows``, each at its own depth, then the checks
        due. Returns whether each row is still in its loop."""
        model, loop, ix = self.model, self.loop, rows.index
        chunk = self._chunk(rows)
        rope = model.rope(chunk)
        active = loop.active[ix]
        self.pool.mark_iteration(chunk, None, active)
        loop.advance(rows, model.core_iteration(loop.s[ix], self.e[ix], self.pool, chunk, None, active, rope))
        with_logits, without = loop.checking(rows)
        if len(with_logits):
            loop.check(with_logits, self._head(with_logits, loop.active[with_logits.index]), self._valid(with_logits))
        if len(without):
            loop.check(without, None, self._valid(without))
        return loop.active[ix]

    def _iterate_prompt(self, unit: _Prompt) -> Tensor:
        model, loop, chunk = self.model, unit.loop, unit.chunk
        rows = Rows.all(1)
        chunk.iterations = torch.tensor([loop.t[0]], device=model.device)
        self.pool.mark_iteration(chunk, None, loop.active)
        loop.advance(rows, model.core_iteration(loop.s, unit.e, self.pool, chunk, None, loop.active, unit.rope))
        with_logits, without = loop.checking(rows)
        if len(with_logits):
            loop.check(rows, self._prompt_head(unit, loop.active), chunk.valid)
        elif len(without):
            loop.check(rows, None, chunk.valid)
        return loop.active

    def _valid(self, rows: Rows) -> Tensor:
        return ones(len(rows), self.model.device)[:, None]

    def _head(self, rows: Rows, active: Tensor) -> Tensor:
        """Next-token logits [R, V] of the rows' current states (the coda's K/V written for ``active``)."""
        chunk = self._chunk(rows)
        s = self.loop.s[rows.index]
        return self.model.head(s, self.pool, chunk, active, self.model.rope(chunk), last_only=True)[:, -1]

    def _prompt_head(self, unit: _Prompt, active: Tensor) -> Tensor:
        return self.model.head(unit.loop.s, self.pool, unit.chunk, active, unit.rope, last_only=True)[:, -1]

    # ---------------------------------------------------------------- units end
    def ended(self, flags: list) -> list[Ended]:
        still = dict(zip(self._launched + self._launched_prompts, flags))
        done = [r for r in self._launched if r in self.running and (not still[r] or self.loop.at_end(r))]
        out = []
        if done:
            out += self._end_units(done)
        for row in self._launched_prompts:
            unit = self.prompts.get(row)
            if unit is None:  # retired since the launch
                continue
            if not still[row] or unit.loop.at_end(0):
                out.append(self._end_prompt(row, unit))
        return out

    def _end_units(self, rows_l: list[int]) -> list[Ended]:
        """Logits of ended one-position units (rule 5, the head batched over them), states kept for
        ``continuous``; an adaptive prefill's non-last positions start the next position at once."""
        dev = self.model.device
        rows = Rows(rows_l, 0, dev)
        ix = rows.index
        logits = self.loop.final_logits(rows, lambda sub: self._head(sub, ones(len(sub), dev)))
        flags = nonfinite_flags(self.loop.s[ix], None, logits, ones(len(rows), dev))
        self.last[ix] = self.loop.s[ix]
        self.loop.active[ix] = False  # retired: masked if launched again idle
        self.running.difference_update(rows_l)
        out = []
        for i, r in enumerate(rows_l):
            rec = self.requests[r]
            rec.has_state = True
            if rec.prompt_left:  # adaptive prefill: logits of a non-last prompt position are not used
                self._next_prompt_position(rec)
                continue
            self.results[r] = (logits[i], flags[i])
            out.append(Ended(rec.request, self.loop.t[r]))
        return out

    def _end_prompt(self, row: int, unit: _Prompt) -> Ended:
        loop = unit.loop
        logits = loop.final_logits(Rows.all(1), lambda _: self._prompt_head(unit, ones(1, self.model.device)))
        flags = nonfinite_flags(loop.s, unit.chunk.valid, logits, ones(1, self.model.device))
        self.last[row] = loop.s[0, -1:]
        self.requests[row].has_state = True
        self.results[row] = (logits[0], flags[0])
        del self.prompts[row]
        return Ended(self.requests[row].request, loop.t[0])

    def logits(self, ended: list[Ended]) -> tuple[Tensor, Tensor]:
        got = [self.results.pop(e.request.row) for e in ended]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def retire(self, request) -> None:
        row = request.row
        self.requests.pop(row, None)
        self.starting.pop(row, None)
        self.prompts.pop(row, None)
        self.results.pop(row, None)
        self.running.discard(row)
        self.loop.active[row] = False
        self.pool.release(row)
