"""KV modes: how a looped core layer keeps K/V across the iterations of one position.

A mode is parsed once from its spec (``full``, ``shared``, ``ring-K``, ``anchor-A``, ``skip``) into a
``KVMode`` that the cache, the backends, the CLI, the benchmarks and the published-pattern oracle all read.

- ``full``: one slot per iteration (K = r_max).
- ``shared``: one slot, overwritten every iteration: the memory of a plain transformer of the same depth.
- ``ring-K``: K slots used round-robin (the paper's KV budget).
- ``anchor-A``: A + 1 slots: iterations 0..A-1 keep their own, every later one shares slot A (the published
  ``compress-anchor``, A = 8: the first 8 recurrences anchored, one recurrence's worth for the rest).
- ``skip``: ``full``'s slots with the published ``full`` (and ``skip``) lookup under adaptive exit: a query
  at iteration t attends only to the earlier positions that ran iteration t (``drops_missing``).
- ``always-last``: ``full``'s slots with the published ``always-last-mL`` lookup: when every earlier position
  ran iteration t a query at t reads their entries t, else each one's last iteration, even one deeper than
  t (``reads_last``: the cache's gather, the Triton decode attention and the serving pool; not the CUDA
  persistent kernels).

Write rule: iteration t writes slot ``slot(t)``: ``t mod K`` (``min(t, A)`` in ``anchor-A``). Lookup rule
(one formula for every mode): a query at iteration t reads, for each earlier position p that wrote n_p
iterations, slot ``min(slot(t), n_p - 1)``.
In ``full`` mode that is iteration t's entry, or the position's latest entry when it exited before t
(Huginn's "latest-m4" lookup); in ring/shared mode whatever the slot holds, or the latest entry when the
slot was never written. The cache's gather (latentrt/cache.py) and the Triton decode attention
(latentrt/kernels/decode_attention.py) implement this rule, the CUDA loop its ``t mod K`` form.

The published implementation's cache strategies (``cache_lookup_strategy`` of Huginn's generate) are
accepted by name where they are one of these rules, for a model with L core layers: ``latest-mL`` is
``full`` (its lookup under adaptive exit), and so is ``available-mL`` (the query's iteration where the
position holds it, else the same latest entry: the same rule, since the largest index up to the query's
that a position holds is the query's own when it holds that), ``compress-sN`` with N = K x L is ``ring-K``
(``shared`` for K = 1), ``latest-mL-compress-sN`` (or ``available-``) the same ring,
``[latest-m4-]compress-anchor`` is ``anchor-8`` (for 4 core layers, which its index arithmetic assumes);
its ``full`` lookup (its default) under adaptive exit is ``skip`` (it keeps only the positions holding the
entry; ``skip`` is its name for that rule). The published code hard-codes L = 4 and two prelude layers. Its
other strategies are refused with the reason (``UNSUPPORTED``). The cache applies ``drops_missing`` as an attention
mask (``KVCache.core_mask``) and the Triton decode attention as a flag; the server's pool
(latentrt/kv_pool.py) reads each row's mode as (K, ``kept``, ``pool_lookup``); the CUDA persistent kernel
implements neither ``skip``, ``anchor-A`` nor ``always-last`` (the CUDA backend falls back to the Triton
path).

A new mode is a parser function here plus one line in ``KV_MODES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class KVMode:
    name: str  # the spec it was parsed from, normalised ("full", "shared", "ring-4", "skip")
    slots: int  # core slots per position for the depth it was parsed for
    drops_missing: bool = False  # a query at iteration t ignores positions that did not run it ("skip")
    anchor: int | None = None  # anchor-A: iterations from A on share slot A
    reads_last: bool = False  # a query reads each earlier position's last entry unless all ran its iteration

    @property
    def ring_lookup(self) -> bool:
        """Whether the mode is ``t mod K`` slots with every earlier position read (full, shared, ring-K): the rule
        the CUDA persistent kernels implement (not ``anchor-A``, ``skip`` or ``always-last``)."""
        return not self.drops_missing and self.anchor is None and not self.reads_last

    @property
    def kept(self) -> int:
        """The first iterations that keep a slot of their own (the anchor; 0 in a ring): with ``slots`` = K,
        iteration t writes slot ``min(t, a) + (t - min(t, a)) mod (K - a)``, one formula for every mode (the
        serving pool's kernels read a row's mode as the pair (K, a))."""
        return min(self.anchor, self.slots - 1) if self.anchor is not None else 0

    @property
    def pool_lookup(self) -> int:
        """The serving pool's code for the lookup (a row's third mode column, latentrt/kernels/pool_attention.py):
        0 the slot rule, 1 it less the stale earlier positions (``drops_missing``), 2 ``reads_last``."""
        return 2 if self.reads_last else int(self.drops_missing)

    def slot(self, iteration: int) -> int:
        """The slot iteration ``iteration`` writes: ``min(t, A)`` with an anchor, else ``t mod K`` (``kept``)."""
        first = min(iteration, self.kept)
        return first + (iteration - first) % (self.slots - self.kept)


def _full(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    return KVMode("full", r_max) if arg is None else None


def _skip(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    return KVMode("skip", r_max, drops_missing=True) if arg is None else None


def _always_last(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    """``always-last``, or the published name ``always-last-mL`` for L core layers (no fold: its lookup takes
    the largest index, which a fold would make another iteration's)."""
    if arg == "last" or (n_core is not None and arg == f"last-m{n_core}"):
        return KVMode("always-last", r_max, reads_last=True)
    return None


def _anchor(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    if arg is None or not arg.isdigit() or int(arg) < 1:
        return None
    a = int(arg)
    return KVMode(f"anchor-{a}", min(a + 1, r_max), anchor=a)


def _shared(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    return KVMode("shared", 1) if arg is None else None


def _ring(arg: str | None, r_max: int, n_core: int | None) -> KVMode | None:
    if arg is None or not arg.isdigit() or int(arg) < 1:
        return None
    k = int(arg)
    return KVMode(f"ring-{k}", min(k, r_max))


def _published(arg: str | None, r_max: int, n_core: int | None, latest: bool) -> KVMode | None:
    """``latest-mL[-compress-sN]`` / ``compress-sN`` (see module docstring)."""
    if n_core is None or arg is None:
        return None
    parts = arg.split("-")
    if latest:
        if not parts[0].startswith("m") or parts[0][1:] != str(n_core):
            return None  # the published "mod L" lookup finds the same physical layer only for L core layers
        parts = parts[1:]
        if not parts:
            return KVMode("full", r_max)
        if parts[0] != "compress":
            return None
        parts = parts[1:]
    if parts == ["anchor"]:  # the published anchor: 8 recurrences, its index arithmetic assumes 4 core layers
        return _anchor("8", r_max, n_core) if n_core == 4 else None
    if len(parts) != 1 or not parts[0].startswith("s") or not parts[0][1:].isdigit():
        return None
    n = int(parts[0][1:])
    if n < n_core or n % n_core:
        return None
    k = n // n_core
    return KVMode("shared", 1) if k == 1 else KVMode(f"ring-{k}", min(k, r_max))


# name -> parser(argument after the first '-' or None, r_max, core layers or None) -> KVMode, or None when
# the argument does not name a supported rule
KV_MODES: dict[str, Callable[[str | None, int, int | None], KVMode | None]] = {
    "full": _full,
    "shared": _shared,
    "ring": _ring,
    "skip": _skip,
    "anchor": _anchor,
    "always": _always_last,
    "latest": lambda arg, r_max, n_core: _published(arg, r_max, n_core, latest=True),
    "available": lambda arg, r_max, n_core: _published(arg, r_max, n_core, latest=True),
    "compress": lambda arg, r_max, n_core: _published(arg, r_max, n_core, latest=False),
}
SPECS = (
    "'full', 'shared', 'ring-K' with K >= 1, 'anchor-A' with A >= 1, 'skip' or 'always-last' (or a published "
    "strategy with the same rule: 'latest-mL' or 'available-mL', 'compress-sN', 'latest-mL-compress-sN' with L the "
    "core layers and N a multiple of L, 'compress-anchor' or 'latest-m4-compress-anchor' with 4 core layers, "
    "'always-last-mL')"
)


# published strategies no mode here implements (by the prefix the published code tests), and why
UNSUPPORTED = {
    "compress-r": "it shares one entry between consecutive layers (keys of one layer read by another)",
    "randomized": "it draws entries from torch's global generator (the published sanity check)",
}


def parse_kv_mode(spec, r_max: int, n_core: int | None = None) -> KVMode:
    """The KVMode of a spec for a token depth of at most ``r_max`` iterations; published strategy names need
    the model's number of core layers ``n_core``."""
    if isinstance(spec, KVMode):
        return parse_kv_mode(spec.name, r_max)
    if isinstance(spec, str):
        name, _, arg = spec.partition("-")
        parser = KV_MODES.get(name)
        mode = parser(arg if _ else None, r_max, n_core) if parser is not None else None
        if mode is not None:
            return mode
    where = f" for this model ({n_core} core layers)" if n_core is not None else ""
    unsupported = [why for name, why in UNSUPPORTED.items() if isinstance(spec, str) and name in spec]
    if unsupported:
        raise InputError(f"kv_sharing {spec!r} is a published strategy latentrt does not implement: {unsupported[0]}")
    raise InputError(f"kv_sharing must be {SPECS}, got {spec!r}{where}")
