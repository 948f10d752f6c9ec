"""Decode attention over the preallocated cache, for every KV mode.

One query position per sequence attends to its cached keys [0, length) under a validity mask (left
padding, finished sequences). For looped core layers with several slots, the key of position p comes
from slot ``min(t mod K, n_p - 1)`` (see latentrt.cache): the kernel reads the slot index per position
instead of materialising a gathered copy. In the ``skip`` KV mode (``drops_missing``, latentrt/kv_modes.py)
a position that ran no more than ``slot`` iterations (slot = the iteration there) is not attended; in the
``always-last`` mode (``reads_last``) the rows flagged in ``reads_last`` [B] (some earlier position did not
run the iteration) read every position's last entry, slot ``n_p - 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._triton import HAVE_TRITON, interpreter_block, next_pow2, tl, triton


def reference(
    q: Tensor,
    k_slots: Tensor,
    v_slots: Tensor,
    written: Tensor,
    valid: Tensor,
    slot: int,
    drops_missing=False,
    reads_last: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """q [B,H,D]; k_slots/v_slots [K,B,Hkv,T,D]; written [B,T] iterations per position; valid [B,T] bool.
    Returns [B,H,D]: softmax(q k^T / sqrt(D)) v over valid positions, keys from slot min(slot, n_p - 1);
    with ``drops_missing`` over the valid positions that ran more than ``slot`` iterations (and the last);
    rows where ``reads_last`` [B] is set read slot n_p - 1."""
    K, B, Hkv, T, D = k_slots.shape
    if drops_missing:
        valid = valid & (written > slot)
        valid[:, -1] = True  # the query's own position
    idx = (written - 1).clamp(min=0, max=slot)
    if reads_last is not None:
        idx = torch.where(reads_last[:, None], (written - 1).clamp(min=0), idx)
    b = torch.arange(B, device=q.device)[:, None]
    p = torch.arange(T, device=q.device)[None, :]
    k = k_slots[idx, b, :, p].permute(0, 2, 1, 3).float()  # [B,Hkv,T,D]
    v = v_slots[idx, b, :, p].permute(0, 2, 1, 3).float()
    rep = q.shape[1] // Hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) / math.sqrt(D)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v).to(q.dtype)


def make_inputs(shape: str, device, dtype, seed: int = 0, batch: int = 8, context: int = 512, slots: int = 4):
    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    written = torch.randint(1, slots + 2, (batch, context), generator=g).to(device)
    valid = torch.ones(batch, context, dtype=torch.bool)
    for b in range(batch):
        valid[b, : (b * 7) % 23] = False  # left padding of varied width
    return (
        r(batch, H, D),
        r(slots, batch, H, context, D),
        r(slots, batch, H, context, D),
        written,
        valid.to(device),
        slots - 1,
    )


def bytes_moved(inputs) -> int:
    q, ks, vs, written, valid, _ = inputs
    B, H, T, D = ks.shape[1:]
    return (2 * B * H * T * D + 2 * q.numel()) * q.element_size() + written.numel() * 8 + valid.numel()


if HAVE_TRITON:

    @triton.jit
    def online_softmax_rows(m_i, l_i, acc, scores, v):
        """One block of keys into R running softmax-weighted sums at once (here: query heads; FlashAttention's
        rescaling): running maxima ``m_i``, normalisers ``l_i`` [R], ``acc`` [R, D]; ``scores`` [R, T] (-inf where
        masked), ``v`` [R, T, D]. While every key of a row so far is masked (a block of left padding) its max is
        -inf: exponents are then taken against 0, so its sums stay 0 instead of becoming exp(-inf - -inf) = NaN.
        (This family's and pool_attention.py's.)"""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(scores - m_ref[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 1)

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        written_ptr,
        valid_ptr,
        len_ptr,
        act_ptr,
        last_ptr,
        out_ptr,
        slot,
        n_head,
        group,
        D,
        sm_scale,
        stride_ks,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_wb,
        stride_vb,
        USE_WRITTEN: tl.constexpr,
        DROPS_MISSING: tl.constexpr,
        READS_LAST: tl.constexpr,
        HAS_ACTIVE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        """Program (b, HEADS query heads): online-softmax attention of each head's query over positions
        [0, length) of sequence b. The key/value of position p come from slot min(slot, written[b, p] - 1)
        when USE_WRITTEN (looped core layers with several slots), else from ``slot``. Invalid positions
        (padding, finished) are skipped, except the query's own position; with DROPS_MISSING (and USE_WRITTEN)
        so are positions that ran no more than ``slot`` iterations; with READS_LAST a row whose ``last`` flag is
        set reads slot written[b, p] - 1. A frozen sequence (``act`` 0) returns at once."""
        b = tl.program_id(0)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        if HAS_ACTIVE:
            if tl.load(act_ptr + b) == 0:
                return
        hm = h < n_head
        hk = tl.where(hm, h // group, 0)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q_off = (b * n_head + h[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + q_off, mask=hm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        length = tl.load(len_ptr)
        m_i = tl.full((HEADS,), -float("inf"), tl.float32)
        l_i = tl.zeros((HEADS,), tl.float32)
        acc = tl.zeros((HEADS, BLOCK_D), dtype=tl.float32)
        base = b * stride_kb + hk[:, None, None] * stride_kh  # [HEADS, 1, 1]
        use_last = False
        if READS_LAST:
            use_last = tl.load(last_ptr + b) != 0
        for t0 in range(0, length, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            in_range = t < length
            ok = in_range & ((tl.load(valid_ptr + b * stride_vb + t, mask=in_range, other=0) != 0) | (t == length - 1))
            if USE_WRITTEN:
                n = tl.load(written_ptr + b * stride_wb + t, mask=in_range, other=1)
                s_idx = tl.minimum(tl.maximum(n - 1, 0), slot)
                if READS_LAST:
                    s_idx = tl.where(use_last, tl.maximum(n - 1, 0), s_idx)
                if DROPS_MISSING:
                    ok = ok & ((n > slot) | (t == length - 1))
            else:
                s_idx = tl.zeros((BLOCK_T,), dtype=tl.int64) + slot
            off = base + (s_idx[:, None] * stride_ks + t[:, None] * stride_kt + d[None, :])[None, :, :]
            kv_mask = (ok[:, None] & dm[None, :])[None, :, :]
            k = tl.load(k_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(k * q[:, None, :], 2) * sm_scale
            scores = tl.where(ok[None, :], scores, -float("inf"))
            v = tl.load(v_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            m_i, l_i, acc = online_softmax_rows(m_i, l_i, acc, scores, v)
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=hm[:, None] & dm[None, :])


def launch_blocks(heads: int, positions: int) -> tuple[int, int]:
    """(HEADS, BLOCK_T): query heads of one program and keys a step, for a cache of ``positions``. On a GPU a
    program per head, 64 keys a step; with the interpreter's configs (``interpreter_configs``: its time goes
    mostly per program and per op, some per element) every head of a row in one program and the cache's
    positions in one step, up to 256."""
    return interpreter_block(heads, gpu=1), interpreter_block(positions, gpu=64, least=16, most=256)


def fused(
    q: Tensor,
    k_slots: Tensor,
    v_slots: Tensor,
    written: Tensor | None,
    valid: Tensor,
    slot: int,
    length: Tensor,
    active: Tensor | None = None,
    zero_frozen: bool = True,
    drops_missing: bool = False,
    reads_last: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """q [B,H,D]; k/v_slots [K,B,Hkv,T,D]; written [B,T] or None (read ``slot`` for every position);
    valid [B,T]; length a 1-element device tensor (positions [0, length) are attended); ``active`` [B]
    bool or None: frozen sequences read nothing and get zeros (or unwritten memory with ``zero_frozen=False``);
    ``drops_missing`` (with ``written``; ``slot`` is then the iteration): the ``skip`` mode's lookup;
    ``reads_last`` [B] bool (with ``written``): the ``always-last`` mode's rows reading each last entry.
    Returns [B,H,D] (into ``out`` when given: active rows only)."""
    K, B, Hkv, T, D = k_slots.shape
    H = q.shape[1]
    assert k_slots.stride() == v_slots.stride() and k_slots.stride(-1) == 1
    if out is None:
        out = torch.zeros_like(q) if active is not None and zero_frozen else torch.empty_like(q)
    w = written if written is not None else valid
    heads, block_t = launch_blocks(H, T)
    _decode_attention_kernel[(B, triton.cdiv(H, heads))](
        q.contiguous(),
        k_slots,
        v_slots,
        w,
        valid,
        length,
        active if active is not None else valid,
        reads_last if reads_last is not None else valid,
        out,
        slot,
        H,
        H // Hkv,
        D,
        1.0 / math.sqrt(D),
        k_slots.stride(0),
        k_slots.stride(1),
        k_slots.stride(2),
        k_slots.stride(3),
        w.stride(0),
        valid.stride(0),
        USE_WRITTEN=written is not None,
        DROPS_MISSING=drops_missing,
        READS_LAST=reads_last is not None,
        HAS_ACTIVE=active is not None,
        BLOCK_T=block_t,
        BLOCK_D=next_pow2(D),
        HEADS=heads,
    )
    return out


def fused_as_reference(q, k_slots, v_slots, written, valid, slot):
    """``fused`` with ``reference``'s signature: attend over every position, keys by the slot rule."""
    valid = valid.clone()
    valid[:, -1] = True  # the reference has no "own position"; make the last one valid in both
    return fused(q, k_slots, v_slots, written, valid, slot, torch.tensor([valid.shape[1]], device=q.device))
