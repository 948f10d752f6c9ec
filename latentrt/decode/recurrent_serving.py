"""Serving recurrent-depth models: depth-level continuous batching (the program of decode/serving.py).

Every resident request's current unit is a row of one ``LatentLoop`` (latentrt/recurrence.py: the loop
rules, written once) and of the ``KVPool``. A launch runs the preludes of the units that start, then ONE
core iteration for every running row, each at its own iteration t (its K/V slot t mod K, its own lookup),
with the model's own modules over pool rows, then the checks of the rows whose schedule checks now. A row
whose criterion is met, or which ran its r_max, has ended: its head gives the logits, the scheduler
samples, and the next token's prelude enters the next launch. Rows of different requests never mix: a
request's tokens and steps are those of ``generate()`` for it alone.

A prompt is one unit of many positions. The prompts admitted in one step form a group: one loop over
their positions, right-padded to the longest (padding masked, never a key), advanced an iteration per
launch beside the decode rows, so a long prompt costs one iteration's work per step rather than stalling
decode for a whole prefill, and prompts arriving together share their launches; with ``adaptive_prefill``
each prompt position is a unit of its own, as in generate().
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..recurrence import LatentLoop, LoopSpec, Rows
from .base import nonfinite_flags
from .serving import Ended, ServingProgram, ones


@dataclass
class _PromptGroup:
    """Prompts admitted together: one loop over their positions (member i: pool row ``rows[i]``, its
    first ``lengths[i]`` positions real), ``live`` the members still in their loop."""

    loop: LatentLoop
    e: Tensor  # [R, n, d] prelude output
    chunk: object  # the pool chunk of their positions
    rope: tuple
    rows: list[int]
    lengths: list[int]
    live: list[int]

    def member(self, row: int) -> int:
        return self.rows.index(row)


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
        self.admitted: list[int] = []  # rows whose prompt begins at the next launch
        self.groups: list[_PromptGroup] = []  # prompts in their loops
        self.results: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (logits [V], flags) of an ended unit
        self._launched: list[int] = []
        self._launched_prompts: list[tuple[_PromptGroup, int]] = []  # (group, member) per prompt row launched

    # ---------------------------------------------------------------- units begin
    def admit(self, request) -> None:
        dec, row = request.decoder, request.row
        rec = self.requests[row] = _Request(request)
        self.loop.specs[row], self.loop.t[row] = dec.spec, 0  # the row's decode loop: inactive until a token
        self.entry[row] = 0
        if dec.adaptive_prefill:  # every prompt position its own unit (generate's _prefill_by_token)
            rec.prompt_left = request.batch.ids[0].tolist()
            self._next_prompt_position(rec)
        else:
            self.admitted.append(row)

    def _begin_prompts(self) -> None:
        """The prompts admitted since the last launch become one group: preludes batched over their
        positions, right-padded; each loop starts from the initial state generate() would draw for it."""
        rows, self.admitted = self.admitted, []
        model = self.model
        ids = [self.requests[r].request.batch.ids[0] for r in rows]
        lengths = [len(x) for x in ids]
        n = max(lengths)
        padded = torch.stack([torch.nn.functional.pad(x, (0, n - len(x))) for x in ids])
        chunk = self.pool.begin(rows, n, lengths)
        rope = model.rope(chunk)
        e = model.prelude(padded, self.pool, chunk, rope)
        loop = LatentLoop(len(rows), tuple(e.shape[1:]), self.vocab, e.device, e.dtype)
        s0 = torch.zeros_like(e)
        for i, (r, m) in enumerate(zip(rows, lengths)):
            s0[i, :m] = self._initial_state(self.requests[r], e[i : i + 1, :m])[0]
        by_spec: dict[LoopSpec, list[int]] = {}
        for i, r in enumerate(rows):
            by_spec.setdefault(self.requests[r].request.decoder.prefill_spec, []).append(i)
        for spec, members in by_spec.items():
            whole = len(members) == len(rows)
            at = slice(None) if whole else torch.tensor(members, device=e.device)
            loop.start(Rows.all(len(rows)) if whole else Rows(members, 0, e.device), spec, s0[at])
        self.groups.append(_PromptGroup(loop, e, chunk, rope, rows, lengths, list(range(len(rows)))))

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
        if self.admitted:
            self._begin_prompts()
        if self.starting:
            self._begin_units()
        prompt_rows = {g.rows[i] for g in self.groups for i in g.live}
        self._launched = sorted(self.running | {r.row for r in idle if r.row not in prompt_rows})
        flags = []
        if self._launched:
            flags.append(self._iterate(Rows(self._launched, 0, self.model.device)))
        self._launched_prompts = [(g, i) for g in self.groups for i in g.live]
        for group in self.groups:
            flags.append(self._iterate_prompts(group))
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

    def _part(self, group: _PromptGroup, rows: Rows) -> tuple:
        """The pool chunk and RoPE tables of some members of a group (``rows``: member indices)."""
        if len(rows) == len(group.rows):
            return group.chunk, group.rope
        return group.chunk.subset(rows.list), (group.rope[0][rows.index], group.rope[1][rows.index])

    def _iterate_prompts(self, group: _PromptGroup) -> Tensor:
        """One core iteration of a group's live prompts, then their checks. Returns [live] still looping."""
        model, loop = self.model, group.loop
        whole = len(group.live) == len(group.rows)
        rows = Rows.all(len(group.rows)) if whole else Rows(group.live, 0, model.device)
        chunk, rope = self._part(group, rows)
        ix = rows.index
        chunk.iterations = torch.tensor([loop.t[i] for i in rows.list], device=model.device)
        active = loop.active[ix]
        self.pool.mark_iteration(chunk, None, active)
        loop.advance(rows, model.core_iteration(loop.s[ix], group.e[ix], self.pool, chunk, None, active, rope))
        with_logits, without = loop.checking(rows)
        if len(with_logits):
            loop.check(
                with_logits,
                self._prompt_head(group, with_logits, loop.active[with_logits.index]),
                group.chunk.valid[with_logits.index],
            )
        if len(without):
            loop.check(without, None, group.chunk.valid[without.index])
        return loop.active[ix]

    def _valid(self, rows: Rows) -> Tensor:
        return ones(len(rows), self.model.device)[:, None]

    def _head(self, rows: Rows, active: Tensor) -> Tensor:
        """Next-token logits [R, V] of the rows' current states (the coda's K/V written for ``active``)."""
        chunk = self._chunk(rows)
        s = self.loop.s[rows.index]
        return self.model.head(s, self.pool, chunk, active, self.model.rope(chunk), last_only=True)[:, -1]

    def _prompt_head(self, group: _PromptGroup, rows: Rows, active: Tensor) -> Tensor:
        """Logits [R, V] at the last real position of the prompts of ``rows`` (members of ``group``); the
        coda's K/V written for ``active``."""
        chunk, rope = self._part(group, rows)
        last = torch.tensor([group.lengths[i] - 1 for i in rows.list], device=self.model.device)
        return self.model.head(group.loop.s[rows.index], self.pool, chunk, active, rope, at=last)[:, -1]

    # ---------------------------------------------------------------- units end
    def ended(self, flags: list) -> list[Ended]:
        still = dict(zip(self._launched + [(id(g), i) for g, i in self._launched_prompts], flags))
        done = [r for r in self._launched if r in self.running and (not still[r] or self.loop.at_end(r))]
        out = []
        if done:
            out += self._end_units(done)
        for group in self.groups:
            ran = [i for i in group.live if (id(group), i) in still]
            done = [i for i in ran if not still[(id(group), i)] or group.loop.at_end(i)]
            if done:
                out += self._end_prompts(group, done)
        self.groups = [g for g in self.groups if g.live]
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

    def _end_prompts(self, group: _PromptGroup, members: list[int]) -> list[Ended]:
        """Logits of prompts whose loop ended (rule 5), their last real states kept for ``continuous``."""
        loop, dev = group.loop, self.model.device
        rows = Rows(members, 0, dev)
        logits = loop.final_logits(rows, lambda sub: self._prompt_head(group, sub, ones(len(sub), dev)))
        valid = group.chunk.valid[rows.index]
        flags = nonfinite_flags(loop.s[rows.index], valid, logits, ones(len(members), dev))
        out = []
        for j, i in enumerate(members):
            row = group.rows[i]
            group.live.remove(i)
            self.last[row] = loop.s[i, group.lengths[i] - 1 : group.lengths[i]]
            self.requests[row].has_state = True
            self.results[row] = (logits[j], flags[j])
            out.append(Ended(self.requests[row].request, loop.t[i]))
        return out

    def logits(self, ended: list[Ended]) -> tuple[Tensor, Tensor]:
        got = [self.results.pop(e.request.row) for e in ended]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def retire(self, request) -> None:
        row = request.row
        self.requests.pop(row, None)
        self.starting.pop(row, None)
        self.admitted = [r for r in self.admitted if r != row]
        for group in self.groups:  # a retired prompt leaves its group's loop
            if row in group.rows and group.member(row) in group.live:
                group.live.remove(group.member(row))
        self.groups = [g for g in self.groups if g.live]
        self.results.pop(row, None)
        self.running.discard(row)
        self.loop.active[row] = False
        self.pool.release(row)
