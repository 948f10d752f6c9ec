"""Reference ops shared by the model families: norms, rotary embeddings, cached attention, activations.

Plain PyTorch, runs on CPU and GPU. The formulas the kernels share (RMSNorm, RoPE, GELU) are defined once
in latentrt.kernels.reference and imported here; the fast backends are tested against these.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.reference import apply_rope, attention, gelu_new, rms_norm, rope_tables

__all__ = [
    "ACTIVATIONS",
    "Embedding",
    "Packed",
    "RMSNorm",
    "apply_rope",
    "attention",
    "gelu_new",
    "rms_norm",
    "rope_tables",
]


class Embedding(nn.Embedding):
    """``nn.Embedding`` without its random init. The models are built on the meta device and get their
    weights from a checkpoint or ``LatentModel.init_weights``; torch's ``normal_`` on a meta tensor (the
    init this skips) imports torch._dynamo, about 2 s of every load on a CPU."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Packed:
    """Chunks of different shapes run as one sequence of tokens (the server: every resident unit in one pass).
    Per-token layers (norms, linears, MLPs) run once over all their tokens, i.e. read their weights once;
    attention runs per chunk, over that chunk's own K/V. ``chunks[i]`` has ``len(starts)`` rows of ``n``
    queries (a pool chunk); its tokens lie at [offsets[i], offsets[i] + rows * n) of the packed batch-1
    sequence; ``actives[i]`` [rows] says which of its rows write K/V. A model given a ``Packed`` as its chunk
    passes it as the blocks' mask, and its cache hooks attend: ``kv(i, q, k, v)`` -> chunk i's output."""

    def __init__(self, chunks: list, actives: list) -> None:
        self.chunks, self.actives = chunks, actives
        self.sizes = [len(c.starts) * c.n for c in chunks]
        self.offsets = list(accumulate([0, *self.sizes[:-1]]))

    @property
    def mask(self) -> Packed:
        return self

    def pack(self, parts: list[Tensor]) -> Tensor:
        """Per-chunk tensors [rows, n, ...] -> one [1, tokens, ...] (one chunk's: a view of it, not a copy)."""
        flat = [t.reshape(-1, *t.shape[2:]) for t in parts]
        return (flat[0] if len(flat) == 1 else torch.cat(flat))[None]

    def unpack(self, x: Tensor) -> list[Tensor]:
        """[1, tokens, ...] -> per-chunk views [rows, n, ...]."""
        return [x[0, a : a + m].view(len(c.starts), c.n, *x.shape[2:]) for a, m, c in self._spans()]

    def _spans(self):
        return zip(self.offsets, self.sizes, self.chunks)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv) -> Tensor:
        """q [1,H,tokens,D], k / v [1,Hkv,tokens,D] -> [1,H,tokens,D]: chunk i's queries through its cache
        hook ``kv(i, q_i, k_i, v_i)``, which writes the chunk's K/V and attends ([rows, heads, n, D] in, the
        output [rows, H, n, D] out: the pool, latentrt/kv_pool.py, fuses both for decode rows)."""
        out = []
        for i, (a, m, c) in enumerate(self._spans()):
            q_i, k_i, v_i = (t[0, :, a : a + m].unflatten(1, (len(c.starts), c.n)).transpose(0, 1) for t in (q, k, v))
            out.append(kv(i, q_i, k_i, v_i).transpose(0, 1).flatten(1, 2))
        return (out[0] if len(out) == 1 else torch.cat(out, 1))[None]


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
