"""An exit criterion that replays recorded exit depths, for serving benchmarks on random weights.

A random-weight model at Huginn-0125's shape never converges, so its exit depths say nothing; the serving
benchmark (benchmarks/serve.py) records the per-token depths of a trained model (the built-in one) and
replays them here: each unit draws its depth from the recorded list (i.i.d., from a seeded generator on the
device) and exits after exactly that many iterations. It needs no logits (like latent-diff), so a step costs
what the core iterations cost. Every scheduler sees the same depth distribution, not the same sequence
(which unit draws first depends on the schedule). Benchmark-only: ``registered`` adds it to the product's
registry for the duration of a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from latentrt.exits import CRITERIA, ExitCriterion

NAME = "replay-depths"


@dataclass(frozen=True)
class ReplayDepths(ExitCriterion):
    """Exit after a depth drawn from ``depths`` (set by ``registered``); the threshold is unused."""

    depths: ClassVar[torch.Tensor] = torch.tensor([1])
    generator: ClassVar[torch.Generator | None] = None

    def start(self, batch, vocab, device):
        pick = torch.randint(len(self.depths), (batch,), generator=self.generator)  # on the host: no sync
        return self.depths[pick].to(device), torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, state, prev, new, logits, valid, ops):
        target, ran = state
        ran = ran + 1
        return ran >= target, (target, ran)


@contextmanager
def registered(depths: list[int], seed: int = 0) -> Iterator[str]:
    """``replay-depths`` in latentrt's criteria registry while the block runs, replaying ``depths``."""
    if not depths or min(depths) < 1:
        raise ValueError("replayed depths must be a non-empty list of integers >= 1")
    ReplayDepths.depths = torch.tensor(depths, dtype=torch.long)
    ReplayDepths.generator = torch.Generator().manual_seed(seed)
    CRITERIA[NAME] = ReplayDepths
    try:
        yield NAME
    finally:
        CRITERIA.pop(NAME, None)
