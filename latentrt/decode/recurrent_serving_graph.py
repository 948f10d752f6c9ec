"""The decode rows' core iteration and head of a recurrent server as captured launch sequences (CUDA graphs).

A server step (decode/recurrent_serving.py) runs one core iteration for every running unit. When only
one-position units run (no prompt group in its loop) and the pool's decode attention is fused
(latentrt/kernels/pool_attention.py: no host value, no data-dependent shape), that iteration is a fixed
sequence of launches over *every* pool row: rows not launched this step are inactive (they write no K/V and
their outputs are dropped), and what changes between steps lives in device tensors: the rows' states,
prelude outputs, positions and loop flags (the program's own per-row tensors, updated in place) and their
timeline entries and iterations (copied in asynchronously by ``prepare``). So on CUDA one graph replays the
whole pass (``GraphedRunner``) instead of a launch per operation, and the step's host work is scheduling
only; elsewhere (the interpreter tests) it runs eagerly, the same code. The head pass of decode rows (coda
-> lm_head, for logit criteria every check and for sampling) is the same: every pool row's logits, the
coda's K/V written for the rows asked for (``DecodeHeadRunner``), and so is the prelude of the tokens that
begin their units (``DecodePreludeRunner``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..kv_pool import RaggedChunk
from ..models.layers import Packed
from ..transfer import fill_rows, to_device


class DecodeCoreRunner(GraphedRunner):
    """One core iteration of the one-position units of ``program`` (a ``RecurrentServing``), all pool rows
    at once (see module docstring): ``prepare(rows)`` then call; returns the new states [rows, 1, d]."""

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model
        rows, dev = program.pool.rows, program.model.device
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

    def prepare(self, rows: list[int]) -> None:
        """This step's launched rows, and every row's entry and iteration (asynchronous copies)."""
        p = self.program
        dev = p.model.device
        launched = [False] * p.pool.rows
        for r in rows:
            launched[r] = True
        self.launched.copy_(to_device(launched, dev, torch.bool))
        self.copy_entries()
        self.iterations.copy_(to_device(p.loop.t, dev))

    def copy_entries(self) -> None:
        """Every row's entry to the device, when a unit began since the last copy (the three passes of a
        step share one copy, and a step where no unit began needs none)."""
        p = self.program
        if p.entries_changed:
            self.entry.copy_(to_device(p.entry, p.model.device))
            p.entries_changed = False

    def run(self) -> Tensor:
        p, pool = self.program, self.program.pool
        active = p.loop.active & self.launched
        pool.mark_iteration(self.chunk, None, active)
        packed = Packed([self.chunk], [active])
        s, e = packed.pack([p.loop.s]), packed.pack([p.e])
        new = self.model.core_iteration(s, e, pool, packed, None, None, p._rope(packed))
        return packed.unpack(new)[0]


class DecodeHeadRunner(GraphedRunner):
    """The head (coda -> ln_f -> lm_head) of every pool row's one-position unit, the coda's K/V written for
    the rows ``prepare`` names (at their entries: the core runner's static chunk). Returns logits [rows, V]
    (fp32); the caller keeps the rows it asked for."""

    def __init__(self, core: DecodeCoreRunner) -> None:
        self.core, self.program, self.model = core, core.program, core.model
        self.write = torch.zeros(core.program.pool.rows, dtype=torch.bool, device=core.program.model.device)

    def prepare(self, rows: Tensor, write: Tensor) -> None:
        """``rows`` (a device index) whose K/V are written where ``write`` (aligned with ``rows``)."""
        self.core.copy_entries()
        self.write.zero_()
        self.write[rows] = write

    def run(self) -> Tensor:
        p, chunk = self.program, self.core.chunk
        packed = Packed([chunk], [self.write])
        at = chunk.rows  # token i of the packed sequence is pool row i's
        return self.model.head(packed.pack([p.loop.s]), p.pool, packed, None, p._rope(packed), at=at)[:, -1]


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
