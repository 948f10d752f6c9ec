"""K/V memory for serving: preallocated rows, one per resident request, each with its own timeline.

``KVCache`` (cache.py) serves one generate() call: its sequences share one timeline. A server holds
requests that arrived at different times, sit at different positions and run their latent loops at
different depths, so each row of the pool has its own length, and its own KV mode.

Storage is allocated once, when the server starts, and never per token:

- plain layers (prelude, coda, every GPT-2 layer): ``rows`` x ``max_len`` positions;
- looped core layers: ``slot_rows`` rows of ``max_len`` positions, handed out per request by its KV mode
  (``shared`` takes 1, ``ring-K`` K, ``anchor-A`` A + 1, ``full`` and ``skip`` r_max). ``slot_table[row, k]``
  is the slot row holding request ``row``'s k-th slot, so a request in shared mode costs a twentieth of one
  in full mode at r=20 and the server admits by the bytes a request needs, not by a worst case.
  ``modes[row]`` is the request's mode as the kernels read it: (K, ``KVMode.kept``, ``pool_lookup``).

A chunk may hold rows of different lengths (prompts admitted together): it is padded to the longest, and
a padding position's query writes its K/V into each row's *trash* entry (index ``max_len``), which is
never a key, so padding costs compute and nothing else. (Chunks of different lengths, say decode tokens
and a prompt group, run in one pass side by side, not padded: ``Packed`` in latentrt/models/layers.py.)

The pool is also the cache interface the models' own modules call (``plain`` / ``core`` /
``mark_iteration``, as KVCache): for any subset of rows at per-row positions and per-row iterations, with
the write and lookup rules of latentrt/kv_modes.py (iteration t writes slot s(t), t mod K in a ring; a
query at iteration t reads slot min(s(t), n_p - 1) of an earlier position that ran n_p iterations; in
the ``skip`` mode none that ran no more than t; in ``always-last``, if one did, slot n_p - 1 of each).
A server's pass
(``Packed``) asks for attention outputs instead (``attend_plain`` / ``attend_core``): with the backend's
kernel (``decode_attention``: latentrt/kernels/pool_attention.py) a chunk of one query per row writes and
attends in one launch per layer, reading each row's keys where they lie; a prompt chunk (several queries
per row) is written, then attended by ``prefill_attention`` (latentrt/kernels/pool_prefill.py), also
reading the keys where they lie; without kernels the keys are gathered per row and attended under the
chunk's mask (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import InputError
from .kernels.pool_attention import dropped, slot_rows, slot_target
from .kernels.reference import attention
from .kv_modes import KVMode
from .memory import check_fits
from .transfer import to_device


@dataclass
class RaggedChunk:
    """Timeline entries of some pool rows processed together: row ``rows[i]``'s real entries
    [starts[i], starts[i] + lengths[i]), padded to ``n`` queries (padding: ``valid`` false, its K/V written
    to the trash entry). The chunk interface of cache.Chunk, per row."""

    rows: Tensor  # [R] pool rows
    starts: list[int]  # host: each row's first entry
    lengths: list[int]  # host: each row's real entries
    n: int  # queries per row (the longest row's)
    end: int  # keys cover timeline [0, end): the longest row's end
    q_idx: Tensor  # [R, n] the entries' timeline indices (the trash entry for padding)
    positions: Tensor  # [R, n] model positions (RoPE / wpe)
    mask: Tensor | None  # [R, 1, n, end] bool: which keys each query attends to (None: not built)
    valid: Tensor  # [R, n] bool: real queries
    iterations: Tensor | None = None  # [R] the core iteration each row runs (set per iteration)

    @property
    def size(self) -> int:
        return self.n

    def subset(self, members: list[int]) -> RaggedChunk:
        """The chunk of some of its rows (``members``: indices into ``rows``)."""
        if len(members) == len(self.starts):
            return self
        ix = to_device(members, self.rows.device)
        pick = RaggedChunk(
            self.rows[ix],
            [self.starts[i] for i in members],
            [self.lengths[i] for i in members],
            self.n,
            self.end,
            self.q_idx[ix],
            self.positions[ix],
            None if self.mask is None else self.mask[ix],
            self.valid[ix],
        )
        if self.iterations is not None:
            pick.iterations = self.iterations[ix]
        return pick


class KVPool:
    """Rows of K/V storage for resident requests (see module docstring)."""

    def __init__(
        self,
        layout,
        rows: int,
        max_len: int,
        slot_rows: int,
        dtype,
        device,
        decode_attention=None,
        prefill_attention=None,
    ) -> None:
        self.layout, self.rows, self.max_len = layout, rows, max_len
        self.decode_attention = decode_attention  # kernels/pool_attention.py's ``fused`` signature, or None
        self.prefill_attention = prefill_attention  # kernels/pool_prefill.py's ``fused`` signature, or None
        self.slot_rows = slot_rows if layout.looped else 0
        H, D = layout.kv_heads, layout.head_dim
        self.trash = max_len  # the entry padding queries write to (never a key)
        width = max_len + 1
        kv_rows = layout.plain * rows + layout.looped * self.slot_rows
        nbytes = 2 * kv_rows * H * width * D * dtype.itemsize + rows * width * 9
        what = (
            f"the KV pool's buffers for {rows} resident requests of {max_len} positions and {self.slot_rows} "
            "looped-layer slot rows (max_batch, max_len, kv_slots)"
        )
        check_fits(nbytes, torch.device(device), what, InputError)
        self.plain_k = torch.zeros((layout.plain, rows, H, width, D), dtype=dtype, device=device)
        self.plain_v = torch.zeros_like(self.plain_k)
        self.core_k = torch.zeros((layout.looped, self.slot_rows, H, width, D), dtype=dtype, device=device)
        self.core_v = torch.zeros_like(self.core_k)
        self.written = torch.zeros(rows, width, dtype=torch.long, device=device)  # iterations per entry
        self._zero = torch.zeros((), dtype=torch.long, device=device)  # written as a device value: no host copy
        self.valid = torch.zeros(rows, width, dtype=torch.bool, device=device)
        self.max_slots = max(self.slot_rows, 1)
        self.slot_table = torch.zeros(rows, self.max_slots, dtype=torch.long, device=device)
        self.modes = torch.zeros(rows, 3, dtype=torch.long, device=device)  # each row's (K, a, lookup)
        self.modes[:, 0] = 1
        self.lengths = [0] * rows  # host: entries filled per row
        self.held: dict[int, list[int]] = {}  # row -> the slot rows it holds
        self.dropping: set[int] = set()  # host: rows in a mode that drops entries (none: no mask to compute)
        self.free_rows = list(range(rows))
        self.free_slot_rows = list(range(self.slot_rows))
        self.element_size = self.plain_k.element_size()
        # each chunk's lookups (``core``'s storage rows, ``core_mask``'s dropped entries) for the iteration being
        # run: the same for every core layer of it; cleared wherever ``written``, ``valid`` or the slots change
        self._lookups: dict[tuple[int, str], tuple] = {}
        self._at: dict[tuple, RaggedChunk] = {}  # ``at``'s chunks by (rows, entries), until ``valid`` changes

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def core_mask(self, chunk, iteration=None):
        """The core layers' mask: the chunk's, less (rows in a mode that drops) the entries before the chunk
        that did not run the row's iteration (``chunk.iterations``; ``iteration`` is ignored). A server's
        packed pass (no ``iterations``) gets its mask: its attention asks ``attend_core``, which applies it."""
        if getattr(chunk, "iterations", None) is None or not self.dropping:
            return chunk.mask

        def mask():
            first = chunk.q_idx[:, 0]  # each row's first entry of the chunk (a real one)
            drop = dropped(chunk.rows, self.written[:, : chunk.end], self.modes, chunk.iterations, first)
            return chunk.mask & ~drop[:, None, None, :]

        return self._looked_up(chunk, "mask", mask)

    # ---------------------------------------------------------------- admission
    def _slots_of(self, kv_mode: KVMode | None) -> int:
        return kv_mode.slots if (kv_mode is not None and self.layout.looped) else 0

    def request_bytes(self, kv_mode: KVMode | None) -> int:
        """K/V bytes a request holds while resident: its plain row and its slot rows."""
        per_entry = self.layout.kv_heads * self.layout.head_dim * 2 * self.element_size * self.max_len
        return (self.layout.plain + self.layout.looped * self._slots_of(kv_mode)) * per_entry

    def position_bytes(self, kv_mode: KVMode | None) -> int:
        """K/V bytes one position of a request in ``kv_mode`` fills (as ``KVCache.used_bytes`` counts them)."""
        return self.layout.bytes_per_position(self._slots_of(kv_mode), self.element_size)

    def capacity_bytes(self) -> int:
        per_entry = self.layout.kv_heads * self.layout.head_dim * 2 * self.element_size * self.max_len
        return (self.layout.plain * self.rows + self.layout.looped * self.slot_rows) * per_entry

    def bytes_in_use(self) -> int:
        per_entry = self.layout.kv_heads * self.layout.head_dim * 2 * self.element_size * self.max_len
        return sum((self.layout.plain + self.layout.looped * len(s)) * per_entry for s in self.held.values())

    def never_fits(self, positions: int, kv_mode: KVMode | None) -> str | None:
        """Why a request of ``positions`` entries in ``kv_mode`` can never be served here (None: it can)."""
        if positions > self.max_len:
            return (
                f"the request needs {positions} positions, more than this server's context per request ({self.max_len})"
            )
        slots = self._slots_of(kv_mode)
        if slots > self.slot_rows:
            return (
                f"kv_sharing {kv_mode.name!r} needs {slots} K/V slots per looped layer and position; this server "
                f"holds {self.slot_rows} in all (use 'shared', 'ring-K' with K <= {self.slot_rows} or 'anchor-A' "
                f"with A < {self.slot_rows}, or start the server with more --kv-slots)"
            )
        return None

    def can_allocate(self, kv_mode: KVMode | None) -> bool:
        return bool(self.free_rows) and self._slots_of(kv_mode) <= len(self.free_slot_rows)

    def allocate(self, kv_mode: KVMode | None) -> int:
        """A row (timeline cleared) and the request's slot rows; the caller checked ``can_allocate``."""
        row = self.free_rows.pop(0)
        n = self._slots_of(kv_mode)
        held, self.free_slot_rows = self.free_slot_rows[:n], self.free_slot_rows[n:]
        self.held[row] = held
        if held:
            self.slot_table[row, :n] = to_device(held, self.device)
        if n:
            self.modes[row] = to_device([n, kv_mode.kept, kv_mode.pool_lookup], self.device)
            if kv_mode.drops_missing:
                self.dropping.add(row)
        else:
            self.modes[row] = to_device([1, 0, 0], self.device)
        self.valid[row] = False
        self.written[row] = 0
        self.lengths[row] = 0
        self._lookups.clear()
        self._at.clear()
        return row

    def release(self, row: int, clean_from: int = 0) -> None:
        """Give a request's row and slot rows back, its entries from ``clean_from`` on zeroed. A batch's
        attention covers every row's keys up to its longest row, masked: a masked finite value adds exactly
        0, but a masked NaN would still poison the product (0 x NaN). Every entry of a unit whose token was
        read back was checked (a NaN in its K/V spreads to its state or logits, and the request fails), and a
        unit writes only entries past the last one begun before it, so only the entries of the units begun
        after the last token read back finite are unchecked (``clean_from``: the serving program's
        ``release_row`` counts them; 0 where no token was). (Zeroing every entry of every finished request was
        most of the scheduler's host time.)"""
        n, held = self.lengths[row], self.held[row]
        if clean_from < n:
            for buf in (self.plain_k, self.plain_v):
                buf[:, row, :, clean_from:n] = 0
            if held:
                at = to_device(held, self.device)  # a list index would be copied to the device with a sync
                for buf in (self.core_k, self.core_v):
                    buf[:, :, :, clean_from:n].index_fill_(1, at, 0)
        self.free_slot_rows = sorted(self.free_slot_rows + self.held.pop(row))
        self.dropping.discard(row)
        self.free_rows = sorted(self.free_rows + [row])

    # ---------------------------------------------------------------- timelines
    def begin(self, rows: list[int], n: int, lengths: list[int] | None = None, mask: bool = True) -> RaggedChunk:
        """Reserve the next entries of each row and describe them: ``n`` each, or with ``lengths`` row
        ``rows[i]``'s next ``lengths[i]``, padded to ``n`` queries. ``mask`` false: the chunk has no attention
        mask (None; for a caller whose attention reads the pool itself: its cost is a gather of the rows)."""
        lengths = [n] * len(rows) if lengths is None else list(lengths)
        starts = [self.lengths[r] for r in rows]
        # every value follows from host values: a row's entries are all real, so an entry's index is its model
        # position (padding queries: the trash entry, position 0)
        q_idx, positions, real = [], [], []
        for r, s, m in zip(rows, starts, lengths):
            if s + m > self.max_len:
                raise RuntimeError(f"KV pool row {r} overflow: {s + m} positions > {self.max_len}")
            self.lengths[r] = s + m
            q_idx += [s + j for j in range(m)] + [self.trash] * (n - m)
            positions += [s + j for j in range(m)] + [0] * (n - m)
            real += [1] * m + [0] * (n - m)
        R = len(rows)
        staged = to_device(rows + q_idx + positions + real, self.device)  # one copy for the four
        idx, q_idx, positions, real = staged[:R], *staged[R:].view(3, R, n)
        real = real.bool()
        self.valid[idx[:, None], q_idx] = real
        self.written[idx[:, None], q_idx] = self._zero
        self._lookups.clear()
        self._at.clear()
        return self._chunk(idx, starts, lengths, q_idx, positions, real, mask)

    def every_row(self, entry: Tensor, positions: Tensor, iterations: Tensor | None = None) -> RaggedChunk:
        """The chunk of one entry per pool row, every row: row i's entry ``entry[i]`` at model position
        ``positions[i]`` (device tensors [rows] its user updates in place: a captured pass over every row).
        Its host starts and end say nothing: the fused attention reads the entries on the device."""
        rows = self.rows
        real = torch.ones(rows, 1, dtype=torch.bool, device=self.device)
        idx = torch.arange(rows, device=self.device)
        return RaggedChunk(
            idx, [0] * rows, [1] * rows, 1, self.max_len, entry[:, None], positions[:, None], None, real, iterations
        )

    def at(self, rows: list[int], starts: list[int], positions: Tensor) -> RaggedChunk:
        """The chunk of one entry per row already begun: row ``rows[i]``'s entry ``starts[i]`` at model
        position ``positions[i]`` (a decode token over the iterations of its latent loop). Its indices and
        mask are built once per (rows, entries) until the next ``begin`` / ``allocate`` changes ``valid``: the
        iterations of a token reuse them."""
        key = (tuple(rows), tuple(starts))
        built = self._at.get(key)
        if built is None:
            idx, q_idx = to_device(rows + starts, self.device).view(2, len(rows))  # one copy for both
            real = torch.ones(len(rows), 1, dtype=torch.bool, device=self.device)
            built = self._at[key] = self._chunk(idx, starts, [1] * len(rows), q_idx[:, None], None, real)
        return replace(built, positions=positions[:, None])

    def _chunk(
        self, idx, starts, lengths, q_idx: Tensor, positions: Tensor, valid: Tensor, mask: bool = True
    ) -> RaggedChunk:
        end = max(s + m for s, m in zip(starts, lengths))
        attend = None
        if mask:
            k_idx = torch.arange(end, device=self.device)
            causal = k_idx[None, None, :] <= q_idx[:, :, None]  # [R, n, end] (padding: every earlier key)
            attend = (self.valid[idx, :end][:, None, :] & causal)[:, None]
        return RaggedChunk(idx, starts, lengths, q_idx.shape[1], end, q_idx, positions, attend, valid)

    # ---------------------------------------------------------------- the cache interface of the models
    def _written_at(self, rows: Tensor, chunk: RaggedChunk, active: Tensor | None) -> tuple[Tensor, Tensor]:
        """Where a chunk's entries are written: (storage rows, entries) [R, n] for ``buf[rows, :, entries]``;
        an inactive row's entries are its trash entry (never a key), so a write is one scatter, with no gather
        and select to keep what its real entries hold."""
        q_idx = chunk.q_idx if active is None else torch.where(active[:, None], chunk.q_idx, self.trash)
        return rows[:, None].expand_as(q_idx), q_idx

    def _store(self, k_buf: Tensor, v_buf: Tensor, rows: Tensor, k: Tensor, v: Tensor, chunk, active) -> None:
        """One layer's K and V [R, H, n, D] of the chunk into storage rows ``rows`` (active rows only)."""
        at = self._written_at(rows, chunk, active)
        for buf, new in ((k_buf, k), (v_buf, v)):
            buf[at[0], :, at[1]] = new.permute(0, 2, 1, 3).to(buf.dtype)  # [R, n, H, D]

    def plain(self, layer: int, k: Tensor, v: Tensor, chunk: RaggedChunk, active: Tensor | None = None):
        """Write a plain layer's K/V; return the rows' keys and values [R, H, end, D]."""
        self._store(self.plain_k[layer], self.plain_v[layer], chunk.rows, k, v, chunk, active)
        return self.plain_k[layer][chunk.rows, :, : chunk.end], self.plain_v[layer][chunk.rows, :, : chunk.end]

    def mark_iteration(self, chunk: RaggedChunk, iteration, active: Tensor) -> None:
        """Rows in ``active`` write iteration ``chunk.iterations`` at their entries (for the lookup rule)."""
        rows, entries = self._written_at(chunk.rows, chunk, active)
        self.written[rows, entries] = (chunk.iterations[:, None] + 1).expand_as(entries)
        self._lookups.clear()

    def _looked_up(self, chunk: RaggedChunk, what: str, compute):
        """``compute()`` once per chunk and iteration (the lookups of every core layer of one iteration are
        the same: ``written`` changes only at ``mark_iteration``)."""
        key = (id(chunk), what)  # (the entry keeps the chunk: its id is not reused while the entry stands)
        got = self._lookups.get(key)
        if got is None or got[1] is not chunk.iterations:
            got = self._lookups[key] = (chunk, chunk.iterations, compute())
        return got[2]

    def core(self, layer: int, k: Tensor, v: Tensor, chunk: RaggedChunk, iteration, active: Tensor):
        """Write each row's iteration t into its slot s(t); return what its queries read: for each earlier
        entry p, slot min(s(t), n_p - 1), or n_p - 1 (``always-last``) (``iteration`` is ignored: each row's is
        ``chunk.iterations``); the entries a mode drops are read too, ``core_mask`` masks them."""
        end = chunk.end

        def lookup():
            first = chunk.q_idx[:, 0]
            looked_up = (self.valid[:, :end], self.slot_table, self.modes, chunk.iterations, first)
            target, phys = slot_rows(chunk.rows, self.written[:, :end], *looked_up)
            return target, phys, torch.arange(end, device=self.device)[None, :].expand_as(phys)

        target, phys, p = self._looked_up(chunk, "rows", lookup)
        self._store(self.core_k[layer], self.core_v[layer], target, k, v, chunk, active)
        k_sel = self.core_k[layer][phys, :, p].permute(0, 2, 1, 3)  # [R, end, H, D] -> [R, H, end, D]
        v_sel = self.core_v[layer][phys, :, p].permute(0, 2, 1, 3)
        return k_sel, v_sel

    # ---------------------------------------------------------------- attention (a server's packed passes)
    def attend_plain(self, layer: int, q: Tensor, k: Tensor, v: Tensor, chunk: RaggedChunk, active=None) -> Tensor:
        """Write a plain layer's K/V [R,Hkv,n,D] (rows in ``active``; None: all) and return the chunk's
        attention output [R,H,n,D]."""
        if self._fused(chunk):
            return self._decode(q, k, v, self.plain_k[layer], self.plain_v[layer], chunk, active)
        if self.prefill_attention is not None:
            k_buf, v_buf = self.plain_k[layer], self.plain_v[layer]
            self._store(k_buf, v_buf, chunk.rows, k, v, chunk, active)
            return self.prefill_attention(q, k_buf, v_buf, chunk.rows, chunk.q_idx, chunk.end, self.valid)
        return attention(q, *self.plain(layer, k, v, chunk, active), chunk.mask)

    def attend_core(self, layer: int, q: Tensor, k: Tensor, v: Tensor, chunk: RaggedChunk, active: Tensor) -> Tensor:
        """``attend_plain`` for a looped layer: each row at its own iteration (``chunk.iterations``, marked
        by ``mark_iteration`` first), its KV mode's slots."""
        looped = (self.slot_table, self.modes, chunk.iterations, self.written)
        if self._fused(chunk):
            return self._decode(q, k, v, self.core_k[layer], self.core_v[layer], chunk, active, looped)
        if self.prefill_attention is not None:
            k_buf, v_buf = self.core_k[layer], self.core_v[layer]
            self._store(k_buf, v_buf, slot_target(chunk.rows, *looped[:3]), k, v, chunk, active)
            return self.prefill_attention(q, k_buf, v_buf, chunk.rows, chunk.q_idx, chunk.end, self.valid, *looped)
        return attention(q, *self.core(layer, k, v, chunk, None, active), self.core_mask(chunk))

    def _fused(self, chunk: RaggedChunk) -> bool:
        return self.decode_attention is not None and chunk.n == 1

    def _decode(self, q, k, v, k_buf, v_buf, chunk: RaggedChunk, active, looped=()) -> Tensor:
        if active is None:
            active = torch.ones(len(chunk.starts), dtype=torch.bool, device=self.device)
        q, k, v = q[:, :, 0], k[:, :, 0].to(k_buf.dtype), v[:, :, 0].to(v_buf.dtype)
        entry = chunk.q_idx[:, 0]
        return self.decode_attention(q, k, v, k_buf, v_buf, chunk.rows, entry, self.valid, active, *looped)[0][
            :, :, None
        ]
