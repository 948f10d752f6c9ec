"""Log-probabilities of chosen tokens under the model's distribution: log-softmax of the logits over the
vocabulary, before the penalties, constraints, temperature and top-k/p (as OpenAI and vLLM report them), with
the k most likely tokens'. generate()'s ``logprobs=k`` and the server's ``logprobs`` compute them here, on the
logits' device, and read them back with the tokens' other values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # most likely tokens reported per position at most (vLLM's default limit)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's distribution, the (id, log-prob) of the most likely tokens,
    best first, and (the server's) where its text starts in the request's text."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it to score it)
    top: list[tuple[int, float]]
    offset: int | None = None


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, k: int, vocab: int) -> torch.Tensor:
    """[n, 1 + 2k] fp32 on the logits' device: per row, ``tokens``' log-prob under the model's distribution
    (log-softmax of ``logits[:, :vocab]``: no temperature or top-k/p), then the k best log-probs and their
    ids (ids < 2^24: exact in fp32); k is clipped to the vocabulary. ``read_logprob_row`` reads a row back. A
    token past the vocabulary (drawn from non-finite logits, whose flag fails its sequence when read) reads the
    last id's value rather than past the row."""
    lp = torch.log_softmax(logits[:, :vocab].float(), -1)
    cols = [lp.gather(1, tokens[:, None].clamp(0, vocab - 1))]
    best = lp.topk(min(k, vocab), -1)
    return torch.cat(cols + [best.values, best.indices.float()], 1)


def read_logprob_row(row: list[float], keep: int) -> tuple[float, list[tuple[int, float]]]:
    """A ``logprob_rows`` row on the host: (the token's log-prob, [(id, log-prob)] of its ``keep`` best)."""
    k = (len(row) - 1) // 2
    return row[0], [(int(i), v) for v, i in zip(row[1 : 1 + k], row[1 + k :])][:keep]
