"""QKV epilogue: qk_bias + interleaved RoPE on q and k, K/V written into the cache slot, in one pass.

Input: the Wqkv output [B, n, (H + 2 Hkv) D] of a layer; rows are [q; k; v]. Output: q [B, H, n, D]
rotated, and the rotated k and the v written into ``k_cache[:, :, start:start+n]`` / ``v_cache`` (the
slot the KV mode chose) only for active sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.models.layers import apply_rope


def reference(
    qkv: Tensor,
    qk_bias: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    start: int,
    active: Tensor,
    n_head: int,
    n_kv: int,
) -> Tensor:
    """Returns q [B,H,n,D]; writes k/v [B,Hkv,n,D] into the caches at [start, start+n) where active."""
    B, n, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.split([n_head * D, n_kv * D, n_kv * D], -1)
    q, k, v = q.view(B, n, n_head, D), k.view(B, n, n_kv, D), v.view(B, n, n_kv, D)
    if qk_bias is not None:
        q = (q + qk_bias[0]).to(qkv.dtype)
        k = (k + qk_bias[1][:, :n_kv]).to(qkv.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = active[:, None, None, None]
    dst_k, dst_v = k_cache[:, :, start : start + n], v_cache[:, :, start : start + n]
    dst_k.copy_(torch.where(a, k.transpose(1, 2), dst_k))
    dst_v.copy_(torch.where(a, v.transpose(1, 2), dst_v))
    return q.transpose(1, 2)


def make_inputs(shape: str, device, dtype, seed: int = 0, batch: int = 8, n: int = 1, context: int = 512):
    from latentrt.models.layers import rope_tables

    from . import SHAPES

    _, H, D, _, _ = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cos, sin = rope_tables(D, context + n, 50000.0, device=device)
    pos = torch.arange(context, context + n, device=device)[None].expand(batch, n)
    kc, vc = r(batch, H, context + n, D), r(batch, H, context + n, D)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    active[::3] = False
    return r(batch, n, 3 * H * D), 0.1 * r(2, 1, H, D), cos[pos], sin[pos], kc, vc, context, active, H, H


def bytes_moved(inputs) -> int:
    qkv = inputs[0]
    return 2 * qkv.numel() * qkv.element_size()
