"""One timeline position of a GPT-2 model for the batch as fixed launches: a CUDA graph per prompt.

A column is a Coconut thought (its input is the previous column's hidden state fed back: ln_f(h) +
wpe[pos]), a prompt token between thoughts, or an answer token (input: its embedding + wpe[pos]). On
device-side indices (column, timeline index) one captured graph serves every column. Each GPT-2 layer
runs as seven launches on Conv1D weights transposed once (``fused_layers_apply`` says where that path
does not apply; the model's own modules run the layers there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import decode_attention, linear
from ..graph import GraphedRunner

TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # GELU's tanh form: the fused kernels' activation


def fused_layers_apply(config) -> str | None:
    """Why GPT-2's fused layer path cannot run this config (None when it can): the decode attention kernel
    scales by 1/sqrt(head_dim) and the GEMV epilogue computes GELU's tanh form."""
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        return "attention scaling other than 1/sqrt(head_dim)"
    if config.activation_function not in TANH_GELUS:
        return f"activation {config.activation_function!r}"
    return None


class ColumnRunner(GraphedRunner):
    """Static buffers and launches of one column for a batch. ``embeds`` [B, S, d] token embeddings and
    ``latent`` / ``mask`` [B, S] bool (thought positions / real positions) are the prompt's (or an answer
    token's one-column buffers); ``prepare(h_prev, column, timeline_index)`` sets the fed-back hidden
    state [B, 1, d], the column and its timeline entry. Output: the hidden state before ln_f [B, 1, d]."""

    def __init__(
        self, model, feedback, cache, embeds: Tensor, latent: Tensor, mask: Tensor, weights_t: list | None = None
    ) -> None:
        """``weights_t``: GPT-2's Conv1D weights transposed to [out, in] per layer; with them every layer
        runs as seven launches (_fused_layers), else through the model's own modules."""
        self.model, self.feedback, self.cache = model, feedback, cache
        self.embeds, self.latent, self.mask = embeds, latent, mask
        self.weights_t = weights_t
        dev = model.device
        B, _, d = embeds.shape
        self.h = torch.zeros(B, 1, d, dtype=embeds.dtype, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.t_idx = torch.arange(cache.max_len, device=dev)
        # LayerNorm statistics (sum, sum of squares) per row after each residual add: 2 per layer
        self.stats = torch.zeros(2 * len(model.transformer.h), B, 2, dtype=torch.float32, device=dev)

    def run_all(self, h_prev: Tensor, first: int, last: int) -> Tensor | None:
        """All columns first..last in one launch, or None (the caller then runs them one by one)."""
        return None

    def prepare(self, h_prev: Tensor, column: int, timeline_index: int) -> None:
        self.h.copy_(h_prev)
        self.col.fill_(column)
        self.pos.fill_(timeline_index)

    def run(self) -> Tensor:
        m, cache, pos = self.model, self.cache, self.pos
        t_ = m.transformer
        valid = self.mask.index_select(1, self.col)  # [B, 1]
        rows = self.latent.index_select(1, self.col)[:, :, None]  # [B, 1, 1]
        positions = cache.begin_at(pos, valid[:, 0])[:, None]
        x = self.embeds.index_select(1, self.col) + t_.wpe(positions)
        x, ln1x = m.with_thoughts(x, *self.feedback(self.h, positions), rows)
        if self.weights_t is not None:
            return self._fused_layers(x[:, 0], ln1x[:, 0])[:, None]
        mask = ((self.t_idx <= pos) & (cache.valid | (self.t_idx == pos)))[:, None, None, :]
        for i, block in enumerate(t_.h):
            x = block(x, mask, lambda k, v, i=i: cache.write_plain_at(i, pos, k, v), ln1x if i == 0 else None)
        return x

    def _fused_layers(self, x: Tensor, ln1x: Tensor) -> Tensor:
        """Every GPT-2 layer for the column as seven launches: QKV (ln_1 in the prologue from the previous
        layer's statistics; layer 0 gets ln_1(x) from the feedback kernel), the K/V writes, decode
        attention over the timeline (positions <= pos that are valid, and pos itself), c_proj + bias +
        residual with the row statistics in its epilogue, c_fc with ln_2 in the prologue + bias + GELU,
        the MLP's c_proj + bias + residual with the next layer's statistics. x, ln1x [B, d]."""
        m, cache, pos = self.model, self.cache, self.pos
        B, d = x.shape
        H = m.config.n_head
        stats = self.stats
        stats.zero_()
        length = pos + 1
        h = x
        for i, (blk, w) in enumerate(zip(m.transformer.h, self.weights_t)):
            attn, mlp = blk.attn, blk.mlp
            if i == 0:
                qkv = linear.fused(ln1x, w["attn"], bias=attn.c_attn.bias)
            else:
                ln = (stats[2 * i - 1], blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
                qkv = linear.fused(h, w["attn"], bias=attn.c_attn.bias, ln_prenorm=ln)
            q, k, v = qkv.view(B, 3, H, d // H).unbind(1)
            cache.write_plain_at(i, pos, k[:, :, None], v[:, :, None])
            k_slots, v_slots = cache.plain_k[i : i + 1], cache.plain_v[i : i + 1]
            att = decode_attention.fused(q, k_slots, v_slots, None, cache.valid, 0, length).reshape(B, d)
            mid = linear.fused(att, w["proj"], add=h, bias=attn.c_proj.bias, stats=stats[2 * i])
            ln = (stats[2 * i], blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            hid = linear.fused(mid, w["fc"], bias=mlp.c_fc.bias, gelu=True, ln_prenorm=ln)
            h = linear.fused(hid, w["out"], add=mid, bias=mlp.c_proj.bias, stats=stats[2 * i + 1])
        return h


class ColumnAnswerRunner:
    """Coconut answer tokens on the backend's column runner (``Backend.answer_runner``): the column (one
    captured graph: the layers over the token embeddings + wpe), then ln_f and the LM head as the model's
    modules. ``prepare(embeds [B, 1, d], alive [B])``; calling it returns the logits [B, V] (fp32)."""

    def __init__(self, backend, cache) -> None:
        m = backend.model
        self.model, self.cache = m, cache
        self.embeds = torch.zeros(cache.batch, 1, m.config.n_embd, dtype=m.dtype, device=m.device)
        no_thoughts = torch.zeros(cache.batch, 1, dtype=torch.bool, device=m.device)
        self.valid = torch.zeros_like(no_thoughts)
        self.column = backend.column_runner(cache, self.embeds, no_thoughts, self.valid)

    def prepare(self, embeds: Tensor, alive: Tensor) -> None:
        self.embeds.copy_(embeds)
        self.valid.copy_(alive[:, None])
        self.column.prepare(self.embeds, 0, self.cache.reserve())  # no thought rows: the fed-back input is unused

    def __call__(self) -> Tensor:
        m = self.model
        return m.lm_logits(m.transformer.ln_f(self.column()))[:, -1]
