"""Sampled tokens' distributions as captured launch sequences (CUDA graphs), one per sampling settings and shape.

A sampled token's distribution (``sampling.sampling_probs``: ~30 torch ops: the filters, the overflow and
NaN guards) was launched op by op for every sampled token: by generate() once a token (once a sequence and
token with a seed: each row's distribution is computed on the row alone) and by the server once a request and
token. On a GPU that is host time in every token, and with the OpenAI API's default temperature of 1 most
requests sample. Each settings' distribution is one graph over the logits' shape ([1, W] for a row alone,
[B, W] for generate()'s unseeded batch; W: the head's width). It runs the same operations on the same shape as
the eager call, so the distribution is bit for bit the eager one (and a row's is not a batch's: torch sums a
50k-token row in another order alone than beside other rows, and the draw depends on the last bits). The draw
stays outside the graph: it advances the sequence's own generator (``sampling.draw``).

generate() uses its model's ``Distributions`` (``of_model``, kept across calls: a settings' graph is captured
at its third call); a server keeps its own (its engine thread and a caller's generate() may run at once).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor

from .backends.graph import GraphedRunner
from .sampling import in_vocabulary, sampling_probs


def distribution(logits: Tensor, vocab: int, settings: tuple) -> Tensor:
    """The distribution [B, V] logits [B, W] draw from (the head's padding columns excluded), as
    ``sampling.sample`` computes it eagerly."""
    return sampling_probs(in_vocabulary(logits, vocab), *settings)


def _forgotten() -> None:
    """What a copied or unpickled ``Distributions`` becomes (``Distributions.__reduce__``)."""
    return None


class DistributionRunner(GraphedRunner):
    """``sampling_probs`` of logits of one shape and dtype (``logits``, copied in per call) with fixed settings
    (temperature, top-k, top-p, min-p, published top-p), the head's padding columns excluded."""

    def __init__(self, model, settings: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.model, self.settings = model, settings
        self.logits = torch.zeros(shape, dtype=dtype, device=model.device)
        self.calls = 0

    def run(self) -> Tensor:
        return distribution(self.logits, self.model.config.vocab_size, self.settings)


class Distributions:
    """Distributions to draw from, a ``DistributionRunner`` per settings, logits shape and dtype, at most MAX_GRAPHS
    (the least recently used dropped). A key's graph is captured at its CAPTURE_AT-th call, its calls before
    run eagerly: a request's own temperature (any float) would otherwise cost a capture (an eager call, a
    synchronize, the recording) for one request's tokens. A graph's input and output are shared: where threads
    share an instance (generate()'s, kept on the model), each holds ``lock`` from its call to its draw."""

    MAX_GRAPHS = 16  # (each graph holds its shape's temporaries: a few MB a row at a 50k vocabulary)
    CAPTURE_AT = 3

    def __init__(self, model) -> None:
        self.model, self.device = model, model.device
        self.lock = threading.Lock()  # held by a caller from a call to its draw, where threads share the model's
        self.runners: OrderedDict[tuple, DistributionRunner] = OrderedDict()
        self._dropped_captures = 0

    @classmethod
    def of_model(cls, model) -> Distributions:
        """The model's own, made at its first use and kept on it (generate()'s: graphs outlive a call); a new one
        once the model is on another device."""
        found = model.__dict__.get("_latentrt_distributions")
        if found is None or found.device != model.device:
            found = model.__dict__["_latentrt_distributions"] = cls(model)
        return found

    def __reduce__(self):
        """A copied or pickled model's own is none (``of_model`` makes it anew): graphs, their buffers and the
        lock are neither copied nor pickled."""
        return (_forgotten, ())

    @property
    def captures(self) -> int:
        """Graphs captured so far (the dropped runners' included)."""
        return self._dropped_captures + sum(r.captures for r in self.runners.values())

    def new_runner(self, settings: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> DistributionRunner:
        return DistributionRunner(self.model, settings, shape, dtype)

    def __call__(self, settings: tuple, logits: Tensor) -> Tensor:
        """The distribution [B, V] to draw from, for logits [B, W] (the head's, or penalised: in the vocabulary
        already) and ``settings`` (``sampling_probs``' arguments after the logits). Valid until the next call
        with the same settings, shape and dtype (a graph's output is overwritten by its next replay)."""
        key = (settings, tuple(logits.shape), logits.dtype)
        runner = self.runners.pop(key, None) or self.new_runner(*key)
        self.runners[key] = runner
        while len(self.runners) > self.MAX_GRAPHS:
            self._dropped_captures += self.runners.popitem(last=False)[1].captures
        runner.calls += 1
        if runner._graph is None and runner.calls < self.CAPTURE_AT:
            return distribution(logits, self.model.config.vocab_size, settings)
        runner.logits.copy_(logits)
        return runner()
