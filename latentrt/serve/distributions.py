"""A server's sampling distributions as captured launch sequences (CUDA graphs), one per sampling settings.

A sampled token's distribution (``sampling.sampling_probs``: ~30 torch ops for one row, float64 filters, the
overflow and NaN guards) was launched op by op for every sampled token of every request: on a GPU that is host
time in every step where units end, and with the OpenAI API's default temperature of 1 most requests sample.
Each settings' distribution is one graph over one row [1, W] of the head's logits (W: the head's width). It
runs the same operations on the same shape as generate() runs for the request alone, so the distribution is
bit for bit generate()'s (not a batch of requests alike: torch sums a 50k-token row in another order alone
than beside other rows, and the draw depends on the last bits). The draw stays outside the graph: it advances
the request's own generator (``Generation.draw_from``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..backends.graph import GraphedRunner
from ..sampling import in_vocabulary, sampling_probs


def distribution(logits: Tensor, vocab: int, settings: tuple) -> Tensor:
    """The distribution [1, V] a row of the head's logits [1, W] draws from, as generate() computes it."""
    return sampling_probs(in_vocabulary(logits, vocab), *settings)


class DistributionRunner(GraphedRunner):
    """``sampling_probs`` of one row of logits (``logits``, [1, W] fp32, copied in per call) with fixed settings
    (temperature, top-k, top-p, min-p, published top-p), the head's padding columns excluded."""

    def __init__(self, model, settings: tuple, width: int) -> None:
        self.model, self.settings = model, settings
        self.logits = torch.zeros(1, width, dtype=torch.float32, device=model.device)
        self.calls = 0

    def run(self) -> Tensor:
        return distribution(self.logits, self.model.config.vocab_size, self.settings)


class Distributions:
    """The distributions of a server's sampled tokens, a ``DistributionRunner`` per settings and width, at most
    MAX_GRAPHS (the least recently used dropped). A settings' graph is captured at its CAPTURE_AT-th call, its
    calls before run eagerly: a request's own temperature (any float) would otherwise cost a capture (an eager
    call, a synchronize, the recording) for one request's tokens."""

    MAX_GRAPHS = 16  # (each graph holds one row's temporaries: a few MB at a 50k vocabulary)
    CAPTURE_AT = 3

    def __init__(self, model) -> None:
        self.model = model
        self.runners: OrderedDict[tuple, DistributionRunner] = OrderedDict()
        self._dropped_captures = 0

    @property
    def captures(self) -> int:
        """Graphs captured so far (the dropped runners' included)."""
        return self._dropped_captures + sum(r.captures for r in self.runners.values())

    def new_runner(self, settings: tuple, width: int) -> DistributionRunner:
        return DistributionRunner(self.model, settings, width)

    def __call__(self, settings: tuple, logits: Tensor) -> Tensor:
        """The distribution [1, V] to draw from, for a row of logits [1, W] (the head's, or penalised: in the
        vocabulary already) and ``settings`` (``Generation.sampling_settings``). Valid until the next call
        with the same settings and width (a graph's output is overwritten by its next replay)."""
        key = (settings, logits.shape[-1])
        runner = self.runners.pop(key, None) or self.new_runner(settings, logits.shape[-1])
        self.runners[key] = runner
        while len(self.runners) > self.MAX_GRAPHS:
            self._dropped_captures += self.runners.popitem(last=False)[1].captures
        runner.calls += 1
        if runner._graph is None and runner.calls < self.CAPTURE_AT:
            return distribution(logits, self.model.config.vocab_size, settings)
        runner.logits.copy_(logits)
        return runner()
