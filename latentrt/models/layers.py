"""Reference ops shared by the model families: norms, rotary embeddings, cached attention, activations.

Plain PyTorch, runs on CPU and GPU. The formulas the kernels share (RMSNorm, RoPE, GELU) are defined once
in latentrt.kernels.reference and imported here; the fast backends are tested against these.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.reference import apply_rope, gelu_new, rms_norm, rope_tables

__all__ = ["ACTIVATIONS", "Packed", "RMSNorm", "apply_rope", "attention", "gelu_new", "rms_norm", "rope_tables"]


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


class Packed:
    """Chunks of different shapes run as one sequence of tokens (the server: every resident unit in one pass).
    Per-token layers (norms, linears, MLPs) run once over all their tokens, i.e. read their weights once;
    attention runs per chunk, under that chunk's mask and with its K/V. ``chunks[i]`` has ``len(starts)``
    rows of ``n`` queries (a cache chunk); its tokens lie at [offsets[i], offsets[i] + rows * n) of the packed
    batch-1 sequence; ``actives[i]`` [rows] says which of its rows write K/V. A model given a ``Packed`` as its
    chunk passes it as the blocks' mask, and its K/V hooks take the chunk's index first."""

    def __init__(self, chunks: list, actives: list) -> None:
        self.chunks, self.actives = chunks, actives
        self.sizes = [len(c.starts) * c.n for c in chunks]
        self.offsets = list(accumulate([0, *self.sizes[:-1]]))

    @property
    def mask(self) -> Packed:
        return self

    def pack(self, parts: list[Tensor]) -> Tensor:
        """Per-chunk tensors [rows, n, ...] -> one [1, tokens, ...]."""
        return torch.cat([t.reshape(-1, *t.shape[2:]) for t in parts])[None]

    def unpack(self, x: Tensor) -> list[Tensor]:
        """[1, tokens, ...] -> per-chunk views [rows, n, ...]."""
        return [x[0, a : a + m].view(len(c.starts), c.n, *x.shape[2:]) for a, m, c in self._spans()]

    def _spans(self):
        return zip(self.offsets, self.sizes, self.chunks)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv) -> Tensor:
        """q [1,H,tokens,D], k / v [1,Hkv,tokens,D] -> [1,H,tokens,D]: each chunk's queries over the keys its
        K/V hook ``kv(i, k_i, v_i)`` writes and returns ([rows, heads, n, D] in, [rows, heads, end, D] out)."""
        out = []
        for i, (a, m, c) in enumerate(self._spans()):
            q_i, k_i, v_i = (t[0, :, a : a + m].unflatten(1, (len(c.starts), c.n)).transpose(0, 1) for t in (q, k, v))
            k_all, v_all = kv(i, k_i, v_i)
            out.append(attention(q_i, k_all, v_all, c.mask).transpose(0, 1).flatten(1, 2))
        return torch.cat(out, 1)[None]


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
