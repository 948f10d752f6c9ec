"""Sandwich-layer boundary: residual add + RMSNorm of the sum + the next RMSNorm, in one pass.

In a sandwich block  x = norm_2(x + attn(norm_1 x)); x = norm_4(x + mlp(norm_3 x))  every sublayer ends
with ``out = norm_a(res + y)`` followed by ``norm_b(out)``: two reads and two writes of [rows, d] when
fused instead of five reads and three writes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.models.layers import rms_norm


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
