"""Prompt attention over a serving pool: several queries per row, every row its own timeline, KV mode and
latent iteration.

The multi-query companion of pool_attention.py (one query per row, fused with its K/V write). A prompt
chunk's K/V are written first (``KVPool``: one indexed store per buffer), then this family attends: query
i of launch row r sits at entry ``q_idx[r, i]`` of pool row ``rows[r]`` and reads every valid entry of that
row up to and including its own (the chunk's earlier entries too, written by the same pass); a padding
query (``q_idx``: the pool's trash entry) reads every valid entry before ``end`` (its output is never
used). Looped core layers read entry p from storage row ``table[rows[r], min(s(t), n_p - 1)]``, t the
row's iteration and s its mode's write rule, and in a mode that drops (``skip``) no entry before the row's
chunk that ran no more than t iterations; an ``always-last`` row with such an entry reads every entry from
slot n_p - 1 (``pool_attention.slot_rows`` / ``dropped`` / ``lookup_cap``: the one lookup rule). The
reference gathers each row's K/V [R, Hkv, end, D] and attends under the mask; the kernel streams each row's
keys in blocks where they lie (no gathered copy: at Huginn's width a row's K/V is about 43 MB per layer at
2K positions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._triton import HAVE_TRITON, fitted_block, interpreter_configs, tl, triton
from .pool_attention import TEST_MODES, dropped, pool_launch_args, slot_rows, slot_table

if HAVE_TRITON:
    from .pool_attention import key_block, row_cap, row_slot
from .reference import attention


def reference(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    rows: Tensor,
    q_idx: Tensor,
    end: int,
    valid: Tensor,
    table: Tensor | None = None,
    modes: Tensor | None = None,
    iterations: Tensor | None = None,
    written: Tensor | None = None,
) -> Tensor:
    """q [R,H,n,D]; k_buf / v_buf [S,Hkv,W,D] one layer's storage (the chunk's K/V already written);
    rows [R]; q_idx [R,n] each query's entry (a row's real queries first); end: the entries concerned (the
    chunk's last + 1); valid / written [N,W] per pool row and entry; looped layers: table [N,K_max], modes
    [N,3] (K, a, lookup), iterations [R] (plain: None). Returns [R,H,n,D]."""
    kept = torch.ones(len(rows), end, dtype=torch.bool, device=q.device)
    if table is None:
        phys = rows[:, None].expand(-1, end)
    else:
        _, phys = slot_rows(rows, written[:, :end], valid[:, :end], table, modes, iterations, q_idx[:, 0])
        kept = ~dropped(rows, written[:, :end], modes, iterations, q_idx[:, 0])
    p = torch.arange(end, device=q.device)[None, :].expand_as(phys)
    k = k_buf[phys, :, p].permute(0, 2, 1, 3)  # [R, end, Hkv, D] -> [R, Hkv, end, D]
    v = v_buf[phys, :, p].permute(0, 2, 1, 3)
    causal = torch.arange(end, device=q.device)[None, None, :] <= q_idx[:, :, None]
    mask = (valid[rows, :end] & kept)[:, None, :] & causal  # [R, n, end]
    return attention(q, k, v, mask[:, None])


def make_inputs(
    shape: str,
    device,
    dtype,
    seed: int = 0,
    batch: int = 7,
    n: int = 12,
    context: int = 64,
    kv_modes: tuple = TEST_MODES,
    heads: tuple[int, int] | None = None,
):
    """A prompt chunk of ``batch`` rows (``n`` queries, row r's first ``lengths[r]`` real, the rest padding
    at the trash entry), each row's chunk after its own earlier entries (some invalid), looped in the KV
    modes ``kv_modes`` (cycled: pool_attention.TEST_MODES); ``heads``: (query heads, K/V heads)."""
    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    H, Hkv = heads or (H, H)
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    W = context + 1
    trash = context
    modes, storage, table = slot_table(batch, kv_modes, g)
    rows = torch.randperm(batch, generator=g)  # the launch's rows in any order
    lengths = torch.randint(1, n + 1, (batch,), generator=g)
    lengths[0] = n
    starts = torch.randint(context // 4, context - n, (batch,), generator=g)  # earlier entries to look up
    iterations = torch.randint(0, 40, (batch,), generator=g)
    valid = torch.zeros(batch, W, dtype=torch.bool)
    written = torch.randint(1, 40, (batch, W), generator=g)
    q_idx = torch.full((batch, n), trash, dtype=torch.long)
    for i in range(batch):
        row, s, m = int(rows[i]), int(starts[i]), int(lengths[i])
        valid[row, :s] = torch.rand(s, generator=g) > 0.1
        valid[row, s : s + m] = True
        written[row, s : s + m] = iterations[i] + 1  # the chunk's entries: this iteration (mark_iteration)
        q_idx[i, :m] = torch.arange(s, s + m)
    end = int((starts + lengths).max())
    to = lambda t: t.to(device)  # noqa: E731
    return (
        r(batch, H, n, D),
        r(storage, Hkv, W, D),
        r(storage, Hkv, W, D),
        to(rows),
        to(q_idx),
        end,
        to(valid),
        to(table),
        to(modes),
        to(iterations),
        to(written),
    )


def bytes_moved(inputs) -> int:
    """Each row's keys and values up to ``end`` (with their flags), once; the queries and outputs."""
    q, k_buf, _, rows, _, end, _ = inputs[:7]
    Hkv, D = k_buf.shape[1], k_buf.shape[3]
    return len(rows) * end * (Hkv * D * 2 * k_buf.element_size() + 9) + 2 * q.numel() * q.element_size()


if HAVE_TRITON:

    @triton.jit
    def _pool_prefill_kernel(
        q_ptr,
        kbuf_ptr,
        vbuf_ptr,
        rows_ptr,
        qidx_ptr,
        valid_ptr,
        table_ptr,
        modes_ptr,
        it_ptr,
        written_ptr,
        out_ptr,
        n_q,
        n_head,
        group,
        D,
        end,
        sm_scale,
        stride_bs,
        stride_bh,
        stride_bt,
        stride_pool,
        stride_table,
        LOOPED: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (r, h, b): queries [b BLOCK_Q, (b + 1) BLOCK_Q) of launch row r, head h, over the row's
        entries up to its block's last query (storage rows by the lookup rule when LOOPED); online
        softmax over key blocks, two tensor-core products per block in fp32 (loads cast to fp32, as the
        interpreter needs; bf16 values are exact in tf32, so bf16 pools lose nothing to PRECISION "tf32",
        fp32 pools use "ieee")."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        i = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        hk = h // group
        im = i < n_q
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        row = tl.load(rows_ptr + r)
        qi = tl.load(qidx_ptr + r * n_q + i, mask=im, other=0)
        q_off = ((r * n_head + h) * n_q + i[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + q_off, mask=im[:, None] & dm[None, :], other=0.0).to(tl.float32)
        it = tl.load(it_ptr + r)
        first = tl.load(qidx_ptr + r * n_q)  # the row's first entry of this chunk
        if LOOPED:
            slot = row_slot(modes_ptr, row, it)
            cap = row_cap(modes_ptr, valid_ptr, written_ptr, row, it, first, slot, stride_pool, BLOCK_T)
        else:
            cap = 0
        m_i = tl.full((BLOCK_Q,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_Q,), tl.float32)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
        hi = tl.minimum(end, tl.max(tl.where(im, qi, 0), 0) + 1)  # no key after the block's last query
        for t0 in range(0, hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok, keys, vals = key_block(
                kbuf_ptr, vbuf_ptr, valid_ptr, written_ptr, table_ptr, modes_ptr, row, t, t < hi, cap, it, first,
                hk * stride_bh, d, dm, stride_bs, stride_bt, stride_pool, stride_table, LOOPED,
            )  # fmt: skip
            s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
            attend = ok[None, :] & (t[None, :] <= qi[:, None])
            s = tl.where(attend, s * sm_scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no key yet: nothing to rescale
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = tl.dot(p, vals, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=im[:, None] & dm[None, :])


GPU_BLOCKS = (16, 32)  # (BLOCK_Q, BLOCK_T): 16 queries a program, 32 keys a step


def launch_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_T) for a chunk of ``n`` queries: GPU_BLOCKS, or with the interpreter's configs
    (``interpreter_configs``) the chunk's queries in one program (up to 64) and 64 keys a step
    (tests/test_kernels.py checks both)."""
    return (fitted_block(n, 16, 64), 64) if interpreter_configs() else GPU_BLOCKS


def fused(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    rows: Tensor,
    q_idx: Tensor,
    end: int,
    valid: Tensor,
    table: Tensor | None = None,
    modes: Tensor | None = None,
    iterations: Tensor | None = None,
    written: Tensor | None = None,
    out: Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """``reference`` as one launch (grid rows x query heads x query blocks); ``out`` [R,H,n,D] may be given;
    ``blocks``: (BLOCK_Q, BLOCK_T), by default ``launch_blocks(n)``."""
    R, H, n, D = q.shape
    BLOCK_Q, BLOCK_T = blocks or launch_blocks(n)
    Hkv = k_buf.shape[1]
    rows = rows.to(torch.int64).contiguous()
    lookup, strides = pool_launch_args(k_buf, v_buf, valid, rows, H, (table, modes, iterations, written))
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    _pool_prefill_kernel[(R, H, triton.cdiv(n, BLOCK_Q))](
        q,
        k_buf,
        v_buf,
        rows,
        q_idx.to(torch.int64).contiguous(),
        valid,
        *lookup,
        out,
        n,
        H,
        H // Hkv,
        D,
        int(end),
        1.0 / math.sqrt(D),
        *strides,
        LOOPED=table is not None,
        PRECISION="ieee" if k_buf.dtype == torch.float32 else "tf32",
        BLOCK_Q=BLOCK_Q,
        BLOCK_T=BLOCK_T,
        BLOCK_D=fitted_block(D, 16),
    )
    return out
