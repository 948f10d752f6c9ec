"""Recurrent-depth layers for one new position per sequence as fused Triton launches.

Per sandwich layer: Wqkv (norm_1 in its prologue where the previous product summed squares) -> qk_bias +
RoPE + K/V into the iteration's slot -> decode attention with the slot lookup rule (latentrt/kv_modes.py)
-> proj -> residual + norm_2 + norm_3 -> fc with fused SiLU gate -> proj -> residual + norm_4 + the next
layer's norm_1. Every weight kernel returns before touching its weights when no sequence is active, so
frozen work costs only launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import decode_attention, linear, norms, rope_kv


class DecodePosition:
    """Device-side description of the position being decoded: timeline index ``pos`` [1], attended
    length ``length`` [1] (= pos + 1), per-sequence RoPE rows ``cos``/``sin`` [B, D/2], validity ``valid``
    [B, T] of every timeline entry (the cache's)."""

    def __init__(self, config, pos: Tensor, length: Tensor, cos: Tensor, sin: Tensor, valid: Tensor) -> None:
        self.config, self.pos, self.length, self.cos, self.sin, self.valid = config, pos, length, cos, sin, valid


def sandwich_layer(
    blk,
    h: Tensor,
    x_in: Tensor,
    k_slots: Tensor,
    v_slots: Tensor,
    written: Tensor | None,
    slot: int,
    where: DecodePosition,
    active: Tensor,
    next_norm: Tensor | None,
    prenorm: tuple | None = None,
    drops_missing: bool = False,
    reads_last: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One sandwich block for one new position per sequence. ``x_in`` is norm_1(h), or h itself with
    ``prenorm`` (norm_1 applied in the QKV product's prologue). Returns (h, next_norm(h)). Rows of frozen
    sequences are computed from, or left as, unwritten memory on a GPU (fewer memsets in the graph; rows never
    mix and the caller masks them); elsewhere they are zero-filled so no garbage is computed."""
    cfg = where.config
    B = h.shape[0]
    zf = not h.is_cuda
    qkv = linear.fused(x_in, blk.attn.Wqkv.weight, active=active, prenorm=prenorm, zero_frozen=zf)
    if cfg.keys_per_query_head:  # MQA with qk_bias: the one K and V head repeated per query head (as cached)
        H, D = cfg.num_attention_heads, cfg.head_dim
        q_part, k, v = qkv.split([H * D, D, D], -1)
        qkv = torch.cat([q_part, k.repeat(1, H), v.repeat(1, H)], -1)
    q = rope_kv.fused(
        qkv,
        blk.attn.qk_bias,
        where.cos,
        where.sin,
        k_slots[slot],
        v_slots[slot],
        where.pos,
        active,
        cfg.num_attention_heads,
        cfg.cache_kv_heads,
    )
    y = decode_attention.fused(
        q,
        k_slots,
        v_slots,
        written,
        where.valid,
        slot,
        where.length,
        active,
        zero_frozen=zf,
        drops_missing=drops_missing,
        reads_last=reads_last,
    )
    o = linear.fused(y.reshape(B, -1), blk.attn.proj.weight, active=active, zero_frozen=zf)
    h, n3 = norms.fused(h, o, blk.norm_2.weight, blk.norm_3.weight, cfg.norm_eps)
    g = linear.fused(n3, blk.mlp.fc.weight, active=active, gate=True, zero_frozen=zf)
    mo = linear.fused(g, blk.mlp.proj.weight, active=active, zero_frozen=zf)
    return norms.fused(h, mo, blk.norm_4.weight, next_norm, cfg.norm_eps)


def core_iteration(
    model, s: Tensor, e_term: Tensor, cache, iteration: int, where: DecodePosition, active: Tensor
) -> Tensor:
    """adapter (W[:, :d] s + the token's W[:, d:] e term, with core layer 0's norm_1 folded in: the
    product's epilogue sums squares and the QKV product's prologue normalises) -> every core layer, K/V
    into the iteration's slot. s [B, d] -> [B, d]; rows of frozen sequences are unspecified (callers mask)."""
    cfg, blocks = model.config, model.transformer.core_block
    d = cfg.n_embd
    sumsq = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    w = model.transformer.adapter.weight[:, :d]
    h = linear.fused(s, w, add=e_term, active=active, sumsq=sumsq, zero_frozen=not s.is_cuda)
    x_in, prenorm = h, (sumsq, blocks[0].norm_1.weight, cfg.norm_eps)
    slot = cache.slot(iteration)  # (the iteration itself in the skip mode: r_max slots)
    written = None if cache.core_slots == 1 else cache.written
    reads_last = cache.reads_last_rows(iteration, where.pos) if cache.kv_mode.reads_last else None
    for j, blk in enumerate(blocks):
        nxt = blocks[j + 1].norm_1.weight if j + 1 < len(blocks) else None
        k, v = cache.core_k[j], cache.core_v[j]
        h, x_in = sandwich_layer(
            blk, h, x_in, k, v, written, slot, where, active, nxt, prenorm, cache.kv_mode.drops_missing, reads_last
        )
        prenorm = None
    return h
