"""Exit tests on the device as per-sequence reductions returning masks (no host branching).

latent-diff / cosine: one pass over the previous and new state, averaged over the real positions.
KL: log-softmax of the head's logits fused with KL(prev || cur) against the previous log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAVE_TRITON, next_pow2, tl, triton
from .reference import cosine_reference, kl_reference, latent_diff_reference  # noqa: F401 (the family's references)

reference = kl_reference


def make_inputs(shape: str, device, dtype, seed: int = 0, batch: int = 8):
    from . import SHAPES

    V = SHAPES[shape][4]
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(batch, V, generator=g).to(device=device, dtype=torch.float32)
    prev = F.log_softmax(torch.randn(batch, V, generator=g), -1).to(device)
    return logits, prev


def bytes_moved(inputs) -> int:
    logits, prev = inputs
    return 3 * logits.numel() * 4


if HAVE_TRITON:

    @triton.jit
    def _latent_diff_kernel(prev_ptr, new_ptr, valid_ptr, out_ptr, n, D, COSINE: tl.constexpr, BLOCK: tl.constexpr):
        """Program b: mean over b's real positions of |new-prev|/|new| (or 1 - that mean of cos(new, prev)),
        rounded to the states' dtype where the reference (the published formula in that dtype) rounds:
        new - prev and new * prev per element, each norm, dot and quotient, the mean and 1 - it."""
        b = tl.program_id(0)
        dt = new_ptr.dtype.element_ty  # x.to(dt).to(tl.float32): x rounded to the states' dtype
        total = 0.0
        count = 0.0
        for p in range(0, n):
            dd = 0.0
            nn = 0.0
            pp = 0.0
            dot = 0.0
            for d0 in range(0, D, BLOCK):
                c = d0 + tl.arange(0, BLOCK)
                m = c < D
                x = tl.load(new_ptr + (b * n + p) * D + c, mask=m, other=0.0).to(tl.float32)
                y = tl.load(prev_ptr + (b * n + p) * D + c, mask=m, other=0.0).to(tl.float32)
                diff = (x - y).to(dt).to(tl.float32)
                dd += tl.sum(diff * diff, 0)
                nn += tl.sum(x * x, 0)
                pp += tl.sum(y * y, 0)
                dot += tl.sum((x * y).to(dt).to(tl.float32), 0)
            # IEEE-rounded square roots and quotients (the GPU's defaults approximate), as torch's
            norm_new = tl.sqrt_rn(nn).to(dt).to(tl.float32)
            if COSINE:
                value = tl.div_rn(dot.to(dt).to(tl.float32), norm_new).to(dt).to(tl.float32)
                value = tl.div_rn(value, tl.sqrt_rn(pp).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            else:
                value = tl.div_rn(tl.sqrt_rn(dd).to(dt).to(tl.float32), norm_new).to(dt).to(tl.float32)
            w = (tl.load(valid_ptr + b * n + p) != 0).to(tl.float32)
            total += tl.where(w > 0, value, 0.0)
            count += w
        mean = tl.div_rn(total, tl.maximum(count, 1.0)).to(dt).to(tl.float32)
        if COSINE:
            mean = 1.0 - mean
        tl.store(out_ptr + b, mean)  # rounded to the states' dtype by the store

    @triton.jit
    def _kl_kernel(logits_ptr, prev_ptr, logp_ptr, kl_ptr, V, BLOCK: tl.constexpr):
        """Program b: log-softmax of b's logits (two passes: online max/sum, then write) fused with
        KL(prev || cur) = sum exp(prev) (prev - cur)."""
        b = tl.program_id(0)
        row = logits_ptr + b * V
        m_i = -float("inf")
        s_i = 0.0
        for v0 in range(0, V, BLOCK):
            c = v0 + tl.arange(0, BLOCK)
            x = tl.load(row + c, mask=c < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(x, 0))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m_i = m_new
        lse = m_i + tl.log(s_i)
        kl = 0.0
        for v0 in range(0, V, BLOCK):
            c = v0 + tl.arange(0, BLOCK)
            m = c < V
            lp = tl.load(row + c, mask=m, other=0.0).to(tl.float32) - lse
            tl.store(logp_ptr + b * V + c, lp, mask=m)
            prev = tl.load(prev_ptr + b * V + c, mask=m, other=0.0)
            kl += tl.sum(tl.where(m, tl.exp(prev) * (prev - lp), 0.0), 0)
        tl.store(kl_ptr + b, kl)


def latent_diff_fused(prev: Tensor, new: Tensor, valid: Tensor, cosine: bool = False) -> Tensor:
    """The criterion per sequence [B] in the states' dtype (compared with the threshold in it, as the
    reference's value is)."""
    B, n, D = new.shape
    out = torch.empty(B, dtype=new.dtype, device=new.device)
    _latent_diff_kernel[(B,)](
        prev.contiguous(), new.contiguous(), valid.contiguous(), out, n, D, COSINE=cosine, BLOCK=min(1024, next_pow2(D))
    )
    return out


def kl_fused(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
    B, V = logits.shape
    logp = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    kl = torch.empty(B, dtype=torch.float32, device=logits.device)
    _kl_kernel[(B,)](logits.contiguous(), prev_logp.contiguous(), logp, kl, V, BLOCK=min(4096, next_pow2(V)))
    return kl, logp


fused = kl_fused
