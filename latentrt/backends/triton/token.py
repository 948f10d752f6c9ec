"""One generated token of a recurrent-depth model as a fixed sequence of kernel launches: a CUDA graph.

Everything that changes from token to token lives in device tensors (the token ids, the timeline index,
the RoPE positions, the initial state), so the same launches serve every token and, on CUDA, one
captured graph replays prelude -> the latent loop (latentrt/recurrence.py, ``run_recurrence``, with
fused layers and exit tests) -> coda -> head. Sequences that exit are frozen by device masks and every
weight-reading kernel returns before reading its weights when no sequence is active, so iterations after
the last exit cost launches, not weight passes (a graph cannot branch; torch 2.11 cannot capture
``torch.while_loop``). With the backend's ``early_stop`` (the default; LATENTRT_TRITON_EARLY_STOP=0 turns
it off) the loop is split at ``exit_boundaries`` (after 1, 2, 4, 8, then every 4 iterations, at a check) into
graphs replayed in order, and at each boundary the host reads whether any sequence is still active, skipping
the rest of the loop when none is: a few reads a token for the launches of every iteration after the last
exit. On an H200 (RESULTS.md, 2026-12-04): a token whose sequences all exit after one of 32 iterations took
7.02 ms as one graph and 2.97 ms split (56.7% of its HBM floor); at fixed r the split costs under 2%.
Without it the host reads back once per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import feedback, linear, norms
from ...kernels.reference import nonfinite_flags
from ...recurrence import LoopSpec, all_exited, recurrence_segments
from ..base import Backend
from ..graph import GraphedRunner
from .recurrent_layers import DecodePosition, core_iteration, sandwich_layer

# iterations: an empty iteration cost ~0.17 ms of launches on an H200 (2026-12-04); a boundary (a read, a graph
# launch, a small reduction) costs under 2% of a 32-iteration token there (37.80 ms split, 37.78 one graph)
MAX_BOUNDARY_GAP = 4


def exit_boundaries(spec: LoopSpec) -> frozenset[int]:
    """The iterations after which an early-stopping token runner reads whether every sequence has exited:
    the first check at or after 1, 2, 4 and 8 iterations, then every MAX_BOUNDARY_GAP (a loop whose last
    exit is at iteration t launches at most min(t, 4) empty iterations more, while r_max 32 costs 10 reads),
    and the last iteration (so the last graph holds only the head). None without an exit test."""
    checks = [t for t in range(spec.r_max) if spec.checks_at(t)]
    if not checks:
        return frozenset()
    stops, target = {spec.r_max - 1}, 0
    while (after := next((t for t in checks if t >= target), None)) is not None:
        stops.add(after)
        done = after + 1
        target = done + min(done, MAX_BOUNDARY_GAP) - 1
    return frozenset(stops)


class RecurrentTokenRunner(GraphedRunner):
    """Static buffers and the launch sequence of one decode token for a batch (see module docstring).

    Inputs, set by ``prepare`` before each call: ``tok`` [B], ``alive`` [B], ``s0`` [B, d] (the initial
    state) and the timeline index. Outputs: next-token logits [B, V] fp32, iterations used [B],
    non-finite flags [B] (1: state, 2: logits) and the final state [B, d] (for ``continuous``)."""

    def __init__(self, backend: Backend, cache, spec: LoopSpec) -> None:
        model = backend.model
        self.model, self.cache, self.spec, self.exit_ops = model, cache, spec, backend.exit_ops
        self.stops = exit_boundaries(spec) if getattr(backend, "early_stop", True) else frozenset()
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

    def stop(self, loop) -> bool:
        return all_exited(loop)

    def segments(self):
        """The token's launches (GraphedRunner): prelude, the loop with its boundaries (``self.stops``), head."""
        where, e_term = self._begin()
        s, used, out = yield from self.loop(where, e_term)
        return out, used, nonfinite_flags(s, None, out, self.alive), s

    def _begin(self) -> tuple[DecodePosition, Tensor]:
        """Begin the timeline entry on the device, run the prelude, and compute the adapter's per-token
        term W[:, d:] e + bias."""
        m, cache = self.model, self.cache
        t_, cfg = m.transformer, m.config
        rope_pos = cache.begin_at(self.pos, self.alive)
        where = DecodePosition(cfg, self.pos, self.length, m.rope_cos[rope_pos], m.rope_sin[rope_pos], cache.valid)
        x = (t_.wte(self.tok) * cfg.embed_scale).to(m.dtype)
        e = self._plain_stack(t_.prelude, 0, x, self.alive, where, next_after=None)[0]
        return where, feedback.adapter_input_term(e, t_.adapter.weight, t_.adapter.bias)

    def loop(self, where: DecodePosition, e_term: Tensor):
        """The latent loop of latentrt/recurrence.py on fused layers, with its boundaries (a generator);
        returns (final state [B, d], iterations used [B], next-token logits [B, V])."""
        m, cache = self.model, self.cache
        return (
            yield from recurrence_segments(
                self.spec,
                self.s0.clone(),
                self.alive,
                self.alive[:, None],
                m.config.padded_vocab_size,
                iterate=lambda s, t, active: core_iteration(m, s, e_term, cache, t, where, active),
                head=lambda s, active: self._head(s, active, where),
                mark=lambda t, active: cache.mark_iteration_at(self.pos, t, active),
                exit_ops=self.exit_ops,
                stops=self.stops,
            )
        )

    def _plain_stack(self, blocks, base: int, x: Tensor, active: Tensor, where: DecodePosition, next_after) -> tuple:
        """Plain (one K/V entry per position) sandwich layers ``base..`` on x: returns (h, next_after(h))."""
        cache, eps = self.cache, self.model.config.norm_eps
        if len(blocks) == 0:
            return x, (norms.fused(x, None, next_after, None, eps)[0] if next_after is not None else None)
        h, normed = x, norms.fused(x, None, blocks[0].norm_1.weight, None, eps)[0]
        for i, blk in enumerate(blocks):
            nxt = blocks[i + 1].norm_1.weight if i + 1 < len(blocks) else next_after
            layer = base + i
            k, v = cache.plain_k[layer : layer + 1], cache.plain_v[layer : layer + 1]
            h, normed = sandwich_layer(blk, h, normed, k, v, None, 0, where, active, nxt)
        return h, normed

    def _head(self, s: Tensor, active: Tensor, where: DecodePosition) -> Tensor:
        """ln_f -> coda (K/V written for ``active``) -> ln_f -> lm_head: fp32 logits [B, V]."""
        m = self.model
        t_ = m.transformer
        x = norms.fused(s, None, t_.ln_f.weight, None, m.config.norm_eps)[0]
        _, normed = self._plain_stack(t_.coda, m.config.n_layers_in_prelude, x, active, where, t_.ln_f.weight)
        return linear.fused(normed, m.lm_head.weight, active=active).float()
