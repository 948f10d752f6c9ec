"""Reference ops shared by the model families: norms, rotary embeddings, cached attention, activations.

Plain PyTorch, runs on CPU and GPU. The formulas the kernels share (RMSNorm, RoPE, GELU) are defined once
in latentrt.kernels.reference and imported here; the fast backends are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.reference import apply_rope, gelu_new, rms_norm, rope_tables

__all__ = ["ACTIVATIONS", "RMSNorm", "apply_rope", "attention", "gelu_new", "rms_norm", "rope_tables"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Masked attention. q [B,H,S,D]; k, v [B,Hkv,T,D]; mask [B,1,S,T] bool (True = attend)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
