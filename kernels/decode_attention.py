"""Decode attention over the preallocated cache, for every KV mode.

One query position per sequence attends to its cached keys [0, length) under a validity mask (left
padding, finished sequences). For looped core layers with several slots, the key of position p comes
from slot ``min(t mod K, n_p - 1)`` (see latentrt.cache): the kernel reads the slot index per position
instead of materialising a gathered copy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference(q: Tensor, k_slots: Tensor, v_slots: Tensor, written: Tensor, valid: Tensor, slot: int) -> Tensor:
    """q [B,H,D]; k_slots/v_slots [K,B,Hkv,T,D]; written [B,T] iterations per position; valid [B,T] bool.
    Returns [B,H,D]: softmax(q k^T / sqrt(D)) v over valid positions, keys from slot min(slot, n_p - 1)."""
    K, B, Hkv, T, D = k_slots.shape
    idx = (written - 1).clamp(min=0, max=slot)
    b = torch.arange(B, device=q.device)[:, None]
    p = torch.arange(T, device=q.device)[None, :]
    k = k_slots[idx, b, :, p].permute(0, 2, 1, 3).float()  # [B,Hkv,T,D]
    v = v_slots[idx, b, :, p].permute(0, 2, 1, 3).float()
    rep = q.shape[1] // Hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k) / math.sqrt(D)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v).to(q.dtype)


def make_inputs(shape: str, device, dtype, seed: int = 0, batch: int = 8, context: int = 512, slots: int = 4):
    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    written = torch.randint(1, slots + 2, (batch, context), generator=g).to(device)
    valid = torch.ones(batch, context, dtype=torch.bool)
    for b in range(batch):
        valid[b, : (b * 7) % 23] = False  # left padding of varied width
    return (
        r(batch, H, D),
        r(slots, batch, H, context, D),
        r(slots, batch, H, context, D),
        written,
        valid.to(device),
        slots - 1,
    )


def bytes_moved(inputs) -> int:
    q, ks, vs, written, valid, _ = inputs
    B, H, T, D = ks.shape[1:]
    return (2 * B * H * T * D + 2 * q.numel()) * q.element_size() + written.numel() * 8 + valid.numel()
