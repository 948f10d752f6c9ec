"""Exit criteria for adaptive recurrence, as batched tensor ops returning device masks.

Each criterion keeps a small per-sequence state across the iterations of one token and, after each
iteration, returns a bool mask of sequences whose criterion is met. For a prefill (many positions at
once) latent-diff and cosine average over the prompt's real positions; the distribution-based
criteria use its last position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

DEFAULT_THRESHOLDS = {
    "latent-diff": 0.03,
    "kl": 5e-4,
    "entropy-diff": 1e-3,
    "argmax-stability": 5,
    "cosine": 1e-3,
    "none": 0.0,
}
NEEDS_LOGITS = {"kl", "entropy-diff", "argmax-stability"}


@dataclass(frozen=True)
class ExitCriterion:
    name: str
    threshold: float

    @property
    def needs_logits(self) -> bool:
        return self.name in NEEDS_LOGITS

    @property
    def never_exits(self) -> bool:
        return self.name == "none"


def make_criterion(name: str, threshold: float | None) -> ExitCriterion:
    if name not in DEFAULT_THRESHOLDS:
        raise InputError(f"unknown exit criterion {name!r}; choose one of {sorted(DEFAULT_THRESHOLDS)}")
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[name]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise InputError(f"exit_threshold must be a finite number, got {threshold!r}")
    if threshold < 0:
        raise InputError(f"exit_threshold must be >= 0, got {threshold}")
    if name == "argmax-stability" and int(threshold) != threshold:
        raise InputError(f"argmax-stability's threshold counts steps; got non-integer {threshold}")
    return ExitCriterion(name, float(threshold))


class ReferenceExitOps:
    """The criteria's formulas in PyTorch (kernels/exits.py); a backend may pass fused versions."""

    @staticmethod
    def latent_diff(prev: Tensor, new: Tensor, valid: Tensor, cosine: bool) -> Tensor:
        from kernels.exits import cosine_reference, latent_diff_reference

        return (cosine_reference if cosine else latent_diff_reference)(prev, new, valid)

    @staticmethod
    def kl(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
        from kernels.exits import kl_reference

        return kl_reference(logits, prev_logp)


class ExitTracker:
    """Per-token criterion state for a batch of B sequences over V-way next-token distributions."""

    def __init__(self, criterion: ExitCriterion, batch: int, vocab: int, device: torch.device, ops=None) -> None:
        self.criterion = criterion
        self.ops = ops or ReferenceExitOps
        name = criterion.name
        if name == "kl":
            self.prev = torch.full((batch, vocab), -math.log(vocab), device=device)  # uniform log-probs
        elif name == "entropy-diff":
            self.prev = torch.full((batch,), 100.0, device=device)
        elif name == "argmax-stability":
            self.prev = torch.full((batch,), -1, dtype=torch.long, device=device)
            self.stable = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, prev_state: Tensor, state: Tensor, last_logits: Tensor | None, valid: Tensor) -> Tensor:
        """Exit mask [B] after one iteration. ``valid`` [B,n] marks the chunk's real positions."""
        name, thr = self.criterion.name, self.criterion.threshold
        if name == "none":
            return torch.zeros(state.shape[0], dtype=torch.bool, device=state.device)
        if name in ("latent-diff", "cosine"):
            return self.ops.latent_diff(prev_state, state, valid, name == "cosine") < thr
        logits = last_logits.float()
        if name == "kl":
            kl, self.prev = self.ops.kl(logits, self.prev)  # KL(prev || cur)
            return kl < thr
        if name == "entropy-diff":
            probs = F.softmax(logits, dim=-1)
            ent = -(probs * torch.log(probs + 1e-10)).sum(-1)
            diff = (ent - self.prev).abs()
            self.prev = ent
            return diff < thr
        # argmax-stability
        arg = logits.argmax(-1)
        self.stable = torch.where(arg == self.prev, self.stable + 1, torch.zeros_like(self.stable))
        self.prev = arg
        return self.stable >= thr
