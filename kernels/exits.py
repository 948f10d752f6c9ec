"""Exit tests on the device as per-sequence reductions returning masks (no host branching).

latent-diff / cosine: one pass over the previous and new state, averaged over the real positions.
KL: log-softmax of the head's logits fused with KL(prev || cur) against the previous log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def latent_diff_reference(prev: Tensor, new: Tensor, valid: Tensor) -> Tensor:
    """mean over real positions of |new - prev| / |new|, per sequence [B]."""
    per = (prev.float() - new.float()).norm(dim=-1) / new.float().norm(dim=-1)
    w = valid.float()
    return (per * w).sum(-1) / w.sum(-1).clamp(min=1)


def kl_reference(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(prev || cur) [B], cur log-probs [B,V]) from logits [B,V]."""
    logp = F.log_softmax(logits.float(), -1)
    return (prev_logp.exp() * (prev_logp - logp)).sum(-1), logp


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
