"""The serving contract: a family's computation for many requests at once, a scheduler step at a time.

generate() runs one batch from start to end (latentrt/engine.py with the family's ``Decoder``). A server
(latentrt/serve) holds requests that come and go; the scheduler owns them (options, sampling, stopping,
events) and a family's ``ServingProgram`` owns their computation: each resident request is a row of a
``KVPool`` (latentrt/kv_pool.py) and runs *units* (its prompt, then one unit per generated token; a
recurrent unit is prelude -> latent loop -> head, a Coconut prompt is a prefix, k thought passes and a
suffix). A program advances every resident row by one piece of work per ``launch``: a core iteration of a
recurrent loop at that row's own depth, or one Coconut pass. A request's unit ends when its loop exits or
its last pass runs; the scheduler then samples from its logits and hands the token back with ``start``.

Each request's options live in its own decoder (the family's ``Decoder``, built by the engine's
validation for that request alone), so a program reads exactly the rules generate() would apply to it, and
its tokens and steps equal those of ``generate()`` for that request alone (greedy, or seeded: every random
draw comes from the request's own generator, in the same order).

A family serves when its ``Family`` names a program class (families.py): its own file plus that field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kv_pool import KVPool


@dataclass
class Ended:
    """A request whose unit ended this step: the logits of its next token come from ``ServingProgram.logits``."""

    request: object
    iterations: int  # latent iterations the unit ran (0 where the family has none)
    ready: bool = True  # its logits exist already; False: ``logits`` runs the head for it (one pass for all)
    launches: int | None = None  # the launches its row was needed in (None: one per iteration, a recurrent unit's)

    @property
    def needed(self) -> int:
        """The launches the unit's row was needed in (slot utilisation counts them against the rows launched)."""
        return self.iterations if self.launches is None else self.launches


class ServingProgram:
    """Base class of the family programs (see module docstring). ``rows`` requests at most, each up to
    ``max_len`` positions, ``slot_rows`` looped-layer slot rows shared by them (latentrt/kv_pool.py)."""

    def __init__(self, model, rows: int, max_len: int, slot_rows: int) -> None:
        self.model = model
        backend = model.backend
        decode = backend.pool_attention() if backend is not None else None
        prefill = backend.pool_prefill() if backend is not None else None
        self.pool = KVPool(model.cache_layout(), rows, max_len, slot_rows, model.dtype, model.device, decode, prefill)
        self.launched_rows = 0  # rows the last launch ran (for slot utilisation)
        self.passes = 0  # passes over a set of the model's layers so far (each reads those weights once)
        self.weight_reads = 0.0  # those passes' weights, in core iterations' (prelude_cost, head_cost, 1)
        # of the passes, those that took a captured launch sequence (a CUDA graph on a GPU, the same launches
        # eagerly elsewhere): the rest launch op by op from Python, which on a GPU costs more than the bytes
        self.graph_passes = 0
        # what beginning units (their preludes) and ending them (their heads) cost, in core iterations:
        # the scheduler lets ended units wait until batching them is worth it (latentrt/serve/engine.py)
        self.prelude_cost = self.head_cost = 0.0
        self.step_cost = 1.0  # the last launch's passes, in core iterations

    # whether ``ended`` may be given a launch's flags after the next ``launch`` (the engine's asynchronous scheduling:
    # latentrt/serve/engine.py), each launch's flags once and in order
    async_scheduling = False

    @staticmethod
    def kv_mode(decoder):
        """The KV mode a request's decoder asks for (None: the family has no looped layers)."""
        return getattr(decoder, "kv_mode", None)

    def admit(self, request) -> None:
        """Begin a request's prompt; ``request.row`` is its pool row, ``request.decoder`` its options."""
        raise NotImplementedError

    def start(self, request, token: Tensor) -> None:
        """Begin the unit of the request's next token (``token``: a 0-d device tensor)."""
        raise NotImplementedError

    def launch(self, idle: list) -> Tensor:
        """One step for every running request, plus ``idle`` requests run masked (the token-synchronous
        schedulers' waiting rows: launched, computing nothing that is kept). Returns device flags for
        ``ended`` (read back by the scheduler in its one host read per step)."""
        raise NotImplementedError

    def ended(self, flags: list) -> list[Ended]:
        """The units that ended in the last launch, from its flags read back to the host. A unit whose logits
        need the head (``ready`` false) stays in the program, out of the launches, until ``logits``."""
        raise NotImplementedError

    def ended_on_host(self) -> list[Ended]:
        """With asynchronous scheduling, before the next launch: the units whose end the host knows without the
        last launch's flags (a loop at its r_max), ended now so that their next units join that launch;
        ``ended`` then leaves them out."""
        return []

    def logits(self, ended: list[Ended]) -> tuple[Tensor, Tensor]:
        """Next-token logits [n, V] (fp32) of units that ended (in this or earlier launches), and their
        non-finite flags [n] (1: latent state, 2: logits); the heads of those not ``ready`` run as one pass."""
        raise NotImplementedError

    def retire(self, request) -> None:
        """Forget a request (finished, failed or cancelled) and free its row (``release_row``)."""
        raise NotImplementedError

    def release_row(self, request) -> None:
        """Free the request's pool row, zeroing what may hold an unchecked value (``KVPool.release``): the
        entries past those of units whose tokens were read back finite (``checked_entries``). After a stop,
        the unit begun after the last token, and with asynchronous scheduling one more that may have ended and
        been sampled before the last token was read; a row released when its last token is sampled (before it
        is read), that token's unit; a failed request, its failing unit (and every entry if its first token
        failed); a cancelled one, its units in flight."""
        row = request.row
        self.pool.release(row, min(request.checked_entries, self.pool.lengths[row]))

    def count_pass(self, weights: float = 1.0, graph: bool = False) -> None:
        """One pass over layers whose weights are ``weights`` core iterations'; ``graph``: through a captured
        launch sequence (backends/graph.py)."""
        self.passes += 1
        self.weight_reads += weights
        self.graph_passes += graph

    def latent_work(self, request) -> int:
        """Latent work a request's prompt cost beyond its units' iterations (Coconut: its thoughts)."""
        return 0


def weight_ratio(modules, per) -> float:
    """Parameters of ``modules`` per parameter of ``per``: what a pass over them costs in passes over ``per``
    where reading the weights is the cost (decode on a GPU; on a CPU each layer's fixed cost scales alike)."""

    def count(mods) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())

    return count(modules) / max(1, count(per))


def ones(n: int, device) -> Tensor:
    return torch.ones(n, dtype=torch.bool, device=device)
