"""Preallocated KV cache for one generation; it owns the timeline every backend reads.

Two kinds of layers share one timeline of T positions:
- plain layers (prelude, coda, every GPT-2 layer) hold one K/V entry per position;
- looped core layers hold K slots per position, K set by the KV mode (latentrt/kv_modes.py, which also
  states the write and lookup rules).

The timeline is three tensors: ``valid`` [B, T] (which entries are real tokens: not left padding, not a
finished sequence), ``n_valid`` [B] (real entries so far: the next RoPE / wpe position) and ``written``
[B, T] (iterations each position ran, for the lookup rule). Only this module writes them, through
``begin`` / ``mark_iteration`` / ``record_iterations`` for spans the host knows, and ``begin_at`` /
``mark_iteration_at`` / ``write_plain_at`` for device-side indices (graph-captured decode steps).
Kernels write K/V data into the slots the cache hands out and read the timeline. Sequences that exited
are frozen by masking their writes, never by host branching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels.reference import kept_first, missed_iteration, take_positions
from .kv_modes import KVMode


@dataclass
class Chunk:
    """A run of new timeline positions [start, end) being processed together."""

    start: int
    end: int
    positions: Tensor  # [B, n] model positions (RoPE / wpe) of the new entries
    mask: Tensor  # [B, 1, n, end] bool: which cached keys each new query attends to
    valid: Tensor  # [B, n] bool: which new entries are real tokens (not left padding / finished)

    @property
    def size(self) -> int:
        return self.end - self.start


def make_chunk(valid_so_far: Tensor, n_valid: Tensor, start: int, valid: Tensor) -> Chunk:
    """Positions and attention mask of new entries [start, end) given the validity of all entries so far."""
    end = valid_so_far.shape[1]
    positions = (n_valid[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
    q_idx = torch.arange(start, end, device=valid.device)
    k_idx = torch.arange(end, device=valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # [n, end]
    diag = k_idx[None, :] == q_idx[:, None]  # a padded query still attends to itself (no NaN rows)
    mask = (valid_so_far[:, None, :] & causal[None]) | diag[None]
    return Chunk(start, end, positions, mask[:, None], valid)


class GrowingKVCache:
    """A differentiable cache for training (plain layers only): entries are concatenated, never written
    in place, so gradients flow through every cached K/V. Same begin()/plain() interface as KVCache."""

    def __init__(self, batch: int, n_plain: int, device: torch.device | str = "cpu") -> None:
        self.k: list[list[Tensor]] = [[] for _ in range(n_plain)]
        self.v: list[list[Tensor]] = [[] for _ in range(n_plain)]
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.n_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    def begin(self, valid: Tensor) -> Chunk:
        valid = valid.to(device=self.valid.device, dtype=torch.bool)
        start = self.length
        self.valid = torch.cat([self.valid, valid], 1)
        chunk = make_chunk(self.valid, self.n_valid, start, valid)
        self.n_valid = self.n_valid + valid.long().sum(1)
        self.length = self.valid.shape[1]
        return chunk

    def plain(
        self, layer: int, k: Tensor, v: Tensor, chunk: Chunk, active: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        self.k[layer].append(k)
        self.v[layer].append(v)
        return torch.cat(self.k[layer], 2), torch.cat(self.v[layer], 2)


class KVCache:
    """K/V tensors for every layer, allocated once for ``max_len`` positions."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_plain: int,
        kv_heads: int,
        head_dim: int,
        *,
        n_core: int = 0,
        kv_mode: KVMode | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.kv_mode = kv_mode if kv_mode is not None else KVMode("shared", 1)  # the looped layers' slot rules
        core_slots = self.kv_mode.slots
        self.plain_k = torch.zeros((n_plain, *shape), dtype=dtype, device=device)
        self.plain_v = torch.zeros_like(self.plain_k)
        self.core_k = torch.zeros((n_core, core_slots, *shape), dtype=dtype, device=device)
        self.core_v = torch.zeros_like(self.core_k)
        self.core_slots = core_slots
        self.written = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self.batch, self.max_len, self.length = batch, max_len, 0
        # fewest iterations any real, finished position wrote: a slot below it needs no per-position gather
        self.min_done, self.reported = 1 << 30, 0  # reported: positions [0, reported) went through record_iterations()
        self._kept_memo: tuple | None = None  # ``_kept``'s last (chunk, iteration, result)
        self._bytes_per_position = (
            (n_plain + n_core * core_slots) * batch * kv_heads * head_dim * 2 * (self.plain_k.element_size())
        )

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def used_bytes(self) -> int:
        """Bytes of K/V storage held for the positions filled so far."""
        return self._bytes_per_position * self.length

    def begin(self, valid: Tensor) -> Chunk:
        """Reserve the next ``valid.shape[1]`` positions; ``valid`` [B, n] marks real entries."""
        n = valid.shape[1]
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > {self.max_len} allocated")
        valid = valid.to(device=self.device, dtype=torch.bool)
        self.valid[:, start:end] = valid
        chunk = make_chunk(self.valid[:, :end], self.n_valid, start, valid)
        self.n_valid += valid.long().sum(1)
        self.length = end
        return chunk

    def truncate(self, length: int) -> None:
        """Forget the entries from ``length`` on (a sampler's drafts, a wavefront's window): the timeline
        rolls back to its first ``length`` entries; their K/V stay in memory, unreachable, until overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} entries to {length}")
        self.valid[:, length : self.length] = False
        self.written[:, length : self.length] = 0
        self.n_valid = self.valid[:, :length].long().sum(1)
        self.length = length
        self.reported = min(self.reported, length)

    def reserve(self, n: int = 1) -> int:
        """Reserve the next ``n`` timeline positions on the host only (``begin_at`` does the device-side part
        of ``begin`` for each); returns the first one's index."""
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length + n} positions > {self.max_len} allocated")
        self.length += n
        return self.length - n

    def begin_at(self, pos: Tensor, valid: Tensor) -> Tensor:
        """The device-side ``begin`` of one reserved position: ``pos`` a 1-element device tensor holding its
        index, ``valid`` [B] bool. Marks validity, clears its iteration count and returns each sequence's
        model position [B] (RoPE / wpe). No host read: capturable in a CUDA graph."""
        valid = valid.reshape(-1, 1)
        self.valid.index_copy_(1, pos, valid)
        self.written.index_fill_(1, pos, 0)
        positions = (self.n_valid + valid[:, 0].long() - 1).clamp(min=0)
        self.n_valid.add_(valid[:, 0].long())
        return positions

    def plain(
        self, layer: int, k: Tensor, v: Tensor, chunk: Chunk, active: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Write the chunk's K/V [B,H,n,D] of a plain layer (masked by ``active`` [B]); return [:end]."""
        _write(self.plain_k[layer], k, chunk, active)
        _write(self.plain_v[layer], v, chunk, active)
        return self.plain_k[layer, :, :, : chunk.end], self.plain_v[layer, :, :, : chunk.end]

    def mark_iteration(self, chunk: Chunk, iteration: int, active: Tensor) -> None:
        """Record that active sequences write iteration ``iteration`` for the chunk's positions."""
        cur = self.written[:, chunk.start : chunk.end]
        self.written[:, chunk.start : chunk.end] = torch.where(active[:, None], iteration + 1, cur)

    def mark_iteration_at(self, pos: Tensor, iteration: int, active: Tensor) -> None:
        """``mark_iteration`` for the position held in the device tensor ``pos`` (see ``begin_at``)."""
        cur = self.written.index_select(1, pos)
        self.written.index_copy_(1, pos, torch.where(active[:, None], iteration + 1, cur))

    def write_plain_at(self, layer: int, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a plain layer's K/V [B, H, 1, D] at the device-held position ``pos``; return the layer's
        whole K/V [B, H, T, D] (callers mask by position)."""
        self.plain_k[layer].index_copy_(2, pos, k.to(self.plain_k.dtype))
        self.plain_v[layer].index_copy_(2, pos, v.to(self.plain_v.dtype))
        return self.plain_k[layer], self.plain_v[layer]

    def record_iterations(self, used: list[int], rows: list[bool]) -> None:
        """Record (host values, read once per token) the iterations each sequence ran for the positions so
        far; ``rows`` marks the sequences that ran them. Lets ``core`` skip the per-position gather for
        slots every earlier position has written."""
        done = [u for u, r in zip(used, rows) if r]
        if done and self.core_k.shape[0]:
            self.min_done = min(self.min_done, *done)
        self.reported = self.length

    def slot(self, iteration: int) -> int:
        """The slot ``iteration`` writes (the KV mode's write rule, latentrt/kv_modes.py)."""
        return self.kv_mode.slot(iteration)

    def reads_last_rows(self, iteration: int, first) -> Tensor:
        """``always-last`` (latentrt/kv_modes.py): the rows [B] whose queries, from entry ``first`` on (an int,
        or a device scalar), read each earlier position's last entry, because some real position before
        ``first`` did not run ``iteration``. No host read: capturable."""
        return missed_iteration(self.written, self.valid, iteration, first)

    def core_mask(self, chunk: Chunk, iteration: int) -> Tensor:
        """The attention mask of the chunk's core layers at ``iteration``: the chunk's, less (in a mode that
        ``drops_missing``, latentrt/kv_modes.py) the earlier positions that did not run that iteration, which
        ``core`` leaves out of the keys (``_kept``)."""
        kept = self._kept(chunk, iteration)
        if kept is None:
            return chunk.mask  # every earlier position ran it
        order, ran = kept
        return take_positions(chunk.mask & ran[:, None, None, :], order, 3)

    def _kept(self, chunk: Chunk, iteration: int) -> tuple[Tensor, Tensor] | None:
        """In a mode that drops missing positions: (the chunk's keys its queries attend to, in order [B, n]: the
        earlier real positions that ran ``iteration`` and the chunk's own; which of the chunk's keys those are
        [B, end]), None where every earlier position ran it. The published cache stacks the kept entries alone,
        and attention over them rounds otherwise with the dropped ones in between or after them, masked, so the
        keys are the kept ones (``kept_first``; a row of a batch that keeps fewer than another, or a left-padded
        one, ends with dropped or padding ones, masked): their count is one host read per chunk and iteration."""
        if not self.kv_mode.drops_missing or (iteration < self.min_done and self.reported >= chunk.start):
            return None
        memo = self._kept_memo
        if memo is not None and memo[0] is chunk and memo[1] == iteration:
            return memo[2]
        ran = (self.written[:, : chunk.end] > iteration) & self.valid[:, : chunk.end]  # (padding: as dropped)
        ran[:, chunk.start :] = True  # the chunk's own positions run it now (its mask says which it sees)
        kept = kept_first(ran)[:, : int(ran.sum(1).max())], ran
        self._kept_memo = (chunk, iteration, kept)  # (the chunk held: its core layers ask again)
        return kept

    def core(
        self, layer: int, k: Tensor, v: Tensor, chunk: Chunk, iteration: int, active: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Write a core layer's K/V for ``iteration`` into its slot; return the K/V the query reads."""
        slot = self.slot(iteration)
        _write(self.core_k[layer, slot], k, chunk, active)
        _write(self.core_v[layer, slot], v, chunk, active)
        kept = self._kept(chunk, iteration)
        return self._looked_up(layer, chunk, iteration, slot, None if kept is None else kept[0])

    def _looked_up(
        self, layer: int, chunk: Chunk, iteration: int, slot: int, order: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The K/V a core layer's queries read at ``iteration`` [B, H, n, D], by the lookup rule: of the chunk's
        positions [0, end), or of those in ``order`` [B, n] (``_kept``), in one gather."""
        if self.core_slots == 1 or (slot < self.min_done and self.reported >= chunk.start):
            # every earlier position has written this slot: a plain slice equals the gather
            k_sel, v_sel = self.core_k[layer, slot, :, :, : chunk.end], self.core_v[layer, slot, :, :, : chunk.end]
            if order is None:
                return k_sel, v_sel
            return take_positions(k_sel, order, 2), take_positions(v_sel, order, 2)
        idx = (self.written[:, : chunk.end] - 1).clamp(min=0, max=slot)  # min(t mod K, n_p - 1)
        if self.kv_mode.reads_last:  # always-last: n_p - 1 where an earlier real position missed t
            last = (self.written[:, : chunk.end] - 1).clamp(min=0)  # the chunk's own: t (marked before)
            idx = torch.where(self.reads_last_rows(iteration, chunk.start)[:, None], last, idx)
        b = torch.arange(self.batch, device=self.device)[:, None]
        p = torch.arange(chunk.end, device=self.device)[None, :] if order is None else order
        if order is not None:
            idx = idx.gather(1, order)
        # advanced indices split by a slice: result is [B, n, H, D]
        k_sel = self.core_k[layer][idx, b, :, p].permute(0, 2, 1, 3)
        v_sel = self.core_v[layer][idx, b, :, p].permute(0, 2, 1, 3)
        return k_sel, v_sel


def _write(buf: Tensor, new: Tensor, chunk: Chunk, active: Tensor | None) -> None:
    """buf [B,H,T,D] <- new [B,H,n,D] at [start:end], only for active sequences."""
    dst = buf[:, :, chunk.start : chunk.end]
    if active is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(active[:, None, None, None], new.to(dst.dtype), dst))
