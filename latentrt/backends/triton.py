"""The Triton backend: decode-time seams as fused kernels, and a recurrence without host syncs.

For one new position per sequence (decode), each core iteration runs as: adapter (W[:, :d] s plus the
per-token W[:, d:] e term computed once) -> core layer 0's norm_1 -> per layer: Wqkv -> qk_bias + RoPE +
K/V into the iteration's slot -> decode attention with the slot lookup rule -> proj -> residual + norm_2
+ norm_3 -> fc with fused SiLU gate -> proj -> residual + norm_4 + the next layer's norm_1. Every weight
kernel returns before touching its weights when no sequence is active, so frozen work costs only launches.
Prefill chunks (compute-bound, many positions) go through the PyTorch reference.
The exit tests use fused kernels and the engine runs all iterations with device masks (``sync_free``):
at most one device->host read per generated token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import decode_attention, exits, feedback, linear, norms, rope_kv

from .torch import TorchBackend


class TritonExitOps:
    @staticmethod
    def latent_diff(prev: Tensor, new: Tensor, valid: Tensor, cosine: bool) -> Tensor:
        return exits.latent_diff_fused(prev, new, valid, cosine)

    @staticmethod
    def kl(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
        return exits.kl_fused(logits, prev_logp)


class TritonBackend(TorchBackend):
    name = "triton"
    sync_free = True
    exit_ops = TritonExitOps

    def __init__(self, model, reason: str = "") -> None:
        super().__init__(model, reason)
        self._token = None  # (e tensor, its adapter term, position tensors) of the token being decoded

    def _token_inputs(self, e: Tensor, chunk, rope) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self._token is None or self._token[0] is not e:
            m = self.model
            w = m.transformer.adapter.weight
            d = e.shape[-1]
            term = torch.nn.functional.linear(e[:, 0], w[:, d:], m.transformer.adapter.bias)  # once per token
            dev = e.device
            pos = torch.tensor([chunk.start], device=dev)
            length = torch.tensor([chunk.end], device=dev)
            self._token = (e, term.contiguous(), pos, length, rope[0][:, 0].contiguous(), rope[1][:, 0].contiguous())
        return self._token[1:]

    def core_step(self, s: Tensor, e: Tensor, cache, chunk, iteration: int, active: Tensor, rope) -> Tensor:
        m = self.model
        if chunk.size != 1 or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return m.core_step(s, e, cache, chunk, iteration, active, rope)
        cfg = m.config
        d, eps = cfg.n_embd, cfg.norm_eps
        term, pos, length, cos, sin = self._token_inputs(e, chunk, rope)
        blocks = m.transformer.core_block
        B = s.shape[0]
        h = linear.fused(s[:, 0].contiguous(), m.transformer.adapter.weight[:, :d], add=term, active=active)
        normed = norms.fused(h, None, blocks[0].norm_1.weight, None, eps)[0]
        slot = iteration % cache.core_slots
        plain_slice = cache.core_slots == 1 or (slot < cache.min_done and cache.reported >= chunk.start)
        for j, blk in enumerate(blocks):
            qkv = linear.fused(normed, blk.attn.Wqkv.weight, active=active)
            q = rope_kv.fused(
                qkv,
                blk.attn.qk_bias,
                cos,
                sin,
                cache.core_k[j, slot],
                cache.core_v[j, slot],
                pos,
                active,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
            )
            y = decode_attention.fused(
                q, cache.core_k[j], cache.core_v[j], None if plain_slice else cache.written, cache.valid, slot, length
            )
            o = linear.fused(y.reshape(B, -1), blk.attn.proj.weight, active=active)
            h, n3 = norms.fused(h, o, blk.norm_2.weight, blk.norm_3.weight, eps)
            g = linear.fused(n3, blk.mlp.fc.weight, active=active, gate=True)
            mo = linear.fused(g, blk.mlp.proj.weight, active=active)
            nxt = blocks[j + 1].norm_1.weight if j + 1 < len(blocks) else None
            h, normed = norms.fused(h, mo, blk.norm_4.weight, nxt, eps)
        return h[:, None]

    def feedback(self, h_pre: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Coconut: ln_f(h) + wpe[pos] and layer 0's ln_1 of it, in one kernel."""
        t = self.model.transformer
        B, n, D = h_pre.shape
        x, y = feedback.coconut_fused(
            h_pre.reshape(-1, D),
            t.ln_f.weight,
            t.ln_f.bias,
            t.wpe.weight,
            positions.reshape(-1),
            t.h[0].ln_1.weight,
            t.h[0].ln_1.bias,
            t.ln_f.eps,
        )
        return x.view(B, n, D), y.view(B, n, D)
