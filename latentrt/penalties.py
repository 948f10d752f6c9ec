"""Logit penalties and biases that depend on what a sequence holds: ``repetition_penalty`` (the published
Huginn sampler's and HF's), ``presence_penalty`` and ``frequency_penalty`` (OpenAI's and vLLM's), and
``logit_bias`` (OpenAI's), applied to the next-token logits before temperature and the filters
(latentrt/sampling.py), in vLLM's order: the bias, then the penalties.

- ``repetition_penalty`` r: every token already in the sequence (its prompt and its new tokens) has its
  logit divided by r where positive and multiplied by r where negative (r > 1 discourages repeats).
- ``presence_penalty`` a, ``frequency_penalty`` f: a token the sequence generated c > 0 times has
  f * c + a subtracted from its logit (the prompt does not count), in [-2, 2] as OpenAI's.
- ``logit_bias``: {token id: bias in [-100, 100]} added to those tokens' logits.
- ``dry_multiplier`` (with ``dry_base``, ``dry_allowed_length``): the published sampler's DRY penalty on
  tokens that continue a repeated pattern (latentrt/dry.py), where the repetition penalty would apply.

The state lives on the logits' device ([B, V] counts and a seen mask), updated from the sampled tokens
without reading them back, so a step still reads the device once. Log-probs reported by the server are the
model's, before these (as OpenAI and vLLM report them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dry import NAMES as DRY_NAMES
from .dry import DryPenalty
from .errors import InputError, check_finite

MAX_BIAS = 100.0
# The published sampler takes any r > 0, but in float32 a seen token's logit L becomes L / r or L * r: inside
# this range |L| < 3e8 (any model's) stays finite; outside it a sampled step met inf / NaN probabilities
# (torch.multinomial's RuntimeError, a device-side assert on CUDA) where the published code fails too.
REPETITION_RANGE = (1e-30, 1e30)
NAMES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", *DRY_NAMES)


def _number(name: str, value, low: float, high: float) -> float:
    check_finite(name, value)
    if not low <= value <= high:
        raise InputError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_penalties(repetition: float, presence: float, frequency: float, logit_bias) -> None:
    """The options' types and ranges (the bias's token ids are checked against the vocabulary by
    ``check_bias_vocabulary``, which generate() calls with the options, before the prompt)."""
    low, high = REPETITION_RANGE
    if not low <= _number("repetition_penalty", repetition, -math.inf, math.inf) <= high:
        raise InputError(
            f"repetition_penalty must be in [{low:g}, {high:g}] (1: none; beyond, the float32 logits it divides "
            f"or multiplies overflow and sampling fails), got {repetition!r}"
        )
    _number("presence_penalty", presence, -2.0, 2.0)
    _number("frequency_penalty", frequency, -2.0, 2.0)
    if logit_bias is None:
        return
    if not isinstance(logit_bias, dict):
        raise InputError(f"logit_bias must be a dict {{token id: bias}}, got {logit_bias!r}")
    for token, bias in logit_bias.items():
        if isinstance(token, bool) or not isinstance(token, int):
            raise InputError(f"logit_bias keys must be token ids (integers), got {token!r}")
        _number(f"logit_bias[{token}]", bias, -MAX_BIAS, MAX_BIAS)


def check_bias_vocabulary(logit_bias: dict | None, vocab: int) -> None:
    """InputError when ``logit_bias`` (checked by ``check_penalties``) names a token id outside the vocabulary."""
    bad = sorted(t for t in logit_bias or () if not 0 <= t < vocab)
    if bad:
        raise InputError(f"logit_bias names token ids {bad[:5]} outside the vocabulary [0, {vocab})")


def active(options) -> bool:
    """Whether ``options`` set any penalty or bias."""
    return bool(
        options.repetition_penalty != 1
        or options.presence_penalty
        or options.frequency_penalty
        or options.logit_bias
        or options.dry_multiplier
    )


class LogitPenalties:
    """The penalties and bias of one generate() call (or one served request), with each sequence's state."""

    def __init__(self, options, batch_size: int, vocab: int, device: torch.device) -> None:
        self.repetition = float(options.repetition_penalty)
        self.presence, self.frequency = float(options.presence_penalty), float(options.frequency_penalty)
        self.vocab = vocab
        self.bias = None
        if options.logit_bias:  # its ids checked by check_bias_vocabulary (generate(), before the prompt)
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids = torch.tensor(list(options.logit_bias), device=device)
            self.bias[ids] = torch.tensor(
                [float(b) for b in options.logit_bias.values()], dtype=torch.float32, device=device
            )
        self.seen = torch.zeros(batch_size, vocab, dtype=torch.bool, device=device) if self.repetition != 1 else None
        counted = self.presence != 0 or self.frequency != 0
        self.counts = torch.zeros(batch_size, vocab, dtype=torch.float32, device=device) if counted else None
        self.dry: DryPenalty | None = None

    @classmethod
    def build(cls, options, ids: Tensor, mask: Tensor, vocab: int) -> LogitPenalties | None:
        """For a call's (validated) options and its prompts ``ids`` [B, S] (``mask``: real positions); None when
        none is set."""
        if not active(options):
            return None
        pen = cls(options, ids.shape[0], vocab, ids.device)
        if pen.seen is not None:  # the prompt's tokens (padding and ids past the vocabulary are not tokens),
            # counted, not written: a padding position sharing an index with a real token adds 0, on the device
            real = mask.bool() & (ids >= 0) & (ids < vocab)
            held = torch.zeros(pen.seen.shape, dtype=torch.int32, device=ids.device)
            pen.seen = held.scatter_add_(1, torch.where(real, ids, 0), real.int()) > 0
        if options.dry_multiplier:
            o = options
            pen.dry = DryPenalty(o.dry_multiplier, o.dry_base, o.dry_allowed_length, ids, mask)
        return pen

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, >= vocab] -> fp32 logits with the bias and penalties applied to the vocabulary's columns."""
        x = logits[:, : self.vocab].float()
        if self.bias is not None:
            x = x + self.bias
        if self.seen is not None:
            x = torch.where(self.seen, torch.where(x < 0, x * self.repetition, x / self.repetition), x)
        if self.dry is not None:
            x = self.dry.apply(x)
        if self.counts is not None:
            x = x - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        return x if logits.shape[-1] == self.vocab else torch.cat([x, logits[:, self.vocab :].float()], -1)

    def record(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """The sampled ``tokens`` [B] join their sequences (``rows``: the running ones; None: all)."""
        add = (
            torch.ones(tokens.shape[0], 1, dtype=torch.float32, device=tokens.device)
            if rows is None
            else rows.float()[:, None]
        )
        at = tokens.clamp(0, self.vocab - 1)[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, at, self.seen.gather(1, at) | add.bool())
        if self.counts is not None:
            self.counts.scatter_add_(1, at, add)
        if self.dry is not None:
            self.dry.record(tokens, rows)
