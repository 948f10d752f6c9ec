"""A Coconut server's pass as one captured launch sequence (a CUDA graph) over every pool row and the step's chunks.

A serving step (decode/coconut_serving.py) runs one pass for every resident request. Where the pool's decode
and prefill attention are fused (latentrt/kernels/pool_attention.py, pool_prefill.py: no host value, no
data-dependent shape), the pass is a fixed sequence of launches over *every* pool row: rows not launched write
no K/V and keep their hidden state (their outputs are dropped), and what changes between steps lives in device
tensors (the rows' token ids, timeline entries, which rows run and which of them take a thought, the program's
per-row hidden states). The prompt chunks admitted that step join the same pass as one group in a slot of its
bucket's shape (``PromptChunksSlot``; serving_graph.py: chunks, positions and keys rounded up to powers of
two, padding masked), so one graph per slot shape serves every step whose chunks round to it (a key captured
at its third call, ``SlotsRunner.CAPTURE_AT``), and a step of single-position passes only replays the graph
without a slot. On CUDA a graph replays the pass instead of a launch per operation (``GraphedRunner``);
elsewhere (the interpreter tests) it runs eagerly, the same code. A row's entry is its model position
(``KVPool.begin``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..kv_pool import RaggedChunk
from ..models.layers import Packed
from ..transfer import copy_from_host
from .serving_graph import ChunkSlot, SlotsRunner


@dataclass
class PromptChunks:
    """The prompt chunks of one step (a ``ChunkSlot`` group): their pool rows, chunk (begun in the pool, padded
    to the longest), real lengths, token ids (host lists) and a serial distinct from the other steps'."""

    rows: list[int]
    chunk: RaggedChunk
    lengths: list[int]
    ids: list[list[int]]
    serial: int


class PromptChunksSlot(ChunkSlot):
    """A step's prompt chunks in a captured pass: their token ids and which members are real (the others are
    padding: they write no K/V and their hidden states are the first member's, dropped)."""

    def __init__(self, shape: tuple[int, int, int], program) -> None:
        super().__init__(shape, program)
        M, N, _ = shape
        dev = program.model.device
        self.ids = torch.zeros(M, N, dtype=torch.long, device=dev)
        self.write = torch.zeros(M, dtype=torch.bool, device=dev)

    def load(self, group: PromptChunks) -> None:
        super().load(group)
        M, N, _ = self.shape
        ids = [t for own in group.ids for t in own + [0] * (N - len(own))] + [0] * (N * (M - self.m))
        copy_from_host(self.ids.view(-1), ids)
        copy_from_host(self.write, [i < self.m for i in range(M)])


class StepPassRunner(SlotsRunner):
    """One pass of the pool rows ``prepare`` names (``CoconutServing``'s ``program``), single-position each (a
    token's embedding + wpe, or for a thought the previous pass's hidden state fed back: ``model.feedback``),
    and of the step's prompt chunks (``PromptChunks``, in a ``PromptChunksSlot``), through every layer; the
    rows that ran take their last position's new hidden state into ``program.h_rows``. Returns the pool rows'
    hidden states [rows, 1, d] before ln_f, then the slot's [M, N, d] if a slot is resident."""

    SLOT = PromptChunksSlot

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model
        rows, dev = program.pool.rows, program.model.device
        self.entry = torch.zeros(rows, dtype=torch.long, device=dev)
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write = torch.zeros(rows, dtype=torch.bool, device=dev)  # the rows that run (and write their K/V)
        self.latent = torch.zeros(rows, dtype=torch.bool, device=dev)  # of those, the thoughts
        self._entries = [0] * rows  # host copy of ``entry``
        self.chunk = program.pool.every_row(self.entry, self.entry)  # (a row's entry is its position)

    def prepare(
        self, rows: list[int], chunk: RaggedChunk | None, ids: Tensor | None, latent: list[bool], chunks=None
    ) -> None:
        """This pass's single-position rows and their chunk (their entries begun in the pool; None: no row),
        token ids [len(rows)] (device; a thought's is unused) and which of them take a thought, and the step's
        ``PromptChunks`` (None: none): asynchronous copies."""
        n = self.program.pool.rows
        write, thought = [False] * n, [False] * n
        for r, e, is_latent in zip(rows, chunk.starts if rows else (), latent):
            write[r], thought[r], self._entries[r] = True, is_latent, e
        copy_from_host(self.write, write)
        copy_from_host(self.latent, thought)
        if rows:
            copy_from_host(self.entry, self._entries)
            self.ids.index_copy_(0, chunk.rows, ids)
        self._select([chunks] if chunks is not None else [])

    def run(self) -> tuple[Tensor, ...]:
        p, m = self.program, self.model
        positions = self.entry[:, None]
        x = m.embed(self.ids[:, None]) + m.transformer.wpe(positions)
        x, ln1x = m.with_thoughts(x, *m.feedback(p.h_rows, positions), self.latent[:, None, None])
        chunks, writes, xs, ln1xs = [self.chunk], [self.write], [x], [ln1x]
        for slot in self.slots:
            chunks.append(slot.chunk)
            writes.append(slot.write)
            xs.append(m.embed(slot.ids) + m.transformer.wpe(slot.chunk.positions))
            ln1xs.append(m.transformer.h[0].ln_1(xs[-1]))
        packed = Packed(chunks, writes)
        h, *in_slots = packed.unpack(m.forward_residual(packed.pack(xs), p.pool, packed, packed.pack(ln1xs)))
        p.h_rows.copy_(torch.where(self.write[:, None, None], h, p.h_rows))
        for slot, hs in zip(self.slots, in_slots):  # each chunk's last real position (padding: the first's)
            p.h_rows.index_copy_(0, slot.chunk.rows, hs.flatten(0, 1)[slot.last][:, None])
        return (h, *in_slots)


class HeadsRunner(GraphedRunner):
    """The head pass (ln_f -> lm_head) of every pool row's last hidden state (``program.h_rows``) and the logits'
    non-finite flags: one captured launch sequence; the caller keeps the rows whose units ended. (The head's
    weights are read once a pass whatever the rows; the rows not kept cost their arithmetic alone.) Returns
    logits [rows, V] (fp32) and flags [rows]."""

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model

    def run(self) -> tuple[Tensor, Tensor]:
        return self.program.head(self.program.h_rows[:, 0])
