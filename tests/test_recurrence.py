"""The latent loop's checks by masks (``LatentLoop.check_where``, what a server's captured passes run) against
its checks by index (``LatentLoop.check``, rules 3-4), on random states, logits and criterion states."""

import copy

import pytest
import torch

from latentrt.exits import CRITERIA, make_criterion
from latentrt.recurrence import LatentLoop, LoopSpec, Rows

R, D, V = 12, 16, 40


def _criteria() -> list:
    """Every registered criterion that can exit, two of them at a second threshold (distinct criteria)."""
    found = [make_criterion(name) for name in CRITERIA if name != "none"]
    return found + [make_criterion("kl", 0.5), make_criterion("latent-diff", 0.9)]


def _loop(dtype: torch.dtype, gen: torch.Generator) -> LatentLoop:
    """A loop of R one-position rows, each under one of the criteria, started and iterated at random."""
    loop = LatentLoop(R, (1, D), V, "cpu", dtype)
    crits = _criteria()
    for i, crit in enumerate(crits):
        rows = [r for r in range(R) if r % len(crits) == i]
        if rows:
            s0 = torch.randn(len(rows), 1, D, generator=gen).to(dtype)
            loop.start(Rows(rows, 0, "cpu"), LoopSpec(8, crit), s0)
    return loop


def _state(loop: LatentLoop) -> list:
    tensors = [loop.s, loop.reference, loop.active, loop.used, loop.out, loop.checked_logits]
    for crit in sorted(loop.criterion_state, key=lambda c: (c.name, c.threshold)):
        state = loop.criterion_state[crit]
        tensors += list(state) if isinstance(state, tuple) else [] if state is None else [state]
    return [t.clone() for t in tensors] + [list(loop.checked)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checks_by_masks_equal_checks_by_index(dtype):
    """Over several rounds (each: new states, new logits, a random subset of rows checking, some rows frozen),
    the masked checks leave every tensor of the loop (states, references, active, exit and checked logits,
    each criterion's state) and the host's ``checked`` exactly as the indexed checks do; rows not checking keep
    theirs even where their logits are NaN (a captured head computes every row's)."""
    gen = torch.Generator().manual_seed(0)
    by_index = _loop(dtype, gen)
    by_mask = copy.deepcopy(by_index)
    valid = torch.ones(R, 1, dtype=torch.bool)
    for _ in range(6):
        step = 0.3 * torch.randn(R, 1, D, generator=gen).to(dtype)
        logits = 4 * torch.randn(R, V, generator=gen)
        checking = torch.rand(R, generator=gen) < 0.7
        logits[~checking] = float("nan")
        for loop in (by_index, by_mask):
            loop.s.add_(step)
        rows = [r for r in range(R) if checking[r]]
        for needs_logits in (True, False):  # ``check``: one kind at a time
            kind = [r for r in rows if by_index.specs[r].criterion.needs_logits == needs_logits]
            if kind:
                ix = Rows(kind, 0, "cpu")
                by_index.check(ix, logits[ix.index] if needs_logits else None, valid[ix.index])
        for crit in {by_mask.specs[r].criterion for r in rows}:
            mask = torch.tensor([checking[r].item() and by_mask.specs[r].criterion == crit for r in range(R)])
            by_mask.check_where(crit, mask, logits if crit.needs_logits else None, valid)
            if crit.needs_logits:
                by_mask.checked_on_host([r for r in range(R) if mask[r]])
        for a, b in zip(_state(by_index), _state(by_mask)):
            if isinstance(a, list):
                assert a == b
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    exits = ~by_index.active
    assert 0 < int(exits.sum()) < R, "the rounds should exit some rows and keep others (a test that can fail)"
