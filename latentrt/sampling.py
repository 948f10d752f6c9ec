"""Next-token selection (greedy, temperature, top-k, top-p, min-p) and the random streams of a batch.

The filters apply in the published Huginn sampler's (and HF's) order: temperature, top-k, top-p, then
min-p, which drops every token less likely than ``min_p`` x the likeliest one (after top-k/top-p).

Batch = single under randomness: with ``seed=s`` sequence i of a batch draws everything random (its
initial latent states, its samples) from its own generator seeded ``s + i``, in the order a run of that
sequence alone would, so its result equals ``generate(that prompt alone, seed=s + i)``. Finished sequences
draw nothing. Without a seed the global torch RNG is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import InputError, check_finite, check_int
from .kernels.reference import nonfinite_along


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float = 0.0) -> None:
    check_finite("temperature", temperature, 0)
    if top_k is not None:  # 0: no top-k (HF's and the published sampler's ``if top_k:``)
        check_int("top_k", top_k, 0)
    if top_p is not None and (isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1)):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(min_p, bool) or not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise InputError(f"min_p must be in [0, 1], got {min_p!r}")


MAX_SEED = 2**63 - 1


class SequenceRNG:
    """One torch.Generator per sequence, seeded ``seed + index`` (see module docstring)."""

    def __init__(self, seed: int, batch: int, device: torch.device) -> None:
        check_int("seed", seed, 0, MAX_SEED - batch + 1, high_label="2**63 - batch")
        self.generators = [torch.Generator(device).manual_seed(seed + i) for i in range(batch)]

    def __getitem__(self, row: int) -> torch.Generator:
        return self.generators[row]


def in_vocabulary(logits: Tensor, vocab: int) -> Tensor:
    """logits [B, W] with the head's padding columns (ids >= ``vocab``) at -inf: never sampled."""
    if logits.shape[-1] <= vocab:
        return logits
    return torch.cat([logits[:, :vocab], torch.full_like(logits[:, vocab:], float("-inf"))], -1)


def filtered_logits(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    published_top_p: bool = False,
) -> Tensor:
    """logits [B,V] -> float64 logits / temperature with the tokens top-k, top-p and min-p drop at -inf (the
    distribution ``sample`` draws from; temperature > 0). ``published_top_p``: top-p by the published Huginn
    sampler's rule (``_published_top_p_drops``) instead of HF's."""
    # in float64 from the maximum down, so a tiny temperature (1e-45) gives its limit, the argmax, not NaNs
    raw, logits = logits, logits.double()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1 and published_top_p:
        logits = logits.masked_fill(_published_top_p_drops(raw, temperature, top_k, top_p), float("-inf"))
    elif top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p:  # p < min_p * p_max, i.e. logit < max + log(min_p) (the maximum is 0 here; the top token stays)
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    return logits


def _published_top_p_drops(logits: Tensor, temperature: float, top_k: int | None, top_p: float) -> Tensor:
    """The tokens the published Huginn sampler's top-p drops, computed as it computes them: on its float32
    probabilities softmax(logits / temperature) with the top-k ones kept (not renormalised), sorted, a token
    dropped where the cumulative sum up to and including it exceeds top_p (the token that crosses p goes; the
    top one stays). HF's rule (the default) keeps the crossing token and renormalises after top-k."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k:
        kth = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    drop_sorted = torch.cumsum(sorted_probs, dim=-1) > top_p
    drop_sorted[:, 0] = False
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def sampling_probs(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    published_top_p: bool = False,
) -> Tensor:
    """The distribution [B, V] a sample draws from (temperature > 0), computed as the published Huginn sampler
    computes it: softmax of logits / temperature in float32, the dropped tokens (``filtered_logits``'s rule)
    zeroed, renormalised. ``torch.multinomial``'s draw depends on these bits, so a generator in the published
    run's state draws the published token. A row where float32 overflows (a tiny temperature, where the
    published sampler fails on NaNs) gets the float64 distribution of ``filtered_logits``: its limit, the
    argmax. No host sync: the choice is made on the device."""
    filtered = filtered_logits(logits, temperature, top_k, top_p, min_p, published_top_p)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # without a filter this zeroes only tokens whose probability is 0 already (logit -inf) or rows that overflow
    # (scalar operands and masks of the good rows: each op is a launch, and this runs per sampled token)
    probs = torch.where(filtered > float("-inf"), probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-10)
    overflowed = nonfinite_along(probs, (-1,), keepdim=True)  # float32 overflowed
    probs = torch.where(overflowed, torch.softmax(filtered, dim=-1).to(probs.dtype), probs)
    # NaN logits (a non-finite state, which the caller reports after this token's one host read, discarding
    # the token): a uniform row, so the draw does not fail first with torch.multinomial's RuntimeError (a
    # device-side assert on CUDA) instead of the NonFiniteStateError naming the sequence. (Each probability is
    # at most 1 where finite, so the row's sum is finite exactly where every one is.)
    total = probs.sum(-1, keepdim=True)
    unsound = (total - total).isnan() | (total <= 0)
    return torch.where(unsound, 1.0 / probs.shape[-1], probs)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: SequenceRNG | None = None,
    rows: list[bool] | None = None,
    min_p: float = 0.0,
    published_top_p: bool = False,
    distributions: Callable[[tuple, Tensor], Tensor] | None = None,
) -> Tensor:
    """logits [B,V] -> token ids [B]. Greedy when temperature is 0. With ``rng`` each row in ``rows`` (the
    running sequences) samples from its own generator; the others get their argmax (ignored by callers).
    ``distributions(settings, logits)``: the distribution ``sampling_probs(logits, *settings)`` computes, by
    other launches (generate() passes its model's captured graphs, latentrt/distributions.py)."""
    if temperature == 0:
        return logits.argmax(-1)
    settings = (temperature, top_k, top_p, min_p, published_top_p)
    probs = distributions or (lambda settings, logits: sampling_probs(logits, *settings))
    if rng is None:
        return draw(probs(settings, logits))
    if logits.shape[0] == 1 and (rows is None or rows[0]):  # (one sequence, a server's row: no argmax to fill in)
        return draw(probs(settings, logits), rng[0])
    # each row's distribution on the row alone: torch sums a long row in another order alone than beside other
    # rows (its threads or blocks split one row, not several), and the draw depends on the last bits
    out = logits.argmax(-1)
    for b, running in enumerate(rows if rows is not None else [True] * logits.shape[0]):
        if running:
            out[b] = draw(probs(settings, logits[b : b + 1]), rng[b])[0]
    return out


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs`` [B, V], bit-identical to ``torch.multinomial(probs, 1, generator=...)[:, 0]``
    (the published samplers' call) without its host reads: torch draws one sample as argmax(p / q) with q
    ~ Exp(1) from the generator, after checking its input with two ``.item()`` reads (two host syncs a call on
    CUDA, which a serving step cannot afford). ``sampling_probs`` makes every row valid (finite, >= 0, a
    positive sum), so the check has nothing to find; the draw, the generator's use and the ties are torch's."""
    return torch.div(probs, exponentials(probs, generator)).argmax(-1)


def exponentials(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The Exp(1) numbers ``draw`` divides ``probs`` by, from ``generator``, one per entry (a seeded sequence
    draws the same ones at the same token in any run: tools/soak.py reads them to tell a tie within rounding)."""
    return torch.empty_like(probs).exponential_(1, generator=generator)
