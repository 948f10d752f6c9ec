"""Sandwich-layer boundary: residual add + RMSNorm of the sum + the next RMSNorm, in one pass.

In a sandwich block  x = norm_2(x + attn(norm_1 x)); x = norm_4(x + mlp(norm_3 x))  every sublayer ends
with ``out = norm_a(res + y)`` followed by ``norm_b(out)``: two reads and two writes of [rows, d] when
fused instead of five reads and three writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAVE_TRITON, interpreter_block, next_pow2, tl, triton
from .reference import rms_norm


def reference(res: Tensor, y: Tensor, w_a: Tensor, w_b: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(out, normed): out = norm_a(res + y), normed = norm_b(out); Huginn's RMSNorm semantics."""
    out = rms_norm(y + res, w_a, eps)
    return out, rms_norm(out, w_b, eps)


def make_inputs(shape: str, device, dtype, seed: int = 0, rows: int = 512):
    from . import SHAPES

    d = SHAPES[shape][0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return r(rows, d), r(rows, d), 1 + 0.1 * r(d), 1 + 0.1 * r(d), 1e-6


def bytes_moved(inputs) -> int:
    res, y, w_a, w_b, _ = inputs
    return (2 * res.numel() + 2 * res.numel() + w_a.numel() + w_b.numel()) * res.element_size()


if HAVE_TRITON:

    @triton.jit
    def _sandwich_kernel(
        res_ptr,
        y_ptr,
        wa_ptr,
        wb_ptr,
        out_ptr,
        normed_ptr,
        n_rows,
        D,
        eps,
        HAS_Y: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        """ROWS rows: x = res (+ y) rounded to the storage dtype; out = norm_a(x); normed = norm_b(out).
        Each norm: fp32 x * rsqrt(mean(x^2) + eps), cast back, times the weight (Huginn's RMSNorm)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        m = (rows < n_rows)[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(res_ptr + off, mask=m, other=0.0)
        dt = x.dtype
        x = x.to(tl.float32)
        if HAS_Y:
            x = (x + tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        wa = tl.load(wa_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        out = ((x * r).to(dt).to(tl.float32) * wa).to(dt)
        tl.store(out_ptr + off, out, mask=m)
        if HAS_B:
            o = out.to(tl.float32)
            r2 = tl.rsqrt(tl.sum(o * o, 1) / D + eps)[:, None]
            wb = tl.load(wb_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
            tl.store(normed_ptr + off, ((o * r2).to(dt).to(tl.float32) * wb).to(dt), mask=m)


def fused(res: Tensor, y: Tensor | None, w_a: Tensor, w_b: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None]:
    """Triton version of ``reference`` (y and w_b optional): one read of res and y, one write per output."""
    D = res.shape[-1]
    res2 = res.reshape(-1, D).contiguous()
    y2 = y.reshape(-1, D).contiguous() if y is not None else res2
    out = torch.empty_like(res2)
    normed = torch.empty_like(res2) if w_b is not None else out
    rows = interpreter_block(res2.shape[0], gpu=1, most=64)  # GPU: a program per row (the grid fills the SMs)
    _sandwich_kernel[(triton.cdiv(res2.shape[0], rows),)](
        res2,
        y2,
        w_a,
        w_b if w_b is not None else w_a,
        out,
        normed,
        res2.shape[0],
        D,
        eps,
        HAS_Y=y is not None,
        HAS_B=w_b is not None,
        BLOCK=next_pow2(D),
        ROWS=rows,
    )
    return out.view_as(res), (normed.view_as(res) if w_b is not None else None)
