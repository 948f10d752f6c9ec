"""QKV epilogue: qk_bias + interleaved RoPE on q and k, K/V written into the cache slot, in one pass.

Input: the Wqkv output [B, n, (H + 2 Hkv) D] of a layer; rows are [q; k; v]. Output: q [B, H, n, D]
rotated, and the rotated k and the v written into ``k_cache[:, :, start:start+n]`` / ``v_cache`` (the
slot the KV mode chose) only for active sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAVE_TRITON, interpreter_block, next_pow2, tl, triton
from .reference import apply_rope, rope_tables


def reference(
    qkv: Tensor,
    qk_bias: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: int,
    active: Tensor,
    n_head: int,
    n_kv: int,
) -> Tensor:
    """Returns q [B,H,n,D]; writes k/v [B,Hkv,n,D] into the caches at [start, start+n) where active."""
    B, n, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.split([n_head * D, n_kv * D, n_kv * D], -1)
    q, k, v = q.view(B, n, n_head, D), k.view(B, n, n_kv, D), v.view(B, n, n_kv, D)
    if qk_bias is not None:
        q = (q + qk_bias[0]).to(qkv.dtype)
        k = (k + qk_bias[1][:, :n_kv]).to(qkv.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = active[:, None, None, None]
    dst_k, dst_v = k_cache[:, :, start : start + n], v_cache[:, :, start : start + n]
    dst_k.copy_(torch.where(a, k.transpose(1, 2), dst_k))
    dst_v.copy_(torch.where(a, v.transpose(1, 2), dst_v))
    return q.transpose(1, 2)


def make_inputs(shape: str, device, dtype, seed: int = 0, batch: int = 8, n: int = 1, context: int = 512):
    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cos, sin = rope_tables(D, context + n, 50000.0, device=device)
    pos = torch.arange(context, context + n, device=device)[None].expand(batch, n)
    kc, vc = r(batch, H, context + n, D), r(batch, H, context + n, D)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    active[::3] = False
    return r(batch, n, 3 * H * D), 0.1 * r(2, 1, H, D), cos[pos], sin[pos], kc, vc, context, active, H, H


def bytes_moved(inputs) -> int:
    qkv = inputs[0]
    return 2 * qkv.numel() * qkv.element_size()


if HAVE_TRITON:

    @triton.jit
    def _qkv_epilogue_kernel(
        qkv_ptr,
        bias_ptr,
        cos_ptr,
        sin_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        act_ptr,
        pos_ptr,
        n_head,
        n_kv,
        stride_qkv,
        stride_cb,
        stride_ch,
        stride_ct,
        HALF,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        """Program (b, HEADS heads of q then k): q heads are biased, rotated and written to q; kv heads are
        biased (k), rotated (k) and written with their v into the cache slot at timeline index pos, only for
        active sequences. A head's q or k sits at column head * D of the row (k heads follow the q heads), and
        so does its bias (qk_bias [2, 1, H, D] read flat: k head j's bias at (H + j) D)."""
        b = tl.program_id(0)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        D = 2 * HALF
        is_q = h < n_head
        is_kv = (h >= n_head) & (h < n_head + n_kv) & (tl.load(act_ptr + b) != 0)
        row = qkv_ptr + b * stride_qkv
        c = tl.load(cos_ptr + b * HALF + i, mask=m, other=0.0)[None, :]
        s = tl.load(sin_ptr + b * HALF + i, mask=m, other=0.0)[None, :]
        col = h[:, None] * D + 2 * i[None, :]  # the even elements of each head's pairs
        hm = (is_q | is_kv)[:, None] & m[None, :]
        x0 = tl.load(row + col, mask=hm, other=0.0)
        dt = x0.dtype
        x0 = x0.to(tl.float32)
        x1 = tl.load(row + col + 1, mask=hm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x0 = (x0 + tl.load(bias_ptr + col, mask=hm, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            x1 = (x1 + tl.load(bias_ptr + col + 1, mask=hm, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        y0 = (x0 * c - x1 * s).to(dt)
        y1 = (x1 * c + x0 * s).to(dt)
        qm = is_q[:, None] & m[None, :]
        out = q_ptr + b * n_head * D + col
        tl.store(out, y0, mask=qm)
        tl.store(out + 1, y1, mask=qm)
        kvm = is_kv[:, None] & m[None, :]
        j = tl.where(is_kv, h - n_head, 0)  # the kv head (0 where masked: no negative offsets)
        dst = b * stride_cb + j[:, None] * stride_ch + tl.load(pos_ptr) * stride_ct + 2 * i[None, :]
        tl.store(k_ptr + dst, y0, mask=kvm)
        tl.store(k_ptr + dst + 1, y1, mask=kvm)
        tl.store(v_ptr + dst, tl.load(row + col + n_kv * D, mask=kvm, other=0.0), mask=kvm)
        tl.store(v_ptr + dst + 1, tl.load(row + col + n_kv * D + 1, mask=kvm, other=0.0), mask=kvm)


def fused(
    qkv: Tensor,
    qk_bias: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    active: Tensor,
    n_head: int,
    n_kv: int,
    out: Tensor | None = None,
) -> Tensor:
    """Decode form (one new position per sequence): qkv [B, (H+2Hkv)D], cos/sin [B, D/2], k/v_cache
    [B, Hkv, T, D] (one slot), pos a 1-element device tensor holding the timeline index. Returns q [B,H,D]
    (into ``out`` when given)."""
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    q = torch.empty(B, n_head, D, dtype=qkv.dtype, device=qkv.device) if out is None else out
    # qk_bias [2, 1, H, D]: q's H heads, then k's, of which the kernel reads the first n_kv (k head j at (H + j) D)
    bias = qk_bias.contiguous() if qk_bias is not None else qkv
    heads = interpreter_block(n_head + n_kv, gpu=1)  # GPU: a program per head and row (the grid fills the SMs)
    _qkv_epilogue_kernel[(B, triton.cdiv(n_head + n_kv, heads))](
        qkv,
        bias,
        cos.contiguous(),
        sin.contiguous(),
        q,
        k_cache,
        v_cache,
        active,
        pos,
        n_head,
        n_kv,
        qkv.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        D // 2,
        HAS_BIAS=qk_bias is not None,
        BLOCK=next_pow2(D // 2),
        HEADS=heads,
    )
    return q


def fused_as_reference(qkv, qk_bias, cos, sin, k_cache, v_cache, start, active, n_head, n_kv):
    """``fused`` with ``reference``'s signature (one new position: qkv [B, 1, ...]), for tests and benchmarks."""
    assert qkv.shape[1] == 1, "the fused epilogue handles decode (one position per sequence)"
    pos = torch.tensor([start], device=qkv.device)
    q = fused(qkv[:, 0], qk_bias, cos[:, 0], sin[:, 0], k_cache, v_cache, pos, active, n_head, n_kv)
    return q[:, :, None]
