"""Unit tests of the exit criteria formulas and the KV slot lookup rule."""

import math

import pytest
import torch

from latentrt.cache import KVCache
from latentrt.errors import InputError
from latentrt.exits import ExitTracker, make_criterion
from latentrt.kv_modes import KVMode, parse_kv_mode


def test_latent_diff_averages_over_real_positions_only():
    crit = make_criterion("latent-diff", 0.3)
    tr = ExitTracker(crit, 2, 10, torch.device("cpu"))
    prev = torch.ones(2, 3, 4)
    new = prev.clone()
    new[:, 0] = 100.0  # position 0 moves: |delta|/|new| = 0.99 there, 0 elsewhere
    valid = torch.tensor([[True, True, True], [False, True, True]])  # row 1: position 0 is padding
    assert tr.update(prev, new, None, valid).tolist() == [False, True]  # row 0 mean 0.33, row 1 mean 0


def _kl_exit(threshold, *logits):
    tr = ExitTracker(make_criterion("kl", threshold), 1, logits[0].shape[-1], torch.device("cpu"))
    return [tr.update(None, torch.zeros(1, 1, 1), lg, None).item() for lg in logits]


def test_kl_first_step_against_uniform_then_successive():
    V = 7
    a, b = torch.randn(1, V), torch.randn(1, V)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl_uniform_a = float((torch.full((V,), 1 / V) * (math.log(1 / V) - pa.log())).sum())  # KL(uniform || p_a)
    kl_ab = float((pa * (pa.log() - pb.log())).sum())  # KL(p_a || p_b): previous first
    assert _kl_exit(kl_uniform_a * 1.001, a) == [True]
    assert _kl_exit(kl_uniform_a * 0.999, a) == [False]
    assert _kl_exit(kl_ab * 1.001, a, b)[1] is True
    assert _kl_exit(kl_ab * 0.999, a, b)[1] is False


def test_argmax_stability_counts_unchanged_steps():
    tr = ExitTracker(make_criterion("argmax-stability", 2), 1, 3, torch.device("cpu"))
    seq = [[0, 1, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]]
    out = [tr.update(None, torch.zeros(1, 1, 1), torch.tensor([s]).float(), None).item() for s in seq]
    assert out == [False, False, True, False]


def test_criterion_validation():
    assert make_criterion("kl", None).threshold == 1e-3  # the published defaults ("auto")
    assert make_criterion("minp-kl", None).threshold == 1e-5
    assert make_criterion("latent-diff", None).threshold == 0.03
    assert make_criterion("entropy-diff", None).threshold == 1e-3
    assert make_criterion("argmax-stability", None).threshold == 5
    assert make_criterion("cosine", None).threshold == 1e-3
    with pytest.raises(InputError, match="unknown exit criterion"):
        make_criterion("foo", None)
    with pytest.raises(InputError, match=">= 0"):
        make_criterion("kl", -1.0)
    with pytest.raises(InputError, match="non-integer"):
        make_criterion("argmax-stability", 2.5)


def test_kv_sharing_specs():
    assert parse_kv_mode("full", 16) == KVMode("full", 16)
    assert parse_kv_mode("shared", 16) == KVMode("shared", 1)
    assert parse_kv_mode("ring-4", 16) == KVMode("ring-4", 4)
    assert parse_kv_mode("ring-40", 16).slots == 16
    assert parse_kv_mode(parse_kv_mode("full", 4), 16) == KVMode("full", 16)  # a mode re-parsed for a depth
    assert [parse_kv_mode("ring-3", 8).slot(t) for t in range(5)] == [0, 1, 2, 0, 1]
    for bad in ("ring-0", "ring-x", "latest", "full-2", 3):
        with pytest.raises(InputError, match="kv_sharing"):
            parse_kv_mode(bad, 8)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_slot_lookup_rule(slots):
    """A query at iteration t reads slot min(t mod K, n_p - 1) of each position p."""
    cache = KVCache(1, 4, 0, 1, 1, n_core=1, core_slots=slots)
    every = torch.ones(1, dtype=torch.bool)
    iters = [5, 2, 8]  # iterations run by three earlier positions
    for p, n in enumerate(iters):
        chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
        for t in range(n):
            cache.mark_iteration(chunk, t, every)
            val = torch.full((1, 1, 1, 1), 100.0 * p + t)
            cache.core(0, val, val, chunk, t, every)
    chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
    for t in range(8):
        cache.mark_iteration(chunk, t, every)
        k, _ = cache.core(0, torch.full((1, 1, 1, 1), -1.0), torch.zeros(1, 1, 1, 1), chunk, t, every)
        for p, n in enumerate(iters):
            slot = min(t % slots, n - 1)
            last_write = max(i for i in range(n) if i % slots == slot)  # the slot's latest content
            assert k[0, 0, p, 0].item() == 100.0 * p + last_write
        assert k[0, 0, 3, 0].item() == -1.0


def test_frozen_sequences_keep_their_entries():
    cache = KVCache(2, 2, 1, 1, 1)
    chunk = cache.begin(torch.ones(2, 1, dtype=torch.bool))
    cache.plain(0, torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), chunk)
    k, _ = cache.plain(
        0, torch.full((2, 1, 1, 1), 7.0), torch.zeros(2, 1, 1, 1), chunk, active=torch.tensor([True, False])
    )
    assert k[:, 0, 0, 0].tolist() == [7.0, 1.0]
