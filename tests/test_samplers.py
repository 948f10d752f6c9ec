"""The multi-token samplers (latentrt/decode/speculative.py, wavefront.py): what holds beyond the published
vectors (tests/test_published.py, which also runs both on the Triton backend), and their errors."""

from __future__ import annotations

import pytest
from conftest import tiny_coconut, tiny_recurrent

import latentrt
from latentrt.errors import InputError
from tools.published import PROMPT, build


@pytest.mark.parametrize("name", ["huginn-a", "huginn-b"])
def test_speculative_greedy_full_kv_equals_sequential_for_every_lookahead_and_draft_depth(name):
    """Greedy, fixed depth, full KV, no randomness: verifying a draft at num_steps computes what sequential
    decoding computes, whatever was drafted, so the tokens are sequential decoding's."""
    model = build(name)
    kw = dict(max_new_tokens=14, num_steps=6, init_scale=0.0, kv_sharing="full")
    sequential = latentrt.generate(model, PROMPT, **kw)
    rounds = set()
    for lookahead in (1, 2, 3, 8):
        for draft_steps in (1, 3, 9):
            opts = dict(lookahead=lookahead, draft_steps=draft_steps)
            got = latentrt.generate(model, PROMPT, decoding="speculative", decoding_options=opts, **kw)
            assert got.tokens == sequential.tokens, opts
            assert got.steps == [6] * len(got.tokens)
            assert 1 + sum(got.decoding["accepted"]) >= len(got.tokens)
            rounds.add(tuple(got.decoding["accepted"]))
    assert len(rounds) > 3  # the drafts were accepted to different extents


def test_speculative_drafts_fewer_at_the_end_of_the_context():
    """Up to the last position of the context: a round drafts only as many tokens as positions are left, and the
    tokens are still sequential decoding's."""
    model = build("huginn-a")
    n = model.config.block_size - len(PROMPT)
    kw = dict(max_new_tokens=n, num_steps=2, init_scale=0.0, kv_sharing="full", default_stops=False)
    sequential = latentrt.generate(model, PROMPT, **kw)
    got = latentrt.generate(model, PROMPT, decoding="speculative", decoding_options=dict(lookahead=8, draft_steps=1),
                            **kw)  # fmt: skip
    assert got.tokens == sequential.tokens and len(got.tokens) == n


def test_speculative_whole_drafts_when_the_draft_is_the_verifier():
    model = build("huginn-b")
    opts = dict(lookahead=4, draft_steps=6)
    got = latentrt.generate(model, PROMPT, max_new_tokens=13, num_steps=6, init_scale=0.0, decoding="speculative",
                            decoding_options=opts)  # fmt: skip
    assert got.decoding["accepted"] == [4, 4, 4]  # drafting at full depth: every draft verified
    assert got.decoding["tokens_per_pass"] == pytest.approx(13 / (1 + 3 * 5))


def test_speculative_acceptance_counts_the_drafts_the_verifier_took():
    """One draft a round: every round commits one token, accepted or replaced, so only ``acceptance`` tells how
    good the drafts were: all of them when drafting at the verifier's depth, fewer at one iteration."""
    model = build("huginn-b")
    kw = dict(max_new_tokens=14, num_steps=6, init_scale=0.0, kv_sharing="full", decoding="speculative")
    for draft_steps, expected in ((6, 13), (1, 3)):
        got = latentrt.generate(model, PROMPT, decoding_options=dict(lookahead=1, draft_steps=draft_steps), **kw)
        stats = got.decoding
        assert stats["accepted"] == [1] * 13 and stats["draft_passes"] == 13 and stats["verify_passes"] == 14
        assert stats["drafts_accepted"] == expected and stats["acceptance"] == expected / 13


@pytest.mark.parametrize("window, waves", [(dict(max_wavefront=3), True), ({}, False)])
def test_wavefront_statistics_count_every_step(window, waves):
    """``steps`` counts the step that committed the last token too (the caller stops reading there): each step
    runs inner_recurrence core passes after the prompt's one; tokens per step counts the prompt's pass;
    ``standing_waves`` counts the steps whose window max_wavefront cut."""
    model = build("huginn-b")
    got = latentrt.generate(model, PROMPT, max_new_tokens=10, num_steps=8, init_scale=0.0, decoding="wavefront",
                            decoding_options=dict(window, exit_t=0.01, inner_recurrence=4))  # fmt: skip
    stats = got.decoding
    assert len(got.tokens) == 10 and stats["core_passes"] == 1 + 4 * stats["steps"]
    assert stats["tokens_per_step"] == 10 / (1 + stats["steps"])
    assert (stats["standing_waves"] > 0) == waves and stats["standing_waves"] <= stats["steps"]


def test_wavefront_invariants_with_noise():
    """Random initial states and noise mixing: no published vector, but a seed reproduces it, it commits
    exactly max_new_tokens, each token's iterations are at least one step's, and the stream is the result."""
    model = build("huginn-b")
    kw = dict(max_new_tokens=9, num_steps=8, seed=3, decoding="wavefront", init_scale=1.0)
    a = latentrt.generate(model, PROMPT, **kw)
    b = latentrt.generate(model, PROMPT, **kw)
    assert (a.tokens, a.steps) == (b.tokens, b.steps) and len(a.tokens) == 9
    assert a.steps[0] == 8 and all(s >= 4 for s in a.steps[1:])
    stream = latentrt.generate(model, PROMPT, stream=True, **kw)
    assert [e.tokens for e in stream] == a.tokens and stream.result.tokens == a.tokens
    assert a.decoding["sampler"] == "wavefront" and a.decoding["steps"] >= 1


def test_wavefront_stops_at_the_first_stop_token_it_commits():
    model = build("huginn-b")
    full = latentrt.generate(model, PROMPT, max_new_tokens=10, num_steps=8, init_scale=0.0, decoding="wavefront")
    stop = full.tokens[3]
    got = latentrt.generate(model, PROMPT, max_new_tokens=10, num_steps=8, init_scale=0.0, decoding="wavefront",
                            stop=[stop])  # fmt: skip
    assert got.tokens == full.tokens[: full.tokens.index(stop) + 1] and got.finish_reasons == ["stop"]


def test_samplers_return_logits_whose_argmax_is_the_greedy_token():
    model = build("huginn-a")
    for decoding in ("speculative", "wavefront"):
        got = latentrt.generate(model, PROMPT, max_new_tokens=6, num_steps=6, init_scale=0.0, decoding=decoding,
                                return_logits=True)  # fmt: skip
        assert got.logits.shape[0] == len(got.tokens)
        assert got.logits[:, : model.config.vocab_size].argmax(-1).tolist() == got.tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decoding="beam"), "unknown decoding 'beam'"),
        (dict(decoding={"name": "beam"}), "unknown decoding {'name': 'beam'}"),
        (dict(decoding_options={"lookahead": 2}), "decoding_options need decoding="),
        (dict(decoding="speculative", decoding_options={"lookahead": 0}), "lookahead must be an integer >= 1"),
        (dict(decoding="speculative", decoding_options={"lookahed": 2}), "unknown decoding_options ['lookahed']"),
        (dict(decoding="speculative", decoding_options={"draft_steps": 0}), "draft_steps must be an integer >= 1"),
        (
            dict(decoding="speculative", decoding_options={"verification_threshold": -0.5}),
            "verification_threshold must be a number >= 0.0, got -0.5",
        ),
        (dict(decoding="wavefront", decoding_options={"ema_embeds": 1.5}), "ema_embeds must be a number in [0.0, 1.0]"),
        # the published keywords: renamed ones point to latentrt's name, unimplemented ones say why
        (
            dict(decoding="speculative", decoding_options={"lookahead_for_draft": 2}),
            "'lookahead_for_draft' (the published keyword) is decoding_options 'lookahead' here",
        ),
        (
            dict(decoding="wavefront", decoding_options={"cache_lookup_strategy": "full"}),
            "'cache_lookup_strategy' (the published keyword) is generate()'s kv_sharing here",
        ),
        (
            dict(decoding="wavefront", decoding_options={"full_prefill": False}),
            "full_prefill=False is a published option latentrt does not implement (only full_prefill=True",
        ),
        (
            dict(decoding="wavefront", decoding_options={"return_analysis_tablets": True}),
            "return_analysis_tablets=True is a published option latentrt does not implement",
        ),
        (dict(decoding="speculative", adaptive=True), "does not take adaptive=True"),
        (dict(decoding="speculative", continuous=True), "does not take continuous=True"),
        (dict(decoding="wavefront", decoding_options={"freeze_strategy": "x"}), "freeze_strategy must be one of"),
        (dict(decoding="wavefront", decoding_options={"max_wavefront": 1}), "max_wavefront must exceed headway"),
        (dict(decoding="wavefront", decoding_options=[1]), "decoding_options must be a dict"),
        (dict(decoding="wavefront", hooks=[object()]), "runs no hooks"),
    ],
)
def test_sampler_errors(kwargs, message):
    model = tiny_recurrent(seed=1)
    with pytest.raises(InputError) as err:
        latentrt.generate(model, [3, 4, 5], max_new_tokens=4, **kwargs)
    assert message in str(err.value)


def test_wavefront_takes_the_published_keywords_set_to_what_it_does():
    """full_prefill=True and the analysis tablets off are what latentrt's wavefront does: accepted, same tokens."""
    model = build("huginn-a")
    plain = latentrt.generate(model, PROMPT, max_new_tokens=6, num_steps=6, init_scale=0.0, decoding="wavefront")
    published = dict(full_prefill=True, return_analysis_tablets=False, return_full_state_tablet=False)
    got = latentrt.generate(model, PROMPT, max_new_tokens=6, num_steps=6, init_scale=0.0, decoding="wavefront",
                            decoding_options=published)  # fmt: skip
    assert got.tokens == plain.tokens and got.steps == plain.steps
    for other in (dict(full_prefill=1), dict(return_analysis_tablets=0)):  # (equal to True / False, not them)
        with pytest.raises(InputError, match="is a published option latentrt does not implement"):
            latentrt.generate(model, PROMPT, max_new_tokens=2, decoding="wavefront", decoding_options=other)


def test_decoding_options_may_be_the_samplers_options_object():
    """``decoding_options`` as the sampler's own options class runs as its dict does; another sampler's class is
    named."""
    from latentrt.decode.speculative import SpeculativeOptions
    from latentrt.decode.wavefront import WavefrontOptions

    model = build("huginn-a")
    kw = dict(max_new_tokens=6, num_steps=6, init_scale=0.0, decoding="speculative")
    given = latentrt.generate(model, PROMPT, decoding_options=dict(lookahead=3, draft_steps=2), **kw)
    typed = latentrt.generate(model, PROMPT, decoding_options=SpeculativeOptions(lookahead=3, draft_steps=2), **kw)
    assert (typed.tokens, typed.steps, typed.decoding) == (given.tokens, given.steps, given.decoding)
    with pytest.raises(InputError, match="decoding_options must be a dict, got WavefrontOptions"):
        latentrt.generate(model, PROMPT, decoding_options=WavefrontOptions(), **kw)


def test_samplers_take_one_prompt_and_only_recurrent_models():
    model = tiny_recurrent(seed=1)
    with pytest.raises(InputError, match="takes one prompt"):
        latentrt.generate(model, [[3, 4], [5, 6]], decoding="wavefront")
    with pytest.raises(InputError, match="decoding does not apply to this Coconut continuous-thought model"):
        latentrt.generate(tiny_coconut(seed=1), [3, 4], decoding="speculative")


@pytest.mark.parametrize(
    "window, prompt, steps",
    [
        (dict(freeze_strategy="fixed", headway=2, max_wavefront=3, inner_recurrence=1), [5], 8),
        (dict(freeze_strategy="fixed", continuous=True, max_wavefront=3, ema_embeds=0.0), [26, 12, 22, 22, 10], 8),
        (dict(freeze_strategy="latent-acceleration-2", headway=4, exit_t=0.3), [13, 5, 26, 7], 5),
    ],
)
def test_wavefront_options_the_published_sampler_cannot_run_are_named(window, prompt, steps):
    """Window settings where the published sampler's slicing fails (IndexError / RuntimeError, checked with
    its code) end in an InputError naming the options: latentrt raised torch's 'The size of tensor a (6)
    must match the size of tensor b (4)' at the same point."""
    model = build("huginn-a")
    kw = dict(decoding="wavefront", num_steps=steps, seed=9, default_stops=False, max_new_tokens=9)
    with pytest.raises(InputError, match=r"decoding='wavefront' cannot go on with freeze_strategy="):
        latentrt.generate(model, prompt, decoding_options=dict(window, state_noise_mixing=0.5), **kw)
    # the same freeze strategies with the published defaults run
    got = latentrt.generate(model, prompt, decoding_options=dict(freeze_strategy=window["freeze_strategy"]), **kw)
    assert len(got.tokens) == 9


def test_wavefront_acceleration_stops_where_the_published_windows_no_longer_overlap():
    """latent-acceleration-2 with a loose exit_t freezes so far ahead that the next step's window shares no
    position with the two before: the published step fails there ('The size of tensor a (2) must match the size
    of tensor b (0)', checked with its code); latentrt says so, naming the options. The criterion is the
    acceleration over the current states' norm: over the previous ones' it would freeze elsewhere and run on."""
    opts = dict(freeze_strategy="latent-acceleration-2", exit_t=1.0, inner_recurrence=2)
    with pytest.raises(InputError, match=r"the last three steps' states cover 2, 0 and 0 positions"):
        latentrt.generate(build("huginn-a"), PROMPT, max_new_tokens=10, num_steps=4, init_scale=0.0,
                          decoding="wavefront", decoding_options=opts)  # fmt: skip
