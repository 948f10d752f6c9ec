"""The non-finite flags of a unit's result (kernels/reference.py: every decoder's and the Triton token runner's)
against their definition by ``torch.isfinite``."""

import pytest
import torch

from latentrt.kernels.reference import nonfinite_flags


def _by_definition(state, valid, logits, alive):
    flags = 2 * (~torch.isfinite(logits).all(-1)).long()
    if state is not None:
        bad = ~torch.isfinite(state).all(-1)
        if valid is not None:
            bad = bad & valid
        flags = flags + (bad.any(-1) if bad.dim() > 1 else bad).long()
    return flags if alive is None else flags * alive.long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [None, 1, 5])  # None: states [B, d]
def test_nonfinite_flags_equal_their_definition(dtype, positions):
    """NaN, +inf and -inf planted at random in states and logits (padded positions too, which a valid mask
    leaves out), huge finite values (whose sum would overflow) not flagged; every combination of masks."""
    gen = torch.Generator().manual_seed(positions or 0)
    B, d, V = 64, 8, 50
    shape = (B, d) if positions is None else (B, positions, d)
    for trial in range(4):
        huge = [1e37 if trial == 3 else 1.0, 1e38 if trial == 2 else 1.0]  # finite, but their sums overflow
        state = (torch.randn(shape, generator=gen).clamp(-3, 3) * huge[0]).to(dtype)
        logits = torch.randn(B, V, generator=gen).clamp(-3, 3) * huge[1]
        for x in (state, logits):
            flat = x.view(-1)
            at = torch.randint(0, flat.numel(), (12,), generator=gen)
            flat[at] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(4).to(x.dtype)
        valid = None if positions is None else torch.rand(B, positions, generator=gen) < 0.7
        alive = torch.rand(B, generator=gen) < 0.8
        for s, v, a in [(state, valid, alive), (state, valid, None), (state, None, None), (None, None, alive)]:
            got = nonfinite_flags(s, v, logits, a)
            want = _by_definition(s, v, logits, a)
            assert got.dtype == torch.long and torch.equal(got, want), (trial, s is None, v is None, a is None)
            assert 0 < int((want > 0).sum()) < B  # (some rows flagged, some not: a test that can fail)
