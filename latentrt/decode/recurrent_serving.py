"""Serving recurrent-depth models: depth-level continuous batching (the program of decode/serving.py).

Every resident request's current unit is a row of a ``LatentLoop`` (latentrt/recurrence.py: the loop
rules, written once) and of the ``KVPool``. One-position units (a generated token, or a prompt position
under ``adaptive_prefill``) are rows of one loop over the pool's rows; the prompts admitted in one step
form a group, one loop over their positions (right-padded to the longest). A launch runs, each as a
batched pass of the model's modules over every row concerned:

1. the preludes of the units that begin;
2. one core iteration of every running unit, each at its own iteration t (its K/V slot t mod K, its own
   lookup rule); a prompt group's rows padded to its longest prompt (padding writes to the pool's trash
   entry: latentrt/kv_pool.py);
3. the head (coda -> lm_head) of the units whose criterion checks now and needs logits; then the checks.

Each is one pass over its layers' weights for every unit concerned, decode tokens and prompt groups alike:
their tokens are packed into one sequence (``Packed``, latentrt/models/layers.py) for the norms, linears and
MLPs, and attention runs per group under its own mask (a decode token is not padded to a prompt's length).

A unit whose criterion is met, or which ran its r_max, has ended: its logits go to the scheduler, which
samples, and the next token's prelude enters the next launch. Where the logits need the head (no logit
criterion checked the state), the unit is parked, out of the launches, until the scheduler asks for them:
one head pass for every parked unit (``prelude_cost`` / ``head_cost``: those passes' weights per core
iteration's, for the scheduler's choice of when). A long prompt costs one iteration's work per
step rather than stalling decode for a whole prefill. Rows of different requests never mix: a request's
tokens and steps are those of ``generate()`` for it alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.reference import nonfinite_flags
from ..models.layers import Packed
from ..recurrence import LatentLoop, LoopSpec, Rows
from ..transfer import fill_rows, to_device
from .recurrent_serving_graph import DecodeCoreRunner, DecodeHeadRunner, DecodePreludeRunner
from .serving import Ended, ServingProgram, ones, weight_ratio


@dataclass
class _PromptGroup:
    """Prompts admitted together: one loop over their positions (member i: pool row ``rows[i]``, its
    first ``lengths[i]`` positions real), ``live`` the members still in their loop."""

    loop: LatentLoop
    e: Tensor  # [R, n, d] prelude output
    chunk: object  # the pool chunk of their positions
    rows: list[int]
    lengths: list[int]
    live: list[int]
    serial: int = 0  # the program's count of groups begun when it began (the graphed pass's key, never reused)

    def running(self) -> list[int]:
        """The members a launch runs: in their loop, not at their r_max (an end not read yet: asynchronous
        scheduling)."""
        return [i for i in self.live if not self.loop.at_end(i)]


@dataclass
class _Part:
    """Some rows of one loop taking part in a batched pass: their chunk (built when first asked for: the
    captured decode passes need only the rows) and the index of the position whose logits a head gives
    (each row's last real one)."""

    loop: LatentLoop
    rows: Rows
    build: Callable[[], object]  # -> the pool chunk of the rows' positions
    e: Tensor | None
    last: list[int]
    group: _PromptGroup | None = None  # a prompt group's members (None: one-position units)
    _chunk: object = None

    @property
    def chunk(self):
        if self._chunk is None:
            self._chunk = self.build()
        return self._chunk


@dataclass
class _Launch:
    """What a launch ran, for ``ended`` to read its flags by (a later launch may have run since: asynchronous
    scheduling): per one-position row (row, its unit's serial, its iterations after the launch), per prompt
    member (its group's serial, member, iterations after)."""

    rows: list[tuple[int, int, int]]
    prompts: list[tuple[int, int, int]]


@dataclass
class _Request:
    request: object
    spec: LoopSpec | None = None  # the current unit's loop spec
    prompt_left: list[int] = field(default_factory=list)  # adaptive_prefill: prompt ids still to run
    prefilling: bool = False  # adaptive_prefill: the unit running is a prompt position's
    has_state: bool = False  # a unit ended before (continuous mode starts from its final state)


def _start_by_spec(loop: LatentLoop, rows: list[int], specs: list[LoopSpec], s0: Tensor) -> None:
    """Start ``rows`` of ``loop`` from ``s0`` (aligned with ``rows``), each under its own spec: one
    ``LatentLoop.start`` per distinct spec."""
    by_spec: dict[LoopSpec, list[int]] = {}
    for i, spec in enumerate(specs):
        by_spec.setdefault(spec, []).append(i)
    for spec, members in by_spec.items():
        at = to_device(members, s0.device)
        loop.start(Rows([rows[i] for i in members], 0, s0.device), spec, s0[at])


class RecurrentServing(ServingProgram):
    def __init__(self, model, rows: int, max_len: int, slot_rows: int) -> None:
        super().__init__(model, rows, max_len, slot_rows)
        cfg, dev, dt = model.config, model.device, model.dtype
        self.vocab = cfg.padded_vocab_size
        self.loop = LatentLoop(rows, (1, cfg.n_embd), self.vocab, dev, dt)  # one-position units, per pool row
        self.e = torch.zeros(rows, 1, cfg.n_embd, dtype=dt, device=dev)  # each row's prelude output
        self.last = torch.zeros(rows, 1, cfg.n_embd, dtype=dt, device=dev)  # each row's last final state
        self.position = torch.zeros(rows, dtype=torch.long, device=dev)  # model position of each row's entry
        self.one_position = torch.ones(rows, 1, dtype=torch.bool, device=dev)  # every row's unit's real positions
        self.entry = [0] * rows  # host: timeline index of each row's current entry
        self.entries_changed = True  # since the graphed passes last copied ``entry`` to the device
        self.requests: dict[int, _Request] = {}  # row -> its request
        self.admitted: list[int] = []  # rows whose prompt begins at the next launch
        self.starting: dict[int, tuple[Tensor, LoopSpec]] = {}  # row -> (token, spec) of a unit to begin
        self.running: set[int] = set()  # rows whose one-position unit is in its loop
        self.groups: list[_PromptGroup] = []  # prompts in their loops
        self.results: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (logits [V], flags) of an ended unit
        self.parked: set[int] = set()  # rows whose unit ended and waits for its head (``logits``)
        t = model.transformer
        core = [*t.core_block, t.adapter]
        self.prelude_cost = weight_ratio(t.prelude, core)
        self.head_cost = weight_ratio([*t.coda, t.ln_f, model.lm_head], core)
        self._launched: list[int] = []
        self._launches: deque[_Launch] = deque()  # launched, their flags not read yet (``ended``)
        self.unit_serial = [0] * rows  # each row's current one-position unit, by the count of units begun
        self._units = 0
        # the decode rows' core pass as one graph where the pool's attention is fused (recurrent_serving_graph.py)
        self.decode_core = DecodeCoreRunner(self) if self.pool.decode_attention is not None else None
        graphed = self.decode_core is not None
        self.decode_head = DecodeHeadRunner(self.decode_core) if graphed else None
        self.decode_prelude = DecodePreludeRunner(self.decode_core) if graphed else None
        self._serial = 0  # prompt groups begun
        self._criteria: dict[bool, tuple] = {True: (), False: ()}  # ``criteria`` (logit ones, state ones)

    MAX_CRITERIA = 4  # of a kind that ``criteria`` keeps once no resident request checks them

    def criteria(self, logits: bool) -> tuple:
        """The exit criteria on logits (or on states) that the captured passes check for the one-position units
        (recurrent_serving_graph.py: part of their graphs' key), in a fixed order: every one a request admitted
        since the start could check, so the key changes only when a new one comes (or, past MAX_CRITERIA of a
        kind, the resident requests' alone)."""
        return self._criteria[logits]

    @staticmethod
    def _unit_criteria(decoder) -> list:
        """The criteria a request's one-position units check (its tokens'; its prompt positions' too when each
        is a unit)."""
        specs = (decoder.spec, decoder.prefill_spec) if decoder.adaptive_prefill else (decoder.spec,)
        return [s.criterion for s in specs if not s.criterion.never_exits]

    def _add_criteria(self, decoder) -> None:
        for crit in self._unit_criteria(decoder):
            kind = crit.needs_logits
            if crit in self._criteria[kind]:
                continue
            found = {*self._criteria[kind], crit}
            if len(found) > self.MAX_CRITERIA:
                resident = (c for rec in self.requests.values() for c in self._unit_criteria(rec.request.decoder))
                found = {c for c in resident if c.needs_logits == kind}
            self._criteria[kind] = tuple(sorted(found, key=lambda c: (c.name, c.threshold)))

    # ---------------------------------------------------------------- units begin
    def admit(self, request) -> None:
        dec, row = request.decoder, request.row
        rec = self.requests[row] = _Request(request)
        self._add_criteria(dec)
        self.loop.specs[row], self.loop.t[row] = dec.spec, 0  # the row's decode loop: inactive until a token
        self.entry[row] = 0
        self.entries_changed = True
        if dec.adaptive_prefill:  # every prompt position its own unit (generate's _prefill_by_token)
            rec.prompt_left, rec.prefilling = list(request.prompt_ids), True
            request.prefill_steps = []  # each position's iterations, as generate()'s ``prefill_steps``
            self._next_prompt_position(rec)
        else:
            self.admitted.append(row)

    def _next_prompt_position(self, rec: _Request) -> None:
        token = to_device(rec.prompt_left.pop(0), self.model.device)
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

    def _initial_states(self, rows: list[int], e: Tensor) -> Tensor:
        """Each of ``rows``' one-position units' s0 (``_initial_state``; ``e`` [rows, 1, d] gives the shape and dtype);
        those drawn from the global generator at one init_scale as one draw, as generate() draws a batch's
        (a per-request draw is what a seed or ``continuous`` fixes; unseeded draws have no order to keep)."""
        states, shared = [None] * len(rows), {}
        for i, r in enumerate(rows):
            rec = self.requests[r]
            dec = rec.request.decoder
            if dec.rng is None and not (dec.continuous and rec.has_state):
                shared.setdefault(dec.init_scale, []).append(i)
            else:
                states[i] = self._initial_state(rec, e[i : i + 1])
        for scale, members in shared.items():
            drawn = self.model.initial_state(e[: len(members)], scale)  # (``e``'s rows for their shape only)
            if len(members) == len(rows):
                return drawn
            for j, i in enumerate(members):
                states[i] = drawn[j : j + 1]
        return torch.cat(states)

    def _begin(self) -> None:
        """The preludes of the prompts admitted and of the one-position units starting, as one pass
        (``Packed``); their loops start at iteration 0."""
        model, pool = self.model, self.pool
        prompts, self.admitted = self.admitted, []
        units = sorted(self.starting)
        if units and not prompts and self.decode_prelude is not None:  # units only: the captured prelude
            chunk = pool.begin(units, 1, mask=False)  # (the captured passes attend by the pool's entries)
            self._place(units, chunk)  # entries and positions first: the graphed prelude reads them
            self.decode_prelude.prepare(chunk.rows, torch.stack([self.starting[r][0] for r in units]))
            self.decode_prelude()  # (which writes the rows' prelude outputs into ``e``)
            self.count_pass(self.prelude_cost, graph=True)
            self._start_units(units, chunk)
            return
        chunks, ids = [], []
        if prompts:
            seqs = [self.requests[r].request.batch.ids[0] for r in prompts]
            lengths = [len(x) for x in seqs]
            n = max(lengths)
            chunks.append(pool.begin(prompts, n, lengths))
            ids.append(torch.stack([F.pad(x, (0, n - len(x))) for x in seqs]))
        if units:
            chunks.append(pool.begin(units, 1))
            ids.append(torch.stack([self.starting[r][0] for r in units])[:, None])
        packed = Packed(chunks, [None] * len(chunks))
        e = packed.unpack(model.prelude(packed.pack(ids), pool, packed, self._rope(packed)))
        self.count_pass(self.prelude_cost)
        if prompts:
            self._start_group(prompts, lengths, chunks[0], e[0])
        if units:
            self._start_units(units, chunks[-1], e[-1])

    def _start_group(self, rows: list[int], lengths: list[int], chunk, e: Tensor) -> None:
        loop = LatentLoop(len(rows), tuple(e.shape[1:]), self.vocab, e.device, e.dtype)
        s0 = torch.zeros_like(e)
        for i, (r, m) in enumerate(zip(rows, lengths)):
            s0[i, :m] = self._initial_state(self.requests[r], e[i : i + 1, :m])[0]
        specs = [self.requests[r].request.decoder.prefill_spec for r in rows]
        _start_by_spec(loop, list(range(len(rows))), specs, s0)
        self._serial += 1
        self.groups.append(_PromptGroup(loop, e, chunk, rows, lengths, list(range(len(rows))), self._serial))

    def _place(self, rows: list[int], chunk) -> None:
        """Rows' timeline entries (host) and positions (device) of their units' one position."""
        self.position[chunk.rows] = chunk.positions[:, 0]
        for i, r in enumerate(rows):
            self.entry[r] = chunk.starts[i]
        self.entries_changed = True

    def _start_units(self, rows: list[int], chunk, e: Tensor | None = None) -> None:
        """Start ``rows``' one-position units (``chunk``: their position) from prelude outputs ``e``; None: the
        captured prelude wrote them, its entries and positions already placed."""
        ix = chunk.rows
        if e is not None:
            self.e[ix] = e
            self._place(rows, chunk)
        for r in rows:
            self.requests[r].spec = self.starting[r][1]
            self._units += 1
            self.unit_serial[r] = self._units
        s0 = self._initial_states(rows, self.e[: len(rows)])  # (``e``'s rows for their shape only)
        _start_by_spec(self.loop, rows, [self.requests[r].spec for r in rows], s0)
        self.running.update(rows)
        self.starting.clear()

    # ---------------------------------------------------------------- one step
    async_scheduling = True  # ``ended`` may read a launch's flags after the next launch (see ``launch``)

    def launch(self, idle: list) -> Tensor:
        """(See ServingProgram.launch.) A unit that exited in the previous launch, whose flags the scheduler
        has not read yet (asynchronous scheduling), runs this one masked: its loop is inactive on the device,
        so it writes no K/V and keeps its state; ``ended`` takes back the iteration this launch counted for it
        on the host. A unit at its r_max is known on the host and is not launched."""
        if self.admitted or self.starting:
            self._begin()
        prompt_rows = {g.rows[i] for g in self.groups for i in g.live}
        running = {r for r in self.running if not self.loop.at_end(r)}
        self._launched = sorted(running | {r.row for r in idle if r.row not in prompt_rows})
        parts = []
        if self._launched:
            parts.append(self._decode_part(Rows(self._launched, 0, self.model.device)))
        groups = [(g, g.running()) for g in self.groups]
        groups = [(g, members) for g, members in groups if members]
        parts += [self._group_part(g, members) for g, members in groups]
        self.launched_rows = len(self._launched) + sum(len(m) for _, m in groups)
        flags = self._iterate(parts) if parts else torch.zeros(0, dtype=torch.bool, device="cpu")
        self._launches.append(
            _Launch(
                [(r, self.unit_serial[r], self.loop.t[r]) for r in self._launched],
                [(g.serial, i, g.loop.t[i]) for g, members in groups for i in members],
            )
        )
        return flags

    def _decode_part(self, rows: Rows) -> _Part:
        # the host values as they are now (a chunk built after the loop advanced would see later iterations);
        # positions change only when units begin, before any part of the step exists
        entries, iterations = [self.entry[r] for r in rows.list], [self.loop.t[r] for r in rows.list]

        def build():
            chunk = self.pool.at(rows.list, entries, self.position[rows.index])
            chunk.iterations = to_device(iterations, self.model.device)
            return chunk

        return _Part(self.loop, rows, build, self.e[rows.index], [0] * len(rows))

    def _group_part(self, group: _PromptGroup, members: list[int]) -> _Part:
        whole = len(members) == len(group.rows)
        rows = Rows.all(len(group.rows)) if whole else Rows(members, 0, self.model.device)
        iterations = [group.loop.t[i] for i in rows.list]  # as they are now (see _decode_part)

        def build():  # (the captured passes need it only for checks and ended prompts)
            chunk = group.chunk.subset(rows.list)
            chunk.iterations = to_device(iterations, self.model.device)
            return chunk

        last = [group.lengths[i] - 1 for i in rows.list]
        return _Part(group.loop, rows, build, group.e[rows.index], last, group)

    def _iterate(self, parts: list[_Part]) -> Tensor:
        """One core iteration of every part's rows, each at its own depth, as one pass (``Packed``: the
        linears once over every part's tokens, attention per part), then the checks due. Returns whether each
        row is still in its loop."""
        model, pool = self.model, self.pool
        in_loop = [self._in_loop(p) for p in parts]
        due: dict = {}  # the captured passes: the decode rows' checks (criterion -> rows), run in the passes
        if self.decode_core is not None:  # the captured pass: every pool row, each resident group whole
            groups = [(p.group, set(p.rows.list)) for p in parts if p.group is not None]
            decode = [(p.rows.list, rows) for p, (rows, _) in zip(parts, in_loop) if p.group is None]
            if decode:
                due = self.loop.due(decode[0][1])
            on_states = {c: rows for c, rows in due.items() if not c.needs_logits}
            self.decode_core.prepare(decode[0][0] if decode else [], groups, on_states)
            self.decode_core()  # (which takes the new states, rule 2's device half, and checks ``on_states``)
            self.count_pass(graph=True)
            for p, (rows, _) in zip(parts, in_loop):
                p.loop.count(rows)
        else:
            actives = [p.loop.active[p.rows.index] for p in parts]
            for p, active in zip(parts, actives):
                pool.mark_iteration(p.chunk, None, active)
            packed = Packed([p.chunk for p in parts], actives)
            s = packed.pack([p.loop.s[p.rows.index] for p in parts])
            e = packed.pack([p.e for p in parts])
            new = packed.unpack(model.core_iteration(s, e, pool, packed, None, None, self._rope(packed)))
            self.count_pass()
            for p, (rows, at), x in zip(parts, in_loop, new):
                p.loop.advance(rows, x if at is None else x[at])
        heads = []
        on_logits = {c: rows for c, rows in due.items() if c.needs_logits}
        in_passes = self.decode_core is not None  # the decode rows' checks: run in the captured passes
        for p, (rows, _) in zip(parts, in_loop):
            if p.loop is self.loop and in_passes:
                with_logits = {r for c in on_logits.values() for r in c}
                if with_logits:
                    heads.append(self._sub(p, rows.subset([r in with_logits for r in rows.list], self.model.device)))
                continue
            with_logits, without = p.loop.checking(rows)
            if len(without):
                p.loop.check(without, None, self._valid(p, without))
            if len(with_logits):
                heads.append(self._sub(p, with_logits))
        self.step_cost = 1.0 + (self.head_cost if heads else 0.0)
        if heads:
            logits = self._heads(heads, [h.loop.active[h.rows.index] for h in heads], on_logits)
            for h, lg in zip(heads, logits):
                if h.loop is self.loop and in_passes:
                    self.loop.checked_on_host(h.rows.list)
                else:
                    h.loop.check(h.rows, lg, self._valid(h, h.rows))
        return torch.cat([p.loop.active[p.rows.index] for p in parts])

    def _in_loop(self, part: _Part) -> tuple[Rows, Tensor | None]:
        """The rows of ``part`` in their loops, and where they are among its rows (None: all of them). The
        idle rows a token-synchronous scheduler launches compute masked and their loop keeps no trace of it:
        an ended unit's iteration count, checks and logits stay as it ended (a parked unit's head, run later,
        must see them so)."""
        if part.loop is not self.loop:
            return part.rows, None
        keep = [r in self.running for r in part.rows.list]
        if all(keep):
            return part.rows, None
        dev = self.model.device
        return part.rows.subset(keep, dev), to_device([i for i, k in enumerate(keep) if k], dev)

    def _rope(self, packed: Packed) -> tuple[Tensor, Tensor]:
        ropes = [self.model.rope(c) for c in packed.chunks]
        return packed.pack([r[0] for r in ropes]), packed.pack([r[1] for r in ropes])

    def _sub(self, part: _Part, rows: Rows) -> _Part:
        """The part of ``part`` for some of its rows."""
        if len(rows) == len(part.rows):
            return part
        at = {r: i for i, r in enumerate(part.rows.list)}
        members = [at[r] for r in rows.list]
        return _Part(
            part.loop, rows, lambda: part.chunk.subset(members), None, [part.last[i] for i in members], part.group
        )

    def _valid(self, part: _Part, rows: Rows) -> Tensor:
        """Which positions of ``rows`` (a part's) are real: every one of a one-position unit (without building
        its chunk), a prompt's first ``lengths``."""
        if part.loop is self.loop and part._chunk is None:
            return self.one_position[: len(rows)]
        return self._sub(part, rows).chunk.valid

    def _heads(self, parts: list[_Part], active: list[Tensor], checks: dict | None = None) -> list[Tensor]:
        """Next-token logits [R, V] of each part's rows (at its rows' last real positions), in one pass
        (``Packed``); the coda's K/V written for ``active``; the captured pass also checks the decode rows
        ``checks`` names (criterion -> rows, logit criteria)."""
        model = self.model
        if self.decode_head is not None:  # the captured head of every pool row and each group's members
            decode = [(p.rows.index, a) for p, a in zip(parts, active) if p.group is None]
            groups = [(p.group, p.rows.index, a) for p, a in zip(parts, active) if p.group is not None]
            self.decode_head.prepare(*(decode[0] if decode else (None, None)), groups, checks)
            out = self.decode_head()
            at = {g.serial: i + 1 for i, (g, _, _) in enumerate(groups)}
            self.count_pass(self.head_cost, graph=True)
            return [out[0 if p.group is None else at[p.group.serial]][p.rows.index] for p in parts]
        packed = Packed([p.chunk for p in parts], active)
        s = packed.pack([p.loop.s[p.rows.index] for p in parts])
        at = [a + i * p.chunk.n + last for a, p in zip(packed.offsets, parts) for i, last in enumerate(p.last)]
        at = to_device(at, model.device)
        logits = model.head(s, self.pool, packed, None, self._rope(packed), at=at)[:, -1]
        self.count_pass(self.head_cost)
        return list(logits.split([len(p.rows) for p in parts]))

    # ---------------------------------------------------------------- units end
    def ended(self, flags: list) -> list[Ended]:
        """(See ServingProgram.ended.) ``flags`` are those of the oldest launch not read yet; a unit that ended
        in it and ran masked in a later launch gets its iteration count as it ended."""
        launch = self._launches.popleft()
        n = len(launch.rows)
        done = []
        for (r, serial, t), still in zip(launch.rows, flags[:n]):
            if r in self.running and self.unit_serial[r] == serial and (not still or t >= self.loop.specs[r].r_max):
                self.loop.t[r] = t
                done.append(r)
        members: dict[int, list[int]] = {}  # group serial -> its members that ended
        live = {g.serial: g for g in self.groups}
        for (serial, i, t), still in zip(launch.prompts, flags[n:]):
            group = live.get(serial)
            if group is not None and i in group.live and (not still or t >= group.loop.specs[i].r_max):
                group.loop.t[i] = t
                members.setdefault(serial, []).append(i)
        return self._end(done, members)

    def ended_on_host(self) -> list[Ended]:
        """(See ServingProgram.ended_on_host.) Units at their r_max: whatever the last launch's flags say, their
        loop is over (``launch`` did not run them again, so their iteration counts are as they ended)."""
        done = [r for r in sorted(self.running) if self.loop.at_end(r)]
        members = {g.serial: [i for i in g.live if g.loop.at_end(i)] for g in self.groups}
        return self._end(done, members)

    def _end(self, rows: list[int], members: dict[int, list[int]]) -> list[Ended]:
        """End the one-position units of ``rows`` and each prompt group's ``members`` (by group serial); groups
        with no member left in their loop go."""
        out = self._end_units(rows) if rows else []
        for group in self.groups:
            if members.get(group.serial):
                out += self._end_prompts(group, members[group.serial])
        self.groups = [g for g in self.groups if g.live]
        return out

    def _final_logits(self, part: _Part) -> Tensor:
        """Rule 5 for a part's rows whose loop is over (the head, where needed, over every position)."""
        dev = self.model.device

        def head(sub: Rows) -> Tensor:
            return self._heads([self._sub(part, sub)], [ones(len(sub), dev)])[0]

        return part.loop.final_logits(part.rows, head)

    def _end_units(self, rows_l: list[int]) -> list[Ended]:
        """Ended one-position units: those whose logits exist (a logit criterion checked them) or whose
        head must run now (an adaptive prefill's non-last positions: the coda's K/V, then the next position
        at once) are finished; the others are parked until ``logits`` runs their heads together."""
        self.running.difference_update(rows_l)
        now = [r for r in rows_l if self.loop.checked[r] or self.requests[r].prompt_left]
        later = [r for r in rows_l if r not in now]
        out = self._finish_units(now) if now else []
        if later:
            fill_rows(self.loop.active, to_device(later, self.model.device), False)  # masked if launched idle
            self.parked.update(later)
            out += [Ended(self.requests[r].request, self.loop.t[r], ready=False) for r in later]
        return out

    def _finish_units(self, rows_l: list[int]) -> list[Ended]:
        """Logits of ended one-position units (the head where rule 5 needs it, one pass), states kept for
        ``continuous``; an adaptive prefill's non-last positions start the next position at once."""
        dev = self.model.device
        part = self._decode_part(Rows(rows_l, 0, dev))
        ix = part.rows.index
        logits = self._final_logits(part)
        final = self.loop.s[ix]
        flags = nonfinite_flags(final, None, logits)
        self.last[ix] = final
        fill_rows(self.loop.active, ix, False)  # retired: masked if launched again idle
        out = []
        for i, r in enumerate(rows_l):
            rec = self.requests[r]
            rec.has_state = True
            if rec.prefilling:
                rec.request.prefill_steps.append(int(self.loop.t[r]))
                rec.prefilling = bool(rec.prompt_left)
            if rec.prompt_left:  # adaptive prefill: logits of a non-last prompt position are not used
                self._next_prompt_position(rec)
                continue
            self.results[r] = (logits[i], flags[i])
            out.append(Ended(rec.request, self.loop.t[r]))
        return out

    def _end_prompts(self, group: _PromptGroup, members: list[int]) -> list[Ended]:
        """Logits of prompts whose loop ended, their last real states kept for ``continuous``."""
        part = self._group_part(group, members)
        logits = self._final_logits(part)
        ix = part.rows.index
        flags = nonfinite_flags(group.loop.s[ix], part.chunk.valid, logits)
        out = []
        for j, i in enumerate(members):
            row = group.rows[i]
            group.live.remove(i)
            self.last[row] = group.loop.s[i, group.lengths[i] - 1 : group.lengths[i]]
            self.requests[row].has_state = True
            self.results[row] = (logits[j], flags[j])
            out.append(Ended(self.requests[row].request, group.loop.t[i]))
        return out

    def logits(self, ended: list[Ended]) -> tuple[Tensor, Tensor]:
        parked = [e.request.row for e in ended if not e.ready]
        if parked:
            self.parked.difference_update(parked)
            self._finish_units(parked)
        got = [self.results.pop(e.request.row) for e in ended]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def retire(self, request) -> None:
        row = request.row
        self.requests.pop(row, None)
        self.starting.pop(row, None)
        self.admitted = [r for r in self.admitted if r != row]
        for group in self.groups:  # a retired prompt leaves its group's loop
            if row in group.rows and group.rows.index(row) in group.live:
                group.live.remove(group.rows.index(row))
        self.groups = [g for g in self.groups if g.live]
        self.results.pop(row, None)
        self.running.discard(row)
        self.parked.discard(row)
        fill_rows(self.loop.active, row, False)
        self.release_row(request)
