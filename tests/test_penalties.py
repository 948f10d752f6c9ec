"""latentrt/penalties.py and min_p (latentrt/sampling.py) against their definitions: HF's logits processors
(the oracle for the published Huginn sampler's repetition_penalty and min_p, which follow HF's rules) and
OpenAI's formula for presence and frequency penalties; then through generate() and its batch rule."""

from collections import Counter

import pytest
import torch
from conftest import penalty_state, tiny_coconut, tiny_recurrent
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import latentrt
from latentrt.sampling import dropped, sampling_probs

V = 50


def penalties(ids: list[list[int]], new: list[list[int]], **options):
    return penalty_state(ids, new, V, **options)


@pytest.mark.parametrize("r", [1.3, 0.7, 3.0])
def test_repetition_penalty_is_hfs_over_the_prompt_and_the_new_tokens(r):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 3, 12)]
    new = [torch.randint(0, V, (5,), generator=g).tolist() for _ in ids]
    logits = torch.randn(3, V, generator=g) * 4
    got = penalties(ids, new, repetition_penalty=r).apply(logits)
    hf = RepetitionPenaltyLogitsProcessor(r)
    for b in range(3):
        want = hf(torch.tensor([ids[b] + new[b]]), logits[b : b + 1].clone())
        assert torch.equal(got[b : b + 1], want)


def test_the_prompts_padding_is_not_a_token_even_beside_token_zero():
    """Padding positions (right-padded here with id 0) must not mark nor unmark token 0, which the first
    prompt holds."""
    logits = torch.full((2, V), 2.0)
    got = penalties([[0, 3], [5, 6, 7]], [[], []], repetition_penalty=2.0).apply(logits)
    assert got[0, 0] == 1.0 and got[0, 3] == 1.0 and got[0, 5] == 2.0  # row 0: its tokens 0 and 3 only
    assert got[1, 0] == 2.0 and got[1, 5] == 1.0  # row 1: no token 0


def test_presence_and_frequency_penalties_are_openais_formula_over_the_new_tokens():
    g = torch.Generator().manual_seed(1)
    ids = [[1, 2, 3, 3], [4]]
    new = [torch.randint(0, 8, (9,), generator=g).tolist() for _ in ids]  # repeats
    logits = torch.randn(2, V, generator=g)
    got = penalties(ids, new, presence_penalty=0.6, frequency_penalty=-0.3).apply(logits)
    for b in range(2):
        want = logits[b].clone()
        for token, count in Counter(new[b]).items():  # the prompt does not count
            want[token] -= count * -0.3 + 0.6
        assert torch.allclose(got[b], want, atol=1e-6)


def test_logit_bias_adds_and_everything_applies_in_vllms_order():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, V + 14, generator=g)  # a head padded past the vocabulary
    bias = {3: 100.0, 7: -2.5, 0: 0.5}
    got = penalties([[3, 9]], [[9, 9]], logit_bias=bias, repetition_penalty=2.0, frequency_penalty=0.5).apply(logits)
    want = logits[:, :V].clone()
    for t, b in bias.items():
        want[0, t] += b  # the bias first, then the penalties
    want = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[3, 9, 9, 9]]), want)
    want[0, 9] -= 2 * 0.5
    assert torch.allclose(got[:, :V], want, atol=1e-6) and torch.equal(got[:, V:], logits[:, V:])


def _hf_kept(logits, temperature, top_k, top_p, min_p):
    """What HF's warpers keep, in its generate's order (temperature, top-k, top-p, min-p)."""
    x = logits.clone()
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p is not None and top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(None, x)
    return x > float("-inf")


FILTERS = [
    (1.0, None, None, 0.1),
    (0.7, 20, None, 0.05),
    (1.3, None, 0.9, 0.2),
    (0.5, 8, 0.8, 0.3),
    (1.0, None, 0.9, 0),
]
FILTERS += [(0.7, None, 0.5, 0), (1.0, 40, 0.95, 0.02), (1.0, None, 1e-8, 0)]  # (1 - 1e-8: 1 in float32)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", FILTERS)
@pytest.mark.parametrize("logits", ["continuous", "bf16 values"])
def test_the_default_filters_drop_what_hfs_warpers_drop_ties_included(temperature, top_k, top_p, min_p, logits):
    """latentrt's default top-k / top-p / min-p are HF's warpers, the kept tokens bit for bit, ties included. A
    bf16 model's logits take few values: over a 65,536-token vocabulary most top-p cuts fall inside a tie, and
    a rule that kept other ids of it (the published sampler's, or HF's formula in float64) differed from HF's
    at 90% of the steps here (34 of 900 seeded draws differed from HF's generate)."""
    g = torch.Generator().manual_seed(3)
    V = 200 if logits == "continuous" else 65536
    x = torch.randn(16 if logits == "continuous" else 4, V, generator=g) * 3
    if logits == "bf16 values":
        x = x.to(torch.bfloat16).float()
    kept = ~dropped(x, temperature, top_k, top_p, min_p)
    assert torch.equal(kept, _hf_kept(x, temperature, top_k, top_p, min_p))
    if logits == "continuous" and min_p:
        without = dropped(x, temperature, top_k, top_p, 0.0)  # (None: no filter left)
        assert kept.sum() < (x.numel() if without is None else (~without).sum())  # (min_p drops something)


@pytest.mark.parametrize("published", [False, True])
def test_a_tie_at_the_top_p_cut_keeps_each_rules_ids(published):
    """Four equal logits at top_p 0.5: HF sorts ascending and keeps the later ids of the tie, the published
    sampler sorts descending and keeps the earlier ones (its vectors in tests/test_published.py, ``samplers``);
    at min_p 1 both keep every token as likely as the likeliest."""
    equal = torch.zeros(1, 4)
    got = ~dropped(equal, 1.0, None, 0.5, 0.0, published)
    assert got[0].nonzero().flatten().tolist() == ([0, 1] if published else [2, 3])
    assert torch.equal(got, _hf_kept(equal, 1.0, None, 0.5, 0.0)) != published
    assert dropped(equal, 1.0, None, None, 0.0, published) is None  # no filter: nothing to compute
    two_best = torch.tensor([[0.0, 0.0, -1.0]])  # min_p 1: a token as likely as the likeliest stays (both rules)
    assert (~dropped(two_best, 1.0, None, 0.99, 1.0, published))[0].tolist() == [True, True, False]


def test_published_top_p_brings_the_published_top_k_with_a_top_p_only():
    """Logits a hair apart whose float32 probabilities are equal: HF's top-k (on the logits) keeps one, the
    published sampler's (on its probabilities) keeps the tie. ``published_top_p`` takes the published sampler's
    filters where there is a top-p for its rule; without one (it warns: nothing to act on) HF's."""
    x = torch.tensor([[1e-10, 0.0, 0.0, -5.0]])
    assert (~dropped(x, 1.0, 1, None, 0.0, True))[0].tolist() == [True, False, False, False]
    assert (~dropped(x, 1.0, 1, 0.999, 0.0, True))[0].tolist() == [True, True, True, False]
    assert (~dropped(x, 1.0, 1, 0.999, 0.0, False))[0].tolist() == [True, False, False, False]


def test_sampling_probs_are_the_published_float32_distribution_and_overflow_falls_back_per_row():
    """The bits torch.multinomial draws from: the published sampler's float32 softmax / zeroing / renormalising
    (top-k here; which tokens are dropped is ``dropped``'s rule), so the same generator state draws
    the same token; a row whose float32 logits / T overflow gets the float64 limit (its argmax), the others
    are untouched."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=g) * 2
    probs = torch.softmax(logits / 0.8, dim=-1)
    kth = torch.topk(probs, 7, dim=-1).values[:, -1:]
    probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    want = probs / probs.sum(-1, keepdim=True).clamp(min=1e-10)
    got = sampling_probs(logits, 0.8, top_k=7)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    a = torch.multinomial(got, 1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, torch.multinomial(want, 1, generator=torch.Generator().manual_seed(9)))
    huge = logits.clone()
    huge[1] *= 1e37  # / 1e-3 overflows float32 in this row only
    tiny = sampling_probs(huge, 1e-3)
    assert torch.isfinite(tiny).all() and tiny[1].argmax() == huge[1].argmax() and tiny[1].max() == 1
    assert torch.equal(tiny[[0, 2]], sampling_probs(huge[[0, 2]], 1e-3))


def test_generate_with_penalties_batch_equals_each_alone():
    """Each sequence's penalties see its own prompt and tokens (not the padding, not the others')."""
    model = tiny_recurrent(seed=5)
    prompts = [[5, 9, 5, 9, 5], [7, 8], [3, 3, 3, 4, 6, 2]]
    # init_scale 0: the draws are the sampler's alone (torch 2.11 and 2.13 draw trunc_normal_ states differently)
    kw = dict(max_new_tokens=8, num_steps=3, seed=14, temperature=0.9, min_p=0.05, default_stops=False, init_scale=0.0)
    for extra in (dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=2.0, logit_bias={6: 3.0})):
        batch = latentrt.generate(model, prompts, **kw, **extra)
        for i, p in enumerate(prompts):
            assert batch.tokens[i] == latentrt.generate(model, p, **dict(kw, seed=14 + i), **extra).tokens
        greedy = dict(kw, temperature=0.0)  # the penalties change the batch's answer (greedy: on any torch)
        assert (
            latentrt.generate(model, prompts, **greedy, **extra).tokens
            != latentrt.generate(model, prompts, **greedy).tokens
        )


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_greedy_token_is_the_argmax_of_its_logits_penalised_by_what_came_before(family):
    """The loop's wiring: token i is the argmax of the model's logits at i (``return_logits``: before the
    penalties) with the penalties of the prompt and tokens[:i] applied as defined (HF's repetition penalty,
    OpenAI's presence and frequency penalties, the bias)."""
    model = tiny_recurrent(seed=5) if family == "recurrent" else tiny_coconut(seed=2)
    vocab, prompt = model.config.vocab_size, [5, 6, 7, 5]
    opts = dict(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.7, logit_bias={6: 2.0, 9: -1.0})
    kw = dict(max_new_tokens=10, default_stops=False, return_logits=True)
    kw.update(num_steps=3, init_scale=0.0) if family == "recurrent" else None
    got = latentrt.generate(model, prompt, **kw, **opts)
    assert got.tokens != latentrt.generate(model, prompt, **kw).tokens
    for i, token in enumerate(got.tokens):
        x = got.logits[i : i + 1, :vocab].clone()
        for t, b in opts["logit_bias"].items():
            x[0, t] += b
        x = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + got.tokens[:i]]), x)
        for t, c in Counter(got.tokens[:i]).items():
            x[0, t] -= 0.7 * c + 0.4
        assert int(x.argmax()) == token, i


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repetition_penalty=0), r"repetition_penalty must be in \[1e-30, 1e\+30\]"),
        # float32 overflow: a sampled step met inf / NaN probabilities (torch.multinomial's RuntimeError)
        (dict(repetition_penalty=1e-300, temperature=1.0, seed=1), r"repetition_penalty must be in \[1e-30"),
        (dict(repetition_penalty=1e300), r"repetition_penalty must be in \[1e-30"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
        (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
        (dict(logit_bias={"3": 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias={3: 101}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={999: 1.0}), r"logit_bias names token ids \[999\] outside the vocabulary"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=1.2, decoding="speculative"), "repetition_penalty applies with decoding='sequential'"),
        (
            dict(min_new_tokens=1, top_k=2, presence_penalty=0.5, decoding="wavefront"),
            "presence_penalty, min_new_tokens apply",
        ),
    ],
)
def test_bad_penalties_are_clear_errors(kwargs, message):
    with pytest.raises(latentrt.InputError, match=message):
        latentrt.generate(tiny_recurrent(seed=1), [5, 6, 7], max_new_tokens=2, **kwargs)


def test_repetition_penalty_at_its_bounds_samples_finite_probabilities():
    """The extremes of the accepted range keep the penalised float32 logits finite, so a sampled step draws."""
    model = tiny_recurrent(seed=1)
    for r in (1e-30, 1e30):
        got = latentrt.generate(model, [5, 6, 7], max_new_tokens=4, repetition_penalty=r, temperature=1.0, seed=3)
        assert len(got.tokens) == 4
