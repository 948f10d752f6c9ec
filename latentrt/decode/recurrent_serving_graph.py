"""The decode rows' core iteration and head of a recurrent server as captured launch sequences (CUDA graphs).

A server step (decode/recurrent_serving.py) runs one core iteration for every running unit. When only
one-position units run (no prompt group in its loop) and the pool's decode attention is fused
(latentrt/kernels/pool_attention.py: no host value, no data-dependent shape), that iteration is a fixed
sequence of launches over *every* pool row: rows not launched this step are inactive (they write no K/V and
their outputs are dropped), and what changes between steps lives in device tensors: the rows' states,
prelude outputs, positions and loop flags (the program's own per-row tensors, updated in place) and their
timeline entries and iterations (copied in asynchronously by ``prepare``). So on CUDA one graph replays the
whole pass (``GraphedRunner``) instead of a launch per operation, and the step's host work is scheduling
only; elsewhere (the interpreter tests) it runs eagerly, the same code. Prompt groups in their loops join that
pass whole: every member of each resident group at the group's fixed chunk, members out of their loop
masked (no K/V, no timeline mark, outputs dropped) like idle pool rows, each group's iterations and members
in the runner's own device tensors. The pass's launches then depend only on which groups are resident, so
one graph per set of resident groups (``key``), replayed while the set stands (on 2026-12-04 an eager pass with
a prompt group cost a serving step at Huginn-0125's shape most of its host time); a set with groups is captured
only at its third call in a row (``PerGroupSetRunner.CAPTURE_AT``: most sets last a step or two). The head
pass of decode rows (coda -> lm_head, for logit criteria every check and for sampling) is the same: every
pool row's logits, the coda's K/V written for the rows asked for (``DecodeHeadRunner``), and so is the
prelude of the tokens that begin their units (``DecodePreludeRunner``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..kv_pool import RaggedChunk
from ..models.layers import Packed
from ..transfer import copy_from_host, fill_rows, to_device


class PerGroupSetRunner(GraphedRunner):
    """A runner whose launches depend on which prompt groups are resident: the captured graphs of each set
    (``key``: the groups' serials) kept while its groups live, at most MAX_GRAPHS sets besides the current
    one (the oldest dropped first; the empty set's never).

    A set with groups is captured at its CAPTURE_AT-th call in a row, its calls before run eagerly: a
    capture costs about two eager calls and a synchronize, and a set lasts only while no group begins or ends
    (on the CPU, the built-in model's serving trace at 200 requests/s: under the depth scheduler 24 sets with
    groups in 84 steps, 13 of them for one step and 11 for two; a capture at every first call meant one every
    2.4 steps). The empty set (decode rows only) is captured at its first call."""

    MAX_GRAPHS = 4  # (each set's graphs hold its pass's activations)
    CAPTURE_AT = 3  # (benchmarks/serve.py --group-capture-at sets it; 1: every set at its first call)
    _key: tuple = ()
    _calls = 0  # calls of the current set in a row

    def __call__(self):
        self._calls += 1
        if self._graph is None and self._key and self._calls < self.CAPTURE_AT:
            return self.run()
        return super().__call__()

    def _select(self, groups: list) -> set | None:
        """Switch to the graphs of ``groups``' set (none yet: the next call captures them); drop those of sets
        with a group no longer resident. Returns the resident groups' serials if the set changed, else None."""
        key = tuple(g.serial for g in groups)
        if key == self._key:
            return None
        resident = {g.serial for g in self.program.groups} | set(key)
        captured = self.__dict__.setdefault("_captured", {})
        if self._graph is not None:
            captured[self._key] = (self._graph, self._graphs, self._markers, self._outputs)
        self._graph, self._graphs, self._markers, self._outputs = captured.pop(key, (None, [], [], None))
        self._key, self._calls = key, 0
        for k in [k for k in captured if not set(k) <= resident]:
            del captured[k]
        while len(captured) > self.MAX_GRAPHS:
            del captured[next(iter(k for k in captured if k))]
        self.groups = groups
        return resident


class DecodeCoreRunner(PerGroupSetRunner):
    """One core iteration of the one-position units of ``program`` (a ``RecurrentServing``), all pool rows
    at once (see module docstring): ``prepare(rows)`` then call; returns the new states [rows, 1, d]."""

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model
        rows, dev = program.pool.rows, program.model.device
        self.groups: list = []  # the prompt groups this pass runs beside the decode rows, in order (the key)
        self._views: dict[int, tuple] = {}  # group serial -> (its chunk with our iterations, iterations, members)
        self.entry = torch.zeros(rows, dtype=torch.long, device=dev)
        self.iterations = torch.zeros(rows, dtype=torch.long, device=dev)
        self.launched = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.chunk = RaggedChunk(
            torch.arange(rows, device=dev),
            [0] * rows,  # host starts / end: unused by the fused attention (it reads ``entry`` on the device)
            [1] * rows,
            1,
            program.pool.max_len,
            self.entry[:, None],
            program.position[:, None],
            None,
            torch.ones(rows, 1, dtype=torch.bool, device=dev),
            self.iterations,
        )

    def prepare(self, rows: list[int], groups: list = ()) -> None:
        """This step's launched rows and resident prompt groups (``_PromptGroup``), every row's entry and
        iteration, each group's iterations and members in their loop (asynchronous copies)."""
        p = self.program
        launched = [False] * p.pool.rows
        for r in rows:
            launched[r] = True
        copy_from_host(self.launched, launched)
        self.copy_entries()
        copy_from_host(self.iterations, p.loop.t)
        self._use(list(groups))
        for g in self.groups:
            _, iterations, members = self._views[g.serial]
            copy_from_host(iterations, g.loop.t)
            copy_from_host(members, [i in g.live for i in range(len(g.rows))])

    def _use(self, groups: list) -> None:
        """Run beside ``groups`` from now on (their set's graphs, ``_select``): views of new groups made,
        those of ended groups dropped."""
        resident = self._select(groups)
        if resident is None:
            return
        dev = self.program.model.device
        for g in groups:
            if g.serial not in self._views:
                rows = len(g.rows)
                iterations = torch.zeros(rows, dtype=torch.long, device=dev)
                members = torch.zeros(rows, dtype=torch.bool, device=dev)
                self._views[g.serial] = (dataclasses.replace(g.chunk, iterations=iterations), iterations, members)
        for serial in [s for s in self._views if s not in resident]:
            del self._views[serial]

    def copy_entries(self) -> None:
        """Every row's entry to the device, when a unit began since the last copy (the three passes of a
        step share one copy, and a step where no unit began needs none)."""
        p = self.program
        if p.entries_changed:
            copy_from_host(self.entry, p.entry)
            p.entries_changed = False

    def run(self) -> tuple[Tensor, ...]:
        """The iteration, taken by the rows and members that ran it (``LatentLoop.take``: the caller counts
        it on the host). Returns the new states: the pool rows' [rows, 1, d], then each group's [members, n, d]."""
        p, pool = self.program, self.program.pool
        loops, chunks, actives = [p.loop], [self.chunk], [p.loop.active & self.launched]
        inputs = [p.e]
        for g in self.groups:
            chunk, _, members = self._views[g.serial]
            loops.append(g.loop)
            chunks.append(chunk)
            actives.append(g.loop.active & members)
            inputs.append(g.e)
        for chunk, active in zip(chunks, actives):
            pool.mark_iteration(chunk, None, active)
        packed = Packed(chunks, actives)
        states = packed.pack([loop.s for loop in loops])
        new = packed.unpack(
            self.model.core_iteration(states, packed.pack(inputs), pool, packed, None, None, p._rope(packed))
        )
        for loop, x, active in zip(loops, new, actives):
            loop.take(x, active)
        return tuple(new)


class DecodeHeadRunner(PerGroupSetRunner):
    """The head (coda -> ln_f -> lm_head) of every pool row's one-position unit and of every member of the
    prompt groups given (at each member's last real position; a group whole, at the core runner's view of
    it), the coda's K/V written for the rows and members ``prepare`` names. Returns logits (fp32): [rows, V],
    then [members, V] per group; the caller keeps the rows it asked for. One graph per set of groups, as the
    core runner."""

    def __init__(self, core: DecodeCoreRunner) -> None:
        self.core, self.program, self.model = core, core.program, core.model
        self.write = torch.zeros(core.program.pool.rows, dtype=torch.bool, device=core.program.model.device)
        self.groups: list = []
        self._writes: dict[int, Tensor] = {}  # group serial -> which members' coda K/V are written
        self._at = core.chunk.rows  # each row's (then member's) logits position in the packed sequence

    def prepare(self, rows: Tensor | None, write: Tensor | None, groups: list = ()) -> None:
        """``rows`` (a device index, or None) whose K/V are written where ``write`` (aligned with ``rows``);
        ``groups``: (group, members' device index, write) likewise."""
        self.core.copy_entries()
        self.write.zero_()
        if rows is not None:
            self.write[rows] = write
        self._use([g for g, _, _ in groups])
        for g, members, w in groups:
            mask = self._writes[g.serial]
            mask.zero_()
            mask[members] = w

    def _use(self, groups: list) -> None:
        resident = self._select(groups)
        if resident is None:
            return
        dev = self.program.model.device
        rows = self.program.pool.rows
        at, offset = list(range(rows)), rows  # token i of the packed sequence is pool row i's, then the groups'
        for g in groups:
            self._writes.setdefault(g.serial, torch.zeros(len(g.rows), dtype=torch.bool, device=dev))
            n = g.chunk.n
            at += [offset + i * n + length - 1 for i, length in enumerate(g.lengths)]
            offset += len(g.rows) * n
        self._at = to_device(at, dev)
        for serial in [s for s in self._writes if s not in resident]:
            del self._writes[serial]

    def run(self) -> tuple[Tensor, ...]:
        p = self.program
        chunks, writes, states = [self.core.chunk], [self.write], [p.loop.s]
        for g in self.groups:
            chunks.append(self.core._views[g.serial][0])
            writes.append(self._writes[g.serial])
            states.append(g.loop.s)
        packed = Packed(chunks, writes)
        logits = self.model.head(packed.pack(states), p.pool, packed, None, p._rope(packed), at=self._at)[:, -1]
        return tuple(logits.split([len(c.starts) for c in chunks]))


class DecodePreludeRunner(GraphedRunner):
    """The prelude (embedding x sqrt(d) -> prelude layers) of every pool row's next token, the prelude's K/V
    written for the rows whose unit begins (``prepare``: their rows and token ids; their entries and
    positions already placed). Returns e [rows, 1, d]; the caller keeps the rows it asked for."""

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
        p = self.program
        packed = Packed([self.core.chunk], [self.write])
        return packed.unpack(self.model.prelude(self.ids[None], p.pool, packed, p._rope(packed)))[0]
