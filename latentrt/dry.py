"""The published Huginn sampler's DRY penalty (``dry_multiplier``, ``dry_base``, ``dry_allowed_length``):
tokens that would continue a repeated pattern of the sequence get a penalty growing with the pattern's length.

The rule is the published code's (``_apply_repetition_penalty`` of raven_modeling_minimal.py), which differs
from the DRY of text-generation-webui / llama.cpp in how it matches. Over the sequence's last 128 tokens
``c`` (its prompt and its new tokens; L of them), for every start s with L - 128 <= s <= L - 2:

- m(s) is how many tokens, at most 32 and while s + m < L, run forward from s as the sequence runs backward
  from its end: c[s + j] == c[L - 1 - j] for j < m (the published comparison, kept as written);
- if m(s) > 0 and s + m(s) < L, the token c[s + m(s)] is a continuation of length m(s) + 1;

each token's longest continuation n, where n >= ``dry_allowed_length``, has ``dry_multiplier`` x
``dry_base`` ** (n - ``dry_allowed_length``) subtracted from its (fp32) logit. The published sampler applies
it in place of ``repetition_penalty`` and only when that is not 1; latentrt applies it whenever
``dry_multiplier`` > 0 and refuses the pair (one or the other), so neither is silently ignored.

The published code loops over every vocabulary entry, start and match length in Python; here each row's
last 128 tokens are a [128] window on the logits' device and the candidates a [128, 32] comparison, with
no read-back (a step still reads the device once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError, check_finite, check_int

WINDOW = 128  # the published search: starts among the last 128 tokens
MAX_MATCH = 32  # the published match length limit
NAMES = ("dry_multiplier", "dry_base", "dry_allowed_length")


def check_dry(multiplier, base, allowed_length, repetition_penalty) -> None:
    """The DRY options' types and ranges; DRY and ``repetition_penalty`` together are refused."""
    for name, value in (("dry_multiplier", multiplier), ("dry_base", base)):
        check_finite(name, value)
    if multiplier < 0:
        raise InputError(f"dry_multiplier must be >= 0 (0: no DRY penalty), got {multiplier!r}")
    if base <= 0:
        raise InputError(f"dry_base must be > 0, got {base!r}")
    check_int("dry_allowed_length", allowed_length, 0)
    if multiplier > 0 and repetition_penalty != 1:
        raise InputError(
            "dry_multiplier and repetition_penalty are exclusive: the published sampler applies DRY in place of "
            f"the repetition penalty (got repetition_penalty={repetition_penalty!r}); set one of them"
        )


class DryPenalty:
    """The DRY penalty of one generate() call (or served request): each sequence's last ``WINDOW`` tokens,
    right-aligned in ``window`` [B, WINDOW] (the first ``WINDOW - length`` entries are not tokens)."""

    def __init__(self, multiplier: float, base: float, allowed_length: int, ids: Tensor, mask: Tensor) -> None:
        """``ids`` [B, S], ``mask``: the prompts' real positions (padding is not part of a sequence)."""
        # (a continuation is at most MAX_MATCH + 1 long: a larger allowed length penalises nothing, as this bound
        # does, and an int past 64 bits would not enter the tensor arithmetic below)
        self.multiplier, self.base = float(multiplier), float(base)
        self.allowed = min(int(allowed_length), MAX_MATCH + 2)
        B, device = ids.shape[0], ids.device
        real = mask.bool()
        # each row's real tokens moved to the right end (a stable sort puts padding first, order kept)
        order = torch.sort(real.int(), dim=1, stable=True).indices
        packed = torch.where(real, ids, -1).gather(1, order)
        if packed.shape[1] < WINDOW:
            packed = torch.cat([packed.new_full((B, WINDOW - packed.shape[1]), -1), packed], 1)
        self.window = packed[:, -WINDOW:].clone()
        self.length = real.sum(1).clamp(max=WINDOW)  # [B] how many window entries are tokens
        self._starts = torch.arange(WINDOW, device=device)
        self._offsets = torch.arange(MAX_MATCH, device=device)

    def apply(self, x: Tensor) -> Tensor:
        """fp32 logits [B, V] -> with each row's DRY penalty subtracted."""
        W, c = WINDOW, self.window
        at = self._starts[:, None] + self._offsets  # [W, K]: s + j
        inside = at < W  # s + j < L
        forward = c[:, at.clamp(max=W - 1)]  # [B, W, K]: c[s + j]
        backward = c[:, W - 1 - self._offsets]  # [B, K]: c[L - 1 - j]
        equal = (forward == backward[:, None, :]) & inside
        m = equal.int().cumprod(-1).sum(-1)  # [B, W]: the run from each start
        first = W - self.length  # [B]: the first start that is a token
        starts = (self._starts >= first[:, None]) & (self._starts <= W - 2)
        nxt = c.gather(1, (self._starts + m).clamp(max=W - 1))  # [B, W]: c[s + m]
        valid = starts & (m > 0) & (self._starts + m < W) & (nxt < x.shape[1])
        longest = torch.zeros(x.shape, dtype=torch.long, device=x.device)
        longest.scatter_reduce_(1, torch.where(valid, nxt, 0), torch.where(valid, m + 1, 0), "amax")
        # the penalty in double, rounded once to fp32 (the published code subtracts a Python float)
        exponent = (longest - self.allowed).double()
        penalty = torch.where(longest >= self.allowed, self.multiplier * self.base**exponent, 0.0)
        return x - penalty.float()

    def record(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """The sampled ``tokens`` [B] join their sequences (``rows``: the running ones; None: all)."""
        shifted = torch.cat([self.window[:, 1:], tokens[:, None].to(self.window.dtype)], 1)
        if rows is None:
            self.window, self.length = shifted, (self.length + 1).clamp(max=WINDOW)
        else:
            self.window = torch.where(rows[:, None], shifted, self.window)
            self.length = (self.length + rows.long()).clamp(max=WINDOW)
