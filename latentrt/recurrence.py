"""The latent loop of recurrent depth: its semantics, written once.

Every implementation runs these rules; the reference path and the Triton token runner call
``run_recurrence`` itself, and the CUDA kernel (csrc/recurrent_loop.cu) implements them on the device
and is tested against it. They are the rules of the published ``generate_with_adaptive_compute``
(Huginn's raven_modeling_minimal.py) for one sequence; a batch applies them to each sequence on its own.

A *unit* is the prompt (prefill, many positions) or one generated token. For a batch of B sequences:

1. The prelude gives the unit's input e; the initial state s_0 is the random init (truncated normal,
   ``init_scale``), or with ``continuous`` the previous unit's final state (last position).
2. Iteration t = 0 .. r_max-1 runs for the sequences still *active*: the cache records that they write
   iteration t at the unit's positions (``written`` = t + 1, so the lookup rule of latentrt/kv_modes.py
   finds their entries), s <- core(s, e) with the core layers' K/V in slot t mod K, and each active
   sequence's iteration count goes up by one. A frozen sequence keeps its state, its K/V and its count.
3. Checks: the exit criterion (latentrt/exits.py) runs only after iterations t >= ``min_steps`` with
   (t - min_steps) a multiple of ``check_every`` (the published ``check_criterion_every_n_steps``), and
   never in the prefill with ``do_not_exit_in_prefill``. Between checks it keeps its state: a check
   compares the new state with the state of the previous check (the initial state at the first check:
   latent-diff, cosine), or the new logits with those of the previous check (uniform at the first: kl,
   minp-kl; a fresh counter: argmax-stability). So with ``min_steps`` m > 0 the earliest exit is usually
   after m + 2 iterations. Computing logits for a check writes the coda's K/V for the active sequences.
4. A sequence exits at a check when its criterion is met; it is frozen from then on.
5. Logits: a sequence that exited gets the logits of its exit state. One that never exited gets, for the
   logit-based criteria, the logits of the last check (as published: with ``check_every`` > 1 that may
   precede the last iterations), else one head pass over its final state.
6. The unit reports, per sequence, the iterations it ran (``GenerationResult.steps``) and whether its
   final state or logits are non-finite.

Without an exit criterion (``none``, i.e. fixed depth) every sequence runs r_max iterations. A
sequence's result does not depend on the others in the batch: masks, never host branches, decide who
runs. The loop never reads the device from the host unless ``host_may_stop`` (the reference path: it
stops early once every sequence has exited, a host read per check).
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
    min_steps: int = 0  # no check after the first min_steps iterations
    check_every: int = 1  # then a check after every check_every-th iteration

    def checks_at(self, t: int) -> bool:
        """Whether the criterion runs after iteration t (0-based)."""
        return not self.criterion.never_exits and t >= self.min_steps and (t - self.min_steps) % self.check_every == 0

    @property
    def ever_checks(self) -> bool:
        return any(self.checks_at(t) for t in range(self.r_max))


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
    s = reference = s0  # reference: the state the criterion saw last (rule 3)
    B = s.shape[0]
    active = alive.clone()
    used = torch.zeros(B, dtype=torch.long, device=s.device)
    out = torch.zeros(B, vocab, device=s.device)
    tracker = ExitTracker(crit, B, vocab, s.device, exit_ops)
    expand = (slice(None),) + (None,) * (s.dim() - 1)  # active[:, None(, None)] against the state
    checked_logits = None
    for t in range(spec.r_max):
        mark(t, active)
        new = iterate(s, t, active)
        if hooks:
            new = hooks.on_iteration(t, new, active)
        s = torch.where(active[expand], new, s)
        used += active.long()
        if not spec.checks_at(t):
            continue
        logits = head(s, active) if crit.needs_logits else None
        exits = tracker.update(reference, s, logits, valid) & active
        reference = s
        if crit.needs_logits:
            out = torch.where(exits[:, None], logits, out)
            checked_logits = logits
        active = active & ~exits
        if host_may_stop and not bool(active.any()):
            break
    if checked_logits is not None:  # logit criteria: who never exited keeps the last check's logits (rule 5)
        out = torch.where(active[:, None], checked_logits, out)
    else:  # a frozen state is its exit state: one head pass gives every sequence its logits
        out = head(s, alive)
    return s, used, out
