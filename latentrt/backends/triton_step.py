"""One generated token of a recurrent-depth model as a fixed sequence of kernel launches: a CUDA graph.

Everything that changes from token to token lives in device tensors (the token ids, the timeline index,
the RoPE positions, the initial state), so the same launches serve every token and, on CUDA, one
captured graph replays prelude -> r_max core iterations with their exit tests -> coda -> head. Sequences
that exit are frozen by device masks and every weight-reading kernel returns before reading its weights
when no sequence is active, so iterations after the last exit cost launches, not weight passes (a graph
cannot branch; torch 2.11 cannot capture ``torch.while_loop``). The host reads back once per token.

Off CUDA (tests under TRITON_INTERPRET=1) the same ``run`` executes eagerly: the graph is the only thing
that differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import decode_attention, linear, norms, rope_kv

from ..exits import ExitCriterion, ExitTracker


class TokenInputs:
    """Device-side description of the position being decoded: timeline index ``pos`` [1], attended
    length ``length`` [1] (= pos + 1), per-sequence RoPE rows ``cos``/``sin`` [B, D/2], validity ``valid``
    [B, T] of every timeline entry."""

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
    step: TokenInputs,
    active: Tensor,
    next_norm: Tensor | None,
    prenorm: tuple | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One sandwich block for one new position per sequence. ``x_in`` is norm_1(h), or h itself with
    ``prenorm`` (norm_1 applied in the QKV product's prologue). Returns (h, next_norm(h)). Rows of frozen
    sequences are computed from, or left as, unwritten memory on a GPU (fewer memsets in the graph; rows never
    mix and the caller masks them); elsewhere they are zero-filled so no garbage is computed."""
    cfg = step.config
    B = h.shape[0]
    zf = not h.is_cuda
    qkv = linear.fused(x_in, blk.attn.Wqkv.weight, active=active, prenorm=prenorm, zero_frozen=zf)
    q = rope_kv.fused(
        qkv,
        blk.attn.qk_bias,
        step.cos,
        step.sin,
        k_slots[slot],
        v_slots[slot],
        step.pos,
        active,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    y = decode_attention.fused(q, k_slots, v_slots, written, step.valid, slot, step.length, active, zero_frozen=zf)
    o = linear.fused(y.reshape(B, -1), blk.attn.proj.weight, active=active, zero_frozen=zf)
    h, n3 = norms.fused(h, o, blk.norm_2.weight, blk.norm_3.weight, cfg.norm_eps)
    g = linear.fused(n3, blk.mlp.fc.weight, active=active, gate=True, zero_frozen=zf)
    mo = linear.fused(g, blk.mlp.proj.weight, active=active, zero_frozen=zf)
    return norms.fused(h, mo, blk.norm_4.weight, next_norm, cfg.norm_eps)


def core_iteration(model, s: Tensor, term: Tensor, cache, iteration: int, step: TokenInputs, active: Tensor) -> Tensor:
    """adapter (W[:, :d] s + the token's W[:, d:] e term, with core layer 0's norm_1 folded in: the
    product's epilogue sums squares and the QKV product's prologue normalises) -> every core layer, K/V
    into the iteration's slot. s [B, d] -> [B, d]; rows of frozen sequences are unspecified (callers mask)."""
    cfg, blocks = model.config, model.transformer.core_block
    d = cfg.n_embd
    sumsq = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    w = model.transformer.adapter.weight[:, :d]
    h = linear.fused(s, w, add=term, active=active, sumsq=sumsq, zero_frozen=not s.is_cuda)
    x_in, prenorm = h, (sumsq, blocks[0].norm_1.weight, cfg.norm_eps)
    slot = iteration % cache.core_slots
    written = None if cache.core_slots == 1 else cache.written
    for j, blk in enumerate(blocks):
        nxt = blocks[j + 1].norm_1.weight if j + 1 < len(blocks) else None
        k, v = cache.core_k[j], cache.core_v[j]
        h, x_in = sandwich_layer(blk, h, x_in, k, v, written, slot, step, active, nxt, prenorm)
        prenorm = None
    return h


class GraphedStep:
    """A unit of decode work with static inputs/outputs: the first call runs eagerly (compiling the
    kernels) on the stream a CUDA graph is then captured on; later calls replay the graph. Off CUDA every
    call runs eagerly. Subclasses implement ``run`` and fill their input buffers before calling."""

    _graph = None
    graph_replays = 0

    def __call__(self):
        if self._graph is not None:
            self._graph.replay()
            self.graph_replays += 1
            return self._outputs
        if self.model.device.type != "cuda":
            return self.run()
        # the eager call runs on the capture stream, so per-stream library state (cuBLAS workspaces)
        # exists before capture
        self._stream = torch.cuda.Stream(self.model.device)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = self.run()
        torch.cuda.current_stream().wait_stream(self._stream)
        for t in out if isinstance(out, tuple) else (out,):
            t.record_stream(torch.cuda.current_stream())  # used on this stream from now on
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):  # records without executing: state untouched
            self._outputs = self.run()
        self._graph = graph
        return out

    def run(self):
        raise NotImplementedError


class TokenStep(GraphedStep):
    """Static buffers and the launch sequence of one decode token for a batch (see module docstring).

    Inputs, set by ``prepare`` before each run: ``tok`` [B], ``alive`` [B], ``s0`` [B, d] (the initial
    state) and the timeline index. Outputs of ``run``: next-token logits [B, V] fp32, iterations used [B],
    non-finite flags [B] (1: state, 2: logits) and the final state [B, d] (for ``continuous``)."""

    def __init__(self, model, cache, r_max: int, criterion: ExitCriterion, min_steps: int, exit_ops) -> None:
        self.model, self.cache = model, cache
        self.r_max, self.criterion, self.min_steps, self.exit_ops = r_max, criterion, min_steps, exit_ops
        B, d, dev = cache.batch, model.config.n_embd, model.device
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.alive = torch.zeros(B, dtype=torch.bool, device=dev)
        self.s0 = torch.zeros(B, d, dtype=model.dtype, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.length = torch.ones(1, dtype=torch.long, device=dev)

    def prepare(self, tok: Tensor, alive: Tensor, s0: Tensor, timeline_index: int) -> None:
        """Copy the next token's inputs into the static buffers (device copies and fills: no host read)."""
        self.tok.copy_(tok.reshape(-1))
        self.alive.copy_(alive.reshape(-1))
        self.s0.copy_(s0.reshape(self.s0.shape))
        self.pos.fill_(timeline_index)
        self.length.fill_(timeline_index + 1)

    def run(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        step, term = self._begin()
        s, used, out = self._recurrence(step, term)
        alive = self.alive
        bad_state = ~torch.isfinite(s).all(-1) & alive
        bad_logits = ~torch.isfinite(out).all(-1) & alive
        return out, used, bad_state.long() + 2 * bad_logits.long(), s

    def _begin(self) -> tuple[TokenInputs, Tensor]:
        """Reserve the timeline entry on the device (validity, RoPE positions and counts as KVCache.begin
        computes them), run the prelude, and compute the adapter's per-token term W[:, d:] e + bias."""
        m, cache = self.model, self.cache
        t_, cfg = m.transformer, m.config
        alive, pos = self.alive, self.pos
        cache.valid.index_copy_(1, pos, alive[:, None])
        rope_pos = (cache.n_valid + alive.long() - 1).clamp(min=0)
        cache.n_valid.add_(alive.long())
        cache.written.index_fill_(1, pos, 0)
        step = TokenInputs(cfg, pos, self.length, m.rope_cos[rope_pos], m.rope_sin[rope_pos], cache.valid)
        x = (t_.wte(self.tok) * cfg.embed_scale).to(m.dtype)
        e = self._plain_stack(t_.prelude, 0, x, alive, step, next_after=None)[0]
        return step, torch.nn.functional.linear(e, t_.adapter.weight[:, cfg.n_embd :], t_.adapter.bias)

    def _recurrence(self, step: TokenInputs, term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Up to r_max core iterations with the exit test, frozen rows masked; returns the final state
        [B, d], the iterations used [B] and the next-token logits [B, V]."""
        m, cache, crit, alive = self.model, self.cache, self.criterion, self.alive
        cfg, pos = m.config, self.pos
        s = self.s0.clone()
        B = s.shape[0]
        active = alive.clone()
        used = torch.zeros(B, dtype=torch.long, device=s.device)
        out = torch.zeros(B, cfg.padded_vocab_size, device=s.device)
        tracker = ExitTracker(crit, B, cfg.padded_vocab_size, s.device, self.exit_ops)
        valid = alive[:, None]
        last_logits = None
        for t in range(self.r_max):
            cur = cache.written.index_select(1, pos)
            cache.written.index_copy_(1, pos, torch.where(active[:, None], t + 1, cur))
            new = core_iteration(m, s, term, cache, t, step, active)
            prev, s = s, torch.where(active[:, None], new, s)
            used += active.long()
            if crit.never_exits:
                continue
            last_logits = self._head(s, active, step) if crit.needs_logits else None
            exits = tracker.update(prev[:, None], s[:, None], last_logits, valid) & active
            if t + 1 < self.min_steps:
                continue
            if crit.needs_logits:
                out = torch.where(exits[:, None], last_logits, out)
            active = active & ~exits
        if crit.needs_logits:  # rows that never exited: the last iteration's logits are their final ones
            out = torch.where(active[:, None], last_logits, out)
        else:  # a frozen row's state is its exit state: one head pass gives every row its logits
            out = self._head(s, alive, step)
        return s, used, out

    def _plain_stack(self, blocks, base: int, x: Tensor, active: Tensor, step: TokenInputs, next_after) -> tuple:
        """Plain (one K/V entry per position) sandwich layers ``base..`` on x: returns (h, next_after(h))."""
        cache, eps = self.cache, self.model.config.norm_eps
        if len(blocks) == 0:
            return x, (norms.fused(x, None, next_after, None, eps)[0] if next_after is not None else None)
        h, normed = x, norms.fused(x, None, blocks[0].norm_1.weight, None, eps)[0]
        for i, blk in enumerate(blocks):
            nxt = blocks[i + 1].norm_1.weight if i + 1 < len(blocks) else next_after
            layer = base + i
            k, v = cache.plain_k[layer : layer + 1], cache.plain_v[layer : layer + 1]
            h, normed = sandwich_layer(blk, h, normed, k, v, None, 0, step, active, nxt)
        return h, normed

    def _head(self, s: Tensor, active: Tensor, step: TokenInputs) -> Tensor:
        """ln_f -> coda (K/V written for ``active``) -> ln_f -> lm_head: fp32 logits [B, V]."""
        m = self.model
        t_ = m.transformer
        x = norms.fused(s, None, t_.ln_f.weight, None, m.config.norm_eps)[0]
        _, normed = self._plain_stack(t_.coda, m.config.n_layers_in_prelude, x, active, step, t_.ln_f.weight)
        return linear.fused(normed, m.lm_head.weight, active=active).float()


class ThoughtStep(GraphedStep):
    """One Coconut prompt column (a continuous thought, or a token between thoughts) for a batch, on
    device-side indices so one CUDA graph serves every column: the fed-back input ln_f(h) + wpe[pos]
    (and layer 0's ln_1 of it) from the previous column's hidden state, every layer with its K/V written
    at the column's timeline entry, attention over the whole cache under a position mask."""

    def __init__(
        self, model, feedback, cache, embeds: Tensor, latent: Tensor, mask: Tensor, weights_t: list | None = None
    ) -> None:
        """``weights_t``: GPT-2's Conv1D weights transposed to [out, in] per layer (see fused_layers_apply);
        with them every layer runs as seven launches (_fused_layers), else through the model's own modules."""
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
        self.stats = torch.zeros(2 * len(model.transformer.h), B, 2, device=dev)

    def run_columns(self, h_prev: Tensor, first: int, last: int) -> Tensor | None:
        """All columns first..last at once, or None (run_prompt then steps column by column)."""
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
        cache.valid.index_copy_(1, pos, valid)
        positions = (cache.n_valid[:, None] + valid.long() - 1).clamp(min=0)
        cache.n_valid.add_(valid[:, 0].long())
        x = self.embeds.index_select(1, self.col) + t_.wpe(positions)
        fed, fed_ln1 = self.feedback(self.h, positions)
        x = torch.where(rows, fed.to(x.dtype), x)
        ln1x = torch.where(rows, fed_ln1.to(x.dtype), t_.h[0].ln_1(x))
        if self.weights_t is not None:
            return self._fused_layers(x[:, 0], ln1x[:, 0])[:, None]
        mask = ((self.t_idx <= pos) & (cache.valid | (self.t_idx == pos)))[:, None, None, :]

        def kv(i: int):
            def write(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
                cache.plain_k[i].index_copy_(2, pos, k.to(cache.plain_k.dtype))
                cache.plain_v[i].index_copy_(2, pos, v.to(cache.plain_v.dtype))
                return cache.plain_k[i], cache.plain_v[i]

            return write

        for i, block in enumerate(t_.h):
            x = block(x, mask, kv(i), ln1x if i == 0 else None)
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
            cache.plain_k[i].index_copy_(2, pos, k[:, :, None].to(cache.plain_k.dtype))
            cache.plain_v[i].index_copy_(2, pos, v[:, :, None].to(cache.plain_v.dtype))
            k_slots, v_slots = cache.plain_k[i : i + 1], cache.plain_v[i : i + 1]
            att = decode_attention.fused(q, k_slots, v_slots, None, cache.valid, 0, length).reshape(B, d)
            mid = linear.fused(att, w["proj"], add=h, bias=attn.c_proj.bias, stats=stats[2 * i])
            ln = (stats[2 * i], blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            hid = linear.fused(mid, w["fc"], bias=mlp.c_fc.bias, gelu=True, ln_prenorm=ln)
            h = linear.fused(hid, w["out"], add=mid, bias=mlp.c_proj.bias, stats=stats[2 * i + 1])
        return h


def fused_layers_apply(config) -> str | None:
    """Why GPT-2's fused layer path cannot run this config (None when it can): the decode attention kernel
    scales by 1/sqrt(head_dim) and the GEMV epilogue computes GELU's tanh form."""
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        return "attention scaling other than 1/sqrt(head_dim)"
    if config.activation_function not in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return f"activation {config.activation_function!r}"
    return None
