"""The captured serving passes' slots (latentrt/decode/serving_graph.py, recurrent_serving_graph.py,
coconut_serving_graph.py): what a slot holds after each group it is given, whatever group it held before, and
when a runner reloads its slots. (The passes themselves: tests/test_serve_engine.py, served against generate().)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from latentrt.decode.coconut_serving_graph import PromptChunks, PromptChunksSlot
from latentrt.decode.recurrent_serving_graph import GroupSlot
from latentrt.decode.serving_graph import ChunkSlot, SlotsRunner, bucket
from latentrt.kv_pool import RaggedChunk

TRASH, D = 99, 4


def test_bucket_is_the_next_power_of_two_up_to_the_cap():
    assert [bucket(x, 64) for x in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    assert bucket(40, 32) == 32 and bucket(3, 2) == 2


def _program():
    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, config=SimpleNamespace(n_embd=D))
    return SimpleNamespace(model=model, pool=SimpleNamespace(trash=TRASH, rows=8, max_len=64))


def _group(rows: list[int], starts: list[int], lengths: list[int], serial: int):
    """A group of prompt chunks as the servers make them: row i's entries [starts[i], + lengths[i]), padded to
    the longest at the trash entry; its positions are its entries; ``e``: its prelude output."""
    n = max(lengths)
    q_idx = torch.full((len(rows), n), TRASH)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(starts, lengths)):
        q_idx[i, :m] = torch.arange(s, s + m)
        valid[i, :m] = True
    positions = torch.where(valid, q_idx, 0)
    end = max(s + m for s, m in zip(starts, lengths))
    chunk = RaggedChunk(torch.tensor(rows), starts, lengths, n, end, q_idx, positions, None, valid)
    e = torch.arange(len(rows) * n * D, dtype=torch.float32).view(len(rows), n, D) + 1
    return SimpleNamespace(rows=rows, chunk=chunk, lengths=lengths, serial=serial, e=e)


def _expected(group, M: int, N: int) -> dict:
    """What a slot of shape (M, N, .) holds for ``group``: its values, the padding members on the first
    member's row and last position, padding positions at the trash entry, position 0, invalid."""
    m, n = len(group.rows), group.chunk.n
    rows = torch.full((M,), group.rows[0])
    rows[:m] = torch.tensor(group.rows)
    q_idx, positions = torch.full((M, N), TRASH), torch.zeros(M, N, dtype=torch.long)
    q_idx[:m, :n], positions[:m, :n] = group.chunk.q_idx, group.chunk.positions
    valid = torch.zeros(M, N, dtype=torch.bool)
    valid[:m, :n] = group.chunk.valid
    last = [i * N + group.lengths[i] - 1 for i in range(m)] + [group.lengths[0] - 1] * (M - m)
    return dict(rows=rows, q_idx=q_idx, positions=positions, valid=valid, last=torch.tensor(last))


def _held(slot: ChunkSlot) -> dict:
    c = slot.chunk
    return dict(rows=c.rows, q_idx=c.q_idx, positions=c.positions, valid=c.valid, last=slot.last)


@pytest.mark.parametrize("kind", ["chunk", "group", "prompt"])
def test_a_slot_holds_each_group_it_is_given_whatever_it_held_before(kind):
    """A slot (4 members, 8 positions) given a group of four members of up to 7 positions, then one of two
    members of up to 5, then the first again: each time it holds that group alone, the padding reset (a
    member or position the larger group left must not keep its entries: a padding position writes its K/V
    at the trash entry, a padding member runs nowhere)."""
    program = _program()
    big = _group([3, 1, 6, 0], [10, 0, 4, 20], [7, 5, 2, 6], serial=1)
    small = _group([5, 2], [30, 8], [3, 5], serial=2)
    slot = {"chunk": ChunkSlot, "group": GroupSlot, "prompt": PromptChunksSlot}[kind]((4, 8, 64), program)
    for group in (big, small, big):
        if kind == "prompt":  # a Coconut step's chunks: their token ids too
            ids = [[7 + i + j for j in range(m)] for i, m in enumerate(group.lengths)]
            group = PromptChunks(group.rows, group.chunk, group.lengths, ids, group.serial)
        slot.load(group)
        want, got = _expected(group, 4, 8), _held(slot)
        for name in want:
            assert torch.equal(got[name], want[name]), (name, group.serial)
        m, n = len(group.rows), group.chunk.n
        assert (slot.group, slot.m, slot.n) == (group, m, n)
        if kind == "group":  # the loop's buffers: the prelude output in, the rest reset (copied in per call)
            e = torch.zeros(4, 8, D)
            e[:m, :n] = group.e
            assert torch.equal(slot.e, e) and not slot.s.any()
            assert not slot.members.any() and not slot.active.any() and not slot.chunk.iterations.any()
            slot.members.fill_(True), slot.active.fill_(True), slot.s.fill_(1.0), slot.chunk.iterations.fill_(3)
        if kind == "prompt":
            ids = torch.zeros(4, 8, dtype=torch.long)
            for i, own in enumerate(group.ids):
                ids[i, : len(own)] = torch.tensor(own)
            assert torch.equal(slot.ids, ids)
            assert slot.write.tolist() == [i < m for i in range(4)]


def test_a_runner_reloads_its_slots_when_its_groups_change_under_the_same_key():
    """Two sets of groups of the same shapes, one after the other (a group ends, another of its bucket's shape
    begins at the next step): the key stays, the graphs stay, the slots take the new groups; the same set again
    loads nothing."""
    loads = []

    class Recorded(ChunkSlot):
        def load(self, group) -> None:
            loads.append(group.serial)
            super().load(group)

    runner = SlotsRunner()
    runner.SLOT, runner.program = Recorded, _program()
    first = _group([3, 1, 6], [10, 0, 4], [7, 5, 2], serial=1)
    then = _group([5, 2, 4], [20, 8, 0], [6, 5, 8], serial=2)
    assert ChunkSlot.shape_of(first, runner.program.pool) == ChunkSlot.shape_of(then, runner.program.pool)
    runner._select([first])
    key, slot = runner._key, runner.slots[0]
    runner._select([first])
    assert loads == [1]
    runner._select([then])
    assert runner._key == key and runner.slots[0] is slot and slot.group is then and loads == [1, 2]
    assert torch.equal(_held(slot)["q_idx"], _expected(then, 4, 8)["q_idx"])
