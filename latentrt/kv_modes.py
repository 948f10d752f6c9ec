"""KV modes: how a looped core layer keeps K/V across the iterations of one position.

A mode is parsed once from its spec (``full``, ``shared``, ``ring-K``) into a ``KVMode`` that the cache,
the backends, the CLI, the benchmarks and the published-pattern oracle all read.

- ``full``: one slot per iteration (K = r_max).
- ``shared``: one slot, overwritten every iteration: the memory of a plain transformer of the same depth.
- ``ring-K``: K slots used round-robin (the paper's KV budget).

Write rule: iteration t writes slot ``t mod K``. Lookup rule (one formula for every mode): a query at
iteration t reads, for each earlier position p that wrote n_p iterations, slot ``min(t mod K, n_p - 1)``.
In ``full`` mode that is iteration t's entry, or the position's latest entry when it exited before t
(Huginn's "latest-m4" lookup); in ring/shared mode whatever the slot holds, or the latest entry when the
slot was never written. The cache's gather (latentrt/cache.py), the Triton decode attention
(latentrt/kernels/decode_attention.py) and the CUDA loop all implement this rule.

A new mode is a parser function here plus one line in ``KV_MODES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class KVMode:
    name: str  # the spec it was parsed from, normalised ("full", "shared", "ring-4")
    slots: int  # core slots per position for the depth it was parsed for

    def slot(self, iteration: int) -> int:
        """The slot iteration ``iteration`` writes."""
        return iteration % self.slots


def _full(arg: str | None, r_max: int) -> KVMode | None:
    return KVMode("full", r_max) if arg is None else None


def _shared(arg: str | None, r_max: int) -> KVMode | None:
    return KVMode("shared", 1) if arg is None else None


def _ring(arg: str | None, r_max: int) -> KVMode | None:
    if arg is None or not arg.isdigit() or int(arg) < 1:
        return None
    k = int(arg)
    return KVMode(f"ring-{k}", min(k, r_max))


# name -> parser(argument after '-' or None, r_max) -> KVMode, or None when the argument is wrong
KV_MODES: dict[str, Callable[[str | None, int], KVMode | None]] = {
    "full": _full,
    "shared": _shared,
    "ring": _ring,
}
SPECS = "'full', 'shared' or 'ring-K' with K >= 1"


def parse_kv_mode(spec, r_max: int) -> KVMode:
    """The KVMode of a spec for a token depth of at most ``r_max`` iterations."""
    if isinstance(spec, KVMode):
        return KVMode(spec.name, parse_kv_mode(spec.name, r_max).slots)
    if isinstance(spec, str):
        name, _, arg = spec.partition("-")
        parser = KV_MODES.get(name)
        mode = parser(arg if _ else None, r_max) if parser is not None else None
        if mode is not None:
            return mode
    raise InputError(f"kv_sharing must be {SPECS}, got {spec!r}")
