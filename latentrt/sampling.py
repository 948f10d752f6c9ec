"""Next-token selection (greedy, temperature, top-k, top-p, min-p) and the random streams of a batch.

The filters apply in the published Huginn sampler's (and HF's) order: temperature, top-k, top-p, then
min-p, which drops every token less likely than ``min_p`` x the likeliest one (after top-k/top-p).

Batch = single under randomness: with ``seed=s`` sequence i of a batch draws everything random (its
initial latent states, its samples) from its own generator seeded ``s + i``, in the order a run of that
sequence alone would, so its result equals ``generate(that prompt alone, seed=s + i)``. Finished sequences
draw nothing. Without a seed the global torch RNG is used.
"""

from __future__ import annotations

from collections.abc import Callable
from math import inf

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


def dropped(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    published_top_p: bool = False,
) -> Tensor | None:
    """[B, V] bool: the tokens top-k, top-p and min-p drop from logits [B, V] at ``temperature`` (> 0); None
    where no filter is set. Decided as the rule's owner decides it, on its own float32 numbers, ties included:
    HF's warpers (``hf_drops``; latentrt's default, vLLM's rule too), or with ``published_top_p`` and a top-p
    the published Huginn sampler (``published_drops``: its top-k and min-p too, on its probabilities). A bf16
    model's logits tie often (a 65,536-token vocabulary at top-p 0.9: most steps hold a tie at the cut), and
    the two rules break a tie at the cut differently: HF sorts ascending and keeps the later ids of a tie, the
    published sampler sorts descending and keeps the earlier."""
    nucleus = top_p is not None and top_p < 1
    if not (top_k or nucleus or min_p):
        return None
    rule = published_drops if published_top_p and nucleus else hf_drops
    return rule(logits, temperature, top_k, top_p, min_p)


def hf_drops(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, min_p: float) -> Tensor:
    """The tokens HF's ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
    ``MinPLogitsWarper`` leave at -inf, in its generate's order, computed as they compute it on the float32
    logits: top-k keeps every token tied with the k-th; top-p sorts ascending and drops a token while the
    cumulative probability up to it is at most 1 - top_p (the last, likeliest, stays); min-p drops a token less
    likely than min_p x the likeliest, from the probabilities of what is left (HF then keeps the likeliest
    token: min_p <= 1 never drops it). A token at -inf already (a padding column) counts as dropped."""
    scores = logits.float() / temperature
    if top_k:
        scores = scores.masked_fill(scores < torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None], -inf)
    if top_p is not None and top_p < 1:
        ascending, order = torch.sort(scores, descending=False)
        out = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        out[..., -1:] = False
        scores = scores.masked_fill(out.scatter(1, order, out), -inf)
    if min_p:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, -inf)
    return scores == -inf


def published_drops(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, min_p: float) -> Tensor:
    """The tokens the published Huginn sampler leaves at probability 0, computed as it computes them on its
    float32 probabilities softmax(logits / temperature): top-k zeroes those below the k-th; top-p sorts
    descending and zeroes a token where the cumulative sum up to and including it exceeds top_p (the token that
    crosses p goes; the top one stays), counted over the top-k probabilities, not renormalised; min-p zeroes those
    below min_p x the likeliest left. HF's rule keeps the crossing token and renormalises after top-k."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k:
        probs = torch.where(probs < torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[:, -1:], 0.0, probs)
    if top_p is not None and top_p < 1:
        descending, order = torch.sort(probs, descending=True, dim=-1)
        out = torch.cumsum(descending, dim=-1) > top_p
        out[:, 0] = False
        probs = torch.where(torch.zeros_like(out).scatter(-1, order, out), 0.0, probs)
    if min_p:
        probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True)[0], 0.0, probs)
    return probs == 0


def sampling_probs(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float = 0.0,
    published_top_p: bool = False,
) -> Tensor:
    """The distribution [B, V] a sample draws from (temperature > 0), computed as the published Huginn sampler
    computes it: softmax of logits / temperature in float32, the dropped tokens (``dropped``) zeroed,
    renormalised. ``torch.multinomial``'s draw depends on these bits, so a generator in the published run's
    state draws the published token. A row where float32 overflows (a tiny temperature, where the published
    sampler fails on NaNs) gets its limit, the float64 softmax from the maximum down: the argmax (no filter
    changes it: every other token's float64 probability is 0 there). No host sync: the choice is made on the
    device."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    drop = dropped(logits, temperature, top_k, top_p, min_p, published_top_p)
    if drop is not None:
        probs = torch.where(drop, 0.0, probs)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-10)
    overflowed = nonfinite_along(probs, (-1,), keepdim=True)  # float32 overflowed
    limit = logits.double()
    limit = torch.softmax((limit - limit.max(-1, keepdim=True).values) / temperature, dim=-1)
    probs = torch.where(overflowed, limit.to(probs.dtype), probs)
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
