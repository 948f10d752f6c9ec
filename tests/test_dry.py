"""latentrt/dry.py, the published Huginn sampler's DRY penalty: against the rule written out token by token
(as the published code evaluates it, one start at a time), then through generate(), the batch rule and the
option checks. The published sampler's own outputs with DRY are in tests/published_vectors.json
(tests/test_published.py)."""

import pytest
import torch
from conftest import penalty_state, tiny_coconut, tiny_recurrent

import latentrt
from latentrt.errors import InputError

V = 12


def dry_rule(context: list[int], multiplier: float, base: float, allowed: int, vocab: int = V) -> dict[int, float]:
    """{token: penalty} of the published rule, over the vocabulary: for each start s among the last 128
    tokens, the run of c[s + j] == c[L - 1 - j] (j < 32, s + j < L); the token after the run continues it
    with length run + 1; a token's longest continuation n (0 if none) is penalised where n >= allowed (so
    with allowed 0 every token is)."""
    L, longest = len(context), {}
    for s in range(max(0, L - 128), L - 1):
        run = 0
        while s + run < L and run < 32 and context[s + run] == context[L - 1 - run]:
            run += 1
        if run > 0 and s + run < L:
            token = context[s + run]
            longest[token] = max(longest.get(token, 0), run + 1)
    lengths = {t: longest.get(t, 0) for t in range(vocab)}
    return {t: multiplier * base ** (n - allowed) for t, n in lengths.items() if n >= allowed}


def penalised(logits: torch.Tensor, context: list[int], multiplier: float, base: float, allowed: int):
    """The published application: fp32 logits, each penalty (a Python float) subtracted in place."""
    x = logits.clone().float()
    for token, penalty in dry_rule(context, multiplier, base, allowed, len(x)).items():
        x[token] -= penalty
    return x


def state(ids: list[list[int]], new: list[list[int]], **options):
    return penalty_state(ids, new, V, **options)


@pytest.mark.parametrize(
    "multiplier, base, allowed", [(0.8, 1.75, 2), (1.3, 2.0, 1), (0.5, 1.1, 4), (2.0, 0.9, 0), (0.8, 1.75, 7)]
)
def test_dry_is_the_published_rule_on_random_sequences(multiplier, base, allowed):
    """Few distinct tokens, so patterns repeat; prompts of different lengths (padding), sequences longer than
    the 128-token window, and a run longer than the 32-token match limit."""
    g = torch.Generator().manual_seed(int(multiplier * 10) + allowed)
    changed = 0
    for lengths, n_new in (((5, 1, 17), 9), ((40, 3, 150), 30), ((2, 60), 140)):
        ids = [torch.randint(0, 3 + i, (n,), generator=g).tolist() for i, n in enumerate(lengths)]
        new = [torch.randint(0, 3 + i, (n_new,), generator=g).tolist() for i in range(len(ids))]
        if n_new >= 100:  # the end mirrors a block 60 tokens back: a run of 40, cut at the 32-token limit
            new[-1][-40:] = new[-1][-100:-60][::-1]
        logits = torch.randn(len(ids), V, generator=g) * 3
        got = state(ids, new, dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed).apply(logits)
        for b in range(len(ids)):
            want = penalised(logits[b], ids[b] + new[b], multiplier, base, allowed)
            assert torch.equal(got[b], want), (lengths, b)
        changed += int((got != logits).any(-1).sum())
        if n_new >= 100:  # (the run reached the limit: its continuation has length 33)
            assert max(dry_rule(ids[-1] + new[-1], 1.0, 2.0, 0).values()) == 2.0**33
    assert changed >= (4 if allowed < 4 else 1)  # rows the penalty changed (so the comparison can fail)


def test_an_allowed_length_past_the_longest_continuation_penalises_nothing():
    """A continuation is at most 33 long (a 32-token match, then its token): an allowed length of 33 penalises
    that one, a larger one nothing, up to values past 64 bits (an OverflowError before: found by tools.fuzz)."""
    ids, new = [[1]], [[2, 3] * 40]
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    assert max(dry_rule(ids[0] + new[0], 1.0, 2.0, 0).values()) == 2.0**33
    at_33 = state(ids, new, dry_multiplier=1.0, dry_allowed_length=33).apply(logits)
    assert torch.equal(at_33[0], penalised(logits[0], ids[0] + new[0], 1.0, 1.75, 33)) and not torch.equal(
        at_33, logits
    )
    for allowed in (34, 35, 2**63, 10**30):
        assert torch.equal(state(ids, new, dry_multiplier=1.0, dry_allowed_length=allowed).apply(logits), logits)
    model = tiny_recurrent()
    kw = dict(max_new_tokens=4, dry_multiplier=1.0, init_scale=0.0)
    assert latentrt.generate(model, [5, 6], dry_allowed_length=10**30, **kw).tokens == (
        latentrt.generate(model, [5, 6], max_new_tokens=4, init_scale=0.0).tokens
    )


def test_runs_are_counted_as_the_published_code_counts_them():
    """The published comparison runs forward from a start and backward from the end: in ``4 5 6 9 7 6 5 4``
    the start 0 (``4 5 6``, the end read backward) is a run of 3, so 9 continues it with length 4. The DRY of
    text-generation-webui / llama.cpp (the suffix matched backward) would penalise 5 (after the earlier 4)
    instead. Pinned, so a "corrected" rule fails here and in the published vectors."""
    seq = [4, 5, 6, 9, 7, 6, 5, 4]
    assert dry_rule(seq, 1.0, 2.0, 2) == {9: 4.0}
    assert (
        dry_rule([3, 5, 5, 5, 5], 1.0, 2.0, 2) == dry_rule([3, 5, 6, 5, 6, 5], 1.0, 2.0, 2) == {}
    )  # (runs to the end)
    assert dry_rule([3, 5, 6, 7, 5, 6, 7], 1.0, 2.0, 2) == {5: 1.0}  # a period of 3 is
    got = state([seq], [[]], dry_multiplier=1.0, dry_base=2.0).apply(torch.zeros(1, V))
    assert got[0, 9] == -4.0 and got[0].count_nonzero() == 1


def test_the_window_holds_the_last_128_tokens_of_each_running_row():
    """A row that stopped (``rows`` False) keeps its window; the others move on."""
    pen = state([[1, 2, 3], [4, 5]], [[]], dry_multiplier=0.8)
    pen.record(torch.tensor([1, 4]), torch.tensor([True, False]))
    assert pen.dry.window[0, -4:].tolist() == [1, 2, 3, 1] and pen.dry.window[1, -3:].tolist() == [-1, 4, 5]
    assert pen.dry.length.tolist() == [4, 2]
    for _ in range(200):
        pen.record(torch.tensor([7, 8]))
    assert pen.dry.length.tolist() == [128, 128] and set(pen.dry.window.flatten().tolist()) == {7, 8}


def test_generate_with_dry_batch_equals_each_alone():
    model = tiny_recurrent(seed=5)
    prompts = [[5, 9, 5, 9, 5], [7, 8], [3, 3, 3, 4, 6, 2]]
    # init_scale 0: no drawn state (torch 2.11 and 2.13 draw trunc_normal_ states differently)
    kw = dict(max_new_tokens=10, num_steps=3, seed=15, temperature=0.9, default_stops=False, init_scale=0.0)
    dry = dict(dry_multiplier=3.0, dry_base=2.0, dry_allowed_length=1)
    batch = latentrt.generate(model, prompts, **kw, **dry)
    for i, p in enumerate(prompts):
        assert batch.tokens[i] == latentrt.generate(model, p, **dict(kw, seed=15 + i), **dry).tokens
    greedy = dict(kw, temperature=0.0)  # DRY changes the batch's answer (greedy: no draw, on any torch)
    assert (
        latentrt.generate(model, prompts, **greedy, **dry).tokens != latentrt.generate(model, prompts, **greedy).tokens
    )


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_greedy_token_is_the_argmax_of_its_logits_less_the_dry_penalty(family):
    model = tiny_recurrent(seed=5) if family == "recurrent" else tiny_coconut(seed=2)
    vocab, prompt = model.config.vocab_size, [5, 6, 7, 5, 6]
    dry = dict(dry_multiplier=2.0, dry_base=1.5, dry_allowed_length=2)
    kw = dict(max_new_tokens=12, default_stops=False, return_logits=True)
    kw.update(num_steps=3, init_scale=0.0) if family == "recurrent" else None
    got = latentrt.generate(model, prompt, **kw, **dry)
    assert got.tokens != latentrt.generate(model, prompt, **kw).tokens
    for i, token in enumerate(got.tokens):
        x = penalised(got.logits[i, :vocab], prompt + got.tokens[:i], 2.0, 1.5, 2)
        assert int(x.argmax()) == token, i


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dry_multiplier=-0.1), "dry_multiplier must be >= 0"),
        (dict(dry_multiplier=float("nan")), "dry_multiplier must be a finite number"),
        (dict(dry_multiplier=0.8, dry_base=0), "dry_base must be > 0"),
        (dict(dry_multiplier=0.8, dry_allowed_length=1.5), "dry_allowed_length must be an integer >= 0"),
        (dict(dry_multiplier=0.8, dry_allowed_length=-1), "dry_allowed_length must be an integer >= 0"),
        (dict(dry_multiplier=0.8, repetition_penalty=1.2), "dry_multiplier and repetition_penalty are exclusive"),
        (dict(dry_multiplier=0.8, decoding="speculative"), "dry_multiplier applies with decoding='sequential'"),
    ],
)
def test_bad_dry_options_are_clear_errors(kwargs, message):
    model = tiny_recurrent(seed=5)
    with pytest.raises(InputError, match=message):
        latentrt.generate(model, [5, 6], max_new_tokens=2, num_steps=2, **kwargs)
