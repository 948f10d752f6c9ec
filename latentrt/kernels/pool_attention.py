"""Decode attention over a serving pool: every row its own timeline, KV mode and latent iteration.

A server's K/V (latentrt/kv_pool.py) holds one timeline per resident request. One query per pool row
attends to its own row's entries: row ``rows[r]``'s query sits at entry ``entry[r]`` and reads the valid
entries before it, then its own. Plain layers (prelude, coda) keep entry p of pool row ``rows[r]`` at
storage row ``rows[r]``. Looped core layers keep several slots per entry (the request's KV mode:
``modes[rows[r]]`` = (K slots, a kept, lookup)), each a storage row of the shared slot rows
(``table[rows[r], k]``); a row running iteration t writes slot s(t) = min(t, a) + (t - min(t, a)) mod (K - a)
(t mod K in a ring, min(t, A) in ``anchor-A``) and reads entry p from slot min(s(t), n_p - 1), n_p the
iterations entry p ran (``written``); with lookup ``DROPS`` (the ``skip`` mode) an entry before the row's
own that ran no more than t iterations is not read at all; with lookup ``LAST`` (``always-last``), when
some valid entry before the row's own ran no more than t iterations, every entry is read from its last
slot n_p - 1 (``lookup_cap``: a per-row scan of ``written`` before the keys). The write and lookup rules of
latentrt/kv_modes.py (``KVMode.slot``, ``kept``, ``pool_lookup``), per row.

The query's own K/V (``k``, ``v``) are stored at its entry for ``active`` rows and used from registers for
its own key, so the write and the attention are one launch and the gathered K/V copy of the reference
(``KVPool.core`` / ``plain``: every key of every row, per layer) never exists. An inactive row (a unit that
exited, a row not running this step, a free one) reads nothing and gets zeros: the server's graphed passes
launch every pool row, and a waiting row must not cost its context's K/V. Rows of different requests never
share storage rows, so the programs of one launch never read what another writes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._triton import HAVE_TRITON, interpreter_block, next_pow2, tl, triton
from .reference import missed_iteration

if HAVE_TRITON:
    from .decode_attention import online_softmax_rows

# a pool row's lookup (the third column of ``modes``; ``KVMode.pool_lookup``)
SLOT, DROPS, LAST = 0, 1, 2  # min(s(t), n_p - 1); that, less stale earlier entries (skip); always-last


def mode_slot(modes: Tensor, iterations: Tensor) -> Tensor:
    """The slot each row's iteration writes [R] (``modes`` [R, 3]: the rows' (K, a, lookup)): the write rule
    of the module docstring, ``KVMode.slot`` on tensors."""
    first = torch.minimum(iterations, modes[:, 1])
    return first + (iterations - first) % (modes[:, 0] - modes[:, 1])


def slot_target(rows: Tensor, table: Tensor, modes: Tensor, iterations: Tensor) -> Tensor:
    """The storage row each launch row's iteration writes [R]: its slot s(t) (``slot_rows``' first half,
    without the lookup of the entries it reads: what a write needs)."""
    return table[rows].gather(1, mode_slot(modes[rows], iterations)[:, None])[:, 0]


def lookup_cap(m: Tensor, slot: Tensor, written: Tensor, valid: Tensor, iterations: Tensor, first: Tensor) -> Tensor:
    """The highest slot each launch row's lookups read [R]: its slot s(t) (``slot`` [R]), or K - 1 (any: each
    entry's last) for a ``LAST`` row with a valid entry before its first of this pass (``first`` [R]) that ran
    no more than t iterations (``missed_iteration``); of the launch rows' modes ``m`` [R, 3] and their rows of
    ``written`` / ``valid`` [R, W]."""
    last = (m[:, 2] == LAST) & missed_iteration(written, valid, iterations, first)
    return torch.where(last, m[:, 0] - 1, slot)


def slot_rows(
    rows: Tensor, written: Tensor, valid: Tensor, table: Tensor, modes: Tensor, iterations: Tensor, first: Tensor
) -> tuple[Tensor, Tensor]:
    """A looped layer's storage rows by the rule in the docstring: (the row each launch row writes [R], the
    row each of its entries is read from [R, W]); ``written`` / ``valid`` [N, W] (W: the entries concerned),
    ``first`` [R] each row's first entry of this pass. The pool's reference (``KVPool.core``) and this
    family's reference both look up slots here. (Each row's mode, ``written`` and slots gathered once.)"""
    m, w, own = modes[rows], written[rows], table[rows]
    slot = mode_slot(m, iterations)
    cap = lookup_cap(m, slot, w, valid[rows], iterations, first)
    lookup = torch.minimum((w - 1).clamp(min=0), cap[:, None])
    return own.gather(1, slot[:, None])[:, 0], own.gather(1, lookup)


def dropped(rows: Tensor, written: Tensor, modes: Tensor, iterations: Tensor, first: Tensor) -> Tensor:
    """Which entries each launch row does not read [R, W] (``written`` [N, W]): in a mode that drops (``skip``)
    those before the row's first entry of this pass (``first`` [R]) that ran no more than its iteration."""
    p = torch.arange(written.shape[1], device=written.device)[None, :]
    stale = (written[rows] <= iterations[:, None]) & (p < first[:, None])
    return stale & (modes[rows, 2] == DROPS)[:, None]


def pool_launch_args(k_buf: Tensor, v_buf: Tensor, valid: Tensor, rows: Tensor, heads: int, looked_up: tuple) -> tuple:
    """What the pool kernels (this family's and pool_prefill.py's) take after their own inputs: the lookup
    tensors (``looked_up`` = (table, modes, iterations, written), all None for a plain layer: placeholders
    then), and the storage strides; checks the layouts they assume."""
    table, modes, iterations, written = looked_up
    Hkv = k_buf.shape[1]
    assert k_buf.stride() == v_buf.stride() and k_buf.stride(-1) == 1 and heads % Hkv == 0
    assert valid.stride(-1) == 1 and (written is None or written.stride() == valid.stride())
    looped = table is not None
    assert not looped or modes.shape[1] == 3
    idx = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
    lookup = (idx(table), idx(modes), idx(iterations), written) if looped else (rows, rows, rows, valid)
    strides = (k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), valid.stride(0), table.stride(0) if looped else 0)
    return lookup, strides


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    rows: Tensor,
    entry: Tensor,
    valid: Tensor,
    active: Tensor,
    table: Tensor | None = None,
    modes: Tensor | None = None,
    iterations: Tensor | None = None,
    written: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """q [R,H,D]; k, v [R,Hkv,D] the queries' own K/V; k_buf / v_buf [S,Hkv,W,D] one layer's storage;
    rows, entry [R]; valid [N,W] bool and written [N,W] per pool row and entry; active [R] bool; looped
    layers: table [N,K_max] storage rows of each pool row's slots, modes [N,3] each pool row's (K, a, lookup),
    iterations [R] (plain: None).
    Writes k / v at each active row's entry; returns (out [R,H,D], zeros for inactive rows, k_buf, v_buf).
    Sync-free (capturable)."""
    R, H, D = q.shape
    Hkv, W = k.shape[1], k_buf.shape[2]
    if table is None:  # a plain layer: the pool row itself
        target, phys = rows, rows[:, None].expand(-1, W)
        kept = torch.ones(R, W, dtype=torch.bool, device=q.device)
    else:
        target, phys = slot_rows(rows, written, valid, table, modes, iterations, entry)
        kept = ~dropped(rows, written, modes, iterations, entry)
    p = torch.arange(W, device=q.device)[None, :].expand(R, -1)
    own = p == entry[:, None]
    keys = torch.where(own[:, :, None, None], k[:, None], k_buf[phys, :, p]).float()  # [R,W,Hkv,D]
    vals = torch.where(own[:, :, None, None], v[:, None], v_buf[phys, :, p]).float()
    keys, vals = keys.repeat_interleave(H // Hkv, 2), vals.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("rhd,rwhd->rhw", q.float(), keys) / math.sqrt(D)
    attend = own | ((p < entry[:, None]) & valid[rows] & kept)
    scores = scores.masked_fill(~attend[:, None, :], float("-inf"))
    a = active[:, None, None]
    out = torch.where(a, torch.einsum("rhw,rwhd->rhd", scores.softmax(-1), vals), 0.0).to(q.dtype)
    k_buf[target, :, entry] = torch.where(a, k.to(k_buf.dtype), k_buf[target, :, entry])
    v_buf[target, :, entry] = torch.where(a, v.to(v_buf.dtype), v_buf[target, :, entry])
    return out, k_buf, v_buf


# test pools' KV modes as (K, a, lookup), cycled over the rows: shared, ring-3, full, anchor-4, skip,
# always-last (r = 32)
TEST_MODES = ((1, 0, SLOT), (3, 0, SLOT), (32, 0, SLOT), (5, 4, SLOT), (32, 0, DROPS), (32, 0, LAST))


def slot_table(batch: int, kv_modes: tuple, g: torch.Generator) -> tuple[Tensor, int, Tensor]:
    """A test pool's slots (this family's and pool_prefill.py's inputs): pool row i in the KV mode
    ``kv_modes[i mod len]`` ((K, a, lookup), cycled), its K slots each its own storage row, in random order.
    Returns (modes [N, 3], storage rows, table [N, K_max])."""
    modes = torch.tensor([kv_modes[i % len(kv_modes)] for i in range(batch)])
    storage = int(modes[:, 0].sum())
    table = torch.zeros(batch, int(modes[:, 0].max()), dtype=torch.long)
    perm, at = torch.randperm(storage, generator=g), 0
    for i, n in enumerate(modes[:, 0].tolist()):
        table[i, :n] = perm[at : at + n]
        at += n
    return modes, storage, table


def make_inputs(
    shape: str,
    device,
    dtype,
    seed: int = 0,
    batch: int = 6,
    context: int = 200,
    kv_modes: tuple = TEST_MODES,
    heads: tuple[int, int] | None = None,
):
    """A pool of ``batch`` rows, row r at its own entry (up to ``context``) and iteration, in the KV modes
    ``kv_modes`` (cycled), one row inactive, some entries invalid; ``heads``:
    (query heads, K/V heads), default the shape's heads for both (Huginn keeps a key per query head)."""
    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    H, Hkv = heads or (H, H)
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    W = context + 1
    modes, storage, table = slot_table(batch, kv_modes, g)
    rows = torch.randperm(batch, generator=g)  # the launch's rows in any order
    entry = torch.randint(0, context, (batch,), generator=g)
    entry[0] = context - 1
    valid = torch.rand(batch, W, generator=g) > 0.1
    iterations = torch.randint(0, 40, (batch,), generator=g)
    written = torch.randint(1, 40, (batch, W), generator=g)
    active = torch.ones(batch, dtype=torch.bool)
    active[batch // 2] = False
    to = lambda t: t.to(device)  # noqa: E731
    return (
        r(batch, H, D),
        r(batch, Hkv, D),
        r(batch, Hkv, D),
        r(storage, Hkv, W, D),
        r(storage, Hkv, W, D),
        to(rows),
        to(entry),
        to(valid),
        to(active),
        to(table),
        to(modes),
        to(iterations),
        to(written),
    )


def bytes_moved(inputs) -> int:
    """The keys and values each active row reads (its entries up to its own, with their flags), every row's
    query and output, the active rows' own K/V written."""
    q, k, _, k_buf, _, rows, entry, _, active = inputs[:9]
    H, D = k_buf.shape[1], k_buf.shape[3]
    entries = int(entry[active].sum())
    written = int(active.sum()) * k[0].numel() * 2 * k_buf.element_size()
    return entries * (H * D * 2 * k_buf.element_size() + 9) + 2 * q.numel() * q.element_size() + written


if HAVE_TRITON:

    @triton.jit
    def row_slot(modes_ptr, row, it):
        """The slot pool row ``row``'s iteration ``it`` writes: s(t) of its mode (K, a) (``mode_slot``)."""
        k = tl.load(modes_ptr + row * 3)
        a = tl.load(modes_ptr + row * 3 + 1)
        first = tl.minimum(it, a)
        return first + (it - first) % (k - a)

    @triton.jit
    def row_cap(modes_ptr, valid_ptr, written_ptr, row, it, first, slot, stride_pool, BLOCK_T: tl.constexpr):
        """The highest slot pool row ``row``'s lookups read at iteration ``it`` (``lookup_cap``): ``slot``
        (s(t)), or K - 1 for a ``LAST`` row with a valid entry before ``first`` that ran no more than ``it``
        iterations. Only a ``LAST`` row scans its entries' ``written`` (9 bytes an entry, against its keys'
        4 D per head). ``row``, ``it``, ``first``, ``slot``: scalars (one row: the cap is then [1]) or [L, 1]
        (a row per lane: [L, 1])."""
        lookup = tl.load(modes_ptr + row * 3 + 2)
        scan = tl.where(lookup == 2, first, 0)
        t = tl.arange(0, BLOCK_T)
        missed = tl.zeros((BLOCK_T,), dtype=tl.int32) + (scan * 0).to(tl.int32)  # [BLOCK_T] or [L, BLOCK_T]
        for t0 in range(0, tl.max(scan + tl.zeros((1,), dtype=scan.dtype)), BLOCK_T):
            m = t0 + t < scan
            n_p = tl.load(written_ptr + row * stride_pool + t0 + t, mask=m, other=0)
            ok = tl.load(valid_ptr + row * stride_pool + t0 + t, mask=m, other=0) != 0
            missed = tl.maximum(missed, (ok & (n_p <= it)).to(tl.int32))
        return tl.where(tl.max(missed, -1, keep_dims=True) > 0, tl.load(modes_ptr + row * 3) - 1, slot)

    @triton.jit
    def key_rows(row, t, mask, cap, it, first, written_ptr, table_ptr, modes_ptr, stride_pool, stride_table,
                 LOOPED: tl.constexpr):  # fmt: skip
        """The storage rows of pool row ``row``'s entries ``t`` and which of them it reads (the lookup rule:
        a looped layer's entry p from slot min(``cap``, n_p - 1), ``cap`` = s(t) or ``row_cap``'s, and in a
        mode that drops not an entry before ``first`` that ran no more than ``it`` iterations; a plain
        layer's from the row itself, every one). Elementwise: ``row``, ``cap``, ``it``, ``first`` scalars or
        [L, 1] (a row per lane), ``t`` [T] (then [T] or [L, T])."""
        if LOOPED:
            iters = tl.load(written_ptr + row * stride_pool + t, mask=mask, other=1)
            pick = tl.minimum(tl.maximum(iters - 1, 0), cap)
            lookup = tl.load(modes_ptr + row * 3 + 2)
            kept = (iters > it) | (t >= first) | (lookup != 1)
            return tl.load(table_ptr + row * stride_table + pick, mask=mask, other=0), kept
        return tl.zeros(t.shape, dtype=tl.int64) + row, mask

    @triton.jit
    def key_block(
        kbuf_ptr, vbuf_ptr, valid_ptr, written_ptr, table_ptr, modes_ptr, row, t, in_range, cap, it, first,
        head_off, d, dm, stride_bs, stride_bt, stride_pool, stride_table, LOOPED: tl.constexpr,
    ):  # fmt: skip
        """Entries ``t`` [T] of pool row ``row`` at K/V head offset ``head_off`` (hk x the head stride): one row
        (``row`` etc. scalars, ``head_off`` a scalar) or a row and head per lane (``row``, ``cap``, ``it``,
        ``first`` [L, 1], ``head_off`` [L, 1, 1], ``in_range`` [L, T]). Returns (which to attend to: in range,
        valid and kept [T] or [L, T]; their keys and their values, fp32, with a last dimension BLOCK_D, zeros
        where not attended), read from the storage rows of ``key_rows``. Shared by this family and
        pool_prefill.py."""
        phys, kept = key_rows(
            row, t, in_range, cap, it, first, written_ptr, table_ptr, modes_ptr, stride_pool, stride_table, LOOPED
        )
        ok = in_range & kept & (tl.load(valid_ptr + row * stride_pool + t, mask=in_range, other=0) != 0)
        off = head_off + tl.expand_dims(phys * stride_bs + t * stride_bt, -1) + d
        kv_mask = tl.expand_dims(ok, -1) & dm
        keys = tl.load(kbuf_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
        vals = tl.load(vbuf_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
        return ok, keys, vals

    @triton.jit
    def _pool_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        kbuf_ptr,
        vbuf_ptr,
        rows_ptr,
        entry_ptr,
        valid_ptr,
        act_ptr,
        table_ptr,
        modes_ptr,
        it_ptr,
        written_ptr,
        out_ptr,
        n_rows,
        n_head,
        n_kv,
        group,
        D,
        sm_scale,
        stride_bs,
        stride_bh,
        stride_bt,
        stride_pool,
        stride_table,
        LOOPED: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        """Program (ROWS launch rows, HEADS query heads): a lane per (row r, head), each over its pool row's
        entries [0, entry), storage rows by the lookup rule when LOOPED, then its own K/V; the row's K/V stored
        at its entry (by the first query head of each KV head). An inactive row stores zeros and reads
        nothing."""
        lane = tl.arange(0, ROWS * HEADS)
        r = tl.program_id(0) * ROWS + lane // HEADS
        h = tl.program_id(1) * HEADS + lane % HEADS
        lm = (r < n_rows) & (h < n_head)
        r = tl.where(r < n_rows, r, 0)
        hk = tl.where(lm, h // group, 0)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        row = tl.load(rows_ptr + r)
        n = tl.load(entry_ptr + r)
        act = (tl.load(act_ptr + r) != 0) & lm
        n_read = tl.where(act, n, 0)  # an inactive row (or a lane past the rows or heads) reads no key
        it = tl.load(it_ptr + r)
        if LOOPED:  # (s(t) recomputed for the write below rather than kept live over the key loop)
            cap = row_cap(modes_ptr, valid_ptr, written_ptr, row[:, None], it[:, None], n_read[:, None],
                          row_slot(modes_ptr, row, it)[:, None], stride_pool, BLOCK_T)  # fmt: skip
        else:
            cap = 0
        hd_mask = lm[:, None] & dm[None, :]
        q = tl.load(q_ptr + (r * n_head + h)[:, None] * D + d[None, :], mask=hd_mask, other=0.0).to(tl.float32)
        own_off = (r * n_kv + hk)[:, None] * D + d[None, :]
        k_own = tl.load(k_ptr + own_off, mask=hd_mask, other=0.0)
        v_own = tl.load(v_ptr + own_off, mask=hd_mask, other=0.0)
        m_i = tl.sum(q * k_own.to(tl.float32), 1) * sm_scale  # the own key first: weight 1, value v_own
        l_i = m_i * 0.0 + 1.0
        acc = v_own.to(tl.float32)
        head_off = (hk * stride_bh)[:, None, None]
        for t0 in range(0, tl.max(n_read, 0), BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok, keys, vals = key_block(
                kbuf_ptr, vbuf_ptr, valid_ptr, written_ptr, table_ptr, modes_ptr, row[:, None], t,
                t[None, :] < n_read[:, None], cap, it[:, None], n[:, None], head_off, d, dm, stride_bs, stride_bt,
                stride_pool, stride_table, LOOPED,
            )  # fmt: skip
            scores = tl.where(ok, tl.sum(keys * q[:, None, :], 2) * sm_scale, -float("inf"))
            m_i, l_i, acc = online_softmax_rows(m_i, l_i, acc, scores, vals)
        out = tl.where(act[:, None], acc / l_i[:, None], 0.0)
        tl.store(out_ptr + (r * n_head + h)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=hd_mask)
        if LOOPED:
            target = tl.load(table_ptr + row * stride_table + row_slot(modes_ptr, row, it), mask=act, other=0)
        else:
            target = row
        dst = (target * stride_bs + hk * stride_bh + n * stride_bt)[:, None] + d[None, :]
        first = hd_mask & (act & (h % group == 0))[:, None]  # each KV head by its group's first query head
        tl.store(kbuf_ptr + dst, k_own.to(kbuf_ptr.dtype.element_ty), mask=first)
        tl.store(vbuf_ptr + dst, v_own.to(vbuf_ptr.dtype.element_ty), mask=first)


def launch_lanes(rows: int, heads: int) -> tuple[int, int]:
    """(ROWS, HEADS) of one program: (1, 1) on a GPU (a program per row and head), every row and head of the
    launch with the interpreter's configs (``interpreter_configs``: its time goes mostly per program and per op;
    a launch of the server's 4 pool rows was 4 programs)."""
    return interpreter_block(rows, gpu=1), interpreter_block(heads, gpu=1)


def fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    rows: Tensor,
    entry: Tensor,
    valid: Tensor,
    active: Tensor,
    table: Tensor | None = None,
    modes: Tensor | None = None,
    iterations: Tensor | None = None,
    written: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference`` as one launch (grid: blocks of rows x blocks of query heads, ``launch_lanes``); ``out``
    [R,H,D] may be given."""
    R, H, D = q.shape
    Hkv = k.shape[1]
    rows = rows.to(torch.int64).contiguous()
    lookup, strides = pool_launch_args(k_buf, v_buf, valid, rows, H, (table, modes, iterations, written))
    out = torch.empty_like(q) if out is None else out
    rows_per, heads = launch_lanes(R, H)
    _pool_attention_kernel[(triton.cdiv(R, rows_per), triton.cdiv(H, heads))](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        k_buf,
        v_buf,
        rows,
        entry.to(torch.int64).contiguous(),
        valid,
        active.contiguous(),
        *lookup,
        out,
        R,
        H,
        Hkv,
        H // Hkv,
        D,
        1.0 / math.sqrt(D),
        *strides,
        LOOPED=table is not None,
        BLOCK_T=64,
        BLOCK_D=next_pow2(D),
        ROWS=rows_per,
        HEADS=heads,
    )
    return out, k_buf, v_buf
