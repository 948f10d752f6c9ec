"""The Triton backend: decode-time seams as fused kernels, and a recurrence without host syncs.

For one new position per sequence (decode), each core iteration runs as: adapter (W[:, :d] s plus the
per-token W[:, d:] e term computed once; its epilogue sums squares for core layer 0's norm_1, applied in
the QKV product's prologue) -> per layer: Wqkv -> qk_bias + RoPE + K/V into the iteration's slot ->
decode attention with the slot lookup rule -> proj -> residual + norm_2 + norm_3 -> fc with fused SiLU
gate -> proj -> residual + norm_4 + the next layer's norm_1. Every weight kernel returns before touching
its weights when no sequence is active, so frozen work costs only launches.
Prefill chunks (compute-bound, many positions) go through the PyTorch reference.
Decode tokens without hooks run as a ``TokenStep`` (triton_step.py): prelude, every iteration with its
fused exit test, and the head as one CUDA graph on the GPU; at most one device->host read per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import exits, feedback

from .torch import TorchBackend
from .triton_step import ThoughtStep, TokenInputs, TokenStep, core_iteration, fused_layers_apply


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
        self._token = None  # (e tensor, its adapter term, the position's TokenInputs) of the token being decoded

    def _token_inputs(self, e: Tensor, cache, chunk, rope) -> tuple[Tensor, TokenInputs]:
        if self._token is None or self._token[0] is not e:
            m = self.model
            w = m.transformer.adapter.weight
            d = e.shape[-1]
            term = torch.nn.functional.linear(e[:, 0], w[:, d:], m.transformer.adapter.bias)  # once per token
            dev = e.device
            step = TokenInputs(
                m.config,
                torch.tensor([chunk.start], device=dev),
                torch.tensor([chunk.end], device=dev),
                rope[0][:, 0].contiguous(),
                rope[1][:, 0].contiguous(),
                cache.valid,
            )
            self._token = (e, term.contiguous(), step)
        return self._token[1:]

    def core_step(self, s: Tensor, e: Tensor, cache, chunk, iteration: int, active: Tensor, rope) -> Tensor:
        m = self.model
        if chunk.size != 1 or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return m.core_step(s, e, cache, chunk, iteration, active, rope)
        term, step = self._token_inputs(e, cache, chunk, rope)
        s0 = s[:, 0].contiguous()
        new = core_iteration(m, s0, term, cache, iteration, step, active)
        return torch.where(active[:, None], new, s0)[:, None]  # frozen rows keep their state (hooks see it)

    def token_step(self, cache, r_max: int, criterion, min_steps: int) -> TokenStep | None:
        """The graph-capturable decode token (see triton_step); None where the kernels do not apply."""
        if self.model.family != "recurrent" or self.model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        return TokenStep(self.model, cache, r_max, criterion, min_steps, self.exit_ops)

    def thought_step(self, cache, embeds: Tensor, latent: Tensor, mask: Tensor) -> ThoughtStep:
        """Coconut prompt columns as one graph-capturable unit (see triton_step.ThoughtStep), its layers as
        fused launches where the config allows."""
        return ThoughtStep(self.model, self.feedback, cache, embeds, latent, mask, self.fused_layer_weights())

    def fused_layer_weights(self) -> list[dict[str, Tensor]] | None:
        """The transposed weights for ThoughtStep's fused GPT-2 layers, or None where the config needs the
        model's own modules (see fused_layers_apply)."""
        return self.conv1d_transposed() if fused_layers_apply(self.model.config) is None else None

    def conv1d_transposed(self) -> list[dict[str, Tensor]]:
        """GPT-2's Conv1D weights ([in, out]) as contiguous [out, in] copies per layer (the GEMV kernels
        read W row by row): attn, proj, fc, out. One more copy of the layer weights (170 MB in bf16 for
        GPT-2 124M), remade when a weight changed (a training step bumps the tensors' version counters, a
        load_state_dict too), so a fine-tuned model never runs on stale copies."""
        mods = [
            (name, mod)
            for blk in self.model.transformer.h
            for name, mod in (
                ("attn", blk.attn.c_attn),
                ("proj", blk.attn.c_proj),
                ("fc", blk.mlp.c_fc),
                ("out", blk.mlp.c_proj),
            )
        ]
        key = tuple((m.weight.data_ptr(), m.weight._version) for _, m in mods)
        if getattr(self, "_transposed_key", None) != key:
            copies = [m.weight.detach().t().contiguous() for _, m in mods]
            self._transposed = [
                dict(zip(("attn", "proj", "fc", "out"), copies[i : i + 4])) for i in range(0, len(copies), 4)
            ]
            self._transposed_key = key
        return self._transposed

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
