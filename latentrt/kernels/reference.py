"""The reference formulas that the models, the exit criteria and the kernels share, in plain PyTorch.

One definition each, imported by ``latentrt.models`` (the reference model), ``latentrt.exits`` (the exit
criteria) and the kernel families beside this file (their ``reference`` functions and tests): RMSNorm with
Huginn's rounding, interleaved rotary embeddings, GPT-2's tanh GELU, and the exit tests' per-sequence
quantities. Nothing here imports latentrt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ------------------------------------------------------------------------------------------ norms
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Huginn's RMSNorm: normalise in fp32, cast back to x's dtype, then scale by the weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


# ------------------------------------------------------------------------------------------ rotary
def rope_tables(
    head_dim: int, max_positions: int, base: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin [max_positions, head_dim/2] in fp32 for pair i rotated by pos * base^(-2i/head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) in fp32. x [B,S,H,D]; cos/sin [B,S,D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
    return out.type_as(x)


# ------------------------------------------------------------------------------------------ attention
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Masked attention. q [B,H,S,D]; k, v [B,Hkv,T,D]; mask [B,1,S,T] bool (True = attend); ``dropout_p``:
    dropout on the attention probabilities (training only)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def missed_iteration(written: Tensor, valid: Tensor, iterations, first) -> Tensor:
    """The ``always-last`` lookup's test (latentrt/kv_modes.py): which rows [R] hold a valid entry before
    ``first`` that ran no more than its iteration (``written`` [R, W] iterations run per entry, ``valid``
    [R, W]; ``iterations`` and ``first``: ints, or per row [R] / device scalars). Such a row's queries read
    every earlier entry's last iteration. No host read: capturable. The cache's gather and the serving
    pool's references both ask it here."""
    p = torch.arange(written.shape[1], device=written.device)[None, :]
    it = iterations[:, None] if isinstance(iterations, Tensor) and iterations.dim() else iterations
    start = first[:, None] if isinstance(first, Tensor) and first.dim() else first
    return (valid & (written <= it) & (p < start)).any(1)


def kept_first(kept: Tensor) -> Tensor:
    """[B, T] each row's key positions reordered: those ``kept`` [B, T] marks first, in order, then the others.
    A lookup that drops keys (``skip``, latentrt/kv_modes.py) attends over the first ``kept.sum(1).max()`` of
    them: the published cache stacks the kept entries alone (Huginn's ``HuginnDynamicCache``), and attention
    rounds otherwise (~1e-7 relative in fp32, a bf16 exit a check apart) with masked keys between the kept ones
    or after them (CPU SDPA's sums run over the whole length in vector lanes)."""
    return torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices


def take_positions(x: Tensor, order: Tensor, dim: int) -> Tensor:
    """``x`` with its key positions (dim ``dim``: 2 of K/V [B, H, T, D], 3 of a mask [B, 1, S, T]) in each
    row's ``order`` [B, T]."""
    view = [order.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = order.shape[1]
    return x.gather(dim, order.view(view).expand(*x.shape[:dim], order.shape[1], *x.shape[dim + 1 :]))


# ------------------------------------------------------------------------------------------ finiteness
def nonfinite_along(x: Tensor, dims: tuple[int, ...], keepdim: bool = False) -> Tensor:
    """Where ``x`` holds a NaN or an inf along ``dims``: x - x is +0 where x is finite and NaN elsewhere, so
    its sum is NaN exactly then, whatever the finite values' magnitude (three launches; ``~isfinite(x).all()``
    takes six, and these run per generated token)."""
    return (x - x).sum(dims, keepdim=keepdim).isnan()


def nonfinite_flags(
    state: Tensor | None, state_valid: Tensor | None, logits: Tensor, alive: Tensor | None = None
) -> Tensor:
    """[B] long: 1 where a real position's latent state is NaN/inf, + 2 where the logits are (only where
    ``alive``; None: every row, as a server's ended units are)."""
    flags = nonfinite_along(logits, (-1,)) * 2
    if state is not None:
        if state_valid is None:  # every position: one reduction over all but the rows
            bad = nonfinite_along(state, tuple(range(1, state.dim())))
        else:
            bad = (nonfinite_along(state, (-1,)) & state_valid).any(-1)
        flags = flags + bad
    return flags if alive is None else flags * alive


# ------------------------------------------------------------------------------------------ activations
def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# ------------------------------------------------------------------------------------------ exit tests
def _position_mean(per: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per`` [B, n] over each sequence's real positions (``valid`` [B, n]), in ``per``'s dtype: the
    sum in fp32 rounded once, as torch's ``mean`` rounds a bf16 mean (the published criteria average all
    positions of their one sequence). A padded position's value (NaN on a zero state) counts for nothing."""
    w = valid.to(torch.float32)
    total = torch.where(valid, per.float(), 0.0).sum(-1)
    return (total / w.sum(-1).clamp(min=1)).to(per.dtype)


def latent_diff_reference(prev: Tensor, new: Tensor, valid: Tensor) -> Tensor:
    """mean over real positions of |new - prev| / |new|, per sequence [B]. prev/new [B,n,d], valid [B,n].

    The published LatentDiffExitEvaluator's formula in the states' own dtype (a bf16 model's criterion is
    rounded to bf16 at each op, and its threshold compares in bf16), so the exits are its exits."""
    return _position_mean((new - prev).norm(dim=-1) / new.norm(dim=-1), valid)


def cosine_reference(prev: Tensor, new: Tensor, valid: Tensor) -> Tensor:
    """1 - the mean over real positions of cos(new, prev), per sequence [B]: the published
    CosineExitEvaluator's formula (dot / |new| / |prev|, no epsilon: a zero state gives NaN, which never
    exits) in the states' own dtype, as ``latent_diff_reference``."""
    return 1 - _position_mean((new * prev).sum(dim=-1) / new.norm(dim=-1) / prev.norm(dim=-1), valid)


def kl_reference(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(prev || cur) [B], cur log-probs [B,V]) from logits [B,V]."""
    logp = F.log_softmax(logits.float(), -1)
    return (prev_logp.exp() * (prev_logp - logp)).sum(-1), logp


def minp_log_probs_reference(logits: Tensor, min_p: float = 0.1) -> Tensor:
    """The published minp-kl criterion's distribution: probabilities below ``min_p`` x the largest are set to
    1/V, then renormalised; log of that [B, V]."""
    probs = F.softmax(logits.float(), dim=-1)
    floor = probs < min_p * probs.max(dim=-1, keepdim=True).values
    probs = torch.where(floor, 1.0 / probs.shape[-1], probs)
    return (probs / probs.sum(dim=-1, keepdim=True)).log()


def entropy_reference(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) [B] with the published 1e-10 floor inside the log."""
    probs = F.softmax(logits.float(), dim=-1)
    return -(probs * torch.log(probs + 1e-10)).sum(-1)
