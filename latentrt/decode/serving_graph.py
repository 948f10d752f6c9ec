"""Captured serving passes beside prompt chunks: each chunk group in a slot of bucketed shape, a graph per tuple
of shapes (shared by the families' serving graphs: recurrent_serving_graph.py, coconut_serving_graph.py).

A server's captured pass runs every pool row's one-position work as a fixed sequence of launches (inputs in
device tensors the runner refreshes each call). Prompt chunks join the same pass, each group of them in a
slot of its bucket's shape (``ChunkSlot``: members, positions and keys rounded up to powers of two; padding
masked): the pass's launches then depend only on the shapes of the slots, so one graph per tuple of shapes
(``SlotsRunner``'s key) is replayed by every set of groups of those shapes. Sets of groups are short-lived (a
recurrent prompt group lives through its loop; a Coconut step's chunks one pass), so a graph per set would be
captured, and mostly run eagerly before its capture, more often than replayed.
"""

from __future__ import annotations

import torch

from ..backends.graph import GraphedRunner
from ..kv_pool import RaggedChunk
from ..transfer import copy_from_host


def bucket(x: int, cap: int) -> int:
    """The next power of two at or above ``x`` (>= 1), at most ``cap``: a slot's size."""
    return min(1 << (x - 1).bit_length(), cap)


class ChunkSlot:
    """A resident chunk group's place in a captured pass: a chunk of its bucket's shape ``(M, N, end)``
    (members, positions, keys: powers of two at or above the group's), so that one graph serves every set of
    groups of the same shapes. ``load`` copies in what is fixed while the group lives: its members' pool rows,
    entries, positions and real positions, and where each member's last real position lies (``last``, an
    index into the slot's [M * N] positions). Padding members take the first member's row and last position
    and must write nothing (the family's slot masks them); padding positions write to the pool's trash entry,
    and a real position attends to no key after its own (the keys past the group's end only add masked blocks,
    exact zeros), so the group's real positions compute as without padding.

    A group (the family's) has ``rows`` (pool rows), ``chunk`` (its ``RaggedChunk``), ``lengths`` (each
    member's real positions) and ``serial`` (distinct among the groups resident at once)."""

    def __init__(self, shape: tuple[int, int, int], program) -> None:
        M, N, end = self.shape = shape
        dev = program.model.device
        long, self.trash = dict(dtype=torch.long, device=dev), program.pool.trash
        self.last = torch.zeros(M, **long)
        self.chunk = RaggedChunk(
            torch.zeros(M, **long),
            [0] * M,  # host starts / lengths: unused by the fused attention (it reads q_idx on the device)
            [N] * M,
            N,
            end,
            torch.full((M, N), self.trash, **long),
            torch.zeros(M, N, **long),
            None,
            torch.zeros(M, N, dtype=torch.bool, device=dev),
        )
        self.group = None
        self.m = self.n = 0

    @staticmethod
    def shape_of(group, pool) -> tuple[int, int, int]:
        return (
            bucket(len(group.rows), pool.rows),
            bucket(group.chunk.n, pool.max_len),
            bucket(group.chunk.end, pool.max_len),
        )

    def load(self, group) -> None:
        """``group``'s fixed values into the slot, the padding reset."""
        M, N, _ = self.shape
        m, n, c, own = len(group.rows), group.chunk.n, self.chunk, group.chunk
        c.rows.copy_(own.rows[:1].expand(M))
        c.rows[:m].copy_(own.rows)
        for static, value, pad in ((c.q_idx, own.q_idx, self.trash), (c.positions, own.positions, 0)):
            static.fill_(pad)
            static[:m, :n].copy_(value)
        c.valid.zero_()
        c.valid[:m, :n].copy_(own.valid)
        copy_from_host(self.last, [i * N + group.lengths[i] - 1 for i in range(m)] + [group.lengths[0] - 1] * (M - m))
        self.group, self.m, self.n = group, m, n


class SlotsRunner(GraphedRunner):
    """A runner whose launches depend on the shapes of the chunk groups beside the pool's rows and on the exit
    criteria it checks (recurrent servers): each group in a slot of its bucket's shape (``SLOT``), one set of
    graphs (and slots) per ``key`` (the criteria, the tuple of shapes), kept across sets of groups of those
    shapes, at most MAX_GRAPHS keys besides the current one (dropped oldest first, keys not yet captured before
    captured ones, whose graphs cost a capture; keys without groups last).

    A key with groups is captured at its CAPTURE_AT-th call (every set of its shapes counted), its calls
    before run eagerly: a capture costs about two eager calls and a synchronize. Keyed by shapes, later sets
    replay the graphs of earlier ones (on the CPU, the built-in recurrent model's serving trace at 200
    requests/s: under the depth scheduler 24 sets of prompt groups in 84 steps, 13 of them for one step, 11
    for two). A key without groups (the pool's rows only) is captured at its first call."""

    SLOT = ChunkSlot  # the family's slot class
    MAX_GRAPHS = 8  # (each key's graphs hold its pass's activations)
    CAPTURE_AT = 3  # (benchmarks/serve.py --group-capture-at sets it; 1: every key at its first call)
    HELD = ("_graph", "_graphs", "_markers", "_outputs", "slots", "_calls")  # per key
    _key: tuple = ((), ())
    _calls = 0  # calls of the current key
    _serials: tuple = ()  # the groups in the slots now
    _outputs = None
    slots: list = []  # the current key's slot per resident group, in order

    @property
    def criteria(self) -> tuple:
        return self._key[0]

    def __call__(self):
        self._calls += 1
        if self._graph is None and self._key[1] and self._calls < self.CAPTURE_AT:
            return self.run()
        return super().__call__()

    def key_state(self, key: tuple) -> tuple:
        """A new key's own values of the names a subclass adds to ``HELD`` (none here)."""
        return ()

    def _select(self, groups: list, criteria: tuple = ()) -> None:
        """Run beside ``groups``, checking ``criteria``, from now on: the graphs and slots of their key (none
        yet: made, and the key's next calls capture), each group loaded into its slot when the groups changed."""
        serials = tuple(g.serial for g in groups)
        key = (criteria, tuple(self.SLOT.shape_of(g, self.program.pool) for g in groups))
        if serials == self._serials and key == self._key:
            return
        self._serials = serials
        if key != self._key:
            for slot in self.slots:  # (reloaded if the key comes back: holds no ended group's tensors meanwhile)
                slot.group = None
            captured = self.__dict__.setdefault("_captured", {})
            captured[self._key] = tuple(getattr(self, name) for name in self.HELD)
            got = captured.pop(key, None)
            if got is None:
                got = (None, [], [], None, [self.SLOT(shape, self.program) for shape in key[1]], 0)
                got += self.key_state(key)
            for name, value in zip(self.HELD, got):
                setattr(self, name, value)
            self._key = key
            while len(captured) > self.MAX_GRAPHS:  # with groups never captured, with groups, any: oldest first
                keys = list(captured)
                grouped = [k for k in keys if k[1]]
                order = [k for k in grouped if captured[k][0] is None] + grouped + keys
                del captured[order[0]]
        for slot, g in zip(self.slots, groups):
            slot.load(g)
