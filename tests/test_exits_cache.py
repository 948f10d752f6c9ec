"""Unit tests of the exit criteria formulas and the KV slot lookup rule."""

import math

import pytest
import torch
from conftest import tiny_recurrent

import latentrt
from latentrt.cache import KVCache
from latentrt.errors import InputError
from latentrt.exits import ExitTracker, make_criterion
from latentrt.kernels.reference import attention, cosine_reference, latent_diff_reference
from latentrt.kv_modes import KVMode, parse_kv_mode


def test_latent_diff_averages_over_real_positions_only():
    crit = make_criterion("latent-diff", 0.3)
    tr = ExitTracker(crit, 2, 10, torch.device("cpu"))
    prev = torch.ones(2, 3, 4)
    new = prev.clone()
    new[:, 0] = 100.0  # position 0 moves: |delta|/|new| = 0.99 there, 0 elsewhere
    valid = torch.tensor([[True, True, True], [False, True, True]])  # row 1: position 0 is padding
    assert tr.update(prev, new, None, valid).tolist() == [False, True]  # row 0 mean 0.33, row 1 mean 0


def test_state_criteria_compare_in_the_states_dtype_as_kernels_do():
    """A bf16 value compares with the threshold in bf16 (as the published criteria's tensors do); a kernel
    comparing in fp32 gets the threshold rounded that way (``kernel_threshold``) and so decides alike; the
    logits' criteria compare in fp32."""
    thr = 0.03005  # rounds to bf16's 0.030029296875
    value = torch.tensor([0.030029296875], dtype=torch.bfloat16)
    assert not bool(value < thr) and float(value) < thr  # in bf16 the two are equal
    for name in ("latent-diff", "cosine"):
        crit = make_criterion(name, thr)
        assert crit.kernel_threshold(torch.bfloat16) == 0.030029296875
        assert crit.kernel_threshold(torch.float32) == float(torch.tensor(thr, dtype=torch.float32))
        assert not (float(value) < crit.kernel_threshold(torch.bfloat16))  # as the bf16 comparison
    kl = make_criterion("kl", thr)
    assert kl.kernel_threshold(torch.bfloat16) == float(torch.tensor(thr, dtype=torch.float32))


def test_state_criteria_nan_on_a_zero_state_never_exit():
    """The published cosine has no epsilon: against a zero state it is NaN, which is below no threshold; a
    padded position's NaN does not spread to its row."""
    valid = torch.tensor([[True, True], [False, True]])
    prev, new = torch.ones(2, 2, 4), torch.ones(2, 2, 4)
    prev[0, 0] = 0.0  # row 0: a real position against a zero state
    prev[1, 0] = new[1, 0] = 0.0  # row 1: a zero state at a padded position
    tr = ExitTracker(make_criterion("cosine", 5.0), 2, 10, torch.device("cpu"))
    assert tr.update(prev, new, None, valid).tolist() == [False, True]


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
    tr = ExitTracker(make_criterion("argmax-stability", 2), 1, 3, torch.device("cpu"))
    seq = [[1, 0, 0]] * 3  # token 0 first: no earlier argmax (published: -1), so not yet unchanged
    out = [tr.update(None, torch.zeros(1, 1, 1), torch.tensor([s]).float(), None).item() for s in seq]
    assert out == [False, False, True]


def test_latent_diff_and_cosine_are_the_published_formulas():
    """The published LatentDiffExitEvaluator's |s_t - s_prev| / |s_t| (the new state's norm) and
    CosineExitEvaluator's 1 - cos(s_t, s_prev), each averaged over a sequence's real positions."""
    g = torch.Generator().manual_seed(0)
    prev, new = torch.randn(2, 3, 8, generator=g), 3 * torch.randn(2, 3, 8, generator=g)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    for ref, per in (
        (latent_diff_reference, lambda a, b: (b - a).norm() / b.norm()),
        (cosine_reference, lambda a, b: 1 - (a @ b) / a.norm() / b.norm()),
    ):
        want = [torch.stack([per(prev[i, j], new[i, j]) for j in range(3) if valid[i, j]]).mean() for i in range(2)]
        assert torch.allclose(ref(prev, new, valid), torch.stack(want), atol=1e-6)


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
    assert parse_kv_mode("skip", 16) == KVMode("skip", 16, drops_missing=True)  # the published name too
    assert parse_kv_mode("anchor-8", 16) == KVMode("anchor-8", 9, anchor=8)
    assert [parse_kv_mode("anchor-3", 16).slot(t) for t in range(6)] == [0, 1, 2, 3, 3, 3]
    assert parse_kv_mode("anchor-8", 5).slots == 5  # a depth below the anchor: full
    for published in ("latest-m4-compress-anchor", "compress-anchor"):
        assert parse_kv_mode(published, 16, n_core=4) == KVMode("anchor-8", 9, anchor=8)
        with pytest.raises(InputError, match="kv_sharing"):  # its index arithmetic assumes 4 core layers
            parse_kv_mode(published, 16, n_core=2)
    assert parse_kv_mode(parse_kv_mode("skip", 4), 16) == KVMode("skip", 16, drops_missing=True)
    for lookup in ("latest", "available"):  # the published names of the full cache's lookup, and its folds
        assert parse_kv_mode(f"{lookup}-m4", 16, n_core=4) == KVMode("full", 16)
        assert parse_kv_mode(f"{lookup}-m2-compress-s4", 16, n_core=2) == KVMode("ring-2", 2)
        assert parse_kv_mode(f"{lookup}-m4-compress-s4", 16, n_core=4) == KVMode("shared", 1)
        for bad in (f"{lookup}-m4", f"{lookup}-m2-compress-s3", f"{lookup}-m2-skip"):  # m4 for 2 layers; no fold
            with pytest.raises(InputError, match="kv_sharing"):
                parse_kv_mode(bad, 16, n_core=2)
    assert parse_kv_mode("compress-s12", 16, n_core=4) == KVMode("ring-3", 3)
    for spec in ("always-last", "always-last-m4"):  # the published always-last lookup, no fold
        assert parse_kv_mode(spec, 16, n_core=4) == KVMode("always-last", 16, reads_last=True)
        assert not parse_kv_mode(spec, 16, n_core=4).ring_lookup
    for bad in ("always-last-m2", "always-last-m4-compress-s8", "always"):
        with pytest.raises(InputError, match="kv_sharing must be"):
            parse_kv_mode(bad, 16, n_core=4)
    for published in ("latest-m4-compress-r4", "compress-r2", "randomized"):
        with pytest.raises(InputError, match=f"kv_sharing '{published}' is a published strategy latentrt does not"):
            parse_kv_mode(published, 16, n_core=4)
    for bad in ("ring-0", "ring-x", "latest", "available", "full-2", 3):
        with pytest.raises(InputError, match="kv_sharing"):
            parse_kv_mode(bad, 8)


def test_always_last_reads_each_positions_last_entry_unless_all_ran_the_iteration():
    """The published always-last lookup on the cache: at iteration t, every earlier real position's entry t
    when all of them ran t, else each one's last entry (deeper than t too); the chunk's own at t."""
    cache = KVCache(1, 8, 0, 1, 1, n_core=1, kv_mode=parse_kv_mode("always-last", 8))
    runs = [3, 1, 5]  # iterations positions 0..2 ran
    for p, n in enumerate(runs):
        chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
        for t in range(n):
            cache.mark_iteration(chunk, t, torch.ones(1, dtype=torch.bool))
            cache.core(
                0,
                torch.full((1, 1, 1, 1), 10.0 * p + t),
                torch.zeros(1, 1, 1, 1),
                chunk,
                t,
                torch.ones(1, dtype=torch.bool),
            )
    chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
    for t, want in [(0, [0, 10, 20]), (1, [2, 10, 24]), (3, [2, 10, 24])]:  # t=0: all ran it; t>=1: position 1 did not
        cache.mark_iteration(chunk, t, torch.ones(1, dtype=torch.bool))
        k, _ = cache.core(
            0, torch.full((1, 1, 1, 1), 30.0 + t), torch.zeros(1, 1, 1, 1), chunk, t, torch.ones(1, dtype=torch.bool)
        )
        assert k[0, 0, :, 0].tolist() == [*want, 30.0 + t], t
    model = tiny_recurrent(seed=1)
    kw = dict(kv_sharing="always-last", num_steps=3, max_new_tokens=2)
    latentrt.generate(model, [5, 6], adaptive=True, exit_criterion="kl", **kw)


@pytest.mark.parametrize("slots,anchor", [(1, None), (3, None), (8, None), (4, 3)])
def test_slot_lookup_rule(slots, anchor):
    """A query at iteration t reads slot min(slot(t), n_p - 1) of each position p: slot(t) = t mod K, or
    min(t, A) in anchor-A (K = A + 1), holding the latest iteration written there."""
    cache = KVCache(1, 4, 0, 1, 1, n_core=1, kv_mode=KVMode("rule", slots, anchor=anchor))
    slot_of = (lambda t: t % slots) if anchor is None else (lambda t: min(t, anchor))
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
            slot = min(slot_of(t), n - 1)
            last_write = max(i for i in range(n) if slot_of(i) == slot)  # the slot's latest content
            assert k[0, 0, p, 0].item() == 100.0 * p + last_write
        assert k[0, 0, 3, 0].item() == -1.0


@pytest.mark.parametrize("reported", [False, True])
def test_skip_masks_the_positions_that_did_not_run_the_iteration(reported):
    """The "skip" lookup (the published "full" under adaptive exit): at iteration t a query sees only the
    earlier positions that ran t, its own chunk's positions as its mask says, and no padding; other modes,
    and iterations every earlier position ran, keep the chunk's mask. (``reported``: whether the host
    recorded the iterations, which enables the shortcut for iterations all positions ran.)"""
    cache = KVCache(2, 8, 0, 1, 1, n_core=1, kv_mode=parse_kv_mode("skip", 8))
    iters = [[5, 2, 8], [3, 3, 1]]  # per sequence, the iterations of three earlier positions
    for p in range(3):
        chunk = cache.begin(torch.tensor([[True], [p > 0]]))  # sequence 1's first position is padding
        for t in range(8):
            cache.mark_iteration(chunk, t, torch.tensor([t < iters[0][p], t < iters[1][p]]))
        if reported:
            cache.record_iterations([iters[0][p], iters[1][p]], [True, p > 0])
    chunk = cache.begin(torch.ones(2, 2, dtype=torch.bool))  # a chunk of two new positions
    for t in range(8):
        mask = cache.core_mask(chunk, t)
        kept = cache._kept(chunk, t)  # (the keys' positions, in the order ``core`` returns them)
        order = kept[0] if kept is not None else torch.arange(5).expand(2, 5)
        for b in range(2):
            earlier = [p for p in range(3) if t < iters[b][p] and (b == 0 or p > 0)]
            if kept is not None:  # the kept ones first (padding after them, as the dropped ones)
                assert order[b, : len(earlier) + 2].tolist() == earlier + [3, 4], (t, b)
            for q in range(2):
                seen = [int(order[b, j]) for j in range(mask.shape[-1]) if mask[b, 0, q, j]]
                assert seen == earlier + [3, 4][: q + 1], (t, b, q)
    plain = KVCache(1, 4, 0, 1, 1, n_core=1, kv_mode=parse_kv_mode("full", 8))
    chunk = plain.begin(torch.ones(1, 1, dtype=torch.bool))
    assert plain.core_mask(chunk, 5) is chunk.mask


def test_skip_attends_over_the_kept_keys_alone_as_the_published_cache_stacks_them():
    """The published "full" / "skip" lookup stacks the entries of the positions that ran the iteration and
    attends over them alone: in a batch of one the keys are exactly those, in order (no masked key between or
    after them: attention would round otherwise), and attention equals one over them bit for bit."""
    cache = KVCache(1, 8, 0, 1, 4, n_core=1, kv_mode=parse_kv_mode("skip", 8))
    ran = [5, 2, 8, 1, 6]  # iterations of five earlier positions
    for p in range(5):
        chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
        for t in range(ran[p]):
            cache.mark_iteration(chunk, t, torch.ones(1, dtype=torch.bool))
            key = torch.full((1, 1, 1, 4), 100.0 * p + t)
            cache.core(0, key, key + 0.5, chunk, t, torch.ones(1, dtype=torch.bool))
        cache.record_iterations([ran[p]], [True])
    chunk = cache.begin(torch.ones(1, 1, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)
    for t in range(8):
        cache.mark_iteration(chunk, t, torch.ones(1, dtype=torch.bool))
        mask = cache.core_mask(chunk, t)
        k_new = torch.randn(1, 1, 1, 4, generator=g)
        k, v = cache.core(0, k_new, k_new, chunk, t, torch.ones(1, dtype=torch.bool))
        kept = [p for p in range(5) if ran[p] > t] + [5]
        assert k.shape[2] == len(kept) and bool(mask.all()), t
        assert k[0, 0, :-1, 0].tolist() == [100.0 * p + t for p in kept[:-1]] and torch.equal(
            k[0, 0, -1], k_new[0, 0, 0]
        )
        q = torch.randn(1, 1, 1, 4, generator=g)
        alone = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # the published call: the kept keys
        assert torch.equal(attention(q, k, v, mask), alone)


def test_frozen_sequences_keep_their_entries():
    cache = KVCache(2, 2, 1, 1, 1)
    chunk = cache.begin(torch.ones(2, 1, dtype=torch.bool))
    cache.plain(0, torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), chunk)
    k, _ = cache.plain(
        0, torch.full((2, 1, 1, 1), 7.0), torch.zeros(2, 1, 1, 1), chunk, active=torch.tensor([True, False])
    )
    assert k[:, 0, 0, 0].tolist() == [7.0, 1.0]
