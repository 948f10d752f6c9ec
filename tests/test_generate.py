"""generate(): exactness against the published decode pattern, batching, exits, errors, streaming, hooks."""

import warnings

import pytest
import torch
from conftest import draw_norm_weights, rel_err, tiny_coconut, tiny_recurrent

import latentrt
from benchmarks.published_pattern import coconut_generate, recurrent_generate
from latentrt.errors import InputError, NonFiniteStateError, PromptError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 5]]
CRITERIA = ["latent-diff", "kl", "entropy-diff", "argmax-stability", "cosine"]


@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_adaptive_matches_published_pattern(kv, criterion):
    model = tiny_recurrent(seed=1)
    ids = torch.tensor([PROMPTS[0]])
    thr = {"argmax-stability": 3}.get(criterion)
    got = latentrt.generate(
        model,
        ids[0].tolist(),
        max_new_tokens=8,
        adaptive=True,
        num_steps=20,
        exit_criterion=criterion,
        exit_threshold=thr,
        kv_sharing=kv,
        init_scale=0.0,
    )
    want_tokens, want_steps, _ = recurrent_generate(
        model, ids, 8, 20, adaptive=True, criterion=criterion, threshold=thr, kv=kv
    )
    assert got.tokens == want_tokens
    assert got.steps == want_steps
    assert len(set(got.steps)) > 1, "the test model should exit at varied depths"


@pytest.mark.parametrize("kv", ["full", "shared"])
def test_fixed_depth_and_continuous_match_published_pattern(kv):
    model = tiny_recurrent(seed=2)
    draw_norm_weights(model, 2)  # (with the init's ones, a left-out ln_f would change nothing)
    ids = torch.tensor([PROMPTS[2]])
    # (at 2 steps the state carried from the prompt's last position still decides the first tokens: carried
    # from its first position, they differ; at 5 the loop has forgotten it)
    for continuous, num_steps in ((False, 5), (True, 5), (True, 2)):
        got = latentrt.generate(
            model, ids, max_new_tokens=6, num_steps=num_steps, kv_sharing=kv, init_scale=0.0, continuous=continuous
        )
        want, steps, _ = recurrent_generate(model, ids, 6, num_steps, kv=kv, continuous=continuous)
        assert got.tokens == [want] and got.steps == [steps]


def test_kv_bytes_modes():
    model = tiny_recurrent()
    r = {
        kv: latentrt.generate(model, PROMPTS[0], max_new_tokens=4, num_steps=6, kv_sharing=kv, init_scale=0.0)
        for kv in ("full", "ring-2", "shared")
    }
    per_pos = 2 * 32 * 4  # K+V, n_embd, fp32
    n_pos = len(PROMPTS[0]) + 3  # the last token is sampled but never run
    assert r["shared"].kv_bytes == (2 + 2 * 1) * per_pos * n_pos
    assert r["ring-2"].kv_bytes == (2 + 2 * 2) * per_pos * n_pos
    assert r["full"].kv_bytes == (2 + 2 * 6) * per_pos * n_pos
    _, _, published_bytes = recurrent_generate(model, torch.tensor([PROMPTS[0]]), 4, 6)
    assert published_bytes == r["full"].kv_bytes


@pytest.mark.parametrize("kv", ["full", "shared", "ring-2", "skip", "always-last", "anchor-2"])
@pytest.mark.parametrize("criterion", ["latent-diff", "kl", "argmax-stability"])
def test_batch_equals_single(kv, criterion):
    """(Left padding: the lookups of skip and always-last must not count the padding as a position that missed
    an iteration.)"""
    model = tiny_recurrent(seed=5)
    kw = dict(
        max_new_tokens=7,
        adaptive=True,
        num_steps=16,
        exit_criterion=criterion,
        kv_sharing=kv,
        init_scale=0.0,
        return_logits=True,
        exit_threshold={"argmax-stability": 2}.get(criterion),
    )
    batch = latentrt.generate(model, PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = latentrt.generate(model, p, **kw)
        assert batch.tokens[i] == alone.tokens
        assert batch.steps[i] == alone.steps
        assert rel_err(batch.logits[i], alone.logits) < 1e-5


def test_batch_with_stop_token_freezes_finished_sequence():
    model = tiny_recurrent(seed=5)
    first = latentrt.generate(model, PROMPTS[1], max_new_tokens=6, num_steps=4, init_scale=0.0)
    stop = first.tokens[2]
    batch = latentrt.generate(model, PROMPTS, max_new_tokens=6, num_steps=4, init_scale=0.0, stop=[stop])
    assert batch.tokens[1] == first.tokens[: first.tokens.index(stop) + 1]
    assert batch.finish_reasons[1] == "stop"
    for i in (0, 2):
        alone = latentrt.generate(model, PROMPTS[i], max_new_tokens=6, num_steps=4, init_scale=0.0, stop=[stop])
        assert batch.tokens[i] == alone.tokens


def test_full_and_shared_identical_during_prefill():
    model = tiny_recurrent(seed=6)
    a = latentrt.generate(
        model, PROMPTS, max_new_tokens=1, num_steps=5, kv_sharing="full", return_logits=True, init_scale=0.0
    )
    b = latentrt.generate(
        model, PROMPTS, max_new_tokens=1, num_steps=5, kv_sharing="shared", return_logits=True, init_scale=0.0
    )
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)


def test_deterministic_and_seeded():
    model = tiny_recurrent(seed=7)
    kw = dict(max_new_tokens=5, num_steps=4, return_logits=True)
    z1 = latentrt.generate(model, PROMPTS[0], init_scale=0.0, **kw)
    z2 = latentrt.generate(model, PROMPTS[0], init_scale=0.0, **kw)
    assert torch.equal(z1.logits, z2.logits)
    s1 = latentrt.generate(model, PROMPTS[0], seed=1, temperature=1.0, **kw)
    s2 = latentrt.generate(model, PROMPTS[0], seed=1, temperature=1.0, **kw)
    s3 = latentrt.generate(model, PROMPTS[0], seed=2, temperature=1.0, **kw)
    assert s1.tokens == s2.tokens and torch.equal(s1.logits, s2.logits)
    assert not torch.equal(s1.logits, s3.logits)  # the random initial state differs


def test_sampling_filters():
    model = tiny_recurrent(seed=7)
    greedy = latentrt.generate(model, PROMPTS[0], max_new_tokens=6, num_steps=3, init_scale=0.0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        got = latentrt.generate(
            model, PROMPTS[0], max_new_tokens=6, num_steps=3, init_scale=0.0, temperature=0.8, seed=3, **kw
        )
        assert got.tokens == greedy.tokens
    # top_k=0 is no top-k (HF's generate and the published sampler's ``if top_k:``); it was refused
    sampled = dict(max_new_tokens=6, num_steps=3, init_scale=0.0, temperature=1.5, seed=3)
    plain = latentrt.generate(model, PROMPTS[0], **sampled).tokens
    assert latentrt.generate(model, PROMPTS[0], top_k=0, **sampled).tokens == plain
    assert latentrt.generate(model, PROMPTS[0], top_k=2, **sampled).tokens != plain
    with pytest.raises(InputError, match="top_k must be an integer >= 0, got -1"):
        latentrt.generate(model, PROMPTS[0], top_k=-1, **sampled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sync_free_draw_is_torch_multinomials_draw(dtype):
    """sampling.draw (no host read) picks what torch.multinomial(probs, 1) picks from a generator in the same
    state, draw after draw: widths, zeroed tokens (top-k / top-p), one-hot rows, near-ties; both leave the
    generator in the same state."""
    from latentrt.sampling import draw

    for seed in range(120):
        g = torch.Generator().manual_seed(seed)
        rows, vocab = 1 + seed % 4, [2, 7, 50, 1000, 50257][seed % 5]
        logits = torch.randn(rows, vocab, generator=g, dtype=dtype) * (1 + seed % 3)
        if seed % 7 == 0:
            logits[:, vocab // 2 :] = float("-inf")
        if seed % 9 == 0:
            logits = logits.round(decimals=1)  # ties
        probs = torch.softmax(logits, -1)
        if seed % 11 == 0:
            probs[0] = 0
            probs[0, min(3, vocab - 1)] = 1
        ours, theirs = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
        for _ in range(3):
            assert torch.equal(draw(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0]), seed
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_a_seeded_batch_row_draws_from_the_distribution_of_the_row_alone(monkeypatch):
    """Batch = single under randomness (sampling.py): a seeded batch's row i draws from exactly the
    distribution generate(row alone, seed=s + i) draws from. At a real vocabulary torch sums a row in another
    order alone than beside other rows (on this CPU with 2 threads it did: a batch's distribution differed in
    its last bits), so each row's distribution is computed on the row alone."""
    from latentrt import sampling

    seen = []
    real = sampling.draw
    monkeypatch.setattr(sampling, "draw", lambda probs, g=None: seen.append(probs.clone()) or real(probs, g))
    logits = torch.randn(5, 50257, generator=torch.Generator().manual_seed(0)) * 4
    for settings in [dict(temperature=0.8, top_k=20), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7)]:
        seen.clear()
        batch = sampling.sample(logits, rng=sampling.SequenceRNG(3, 5, torch.device("cpu")), **settings)
        alone = [
            sampling.sample(logits[i : i + 1], rng=sampling.SequenceRNG(3 + i, 1, torch.device("cpu")), **settings)
            for i in range(5)
        ]
        assert len(seen) == 10 and all(torch.equal(seen[i], seen[5 + i]) for i in range(5)), settings
        assert batch.tolist() == [t.item() for t in alone]


def test_exit_thresholds_and_min_steps():
    model = tiny_recurrent(seed=8)
    zero_start = dict(max_new_tokens=4, adaptive=True, num_steps=12, init_scale=0.0)
    for crit in ("latent-diff", "kl", "entropy-diff", "cosine"):
        # cosine against a zero initial state is NaN (published: no epsilon), never met: a random one here
        base = dict(zero_start, init_scale=1.0, seed=0) if crit == "cosine" else zero_start
        never = latentrt.generate(model, PROMPTS[0], exit_criterion=crit, exit_threshold=0.0, **base)
        assert never.steps == [12] * 4
        always = latentrt.generate(model, PROMPTS[0], exit_criterion=crit, exit_threshold=1e9, **base)
        assert always.steps == [1] * 4
        # no check before min_steps iterations: the first check (always met here) follows iteration 6
        floor = latentrt.generate(model, PROMPTS[0], exit_criterion=crit, exit_threshold=1e9, min_steps=5, **base)
        assert floor.steps == [6] * 4
        every = dict(base, exit_threshold=1e9, min_steps=2, check_criterion_every_n_steps=4)
        assert latentrt.generate(model, PROMPTS[0], exit_criterion=crit, **every).steps == [3] * 4
        never_checks = latentrt.generate(
            model, PROMPTS[0], exit_criterion=crit, exit_threshold=1e9, min_steps=12, **base
        )
        assert never_checks.steps == [12] * 4
        # above num_steps too, as the published loop runs it (it was an error): said so, the same tokens
        with pytest.warns(UserWarning, match="min_steps=13 exceeds num_steps=12: the exit test never runs"):
            above = latentrt.generate(model, PROMPTS[0], exit_criterion=crit, exit_threshold=1e9, min_steps=13, **base)
        assert (above.tokens, above.steps) == (never_checks.tokens, never_checks.steps)
    none = latentrt.generate(model, PROMPTS[0], exit_criterion="none", **zero_start)
    assert none.steps == [12] * 4
    stab = latentrt.generate(model, PROMPTS[0], exit_criterion="argmax-stability", exit_threshold=1, **zero_start)
    assert all(s >= 2 for s in stab.steps)
    with pytest.warns(UserWarning, match="exit_criterion, exit_threshold act only on the adaptive exit"):
        fixed = latentrt.generate(
            model, PROMPTS[0], max_new_tokens=4, num_steps=7, exit_criterion="latent-diff", exit_threshold=1e9
        )
    assert fixed.steps == [7] * 4  # not adaptive: the criterion is ignored, and said so (it was silent)
    with pytest.warns(UserWarning, match="^min_steps acts only on the adaptive exit: .* and it is unused"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=1, num_steps=7, min_steps=2)
    # without adaptive=True, min_steps above num_steps is unused (one warning), not "exceeds"; with it, the
    # adaptive-only options and min_steps up to num_steps say nothing
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        latentrt.generate(model, PROMPTS[0], max_new_tokens=1, num_steps=7, min_steps=9)
    assert [str(w.message).split(":")[0] for w in said] == ["min_steps acts only on the adaptive exit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive = dict(adaptive=True, exit_criterion="kl", exit_threshold=0.1, check_criterion_every_n_steps=2)
        latentrt.generate(model, PROMPTS[0], max_new_tokens=1, num_steps=7, min_steps=7, **adaptive)
        latentrt.generate(model, PROMPTS[0], max_new_tokens=1, num_steps=7, do_not_exit_in_prefill=True, **adaptive)


def test_sampling_and_dry_options_given_where_they_do_nothing_are_said_to():
    """top_k / top_p / min_p given with temperature 0 (greedy), dry_base / dry_allowed_length without
    dry_multiplier: a warning naming them (HF warns of top_p without do_sample), the tokens unchanged; values
    at their neutral setting, or where they act, say nothing."""
    model = latentrt.load("builtin:recurrent")
    greedy = latentrt.generate(model, "Alex is", max_new_tokens=3, init_scale=0.0)
    for given, message in (
        (dict(top_p=0.9), r"^top_p acts only when sampling \(temperature > 0\); with temperature=0 it is unused"),
        (dict(top_k=3, min_p=0.1), "^top_k, min_p act only when sampling .* they are unused"),
        (dict(options=latentrt.GenerateOptions(top_k=3)), "^top_k acts only when sampling"),
        (dict(dry_base=2.0), r"^dry_base acts only with DRY \(dry_multiplier > 0\); without it it is unused"),
        (dict(dry_allowed_length=3, dry_base=1.5), "^dry_base, dry_allowed_length act only with DRY"),
    ):
        with pytest.warns(UserWarning, match=message):
            out = latentrt.generate(model, "Alex is", max_new_tokens=3, init_scale=0.0, **given)
        assert out.tokens == greedy.tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in (dict(top_p=1.0), dict(top_k=3, temperature=0.5, seed=1), dict(dry_base=2, dry_multiplier=0.5)):
            latentrt.generate(model, "Alex is", max_new_tokens=3, init_scale=0.0, **quiet)
        for invalid in (dict(top_p=1.5), dict(top_k=-2), dict(dry_base=-1.0)):  # their error alone, no warning first
            with pytest.raises(InputError, match=next(iter(invalid))):
                latentrt.generate(model, "Alex is", max_new_tokens=3, init_scale=0.0, **invalid)


def test_streaming_equals_result():
    model = tiny_recurrent(seed=9)
    kw = dict(max_new_tokens=6, adaptive=True, num_steps=10, exit_criterion="latent-diff", init_scale=0.0)
    want = latentrt.generate(model, "every cat is a dog", **kw)
    stream = latentrt.generate(model, "every cat is a dog", stream=True, **kw)
    events = list(stream)
    assert [e.tokens for e in events] == want.tokens
    assert [e.steps for e in events] == want.steps
    assert "".join(e.text for e in events).strip() == want.text.strip()
    assert stream.result.tokens == want.tokens
    batch = list(latentrt.generate(model, ["every cat", "Tom is"], stream=True, **kw))
    assert all(isinstance(e.tokens, list) and len(e.tokens) == 2 for e in batch)


def test_a_stop_token_that_is_not_kept_streams_neither_a_token_nor_a_text():
    """Coconut's published_eos ends a sequence at a stop token it does not keep (after its first token): that
    position's event has no token and no text for it (None, as a finished sequence's), and the pieces add up
    to the result's text."""
    model = tiny_coconut()
    kw = dict(max_new_tokens=4, published_eos=True, stop=[12])
    want = latentrt.generate(model, [[5, 6, 7], [8, 9]], **kw)
    events = list(latentrt.generate(model, [[5, 6, 7], [8, 9]], stream=True, **kw))
    assert want.finish_reasons == ["stop", "stop"] and [len(t) for t in want.tokens] == [1, 1]
    assert [(e.tokens, e.text) for e in events[1:]] == [([None, None], [None, None])]
    assert ["".join(e.text[b] or "" for e in events) for b in range(2)] == want.text


def test_generation_stops_computing_once_every_sequence_has_stopped(monkeypatch):
    """Once every sequence of a batch has stopped (a stop token, a stop string), no further token is computed:
    the decoder is asked for exactly one next token per position some sequence still needs."""
    from latentrt.decode.recurrent import RecurrentDecoder

    model = latentrt.load("builtin:recurrent")
    prompts = ["Alex is a wumpus. Is Alex a wumpus or rompus?", "Bob is a zumpus. Is Bob a zumpus or rompus?"]
    kw = dict(max_new_tokens=12, num_steps=4, init_scale=0.0, default_stops=False)
    base = latentrt.generate(model, prompts, **kw)
    stops = [base.tokens[0][2], base.tokens[1][3]]  # each sequence's stop, at its 3rd or its 4th token
    calls = []
    real = RecurrentDecoder.next_token
    monkeypatch.setattr(RecurrentDecoder, "next_token", lambda self, *a: calls.append(1) or real(self, *a))
    got = latentrt.generate(model, prompts, stop=stops, **kw)
    ends = [min(seq.index(s) for s in stops if s in seq) + 1 for seq in base.tokens]  # either stop ends either
    assert got.finish_reasons == ["stop", "stop"] and [len(t) for t in got.tokens] == ends
    assert len(calls) == max(ends) - 1 < kw["max_new_tokens"] - 1
    calls.clear()
    text = latentrt.generate(model, prompts[0], stop=[base.text[0][-3:]], **kw)  # a string: the same
    assert text.finish_reasons == ["stop"] and len(calls) == len(text.tokens) - 1


def test_hooks_observe_and_replace():
    model = tiny_recurrent(seed=10)
    seen = []
    latentrt.generate(
        model,
        PROMPTS[0],
        max_new_tokens=3,
        num_steps=4,
        init_scale=0.0,
        hooks=lambda ev: seen.append((ev.kind, ev.token_index, ev.step, tuple(ev.state.shape))),
    )
    assert [s[:3] for s in seen] == [("recurrence", t, i) for t in range(3) for i in range(4)]
    assert seen[0][3] == (1, 7, 32) and seen[-1][3] == (1, 1, 32)
    base = latentrt.generate(model, PROMPTS[0], max_new_tokens=3, num_steps=4, init_scale=0.0, return_logits=True)
    steered = latentrt.generate(
        model,
        PROMPTS[0],
        max_new_tokens=3,
        num_steps=4,
        init_scale=0.0,
        return_logits=True,
        hooks=lambda ev: ev.state * 0.5,
    )
    assert not torch.allclose(base.logits, steered.logits)
    # adaptive: a token's hooks are called for the iterations some sequence runs, not up to num_steps
    seen.clear()
    kw = dict(max_new_tokens=6, adaptive=True, num_steps=20, exit_criterion="latent-diff", init_scale=0.0)
    hooked = latentrt.generate(model, PROMPTS[0], hooks=lambda ev: seen.append(ev.token_index), **kw)
    calls = [seen.count(t) for t in range(1, 6)]  # (token 0's are the prompt's)
    assert calls == hooked.steps[1:] and max(calls) < 20
    with pytest.raises(InputError, match="hook returned"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=2, hooks=lambda ev: torch.zeros(3))
    with pytest.raises(InputError, match="hook returned a torch.int64 tensor .* expected a floating-point tensor"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=2, hooks=lambda ev: ev.state.long())  # not truncated


def test_hooks_chain_in_order_and_cannot_change_who_runs():
    """Hooks given as a tuple run in order, each seeing the state the one before returned; a hook that writes
    into the mask it was given changes nothing (it gets a copy); a replacement in another dtype is cast to the
    state's before the next hook sees it, one on another device or a non-callable hook is refused by name."""
    model = tiny_recurrent(seed=10)
    kw = dict(max_new_tokens=3, num_steps=4, init_scale=0.0, return_logits=True)
    base = latentrt.generate(model, PROMPTS[:2], **kw)
    halved = latentrt.generate(model, PROMPTS[:2], hooks=lambda ev: ev.state * 0.5, **kw)
    seen = []

    def double(ev):
        return ev.state.double() * 2

    def record(ev):
        seen.append(ev.state.dtype)
        return ev.state * 0.25

    chained = latentrt.generate(model, PROMPTS[:2], hooks=(double, record), **kw)
    assert chained.tokens == halved.tokens
    assert all(torch.allclose(a, b) for a, b in zip(chained.logits, halved.logits))
    assert set(seen) == {torch.float32}  # the second hook saw the first one's replacement, cast

    def blindfold(ev):
        ev.active.fill_(False)

    blind = latentrt.generate(model, PROMPTS[:2], hooks=blindfold, **kw)
    assert blind.tokens == base.tokens and blind.steps == base.steps
    assert all(torch.equal(a, b) for a, b in zip(blind.logits, base.logits))
    with pytest.raises(InputError, match="hook returned a torch.float32 tensor .* on meta; expected .* on cpu"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=2, hooks=lambda ev: ev.state.to("meta"))
    with pytest.raises(InputError, match="hooks must be callables taking a LatentEvent, got int"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=2, hooks=[record, 3])
    with pytest.raises(InputError, match="hooks must be a callable or a list of callables, got str"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=2, hooks="record")


def test_hooks_see_a_frozen_sequence_keep_its_state():
    """After a sequence exits, the events of the iterations the others still run show its row as the state it
    keeps (what it held at its exit, the hook's replacement included), on every backend
    (tests/test_triton_backend.py compares them), not the iteration a backend may have computed there."""
    model = tiny_recurrent(seed=5)
    kw = dict(max_new_tokens=3, num_steps=8, adaptive=True, exit_criterion="kl", exit_threshold=0.05, seed=3)
    events = []

    def hook(ev):
        events.append((ev.token_index, ev.active.clone(), ev.state.clone()))
        return ev.state * 0.9

    latentrt.generate(model, PROMPTS, hooks=hook, **kw)
    frozen_seen, kept = 0, {}
    for token, active, state in events:
        for r in range(len(active)):
            if active[r]:  # the hook's replacement is what the sequence goes on from
                kept[token, r] = state[r] * 0.9
            else:
                assert torch.equal(state[r], kept[token, r]), (token, r)
                frozen_seen += 1
    assert frozen_seen > 0


def test_coconut_hooks_see_each_thought():
    """A thought event per thought column; in a batch, a row whose token at that column is not a thought shows
    the input it runs there (its token's embedding and position), not a thought it does not take."""
    model = tiny_coconut(seed=1)
    seen = []
    latentrt.generate(model, [5, 6], num_thoughts=3, max_new_tokens=2, hooks=lambda ev: seen.append((ev.kind, ev.step)))
    assert seen == [("thought", 0), ("thought", 1), ("thought", 2)]
    events = []
    hook = lambda ev: events.append((ev.active.tolist(), ev.state.clone()))  # noqa: E731
    # left-padded: [5 6 S L L L E] and [. 7 8 9 S L E]; at the first thought column the second row runs token 9
    latentrt.generate(model, [[5, 6, 2, 4, 4, 4, 3], [7, 8, 9, 2, 4, 3]], max_new_tokens=1, hooks=hook)
    active, state = events[0]
    assert active == [True, False] and [a for a, _ in events] == [[True, False], [True, False], [True, True]]
    t = model.transformer
    with torch.no_grad():
        assert torch.equal(state[1, 0], t.wte.weight[9] + t.wpe.weight[2])


def test_a_text_prompt_keeps_the_tokenizers_bos_and_not_an_appended_eos():
    """A tokenizer whose post-processor wraps text in BOS ... EOS (as Huginn-0125's, whose card strips the
    last token with [:, :-1]): a text prompt keeps the BOS and ends where its text ends, in generate() and in
    the evaluation prompts; a special token written in the text stays."""
    from tokenizers import Tokenizer, processors

    from latentrt.decode.base import Decoder

    model = latentrt.load("builtin:recurrent")
    plain = model.tokenizer
    wrapped = Tokenizer.from_str(plain.to_str())
    bos, eos = plain.token_to_id("<|pad|>"), plain.token_to_id("<|endoftext|>")
    wrapped.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A <|endoftext|>", special_tokens=[("<|pad|>", bos), ("<|endoftext|>", eos)]
    )
    text = "Alex is a wumpus. Is Alex a zumpus?"
    ids = plain.encode(text).ids
    assert wrapped.encode(text).ids == [bos, *ids, eos]
    kw = dict(max_new_tokens=4, num_steps=4, init_scale=0.0)
    want = latentrt.generate(model, [bos, *ids], **kw)
    model.tokenizer = wrapped
    with warnings.catch_warnings():  # the BOS is this vocabulary's unknown token: not a word of the text
        warnings.simplefilter("error", latentrt.UnknownWordsWarning)
        assert latentrt.generate(model, text, **kw).tokens == want.tokens
    assert Decoder.eval_prompt(model, text, "plain") == [bos, *ids]
    assert latentrt.prompts.encode_text(wrapped, [text + " <|endoftext|>"])[0] == [bos, *ids, eos]


def test_bad_inputs_give_clear_errors():
    model = tiny_recurrent()
    cases = [
        (dict(num_steps=0), r"num_steps must be an integer in \[1, 2\*\*31 - 1\], got 0"),
        (dict(exit_criterion="entropy"), "unknown exit criterion 'entropy'"),
        (dict(exit_criterion=["kl"]), r"unknown exit criterion \['kl'\]"),  # a JSON list: not a TypeError
        (dict(adaptive=True, exit_threshold=-0.1), "exit_threshold must be >= 0"),
        (dict(adaptive=True, exit_threshold=float("nan")), "finite"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=200), r"exceeds the model's context \(block_size=\d+\)"),
        (dict(kv_sharing="half"), "kv_sharing"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_thoughts=2), "Coconut"),
        (dict(stop=[""]), "stop strings must not be empty"),
        # (a JSON body's "\ud800": no decoded text holds it, so it stopped nothing, silently; found by tools.fuzz)
        (
            dict(stop=["ok", "\ud800"]),
            r"stop string '\\ud800' is not valid Unicode text \(surrogates not allowed at 0\)",
        ),
        (dict(stop=[model.config.vocab_size]), rf"stop token id {model.config.vocab_size} is not in the vocabulary"),
        (dict(stop=[-1]), "stop token id -1 is not in the vocabulary"),
        (dict(seed=2**63, temperature=1.0), r"seed must be in \[0, 2\*\*63 - 1\], got 9223372036854775808"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(InputError, match=msg):
            latentrt.generate(model, PROMPTS[0], **kwargs)
    with pytest.raises(InputError, match="longer than the model's context"):
        latentrt.generate(model, list(range(5, 35)) * 4)
    top_seed = latentrt.generate(model, PROMPTS[0], seed=2**63 - 1, temperature=1.0, max_new_tokens=3, num_steps=2)
    assert (
        top_seed.tokens
        == latentrt.generate(model, PROMPTS[0], seed=2**63 - 1, temperature=1.0, max_new_tokens=3, num_steps=2).tokens
    )
    # the bound: a prompt and its new tokens fill the context exactly, one more does not fit
    block = model.config.block_size
    assert len(latentrt.generate(model, [5] * (block - 1), max_new_tokens=1, num_steps=1).tokens) == 1
    with pytest.raises(
        InputError, match=rf"prompt \({block - 1} tokens\) \+ max_new_tokens \(2\) = {block + 1} exceeds"
    ):
        latentrt.generate(model, [5] * (block - 1), max_new_tokens=2, num_steps=1)
    with pytest.raises(InputError, match="longer than the model's context"):
        model.logits(torch.ones(1, 97, dtype=torch.long))
    # each family's context as its config.json names it (a GPT-2's was called block_size)
    coconut = tiny_coconut()
    n_positions = coconut.config.n_positions
    with pytest.raises(InputError, match=rf"exceeds the model's context \(n_positions={n_positions}\)"):
        latentrt.generate(coconut, [5, 6], max_new_tokens=n_positions)
    with pytest.raises(InputError, match=rf"longer than the model's context \(n_positions={n_positions}\)"):
        coconut.logits(torch.ones(1, n_positions + 1, dtype=torch.long))
    with pytest.raises(InputError, match="out of range"):
        latentrt.generate(model, [5, 400])
    with pytest.raises(InputError, match="prompt must be"):
        latentrt.generate(model, 3.5)
    with pytest.raises(InputError, match="empty prompt"):
        latentrt.generate(model, ["every", ""])
    with pytest.raises(InputError, match="empty prompt: got an empty list"):
        latentrt.generate(model, [])
    with pytest.raises(InputError, match=r"prompt is a conversation .* latentrt.apply_chat_template"):
        latentrt.generate(model, [{"role": "user", "content": "every cat"}])  # vLLM's LLM.chat, not generate
    with pytest.raises(InputError, match="num_steps"):
        model.logits(torch.tensor([[5, 6]]), num_steps=-2)


def test_non_finite_latent_state_is_an_error_and_corrupts_nothing():
    model = tiny_recurrent(seed=11)
    before = latentrt.generate(model, PROMPTS[0], max_new_tokens=3, num_steps=3, init_scale=0.0)
    with pytest.raises(NonFiniteStateError, match="init_state"):
        model.logits(torch.tensor([PROMPTS[0]]), init_state=torch.full((1, 7, 32), float("nan")))
    w = model.transformer.core_block[0].mlp.proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match="non-finite latent state in the prompt in sequence"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=3, num_steps=3)
    with torch.no_grad():
        w.copy_(saved)
    after = latentrt.generate(model, PROMPTS[0], max_new_tokens=3, num_steps=3, init_scale=0.0)
    assert after.tokens == before.tokens


def test_nan_from_a_hook_names_the_token():
    model = tiny_recurrent(seed=11)

    def poison(ev):
        return ev.state * float("nan") if ev.token_index == 2 else None

    with pytest.raises(NonFiniteStateError, match="at new token 2"):
        latentrt.generate(model, PROMPTS[0], max_new_tokens=4, num_steps=3, hooks=poison)
    # sampling too: the draw from NaN logits failed first, with torch.multinomial's RuntimeError (a device-side
    # assert on CUDA), before the token's one host read saw the non-finite flag
    for kw in (dict(temperature=1.0), dict(temperature=0.7, seed=4, top_k=5, top_p=0.5)):
        with pytest.raises(NonFiniteStateError, match="at new token 2"):
            latentrt.generate(model, PROMPTS, max_new_tokens=4, num_steps=3, hooks=poison, **kw)
    probs = latentrt.sampling.sampling_probs(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), 1.0)
    assert torch.equal(probs[0], torch.tensor([0.5, 0.5]))  # a NaN row: uniform (its token is discarded)
    assert torch.allclose(probs[1], torch.tensor([0.0, 1.0]).softmax(-1))  # a finite row: its distribution
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[inf, 1.0], [-inf, -inf], [nan, nan], [0.0, 1.0]])
    probs = latentrt.sampling.sampling_probs(rows, 1.0)
    assert torch.equal(probs[:3], torch.full((3, 2), 0.5))  # an inf logit, every token impossible, all NaN
    assert torch.equal(probs[3], torch.tensor([0.0, 1.0]).softmax(-1))
    tiny = latentrt.sampling.sampling_probs(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), 1e-45)  # float32 overflows
    assert torch.equal(tiny, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # the float64 limit: the argmax


def test_coconut_generate_matches_published_pattern():
    model = tiny_coconut(seed=3)
    ids = torch.tensor([[5, 6, 7, 2, 4, 4, 4, 3]])
    got = latentrt.generate(model, ids, max_new_tokens=6)
    assert got.tokens == [coconut_generate(model, ids, 6)]
    assert got.num_thoughts == [3]  # a [1, S] tensor is a batch of one
    appended = latentrt.generate(model, [5, 6, 7], num_thoughts=3, max_new_tokens=6)
    assert appended.tokens == got.tokens[0]


def test_coconut_published_recompute_runs_each_later_answer_token_over_the_whole_sequence():
    """``published_recompute``: each answer token after the first from the sequence's input embeddings (the
    prompt's, a thought's the hidden state before it, then the answer's tokens') run whole, from scratch, as
    Coconut's generate runs it (tests/test_published.py: a bf16 case where the cached pass gives another token);
    the first token's logits are the prompt's passes' as before; a batch's rows each as alone; the published
    pattern's tokens (fp32: the cached default's too)."""
    model = tiny_coconut(seed=3)
    ids = [5, 6, 7, 2, 4, 4, 4, 3]
    got = latentrt.generate(model, ids, max_new_tokens=6, published_recompute=True, return_logits=True)
    cached = latentrt.generate(model, ids, max_new_tokens=6, return_logits=True)
    assert got.tokens == cached.tokens == coconut_generate(model, torch.tensor([ids]), 6)
    assert torch.equal(got.logits[0], cached.logits[0])
    assert not torch.equal(got.logits[1:], cached.logits[1:]) and rel_err(got.logits, cached.logits) < 1e-5
    # the passes themselves: the prompt's input embeddings (thoughts: the hidden state before), then the answer's
    with torch.no_grad():
        x = torch.tensor([ids])
        logits, inputs, _ = model.run_prompt(x, torch.ones_like(x, dtype=torch.bool), model.new_cache(1, len(ids)))
        # the input embeddings the prompt ran with (the published forward's inputs_embeds): the tokens', a
        # thought's the hidden state before it, so one pass over them all gives the multipass prompt's logits
        assert torch.equal(inputs[0, :4], model.embed(x)[0, :4]) and torch.equal(inputs[0, 7], model.embed(x)[0, 7])
        assert not torch.equal(inputs[0, 4:7], model.embed(x)[0, 4:7])
        assert rel_err(model.lm_logits(model.pass_whole(inputs)), logits) < 1e-5
        embeds = inputs[0]
        for t in range(1, 6):
            embeds = torch.cat([embeds, model.embed(torch.tensor([got.tokens[t - 1]]))])
            assert torch.equal(got.logits[t], model.lm_logits(model.pass_whole(embeds[None]))[0, -1]), t
    prompts = [[5, 6, 7, 2, 4, 4, 3, 9], [8, 2, 4, 3], [5, 6, 7, 8, 9, 10, 2, 4, 4, 4, 3]]
    batch = latentrt.generate(model, prompts, max_new_tokens=5, published_recompute=True, return_logits=True)
    for i, p in enumerate(prompts):
        alone = latentrt.generate(model, p, max_new_tokens=5, published_recompute=True, return_logits=True)
        assert batch.tokens[i] == alone.tokens and rel_err(batch.logits[i], alone.logits) < 1e-5
    with pytest.raises(InputError, match="published_recompute runs the published generate's passes, which take no"):
        latentrt.generate(model, ids, published_recompute=True, hooks=lambda ev: None)
    with pytest.raises(InputError, match="published_recompute does not apply to this recurrent-depth model"):
        latentrt.generate(tiny_recurrent(), [5, 6], published_recompute=True)


def test_coconut_batch_equals_single():
    model = tiny_coconut(seed=4)
    prompts = [[5, 6, 7, 2, 4, 4, 3, 9], [8, 2, 4, 3], [5, 6, 7, 8, 9, 10, 2, 4, 4, 4, 3]]
    batch = latentrt.generate(model, prompts, max_new_tokens=5, return_logits=True)
    for i, p in enumerate(prompts):
        alone = latentrt.generate(model, p, max_new_tokens=5, return_logits=True)
        assert batch.tokens[i] == alone.tokens
        assert rel_err(batch.logits[i], alone.logits) < 1e-5


def test_coconut_marker_errors():
    model = tiny_coconut()
    for prompt, msg in [
        ([5, 2, 4, 4], "without a matching end"),
        ([5, 6, 3], "without a start"),
        ([5, 4, 6], "outside start/end"),
        ([2, 2, 4, 3, 3], "nested"),
    ]:
        with pytest.raises(PromptError, match=msg) as info:
            latentrt.generate(model, prompt, max_new_tokens=2)
        assert not str(info.value).startswith("sequence")  # one prompt: no sequence to name
        with pytest.raises(InputError, match=msg):
            model.logits(torch.tensor([prompt]))
        # checked before any work: a stream raises when it is asked for, not at its first token (the server's
        # engine validates a request the same way, so bad markers are its 400, not a failed step's 500)
        with pytest.raises(PromptError, match=msg):
            latentrt.generate(model, prompt, max_new_tokens=2, stream=True)
        # a batch names the sequence; a single prompt is the only one
        with pytest.raises(PromptError, match=f"^sequence 1: .*{msg}"):
            latentrt.generate(model, [[5, 6, 7], prompt], max_new_tokens=2)
    with pytest.raises(InputError, match="recurrent-depth") as info:
        latentrt.generate(model, [5, 6], adaptive=True)
    assert not isinstance(info.value, PromptError)  # the options' error, whatever the prompt


def test_min_new_tokens_holds_back_every_stop():
    """``min_new_tokens`` (HF's; vLLM's ``min_tokens``): before it a stop token is never chosen (token i < m
    is the argmax of its logits without the stop ids) and no stop string ends the sequence (one completed
    then is not looked for again, as vLLM); from it on, the first stop ends it, in a batch each on its own."""
    model = latentrt.load("builtin:recurrent")
    prompt = "Alex is a wumpus. Every wumpus is a yumpus. Is Alex a yumpus or rompus?"
    eos, V = model.eos_token_id, model.config.vocab_size
    base = latentrt.generate(model, prompt, max_new_tokens=16)
    assert base.tokens[-1] == eos and len(base.tokens) < 10
    m = len(base.tokens) + 2
    r = latentrt.generate(model, prompt, max_new_tokens=24, min_new_tokens=m, return_logits=True)
    assert eos not in r.tokens[:m] and r.tokens[-1] == eos and r.finish_reasons == ["stop"]
    for i, token in enumerate(r.tokens):
        logits = r.logits[i, :V].clone()
        if i < m:
            logits[eos] = float("-inf")
        assert int(logits.argmax()) == token, i
    seeded = latentrt.generate(model, prompt, max_new_tokens=16, seed=0)
    L = len(seeded.tokens)  # its eos is token L - 1: min_new_tokens=L holds it back, the m-th token included
    held = latentrt.generate(model, prompt, max_new_tokens=16, min_new_tokens=L, seed=0)
    assert seeded.tokens[-1] == eos and held.tokens[: L - 1] == seeded.tokens[: L - 1] and held.tokens[L - 1] != eos
    stop = "rompus"
    kw = dict(max_new_tokens=24, min_new_tokens=6, default_stops=False)
    free = latentrt.generate(model, prompt, **kw)
    texts = [model.tokenizer.decode(free.tokens[:n], skip_special_tokens=True) for n in range(len(free.tokens) + 1)]
    n, at = next(  # the first token from the 6th on whose text completes the string
        (n, texts[n].find(stop, max(0, len(texts[n - 1]) - len(stop) + 1)))
        for n in range(6, len(texts))
        if stop in texts[n][max(0, len(texts[n - 1]) - len(stop) + 1) :]
    )
    assert stop in texts[5]  # (completed before the 6th token: not a stop)
    first = next(n for n in range(1, len(texts)) if stop in texts[n])  # the token that completes it first
    exact = latentrt.generate(model, prompt, stop=[stop], **dict(kw, min_new_tokens=first))
    assert (exact.tokens, exact.finish_reasons) == (free.tokens[:first], ["stop"])  # the m-th token may stop
    got = latentrt.generate(model, prompt, stop=[stop], **kw)
    assert (got.tokens, got.text, got.finish_reasons) == (free.tokens[:n], texts[n][:at], ["stop"])
    # each string is looked for where it can end in the new text: a longer one beside it changes nothing (the
    # search back by the longest string's length found the held "rompus" again at the 6th token)
    longer = latentrt.generate(model, prompt, stop=[stop, "a string the model never writes"], **kw)
    assert (longer.tokens, longer.text) == (got.tokens, got.text)
    streamed = latentrt.generate(model, prompt, stop=[stop], stream=True, **kw)
    assert "".join(e.text or "" for e in streamed) == got.text
    other = "Bob is a zumpus. Is Bob a zumpus or rompus?"
    both = latentrt.generate(model, [prompt, other], stop=[stop], **kw)
    assert both.tokens == [got.tokens, latentrt.generate(model, other, stop=[stop], **kw).tokens]
    with pytest.raises(latentrt.InputError, match=r"min_new_tokens must be an integer in \[0, max_new_tokens=4\]"):
        latentrt.generate(model, prompt, max_new_tokens=4, min_new_tokens=5)


def test_stop_strings_that_span_tokens_end_the_text_before_them():
    """A stop string that is not one token is matched on the text: the sequence stops at the token that
    completes it (kept), its text ends just before it, and the streamed pieces (text that may begin a stop
    string is held back) add up to that text; one never completed changes nothing. In a batch, each
    sequence stops on its own."""
    model = latentrt.load("builtin:recurrent")
    prompt = "Alex is a wumpus. Every wumpus is a yumpus. Is Alex a yumpus or rompus?"
    kw = dict(max_new_tokens=8, temperature=0, seed=1)
    base = latentrt.generate(model, prompt, **kw)
    text = base.text
    assert len(base.tokens) >= 5
    decoded = [model.tokenizer.decode(base.tokens[:n], skip_special_tokens=True) for n in range(len(base.tokens) + 1)]
    # across a token boundary, from inside a word, the whole text's end, and one that only begins
    for stop in (text[3:9], text[5:12], text[-6:], text[-4:] + "zz", "zz"):
        r = latentrt.generate(model, prompt, stop=[stop], **kw)
        streamed = latentrt.generate(model, prompt, stop=[stop], stream=True, **kw)
        pieces = "".join(e.text or "" for e in streamed)
        at = text.find(stop)
        if at < 0:
            assert (r.tokens, r.text, r.finish_reasons) == (base.tokens, text, base.finish_reasons), stop
        else:
            n = next(n for n, d in enumerate(decoded) if stop in d)  # the token that completes it
            assert (r.tokens, r.text, r.finish_reasons) == (base.tokens[:n], text[:at], ["stop"]), stop
        assert pieces == r.text == streamed.result.text, stop
    # a sequence that ends by length while its text's end may still begin a stop string: the last piece shows it
    for n in (3, 5):
        cut = latentrt.generate(model, prompt, **dict(kw, max_new_tokens=n))
        stop = cut.text[-2:] + "zz"
        streamed = latentrt.generate(model, prompt, stop=[stop], stream=True, **dict(kw, max_new_tokens=n))
        pieces = [e.text or "" for e in streamed]
        assert streamed.result.finish_reasons == ["length"], stop
        assert "".join(pieces) == streamed.result.text == cut.text, stop
    other = "Bob is a zumpus. Is Bob a zumpus or rompus?"
    both = latentrt.generate(model, [prompt, other], stop=[text[5:12]], **kw)
    alone = latentrt.generate(model, other, stop=[text[5:12]], **kw)
    assert both.text == [text[: text.find(text[5:12])], alone.text] and both.tokens[1] == alone.tokens


def test_include_stop_str_in_output_and_skip_special_tokens_as_vllm():
    """``include_stop_str_in_output``: the text ends after the stop string (the tokens are the same);
    ``skip_special_tokens=False``: special tokens' text stays (here the eos that ended it); streamed pieces
    add up to the text either way."""
    model = latentrt.load("builtin:recurrent")
    prompt = "Alex is a wumpus. Every wumpus is a yumpus. Is Alex a yumpus or rompus?"
    kw = dict(max_new_tokens=12, temperature=0)
    base = latentrt.generate(model, prompt, **kw)
    eos = model.tokenizer.decode([base.tokens[-1]], skip_special_tokens=False)
    assert base.finish_reasons == ["stop"] and eos and eos not in base.text
    stop = base.text[4:9]
    cases = [
        (dict(stop=[stop]), base.text[:4]),
        (dict(stop=[stop], include_stop_str_in_output=True), base.text[:9]),
        (dict(stop=[stop, base.text[4:11]], include_stop_str_in_output=True), base.text[:11]),  # (the longer)
        (dict(skip_special_tokens=False), model.tokenizer.decode(base.tokens, skip_special_tokens=False)),
    ]
    for options, want in cases:
        r = latentrt.generate(model, prompt, **kw, **options)
        streamed = latentrt.generate(model, prompt, **kw, **options, stream=True)
        assert r.text == want == "".join(e.text or "" for e in streamed) == streamed.result.text, options
    assert cases[-1][1].endswith(eos)
    with pytest.raises(InputError, match="skip_special_tokens must be True or False"):
        latentrt.generate(model, prompt, skip_special_tokens="no")


def test_logits_span_the_padded_head_but_padding_is_never_a_token():
    """The logits are the head's full width (padded_vocab_size, as the published code and transformers give
    them); the padding columns are no token: with their logits made the largest, greedy and sampled decoding
    still pick vocabulary tokens, and a served request's log-probs leave them out too."""
    from latentrt.serve.engine import Engine

    model = latentrt.load("builtin:recurrent")  # (a copy of its own: its head is changed below)
    V, padded = model.config.vocab_size, model.config.padded_vocab_size
    assert padded > V
    with torch.no_grad():
        model.lm_head.weight[V:] = 50 * model.lm_head.weight[: padded - V]  # (tied: the unused embedding rows)
    out = latentrt.generate(model, "Alex is a", max_new_tokens=4, num_steps=2, return_logits=True, seed=3)
    assert out.logits.shape == (len(out.steps), padded)
    assert (out.logits[:, V:].max(-1).values > out.logits[:, :V].max(-1).values).all()  # padding on top
    sampled = latentrt.generate(model, ["Alex is a"] * 8, max_new_tokens=4, num_steps=2, temperature=2.0, seed=1)
    assert all(t < V for row in [out.tokens, *sampled.tokens] for t in row)
    engine = Engine(model, max_batch=2)
    req = engine.submit("Alex is a", max_new_tokens=3, num_steps=2, top_logprobs=5, seed=3)  # (its initial state)
    engine.run_until_idle()
    assert req.tokens == out.tokens[:3] and all(t < V for e in req.logprobs for t, _ in e.top)
