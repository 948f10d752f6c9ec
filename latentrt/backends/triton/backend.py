"""The Triton backend: decode-time seams as fused kernels, and a recurrence without host syncs.

For one new position per sequence (decode), each core iteration runs as the fused launches of
recurrent_layers.py; prefill chunks (compute-bound, many positions) go through the PyTorch reference.
Decode tokens without hooks run as a ``RecurrentTokenRunner`` (token.py): prelude, every iteration with
its fused exit test, and the head as one CUDA graph on the GPU; at most one device->host read per token.
GPT-2 columns (Coconut thoughts and answer tokens) run as a ``ColumnRunner`` (column.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ... import kernels
from ...errors import InputError
from ...kernels import exits, feedback, pool_attention, pool_prefill
from ..base import Backend, Capabilities
from .column import ColumnAnswerRunner, ColumnRunner, fused_layers_apply
from .recurrent_layers import DecodePosition, core_iteration
from .token import RecurrentTokenRunner

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonExitOps:
    @staticmethod
    def latent_diff(prev: Tensor, new: Tensor, valid: Tensor, cosine: bool) -> Tensor:
        return exits.latent_diff_fused(prev, new, valid, cosine)

    @staticmethod
    def kl(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
        return exits.kl_fused(logits, prev_logp)


EARLY_STOP_ENV = "LATENTRT_TRITON_EARLY_STOP"  # 0: the token's whole loop is one graph, never stopped early


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(devices=("cuda",), dtypes=KERNEL_DTYPES, notes=("CPU via TRITON_INTERPRET=1",))
    sync_free = True
    exit_ops = TritonExitOps
    # the decode token's loop split at token.exit_boundaries, stopping once every sequence has exited (a few
    # host reads a token). On by default since an H200 measured it (RESULTS.md, 2026-12-04, third session):
    # 2.36x when every token exits at its first check, 5-9% on adaptive batches, within 2% at fixed r
    early_stop = True

    def __init__(self, model, reason: str = "") -> None:
        super().__init__(model, reason)
        self._token = None  # (e tensor, its adapter term, the position) of the token being decoded
        flag = os.environ.get(EARLY_STOP_ENV, "")
        if flag not in ("", "0", "1"):
            raise InputError(f"{EARLY_STOP_ENV} must be 0 or 1, got {flag!r}")
        if flag:
            self.early_stop = flag == "1"

    @classmethod
    def unavailable(cls, model, auto: bool = False) -> str | None:
        ok, why = kernels.triton_status(getattr(model, "device", None))
        if not ok:
            return why
        if auto and model.device.type != "cuda":
            return "the interpreter is for tests"
        return None

    def pool_attention(self):
        return pool_attention.fused

    def pool_prefill(self):
        return pool_prefill.fused

    # ---------------------------------------------------------------- recurrent depth
    def _position(self, e: Tensor, cache, chunk, rope) -> tuple[Tensor, DecodePosition]:
        if self._token is None or self._token[0] is not e:
            m = self.model
            dev = e.device
            where = DecodePosition(
                m.config,
                torch.tensor([chunk.start], device=dev),
                torch.tensor([chunk.end], device=dev),
                rope[0][:, 0].contiguous(),
                rope[1][:, 0].contiguous(),
                cache.valid,
            )
            adapter = m.transformer.adapter
            e_term = feedback.adapter_input_term(e[:, 0], adapter.weight, adapter.bias)  # once per token
            self._token = (e, e_term.contiguous(), where)
        return self._token[1:]

    def core_iteration(self, s: Tensor, e: Tensor, cache, chunk, iteration: int, active: Tensor, rope) -> Tensor:
        m = self.model
        if chunk.size != 1 or s.dtype not in KERNEL_DTYPES:
            return m.core_iteration(s, e, cache, chunk, iteration, active, rope)
        e_term, where = self._position(e, cache, chunk, rope)
        s0 = s[:, 0].contiguous()
        new = core_iteration(m, s0, e_term, cache, iteration, where, active)
        return new[:, None]  # (frozen rows: unspecified, as the reference's; the loop keeps their state)

    def token_runner(self, cache, spec) -> RecurrentTokenRunner | None:
        """The graph-capturable decode token (see token.py); None where the kernels do not apply."""
        if self.model.dtype not in KERNEL_DTYPES:
            return None
        return RecurrentTokenRunner(self, cache, spec)

    # ---------------------------------------------------------------- continuous thought
    def column_runner(self, cache, embeds: Tensor, latent: Tensor, mask: Tensor) -> ColumnRunner:
        """GPT-2 columns as one graph-capturable unit (see column.py), its layers as fused launches where the
        config allows."""
        return ColumnRunner(self.model, self.feedback, cache, embeds, latent, mask, self.fused_layer_weights())

    def answer_runner(self, cache) -> ColumnAnswerRunner:
        """Answer tokens on the column runner (one graph), then ln_f and the LM head."""
        return ColumnAnswerRunner(self, cache)

    def fused_layer_weights(self) -> list[dict[str, Tensor]] | None:
        """The transposed weights for the column runner's fused GPT-2 layers, or None where the config needs
        the model's own modules (see fused_layers_apply)."""
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
