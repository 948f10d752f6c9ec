"""The decode rows' core iteration and head of a recurrent server as captured launch sequences (CUDA graphs).

A server step (decode/recurrent_serving.py) runs one core iteration for every running unit. When only
one-position units run (no prompt group in its loop) and the pool's decode attention is fused
(latentrt/kernels/pool_attention.py: no host value, no data-dependent shape), that iteration is a fixed
sequence of launches over *every* pool row: rows not launched this step are inactive (they write no K/V and
their outputs are dropped), and what changes between steps lives in device tensors: the rows' states, prelude
outputs, positions and loop flags (the program's own per-row tensors, updated in place) and their timeline
entries and iterations (copied in asynchronously by ``prepare``). So on CUDA one graph replays the whole pass
(``GraphedRunner``) instead of a launch per operation, and the step's host work is scheduling only; elsewhere
(the interpreter tests) it runs eagerly, the same code. Prompt groups in their loops join that pass whole,
each in a slot of its bucket's shape (``GroupSlot``; serving_graph.py: members, positions and keys rounded up
to powers of two, padding masked), members out of their loop masked (no K/V, no timeline mark, outputs dropped)
like idle pool rows, one graph per tuple of slot shapes (``key``, with the exit criteria the pass checks). (On
2026-12-04 an eager pass with a prompt group cost a serving step at Huginn-0125's shape most of its host
time.) A key with groups is captured at its third call
(``GroupSlotsRunner.CAPTURE_AT``). The head pass of decode rows (coda -> lm_head, for logit criteria every
check and for sampling) is the same: every pool row's logits, the coda's K/V written for the rows asked for
(``DecodeHeadRunner``), and so is the prelude of the tokens that begin their units (``DecodePreludeRunner``).
The decode rows' exit checks run inside the core pass (criteria on states) and the head pass (on logits), by
masks over every pool row (``LatentLoop.check_where``): a step's checks cost no launch of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..models.layers import Packed
from ..transfer import copy_from_host, fill_rows
from .serving_graph import ChunkSlot, SlotsRunner


class GroupSlot(ChunkSlot):
    """A resident prompt group's slot (serving_graph.py's ``ChunkSlot``) with its loop's buffers: the runners
    copy in each call what changes (states, iterations, which members run or write) and the core runner copies
    the new states back into the group's loop. Padding members are never in the loop (no K/V, no timeline
    mark, outputs dropped)."""

    def __init__(self, shape: tuple[int, int, int], program) -> None:
        super().__init__(shape, program)
        M, N, _ = shape
        model = program.model
        dev, dt = model.device, model.dtype
        self.s = torch.zeros(M, N, model.config.n_embd, dtype=dt, device=dev)  # the group's states, copied in
        self.e = torch.zeros_like(self.s)  # its prelude output
        self.members = torch.zeros(M, dtype=torch.bool, device=dev)  # core: in their loop; head: K/V written
        self.active = torch.zeros(M, dtype=torch.bool, device=dev)  # the group's loop's active rows
        self.chunk.iterations = torch.zeros(M, dtype=torch.long, device=dev)

    def load(self, group) -> None:
        """``group``'s fixed values (``ChunkSlot.load``) and prelude output into the slot, the rest reset."""
        super().load(group)
        self.e.zero_()
        self.e[: self.m, : self.n].copy_(group.e)
        self.s.zero_()  # (the runners copy the group's states in at each call)
        self.members.zero_()
        self.active.zero_()
        self.chunk.iterations.zero_()


class GroupSlotsRunner(SlotsRunner):
    """A ``SlotsRunner`` of prompt groups (``GroupSlot``) whose pass checks the decode rows' exits too
    (``LatentLoop.check_where``), one criterion after another (``criteria``: those of its kind the program's
    ``criteria`` gives, part of the key), each for the rows ``check_as`` marks (copied in each call, all false
    in a call that checks nothing)."""

    SLOT = GroupSlot
    HELD = SlotsRunner.HELD + ("check_as",)  # per key
    check_as = None  # the current key's [criteria, pool rows] bool: which rows each criterion checks

    def key_state(self, key: tuple) -> tuple:
        criteria = key[0]
        if not criteria:
            return (None,)
        rows, dev = self.program.pool.rows, self.program.model.device
        return (torch.zeros(len(criteria), rows, dtype=torch.bool, device=dev),)

    def prepare_checks(self, checks: dict) -> None:
        """Which pool rows each of the key's criteria checks in this call (``checks``: criterion -> rows)."""
        assert set(checks) <= set(self.criteria), "a row checks a criterion the key does not"
        if not self.criteria:
            return
        rows = self.program.pool.rows
        marks = [False] * (len(self.criteria) * rows)
        for c, crit in enumerate(self.criteria):
            for r in checks.get(crit, ()):
                marks[c * rows + r] = True
        copy_from_host(self.check_as.view(-1), marks)

    def run_checks(self, logits: Tensor | None) -> None:
        """The decode rows' checks marked in ``check_as`` (every row's ``logits`` for logit criteria)."""
        p = self.program
        for crit, checking in zip(self.criteria, self.check_as if self.criteria else ()):
            p.loop.check_where(crit, checking, logits, p.one_position)


class DecodeCoreRunner(GroupSlotsRunner):
    """One core iteration of the one-position units of ``program`` (a ``RecurrentServing``), all pool rows
    at once, and of every member of the resident prompt groups, each in its slot (see module docstring):
    ``prepare(rows, groups)`` then call; returns the new states [rows, 1, d], then each slot's [M, N, d] and
    which of its members ran [M]. A call takes the new states into the loops (rule 2's device half; the
    caller counts the iterations on the host)."""

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model
        rows, dev = program.pool.rows, program.model.device
        self.entry = torch.zeros(rows, dtype=torch.long, device=dev)
        self.iterations = torch.zeros(rows, dtype=torch.long, device=dev)
        self.launched = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.chunk = program.pool.every_row(self.entry, program.position, self.iterations)

    def prepare(self, rows: list[int], groups: list = (), checks: dict | None = None) -> None:
        """This step's launched rows and resident prompt groups (``(_PromptGroup, members launched)``), every
        row's entry and iteration, each group's states, iterations and launched members (asynchronous copies);
        ``checks`` (criterion -> rows, criteria on states only): the decode rows checked after the iteration."""
        p = self.program
        launched = [False] * p.pool.rows
        for r in rows:
            launched[r] = True
        copy_from_host(self.launched, launched)
        self.copy_entries()
        copy_from_host(self.iterations, p.loop.t)
        self._select([g for g, _ in groups], p.criteria(logits=False))
        self.prepare_checks(checks or {})
        for slot, (g, members) in zip(self.slots, groups):
            m, n = slot.m, slot.n
            copy_from_host(slot.chunk.iterations[:m], g.loop.t)
            copy_from_host(slot.members[:m], [i in members for i in range(m)])
            slot.active[:m].copy_(g.loop.active)
            slot.s[:m, :n].copy_(g.loop.s)

    def __call__(self) -> tuple[Tensor, ...]:
        out = super().__call__()
        for j, slot in enumerate(self.slots):  # each group's loop takes its members' new states
            slot.group.loop.take(out[1 + 2 * j][: slot.m, : slot.n], out[2 + 2 * j][: slot.m])
        return out

    def copy_entries(self) -> None:
        """Every row's entry to the device, when a unit began since the last copy (the three passes of a
        step share one copy, and a step where no unit began needs none)."""
        p = self.program
        if p.entries_changed:
            copy_from_host(self.entry, p.entry)
            p.entries_changed = False

    def run(self) -> tuple[Tensor, ...]:
        """The iteration; the pool rows that ran it take their new states (``LatentLoop.take``), the groups'
        members theirs at the call. Returns the pool rows' new states [rows, 1, d], then per slot its new
        states [M, N, d] and which members ran [M]."""
        p, pool = self.program, self.program.pool
        chunks, actives, states, inputs = [self.chunk], [p.loop.active & self.launched], [p.loop.s], [p.e]
        for slot in self.slots:
            chunks.append(slot.chunk)
            actives.append(slot.active & slot.members)
            states.append(slot.s)
            inputs.append(slot.e)
        for chunk, active in zip(chunks, actives):
            pool.mark_iteration(chunk, None, active)
        packed = Packed(chunks, actives)
        new = packed.unpack(
            self.model.core_iteration(
                packed.pack(states), packed.pack(inputs), pool, packed, None, None, p._rope(packed)
            )
        )
        p.loop.take(new[0], actives[0])
        self.run_checks(None)
        return (new[0], *(t for pair in zip(new[1:], actives[1:]) for t in pair))


class DecodeHeadRunner(GroupSlotsRunner):
    """The head (coda -> ln_f -> lm_head) of every pool row's one-position unit and of every member of the
    prompt groups given (at each member's last real position; each group in a slot of its own, as the core
    runner's), the coda's K/V written for the rows and members ``prepare`` names. Returns logits (fp32): [rows,
    V], then [members, V] per group (``run``: [M, V] per slot); the caller keeps the rows it asked for. One
    graph per key of group shapes, as the core runner."""

    def __init__(self, core: DecodeCoreRunner) -> None:
        self.core, self.program, self.model = core, core.program, core.model
        self.write = torch.zeros(core.program.pool.rows, dtype=torch.bool, device=core.program.model.device)

    def prepare(self, rows: Tensor | None, write: Tensor | None, groups: list = (), checks: dict | None = None) -> None:
        """``rows`` (a device index, or None) whose K/V are written where ``write`` (aligned with ``rows``);
        ``groups``: (group, members' device index, write) likewise; ``checks`` (criterion -> rows, logit
        criteria only): the decode rows checked on their logits."""
        self.core.copy_entries()
        self.write.zero_()
        if rows is not None:
            self.write[rows] = write
        self._select([g for g, _, _ in groups], self.program.criteria(logits=True))
        self.prepare_checks(checks or {})
        for slot, (g, members, w) in zip(self.slots, groups):
            slot.members.zero_()
            slot.members[: slot.m][members] = w  # (``members`` may be a slice: every member)
            slot.s[: slot.m, : slot.n].copy_(g.loop.s)

    def __call__(self) -> tuple[Tensor, ...]:
        out = super().__call__()
        return (out[0], *(logits[: slot.m] for logits, slot in zip(out[1:], self.slots)))  # each group's members

    def run(self) -> tuple[Tensor, ...]:
        p = self.program
        chunks, writes, states = [self.core.chunk], [self.write], [p.loop.s]
        # the packed sequence's token i is pool row i's, then the slots' tokens follow
        at, offset = [self.core.chunk.rows], p.pool.rows
        for slot in self.slots:
            chunks.append(slot.chunk)
            writes.append(slot.members)
            states.append(slot.s)
            at.append(slot.last + offset)
            offset += slot.s.shape[0] * slot.s.shape[1]
        packed = Packed(chunks, writes)
        logits = self.model.head(packed.pack(states), p.pool, packed, None, p._rope(packed), at=torch.cat(at))[:, -1]
        out = tuple(logits.split([len(c.starts) for c in chunks]))
        self.run_checks(out[0])
        return out


class DecodePreludeRunner(GraphedRunner):
    """The prelude (embedding x sqrt(d) -> prelude layers) of every pool row's next token, the prelude's K/V
    written and the output taken into the program's ``e`` for the rows whose unit begins (``prepare``: their
    rows and token ids; their entries and positions already placed). Returns e [rows, 1, d]."""

    def __init__(self, core: DecodeCoreRunner) -> None:
        self.core, self.program, self.model = core, core.program, core.model
        rows, dev = core.program.pool.rows, core.program.model.device
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write = torch.zeros(rows, dtype=torch.bool, device=dev)

    def prepare(self, rows: Tensor, ids: Tensor) -> None:
        self.core.copy_entries()
        self.write.zero_()
        fill_rows(self.write, rows, True)
        self.ids[rows] = ids

    def run(self) -> Tensor:
        """The prelude; the rows whose unit begins take their outputs into the program's ``e``."""
        p = self.program
        packed = Packed([self.core.chunk], [self.write])
        e = packed.unpack(self.model.prelude(self.ids[None], p.pool, packed, p._rope(packed)))[0]
        p.e.copy_(torch.where(self.write[:, None, None], e, p.e))
        return e
