"""Hidden -> input feedback paths.

Coconut: the last hidden state goes through ln_f, gets wpe[pos] added and becomes the next pass's
residual input; layer 0's ln_1 of it is needed at once, so both come out of one kernel.
Recurrent depth: the adapter W [d, 2d] applied to [s, e]. Since e is fixed for a token, W[:, d:] e is
computed once per token (``adapter_input_term``); each iteration only computes W[:, :d] s + that term
(kernels/linear.py with ``add=``: half the adapter bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAVE_TRITON, next_pow2, tl, triton


def coconut_reference(
    h: Tensor, ln_f_w: Tensor, ln_f_b: Tensor, wpe_row: Tensor, ln1_w: Tensor, ln1_b: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(x, ln1x): x = ln_f(h) + wpe[pos] (the next residual input), ln1x = ln_1(x)."""
    x = F.layer_norm(h, (h.shape[-1],), ln_f_w, ln_f_b, eps) + wpe_row
    return x, F.layer_norm(x, (x.shape[-1],), ln1_w, ln1_b, eps)


def adapter_input_term(e: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """W[:, d:] e (+ bias): the part of the adapter that is constant across a token's iterations."""
    d = e.shape[-1]
    return F.linear(e, w[:, d:], bias)


reference = coconut_reference


def make_inputs(shape: str, device, dtype, seed: int = 0, rows: int = 32):
    from . import SHAPES

    d = SHAPES[shape][0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return r(rows, d), 1 + 0.1 * r(d), 0.1 * r(d), r(d), 1 + 0.1 * r(d), 0.1 * r(d), 1e-5


def bytes_moved(inputs) -> int:
    h = inputs[0]
    return (3 * h.numel() + 5 * h.shape[-1]) * h.element_size()


if HAVE_TRITON:

    @triton.jit
    def _layer_norm_row(x, w_ptr, b_ptr, c, m, D, eps):
        """LayerNorm of one fp32 row held in registers (masked to its D real columns), with bias."""
        mean = tl.sum(x, 0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, 0) / D
        w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        return xc * tl.rsqrt(var + eps) * w + tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _coconut_feedback_kernel(
        h_ptr, fw_ptr, fb_ptr, wpe_ptr, lw_ptr, lb_ptr, x_ptr, y_ptr, D, eps, stride_wpe, pos_ptr, BLOCK: tl.constexpr
    ):
        """Row r: x = LayerNorm_f(h) + wpe[pos[r]]; y = LayerNorm_1(x)."""
        r = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < D
        h = tl.load(h_ptr + r * D + c, mask=m, other=0.0)
        dt = h.dtype
        f = _layer_norm_row(h.to(tl.float32), fw_ptr, fb_ptr, c, m, D, eps)
        pos = tl.load(pos_ptr + r)
        x = f.to(dt).to(tl.float32) + tl.load(wpe_ptr + pos * stride_wpe + c, mask=m, other=0.0).to(tl.float32)
        x = x.to(dt)
        tl.store(x_ptr + r * D + c, x, mask=m)
        y = _layer_norm_row(x.to(tl.float32), lw_ptr, lb_ptr, c, m, D, eps)
        tl.store(y_ptr + r * D + c, y.to(dt), mask=m)


def coconut_fused(
    h: Tensor, ln_f_w: Tensor, ln_f_b: Tensor, wpe: Tensor, pos: Tensor, ln1_w: Tensor, ln1_b: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """h [R, d]; wpe the full position table; pos [R] int positions. Returns (x, ln_1(x))."""
    R, D = h.shape
    x, y = torch.empty_like(h), torch.empty_like(h)
    _coconut_feedback_kernel[(R,)](
        h.contiguous(),
        ln_f_w,
        ln_f_b,
        wpe,
        ln1_w,
        ln1_b,
        x,
        y,
        D,
        eps,
        wpe.stride(0),
        pos.contiguous(),
        BLOCK=next_pow2(D),
    )
    return x, y


def fused_as_reference(h, ln_f_w, ln_f_b, wpe_row, ln1_w, ln1_b, eps):
    """``coconut_fused`` with ``coconut_reference``'s signature (one position-embedding row for all rows)."""
    pos = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    return coconut_fused(h, ln_f_w, ln_f_b, wpe_row[None], pos, ln1_w, ln1_b, eps)
