"""A Coconut server's single-position passes as one captured launch sequence (a CUDA graph) over every pool row.

A serving step (decode/coconut_serving.py) runs one pass for every resident request. When only
single-position passes run (answer tokens and thoughts; no prompt chunk this step) and the pool's decode
attention is fused (latentrt/kernels/pool_attention.py: no host value, no data-dependent shape), the pass is
a fixed sequence of launches over *every* pool row: rows not launched write no K/V and keep their hidden state
(their outputs are dropped), and what changes between steps lives in device tensors (the rows' token ids,
timeline entries, which rows run and which of them take a thought, the program's per-row hidden states). So on
CUDA one graph replays the pass instead of a launch per operation (``GraphedRunner``); elsewhere (the
interpreter tests) it runs eagerly, the same code. A row's entry is its model position (``KVPool.begin``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..kv_pool import RaggedChunk
from ..models.layers import Packed
from ..transfer import copy_from_host


class ColumnsRunner(GraphedRunner):
    """One single-position pass of the pool rows ``prepare`` names (``CoconutServing``'s ``program``): a
    token's embedding + wpe, or for a thought the previous pass's hidden state fed back (``model.feedback``),
    through every layer; the rows that ran take their new hidden states into ``program.h_rows``. Returns the
    hidden states [rows, 1, d] before ln_f."""

    def __init__(self, program) -> None:
        self.program, self.model = program, program.model
        rows, dev = program.pool.rows, program.model.device
        self.entry = torch.zeros(rows, dtype=torch.long, device=dev)
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write = torch.zeros(rows, dtype=torch.bool, device=dev)  # the rows that run (and write their K/V)
        self.latent = torch.zeros(rows, dtype=torch.bool, device=dev)  # of those, the thoughts
        self._entries = [0] * rows  # host copy of ``entry``
        self.chunk = program.pool.every_row(self.entry, self.entry)  # (a row's entry is its position)

    def prepare(self, rows: list[int], chunk: RaggedChunk, ids: Tensor, latent: list[bool]) -> None:
        """This pass's rows and their chunk (their entries begun in the pool), token ids [len(rows)] (device; a
        thought's is unused) and which of them take a thought: asynchronous copies."""
        n = self.program.pool.rows
        write, thought = [False] * n, [False] * n
        for r, e, is_latent in zip(rows, chunk.starts, latent):
            write[r], thought[r], self._entries[r] = True, is_latent, e
        copy_from_host(self.write, write)
        copy_from_host(self.latent, thought)
        copy_from_host(self.entry, self._entries)
        self.ids.index_copy_(0, chunk.rows, ids)

    def run(self) -> Tensor:
        p, m = self.program, self.model
        positions = self.entry[:, None]
        x = m.embed(self.ids[:, None]) + m.transformer.wpe(positions)
        x, ln1x = m.with_thoughts(x, *m.feedback(p.h_rows, positions), self.latent[:, None, None])
        packed = Packed([self.chunk], [self.write])
        h = packed.unpack(m.forward_residual(packed.pack([x]), p.pool, packed, packed.pack([ln1x])))[0]
        p.h_rows.copy_(torch.where(self.write[:, None, None], h, p.h_rows))
        return h
