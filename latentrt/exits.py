"""Exit criteria for adaptive recurrence, as batched tensor ops returning device masks.

A criterion is a small class: its default threshold, whether it needs the logits of each iteration's
state, the per-sequence state it keeps across the iterations of one token (``start``) and the mask of
sequences whose criterion is met after an iteration (``update``). For a prefill (many positions at once)
latent-diff and cosine average over the prompt's real positions; the distribution-based criteria use its
last position. ``CRITERIA`` is the registry (names the API, the CLI and the backends accept): a new
criterion is a class plus one line there. The formulas live in latentrt.kernels.reference; a backend
may pass fused versions (``exit_ops``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import InputError, check_finite, is_choice
from .kernels.reference import (
    cosine_reference,
    entropy_reference,
    kl_reference,
    latent_diff_reference,
    minp_log_probs_reference,
)


class ReferenceExitOps:
    """The criteria's formulas in PyTorch (latentrt.kernels.reference); a backend may pass fused versions."""

    @staticmethod
    def latent_diff(prev: Tensor, new: Tensor, valid: Tensor, cosine: bool) -> Tensor:
        return (cosine_reference if cosine else latent_diff_reference)(prev, new, valid)

    @staticmethod
    def kl(logits: Tensor, prev_logp: Tensor) -> tuple[Tensor, Tensor]:
        return kl_reference(logits, prev_logp)


@dataclass(frozen=True)
class ExitCriterion:
    """Base class: a named criterion with its threshold (see module docstring)."""

    name: str
    threshold: float

    DEFAULT: ClassVar[float] = 0.0
    needs_logits: ClassVar[bool] = False
    never_exits: ClassVar[bool] = False
    on_states: ClassVar[bool] = False  # computed on the states, in their dtype (else on fp32 logits)

    @classmethod
    def check_threshold(cls, threshold: float) -> None:
        """Criterion-specific constraints on a (finite, >= 0) threshold."""

    def kernel_threshold(self, state_dtype: torch.dtype) -> float:
        """The threshold for a kernel comparing in fp32: rounded to the dtype the criterion compares in (a
        bf16 value compares with a Python float in bf16), so ``value < threshold`` decides as here."""
        dtype = state_dtype if self.on_states else torch.float32
        return float(torch.full((), self.threshold, dtype=dtype, device="cpu"))

    def start(self, batch: int, vocab: int, device: torch.device) -> Any:
        """The per-sequence state before a token's first iteration."""
        return None

    def update(self, state: Any, prev: Tensor, new: Tensor, logits: Tensor | None, valid: Tensor, ops):
        """(exit mask [B], new state) after one iteration. prev/new states [B, n, d]; ``valid`` [B, n]."""
        raise NotImplementedError


class NoExit(ExitCriterion):
    never_exits = True

    def update(self, state, prev, new, logits, valid, ops):
        return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device), state


class LatentDiff(ExitCriterion):
    """||s_t - s_{t-1}|| / ||s_t|| < threshold (averaged over the unit's real positions), in the states' dtype
    as published (a bf16 model's value and threshold are bf16)."""

    DEFAULT = 0.03
    cosine: ClassVar[bool] = False
    on_states = True

    def update(self, state, prev, new, logits, valid, ops):
        return ops.latent_diff(prev, new, valid, self.cosine) < self.threshold, state


class Cosine(LatentDiff):
    """1 - cos(s_t, s_{t-1}) < threshold (the cosine averaged over the unit's real positions)."""

    DEFAULT = 1e-3
    cosine = True


class KL(ExitCriterion):
    """KL(p_prev || p_t) < threshold; the first check compares to the uniform distribution."""

    DEFAULT = 1e-3
    needs_logits = True

    def start(self, batch, vocab, device):
        return torch.full((batch, vocab), -math.log(vocab), dtype=torch.float32, device=device)  # uniform log-probs

    def update(self, state, prev, new, logits, valid, ops):
        kl, logp = ops.kl(logits.float(), state)
        return kl < self.threshold, logp


class MinPKL(KL):
    """KL between successive min-p filtered distributions (probabilities under 0.1 x the largest set to 1/V,
    renormalised) < threshold; the first check compares to the uniform distribution."""

    DEFAULT = 1e-5

    def update(self, state, prev, new, logits, valid, ops):
        logp = minp_log_probs_reference(logits)
        return (state.exp() * (state - logp)).sum(-1) < self.threshold, logp


class EntropyDiff(ExitCriterion):
    """|H(p_t) - H(p_{t-1})| < threshold; the entropy before the first iteration counts as 100."""

    DEFAULT = 1e-3
    needs_logits = True

    def start(self, batch, vocab, device):
        return torch.full((batch,), 100.0, dtype=torch.float32, device=device)

    def update(self, state, prev, new, logits, valid, ops):
        ent = entropy_reference(logits.float())
        return (ent - state).abs() < self.threshold, ent


class ArgmaxStability(ExitCriterion):
    """The argmax token unchanged for ``threshold`` consecutive iterations."""

    DEFAULT = 5
    needs_logits = True

    @classmethod
    def check_threshold(cls, threshold):
        if int(threshold) != threshold:
            raise InputError(f"argmax-stability's threshold counts steps; got non-integer {threshold}")

    def start(self, batch, vocab, device):
        return (
            torch.full((batch,), -1, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    def update(self, state, prev, new, logits, valid, ops):
        last, stable = state
        arg = logits.float().argmax(-1)
        stable = torch.where(arg == last, stable + 1, torch.zeros_like(stable))
        return stable >= self.threshold, (arg, stable)


CRITERIA: dict[str, type[ExitCriterion]] = {
    "latent-diff": LatentDiff,
    "kl": KL,
    "minp-kl": MinPKL,
    "entropy-diff": EntropyDiff,
    "argmax-stability": ArgmaxStability,
    "cosine": Cosine,
    "none": NoExit,
}
DEFAULT_THRESHOLDS = {name: cls.DEFAULT for name, cls in CRITERIA.items()}


def make_criterion(name: str, threshold: float | None = None) -> ExitCriterion:
    """The registered criterion ``name`` with ``threshold`` (None: its default), validated."""
    if not is_choice(name, CRITERIA):
        raise InputError(f"unknown exit criterion {name!r}; choose one of {sorted(CRITERIA)}")
    cls = CRITERIA[name]
    if threshold is None:
        threshold = cls.DEFAULT
    check_finite("exit_threshold", threshold)
    if threshold < 0:
        raise InputError(f"exit_threshold must be >= 0, got {threshold}")
    cls.check_threshold(threshold)
    return cls(name, float(threshold))


class ExitTracker:
    """Per-token criterion state for a batch of B sequences over V-way next-token distributions."""

    def __init__(self, criterion: ExitCriterion, batch: int, vocab: int, device: torch.device, ops=None) -> None:
        self.criterion = criterion
        self.ops = ops or ReferenceExitOps
        self.state = criterion.start(batch, vocab, device)

    def update(self, prev_state: Tensor, state: Tensor, last_logits: Tensor | None, valid: Tensor) -> Tensor:
        """Exit mask [B] after one iteration. States [B, n, d] (or [B, d]: one position); ``valid`` [B, n]
        marks the unit's real positions."""
        if state.dim() == 2:
            prev_state, state = prev_state[:, None], state[:, None]
        exits, self.state = self.criterion.update(self.state, prev_state, state, last_logits, valid, self.ops)
        return exits
