"""The latent loop of recurrent depth: its semantics, written once.

Every implementation runs these rules; the reference path and the Triton token runner call
``run_recurrence`` itself, and the CUDA kernel (csrc/recurrent_loop.cu) implements them on the device
and is tested against it.

A *unit* is the prompt (prefill, many positions) or one generated token. For a batch of B sequences:

1. The prelude gives the unit's input e; the initial state s_0 is the random init (truncated normal,
   ``init_scale``), or with ``continuous`` the previous unit's final state (last position).
2. Iteration t = 0 .. r_max-1 runs for the sequences still *active*: the cache records that they write
   iteration t at the unit's positions (``written`` = t + 1, so the lookup rule of latentrt/kv_modes.py
   finds their entries), s <- core(s, e) with the core layers' K/V in slot t mod K, and each active
   sequence's iteration count goes up by one. A frozen sequence keeps its state, its K/V and its count.
3. After iteration t the exit criterion (latentrt/exits.py) is updated for every sequence, from the
   previous and new state (latent-diff, cosine) or the logits of the new state (kl, entropy-diff,
   argmax-stability; computing them writes the coda's K/V for the active sequences). A sequence exits
   when its criterion is met and t + 1 >= ``min_steps``; it is frozen from then on.
4. Logits: for the logit-based criteria, a sequence's logits are those computed at its exit iteration
   (or at the last iteration if it never exits); otherwise one head pass over every sequence's final
   state (a frozen state is its exit state) gives them and writes the coda's K/V.
5. The unit reports, per sequence, the iterations it ran (``GenerationResult.steps``) and whether its
   final state or logits are non-finite.

Without an exit criterion (``none``, i.e. fixed depth) every sequence runs r_max iterations. A
sequence's result does not depend on the others in the batch: masks, never host branches, decide who
runs. The loop never reads the device from the host unless ``host_may_stop`` (the reference path: it
stops early once every sequence has exited, a host read per iteration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .exits import ExitCriterion, ExitTracker


@dataclass(frozen=True)
class LoopSpec:
    """What a generate() call asks of each unit's loop."""

    r_max: int  # iterations at most (num_steps)
    criterion: ExitCriterion  # ``none`` for fixed depth
    min_steps: int = 0


def run_recurrence(
    spec: LoopSpec,
    s0: Tensor,
    alive: Tensor,
    valid: Tensor,
    vocab: int,
    iterate: Callable[[Tensor, int, Tensor], Tensor],
    head: Callable[[Tensor, Tensor], Tensor],
    mark: Callable[[int, Tensor], None],
    exit_ops=None,
    hooks=None,
    host_may_stop: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one unit's latent loop (rules in the module docstring).

    ``s0`` the initial state ([B, n, d] or [B, d]); ``alive`` [B] the sequences that run the unit; ``valid``
    [B, n] its real positions (for the latent-diff average); ``iterate(s, t, active)`` one core iteration;
    ``head(s, active)`` the next-token logits [B, vocab] (fp32) of a state; ``mark(t, active)`` records in
    the cache that ``active`` write iteration t; ``exit_ops`` the backend's exit formulas (None: reference);
    ``hooks`` a HookList called after every iteration. Returns (final state, iterations used [B] long,
    logits [B, vocab] fp32)."""
    crit = spec.criterion
    s = s0
    B = s.shape[0]
    active = alive.clone()
    used = torch.zeros(B, dtype=torch.long, device=s.device)
    out = torch.zeros(B, vocab, device=s.device)
    tracker = ExitTracker(crit, B, vocab, s.device, exit_ops)
    expand = (slice(None),) + (None,) * (s.dim() - 1)  # active[:, None(, None)] against the state
    logits = None
    for t in range(spec.r_max):
        mark(t, active)
        new = iterate(s, t, active)
        if hooks:
            new = hooks.on_iteration(t, new, active)
        prev, s = s, torch.where(active[expand], new, s)
        used += active.long()
        if crit.never_exits:
            continue
        logits = head(s, active) if crit.needs_logits else None
        exits = tracker.update(prev, s, logits, valid) & active
        if t + 1 < spec.min_steps:
            continue
        if crit.needs_logits:
            out = torch.where(exits[:, None], logits, out)
        active = active & ~exits
        if host_may_stop and not bool(active.any()):
            break
    if crit.needs_logits:  # sequences that never exited: their last iteration's logits
        out = torch.where(active[:, None], logits, out)
    else:  # a frozen state is its exit state: one head pass gives every sequence its logits
        out = head(s, alive)
    return s, used, out
