"""The serving engine: every request equals generate() for it alone, whatever else is resident, under each
scheduler; the K/V pool; admission, cancellation, failures that stay with their request."""

from __future__ import annotations

import collections
import hashlib
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent

import latentrt
from latentrt.errors import InputError, NonFiniteStateError
from latentrt.kv_pool import KVPool
from latentrt.serve import Engine, QueueFull

CRITERIA_THRESHOLDS = {
    "kl": 1e-3,
    "minp-kl": 1e-4,
    "latent-diff": 0.3,
    "cosine": 0.05,
    "entropy-diff": 1e-2,
    "argmax-stability": 2,
}


def recurrent_requests(n: int, seed: int = 0) -> list[tuple[list[int], dict]]:
    """Prompts of mixed lengths with mixed options: depths, criteria, schedules, KV modes, sampling."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 40) for _ in range(rng.randrange(1, 30))]
        kw = dict(max_new_tokens=rng.randrange(1, 12), seed=1000 + i, default_stops=rng.random() < 0.7)
        kind = i % 6
        if kind == 0:
            kw.update(num_steps=rng.randrange(1, 7))
        else:
            crit = list(CRITERIA_THRESHOLDS)[i % len(CRITERIA_THRESHOLDS)]
            kw.update(adaptive=True, num_steps=rng.randrange(2, 14), exit_criterion=crit)
            kw.update(exit_threshold=CRITERIA_THRESHOLDS[crit])
            if kind == 2:
                kw.update(min_steps=1, check_criterion_every_n_steps=2)
            if kind == 3:
                kw.update(do_not_exit_in_prefill=True, continuous=True)
            if kind == 4:  # (continuous: each prompt position's unit starts from the one before's final state)
                kw.update(adaptive_prefill=rng.random() < 0.5, init_scale=0.5, continuous=i % 4 == 0)
        kw["kv_sharing"] = rng.choice(["full", "shared", "ring-2", "anchor-2", "skip", "always-last"])
        if rng.random() < 0.4:
            kw.update(temperature=0.9, top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]))
        if rng.random() < 0.3:
            kw["stop"] = [rng.randrange(1, 40)]
        if i % 5 == 4:  # penalties and a bias: each request's own state
            kw.update(repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=1.0, min_p=0.05)
            kw["logit_bias"] = {rng.randrange(1, 40): 4.0}
        if i % 5 == 2:  # the published DRY penalty: each request's own window of tokens
            kw.update(dry_multiplier=2.0, dry_base=1.5, dry_allowed_length=1)
        if i % 7 == 3:  # no stop before the 3rd token
            kw["min_new_tokens"] = min(3, kw["max_new_tokens"])
        out.append((prompt, kw))
    return out


_ALONE: dict = {}


def generate_alone(model, prompt: list[int], **kw):
    """``latentrt.generate(model, prompt, **kw)``, computed once per model (its weights and backend), prompt and
    options: the parametrised tests serve the same requests to the same tiny model under each scheduler, and
    this oracle cost each ~6 s of its ~15. (Every request is greedy or seeded: one answer per key.)"""
    weights = hashlib.sha1()
    for name, t in model.state_dict().items():
        weights.update(name.encode())
        weights.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    key = (repr(model.config), weights.hexdigest(), model.backend.name, tuple(prompt), repr(sorted(kw.items())))
    if key not in _ALONE:
        _ALONE[key] = latentrt.generate(model, prompt, **kw)
    return _ALONE[key]


def assert_served_equals_alone(model, requests, **engine_kw):
    engine = Engine(model, **engine_kw)
    served = [engine.submit(p, **kw) for p, kw in requests]
    engine.run_until_idle()
    for req, (p, kw) in zip(served, requests):
        alone = generate_alone(model, p, **kw)
        assert req.error is None, req.error
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)
        assert req.finish_reason == alone.finish_reasons[0]
        assert req.text == alone.text
    return engine


def test_sampled_tokens_distributions_replay_a_graph_per_settings(monkeypatch):
    """A sampled token's distribution runs through its settings' captured graph (``Distributions``: here the
    graphs simulated as on CUDA, each captured at its first call, replayed, and checked for what a capture
    refuses or bakes in), penalised and stop-holding rows included; at most MAX_GRAPHS settings are held. Each
    request's tokens equal generate() alone (a graph's distribution is the eager one bit for bit:
    tests/test_distributions.py)."""
    from host_syncs import GraphedCalls

    from benchmarks.simulated_graphs import SimulatedGraphs
    from latentrt.distributions import Distributions

    checked = GraphedCalls().install(monkeypatch)
    monkeypatch.setattr(Distributions, "CAPTURE_AT", 1)
    monkeypatch.setattr(Distributions, "MAX_GRAPHS", 2)
    settings = [dict(temperature=0.9, top_k=5), dict(temperature=0.7, top_p=0.8), dict(temperature=1.2, min_p=0.1)]
    requests = []
    for i in range(9):
        kw = dict(settings[i % 3], seed=100 + i, max_new_tokens=5, num_steps=2 + i % 3)
        if i == 4:
            kw.update(repetition_penalty=1.5)
        if i == 5:
            kw.update(min_new_tokens=3, stop=[7])
        requests.append(([5 + i, 6, 7], kw))
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=6)
    served = [engine.submit(p, **kw) for p, kw in requests]
    with torch.no_grad(), SimulatedGraphs([engine.distributions]) as sim:
        engine.run_until_idle()
    assert {name for name, _ in sim.captured} == {"DistributionRunner"} and len(sim.captured) >= 3
    assert sim.replays >= checked.calls["DistributionRunner"] - len(sim.captured) > 10
    assert len(engine.distributions.runners) == 2 and not checked.hazards, checked.hazards
    for req, (p, kw) in zip(served, requests):
        assert req.tokens == latentrt.generate(model, p, **kw).tokens, (p, kw)


@pytest.mark.parametrize(
    "scheduler, edge_cost, async_scheduling",
    [
        ("depth", None, False),
        ("depth", 0.0, False),
        ("token", None, False),
        ("static", None, False),
        ("depth", None, True),
        ("depth", 0.0, True),
        ("token", None, True),
    ],
)
def test_recurrent_requests_equal_generate_alone(scheduler, edge_cost, async_scheduling):
    """(``edge_cost``: how long ended units wait to be sampled together; waiting never changes a result.
    ``async_scheduling``: each step launches before it reads the previous launch's exits; a unit that exited runs a
    launch masked.)"""
    model = tiny_recurrent(seed=3)
    kw = dict(max_batch=8, scheduler=scheduler, edge_cost=edge_cost, async_scheduling=async_scheduling)
    engine = assert_served_equals_alone(model, recurrent_requests(36), **kw)
    m = engine.metrics
    assert m.requests == 36 and not engine.resident and engine.program.pool.bytes_in_use() == 0
    assert m.iterations <= m.launched_rows


def test_the_pools_lookups_run_once_per_iteration_not_per_core_layer(monkeypatch):
    """The pool's reference path looks a chunk's slot rows up (and, for a mode that drops, its mask) once per
    core iteration: every core layer of an iteration reads the same entries (``written`` changes only when the
    next iteration is marked). Four core layers here: a lookup per layer would be four per mark."""
    from latentrt import kv_pool

    counts = collections.Counter()
    for name in ("slot_rows", "dropped", "mark"):
        real = getattr(kv_pool, name) if name != "mark" else kv_pool.KVPool.mark_iteration
        counted = lambda *a, real=real, name=name, **k: counts.update([name]) or real(*a, **k)  # noqa: E731
        if name == "mark":
            monkeypatch.setattr(kv_pool.KVPool, "mark_iteration", counted)
        else:
            monkeypatch.setattr(kv_pool, name, counted)
    model = tiny_recurrent(seed=3, n_layers_in_recurrent_block=4)
    engine = Engine(model, max_batch=4)
    kw = dict(max_new_tokens=4, num_steps=5, default_stops=False, seed=1)
    served = [engine.submit([5, 6, 7], kv_sharing="skip", **kw), engine.submit([8, 9], kv_sharing="ring-2", **kw)]
    engine.run_until_idle()
    for req, (p, mode) in zip(served, (([5, 6, 7], "skip"), ([8, 9], "ring-2"))):
        alone = latentrt.generate(model, p, kv_sharing=mode, **kw)
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps)
    assert counts["mark"] > 0 and counts["slot_rows"] == counts["mark"] and 0 < counts["dropped"] <= counts["mark"]


@pytest.mark.parametrize("scheduler", ["depth", "token"])
def test_logprobs_equal_the_log_softmax_of_generates_logits(scheduler):
    """Requests that ask for log-probs (``top_logprobs`` 0 or 3) among those that do not, mixed options:
    each token's log-prob and its 3 best equal log-softmax(generate(return_logits=True) alone) over the
    vocabulary, whatever the temperature; the others get none."""
    model = tiny_recurrent(seed=3)
    requests = recurrent_requests(18, seed=4)
    engine = Engine(model, max_batch=6, scheduler=scheduler)
    tops = [(None, 0, 3)[i % 3] for i in range(len(requests))]
    served = [engine.submit(p, top_logprobs=k, **kw) for (p, kw), k in zip(requests, tops)]
    engine.run_until_idle()
    V = model.config.vocab_size
    for req, (p, kw), k in zip(served, requests, tops):
        alone = latentrt.generate(model, p, return_logits=True, **kw)
        assert req.tokens == alone.tokens, (p, kw)
        if k is None:
            assert req.logprobs == []
            continue
        lp = alone.logits[:, :V].float().log_softmax(-1)
        assert [e.token for e in req.logprobs] == alone.tokens
        for i, e in enumerate(req.logprobs):
            assert e.logprob == pytest.approx(lp[i, e.token].item(), abs=1e-5)
            best = lp[i].topk(k)
            assert [t for t, _ in e.top] == best.indices.tolist()
            assert [v for _, v in e.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    with pytest.raises(InputError, match=r"top_logprobs must be an integer in \[0, 20\]"):
        engine.submit([5], top_logprobs=21)
    with pytest.raises(InputError, match="only a request that echoes its prompt can generate no token"):
        engine.submit([5], score_only=True)
    with pytest.raises(InputError, match="return_logits is not available from the server"):  # (top_logprobs is)
        engine.submit([5], return_logits=True)
    assert not engine.queue


def test_coconut_echo_scores_the_prompt_with_its_thoughts():
    """A Coconut prompt is scored as the model runs it: ``<|latent|>`` positions are continuous thoughts (the
    markers are tokens of the prompt, with log-probs like any, including those ``num_thoughts`` appends); the
    generated token's log-prob is the same forward's last position, a cross-check of the two paths. A prompt
    without markers, on a model trained without thoughts, is scored as plain GPT-2."""
    model = tiny_coconut(seed=2)
    start, latent, end = model.marker_ids
    V = model.config.vocab_size
    engine = Engine(model, max_batch=2)
    cases = [
        ([6, 9, start, latent, latent, end, 7], {}, []),
        ([6, 9, 11, 7, 5], {}, []),
        ([6, 9, 11], dict(num_thoughts=2), [start, latent, latent, end]),
    ]
    for ids, kw, appended in cases:
        req = engine.submit(ids, top_logprobs=2, echo=True, max_new_tokens=1, **kw)
        engine.run_until_idle()
        ran = ids + appended
        lp = model.logits(torch.tensor([ran]))[0, :, :V].log_softmax(-1)
        assert req.prompt_ids == ran and req.prompt_logprobs[0].logprob is None
        assert [e.token for e in req.prompt_logprobs] == ran
        for i, e in enumerate(req.prompt_logprobs[1:]):
            assert e.logprob == pytest.approx(lp[i, ran[i + 1]].item(), abs=1e-5)
            assert [t for t, _ in e.top] == lp[i].topk(2).indices.tolist()
        assert req.logprobs[0].logprob == pytest.approx(lp[-1, req.tokens[0]].item(), abs=1e-5)
        assert req.tokens == latentrt.generate(model, ids, max_new_tokens=1, **kw).tokens


def test_stop_strings_served_as_generate_alone():
    """Stop strings (matched on the text, which ends before them) under the depth scheduler: each request's
    tokens, text and finish reason equal generate() alone, and its events' texts add up to its text."""
    model = tiny_recurrent(seed=3)
    prompts = ["every cat is a dog", "Tom is a cat", "a dog is every cat", "is Tom"]
    kw = dict(max_new_tokens=10, temperature=0.0, seed=7, default_stops=False)
    requests = []
    for p in prompts:
        text = latentrt.generate(model, p, **kw).text
        for stop in (text[2:7], text[-3:] + "zz", text[4:6]):
            if stop.strip():
                requests.append((p, dict(kw, stop=[stop, "never"])))
                ended = latentrt.generate(model, p, **requests[-1][1])
                if ended.finish_reasons == ["stop"]:  # min_new_tokens at its stop: the m-th token may stop, not before
                    for m in (len(ended.tokens), len(ended.tokens) + 1):
                        requests.append((p, dict(kw, stop=[stop, "never"], min_new_tokens=m)))
    engine = Engine(model, max_batch=4)
    events = [[] for _ in requests]
    served = [engine.submit(p, on_event=events[i].append, **o) for i, (p, o) in enumerate(requests)]
    engine.run_until_idle()
    stopped = 0
    for req, (p, o), evs in zip(served, requests, events):
        alone = latentrt.generate(model, p, **o)
        assert (req.tokens, req.text, req.finish_reason) == (alone.tokens, alone.text, alone.finish_reasons[0]), o
        assert "".join(e.text or "" for e in evs if e.kind in ("token", "text")) == req.text
        stopped += req.finish_reason == "stop"
    assert stopped >= len(requests) // 2


def test_text_not_read_per_token_is_decoded_once(monkeypatch):
    """``text_per_token=False`` (a response that is not streamed): no decode while the request runs, one when
    it finishes, the same text as generate() alone; stop strings and log-probs still decode per token."""
    from latentrt.sequence_text import SequenceText

    model = tiny_recurrent(seed=3)
    requests = [(p, dict(kw, max_new_tokens=8)) for p, kw in recurrent_requests(6, seed=5)]
    engine = Engine(model, max_batch=4)
    events = [[] for _ in requests]
    served = [
        engine.submit(p, on_event=events[i].append, text_per_token=False, **kw) for i, (p, kw) in enumerate(requests)
    ]
    added, decoded = [], []
    real_add, real_finish = SequenceText.add, SequenceText.finish
    monkeypatch.setattr(SequenceText, "add", lambda self, t, **kw: added.append(t) or real_add(self, t, **kw))
    monkeypatch.setattr(
        SequenceText, "finish", lambda self, ids: decoded.append(self.final is None) or real_finish(self, ids)
    )
    engine.run_until_idle()
    assert added == [] and decoded.count(True) == len(requests)  # nothing per token; the whole text once each
    for req, (p, kw), evs in zip(served, requests, events):
        alone = latentrt.generate(model, p, **kw)
        assert (req.tokens, req.text) == (alone.tokens, alone.text)
        assert all(e.text is None for e in evs if e.kind == "token")
    added.clear(), decoded.clear()
    live = engine.submit(requests[0][0], text_per_token=False, **dict(requests[0][1], stop=["never"]))
    streamed = engine.submit(requests[1][0], **requests[1][1])
    assert live.live_text and streamed.live_text
    engine.run_until_idle()  # each token's text decoded as it comes (O(1) a token); the whole text once, at the end
    assert sorted(added) == sorted(live.tokens + streamed.tokens) and decoded.count(True) == 2


def exiting_requests(n: int = 8, **extra) -> list[tuple[list[int], dict]]:
    return [
        (
            [3 + i, 5, 7],
            dict(
                max_new_tokens=6,
                adaptive=True,
                num_steps=12,
                exit_criterion="latent-diff",
                exit_threshold=0.3,
                seed=i,
                default_stops=False,
            )
            | extra,
        )
        for i in range(n)
    ]


def test_depth_batching_refills_rows_and_wastes_no_slot_on_exits():
    """Depth-level batching launches a row only while its loop runs: waiting rows cost nothing; token-level
    batching launches the rows that exited until the slowest exits. (One K/V slot a position: the pool holds
    four rows at once.)"""
    model = tiny_recurrent(seed=3)
    reqs = exiting_requests(kv_sharing="shared")
    util = {}
    for scheduler in ("depth", "token"):
        engine = assert_served_equals_alone(model, reqs, max_batch=4, scheduler=scheduler)
        util[scheduler] = engine.metrics.utilisation()
    assert util["token"] < util["depth"]
    # the depth scheduler launches only rows in their loops; a unit dropped after a stop is the only waste
    assert util["depth"] == 1.0


@pytest.mark.parametrize("scheduler", ["depth", "token", "static"])
def test_when_each_scheduler_admits_a_request_that_arrives_mid_token(scheduler):
    """A request that arrives while a resident one is inside its token's loop enters at once (``depth``: a
    freed or free row is filled at the next step), at the end of that token's round (``token``, vLLM's policy:
    new requests join between tokens), or once every resident request has finished (``static``)."""
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=4, scheduler=scheduler)
    kw = dict(num_steps=6, max_new_tokens=3, init_scale=0.0, default_stops=False)
    a = engine.submit([5, 9, 2], **kw)
    engine.step()
    engine.step()  # a's first token's loop is running
    b = engine.submit([7, 3], **kw)
    entered = None
    for step in range(1, 40):
        engine.step()
        if b in engine.resident or b.finished:
            entered = step, len(a.tokens), a.finished
            break
    if scheduler == "depth":
        assert entered == (1, 0, False)
    elif scheduler == "token":
        assert entered[0] > 1 and entered[1:] == (1, False)  # once a's first token's round ended
    else:
        assert entered[2]  # a finished first
    engine.run_until_idle()
    for req, p in ((a, [5, 9, 2]), (b, [7, 3])):
        assert req.tokens == latentrt.generate(model, p, **kw).tokens


@pytest.mark.parametrize("scheduler", ["token", "static"])
def test_an_ended_unit_launched_idle_keeps_its_logits(scheduler):
    """A unit that ends without a check of its logit criterion (``min_steps`` = ``num_steps``) waits for its
    head while a deeper request runs; the token-synchronous schedulers launch its row idle meanwhile. Its
    loop must keep no trace of those launches (they once checked it there and it was sampled from zeros)."""
    model = tiny_recurrent(seed=3)
    unchecked = dict(adaptive=True, exit_criterion="kl", max_new_tokens=4, init_scale=0.0)
    reqs = [
        ([5, 9, 2], dict(unchecked, num_steps=2, min_steps=2)),
        ([7, 3], dict(unchecked, num_steps=1, min_steps=1, check_criterion_every_n_steps=2)),
        ([4, 8, 1, 6], dict(num_steps=6, max_new_tokens=4, init_scale=0.0)),
    ]
    assert_served_equals_alone(model, reqs, max_batch=4, scheduler=scheduler)


def test_depth_batching_samples_ended_units_together_where_that_saves_weight_reads():
    """Units that end wait (out of the launches) until the row-iterations lost by waiting reach the cost of
    the head and prelude passes: the default (the weights' ratios) reads fewer weights for the same tokens
    than sampling at every step (``edge_cost=0``) or waiting too long; waiting never changes a result."""
    model = tiny_recurrent(seed=3)
    reqs = [(p, dict(kw, kv_sharing="shared")) for p, kw in exiting_requests(24)]
    reads, passes, steps = {}, {}, {}
    for cost in (0.0, None, 3.0):
        if cost is None:
            engine = assert_served_equals_alone(model, reqs, max_batch=8)
        else:
            engine = Engine(model, max_batch=8, edge_cost=cost)
            for p, kw in reqs:
                engine.submit(p, **kw)
            engine.run_until_idle()
        reads[cost], passes[cost], steps[cost] = (
            engine.program.weight_reads,
            engine.program.passes,
            engine.metrics.steps,
        )
    program = engine.program
    assert 0 < program.prelude_cost < 1 and 0 < program.head_cost < 1  # the tiny model's weight ratios
    assert reads[None] < reads[0.0] and reads[None] < reads[3.0]
    assert passes[None] < passes[0.0]
    assert steps[0.0] < steps[None] < steps[3.0]  # the price: rows wait


def test_a_request_cancelled_while_its_unit_waits_for_sampling_frees_its_row():
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=4, kv_slots=64, edge_cost=50.0)  # ended units wait long
    reqs = exiting_requests(4)
    served = [engine.submit(p, **kw) for p, kw in reqs]
    for _ in range(200):
        engine.step()
        if engine.program.parked:
            break
    row = next(iter(engine.program.parked))
    victim = next(r for r in served if r.row == row)
    engine.cancel(victim)
    engine.run_until_idle()
    assert victim.finish_reason == "cancelled" and not engine.program.parked and not engine._exited
    for req, (p, kw) in zip(served, reqs):
        if req is not victim:
            alone = latentrt.generate(model, p, **kw)
            assert (req.tokens, req.steps) == (alone.tokens, alone.steps)
    assert engine.program.pool.bytes_in_use() == 0


def coconut_requests(n: int) -> list[tuple[list[int], dict]]:
    rng = random.Random(1)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(5, 40) for _ in range(rng.randrange(1, 20))]
        kw = dict(max_new_tokens=rng.randrange(1, 10), num_thoughts=rng.choice([None, 0, 1, 3, 5]), seed=i)
        if i % 3 == 0:
            kw.update(temperature=0.7)
        if i % 4 == 0:
            kw.update(published_eos=True)
        if i % 5 == 1:
            kw.update(repetition_penalty=2.0, frequency_penalty=0.5, logit_bias={rng.randrange(5, 40): 2.0})
        if i % 5 == 3:
            kw.update(dry_multiplier=3.0)
        reqs.append((prompt, kw))
    reqs.append(([6, 2, 4, 4, 3, 7, 2, 4, 3, 9], dict(max_new_tokens=4)))  # two thought groups in the prompt
    return reqs


def test_coconut_requests_equal_generate_alone():
    """(Slot utilisation counts a Coconut row's passes: the depth scheduler launches a row only for a pass it
    needs; the token scheduler's rows wait for the round's most thoughts. It once read 0, counting latent
    iterations, which Coconut has none of. With asynchronous scheduling every end is known on the host, so a
    unit's next one joins the next launch as it does without: the same passes and rows launched.)"""
    model = tiny_coconut(seed=2)
    reqs = coconut_requests(24)
    thoughts = sum(latentrt.generate(model, p, **kw).num_thoughts for p, kw in reqs)
    util, needed, launched = {}, {}, {}
    for scheduler in ("depth", "token"):
        for async_scheduling in (False, True):
            kw = dict(max_batch=6, scheduler=scheduler, async_scheduling=async_scheduling)
            engine = assert_served_equals_alone(model, reqs, **kw)
            assert engine.program.pool.bytes_in_use() == 0
            m = engine.metrics
            # latent work: the prompts' thoughts; every answer token a pass, prompts more
            assert m.iterations == thoughts > 0 and m.needed > m.tokens
            # a step's passes, prompt chunks included, as one (Packed), and one head pass for the units it ended
            assert m.passes <= 2 * m.steps and m.weight_reads <= m.steps * (1 + engine.program.head_weights) + 1e-9
            launched[scheduler, async_scheduling] = (m.passes, m.launched_rows)
        assert launched[scheduler, False] == launched[scheduler, True]
        util[scheduler], needed[scheduler] = m.utilisation(), m.needed
    assert needed["depth"] == needed["token"]  # the same passes, whatever the schedule
    assert util["depth"] == 1.0 and 0 < util["token"] < 1.0


def test_coconut_requests_equal_generate_alone_where_the_pool_cannot_pack_their_passes(monkeypatch):
    """GPT-2 attention scaled by the inverse layer index is not the pool's (1/sqrt(D)): a step's prompt chunks
    then run one by one beside the batched single-position passes, as before the packed pass."""
    from latentrt.decode.coconut_serving import CoconutServing

    heads = []
    real = CoconutServing._heads
    monkeypatch.setattr(CoconutServing, "_heads", lambda self, *a: heads.append(1) or real(self, *a))
    model = tiny_coconut(seed=2, scale_attn_by_inverse_layer_idx=True)
    assert not model.packs and tiny_coconut(seed=2).packs
    engine = assert_served_equals_alone(model, coconut_requests(10), max_batch=6)
    assert engine.metrics.passes - len(heads) > engine.metrics.steps  # (the layers' passes)


@pytest.mark.parametrize("other", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)])
def test_coconut_served_with_other_attention_scaling_equals_generate_alone(other):
    """A GPT-2 config whose attention is not scaled by 1/sqrt(head_dim) is not packed into one pass (the pool
    attends with that scale): its requests still equal generate() alone."""
    model = tiny_coconut(seed=2, **other)
    assert not model.packs
    assert_served_equals_alone(model, coconut_requests(6), max_batch=4)


@pytest.mark.parametrize("scheduler", ["token", "static"])
def test_coconut_on_the_triton_backend_under_the_synchronous_schedulers(scheduler):
    """Under a token-synchronous or static scheduler a row whose passes for the token are done waits out the
    others' passes unlaunched (masked in the captured pass over every pool row). Each request equals generate()
    alone on the reference backend."""
    from latentrt import kernels
    from latentrt.backends import get_backend

    if not kernels.triton_available():
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    model = tiny_coconut(seed=2)
    reference = model.backend
    model.backend = get_backend("triton", model)
    engine = Engine(model, max_batch=4, scheduler=scheduler)
    assert engine.program.pass_runner is not None
    model.backend = reference
    requests = [(p, dict(kw, max_new_tokens=min(kw["max_new_tokens"], 4))) for p, kw in coconut_requests(6)]
    served = [engine.submit(p, **kw) for p, kw in requests]
    with torch.no_grad():
        engine.run_until_idle()
    for req, (p, kw) in zip(served, requests):
        alone = generate_alone(model, p, **kw)
        assert req.error is None and req.tokens == alone.tokens, (p, kw)


def test_coconut_served_on_the_triton_backend_equals_generate_alone(monkeypatch):
    """On the Triton backend a Coconut server's single-position passes attend through the pool's fused decode
    kernel and its prompt chunks through the multi-query one (the interpreter on the CPU); every step is one
    captured pass over every pool row, the step's prompt chunks in a slot of bucketed shape (``StepPassRunner``),
    and the ended rows' head pass another (``HeadsRunner``): here their graphs simulated as on CUDA, each key
    captured at its first call and replayed, and checked for what a capture refuses or bakes in. Each request
    equals generate() alone on the reference backend (tokens; log-probs within 1e-5)."""
    from host_syncs import GraphedCalls

    from benchmarks.simulated_graphs import SimulatedGraphs
    from latentrt import kernels
    from latentrt.backends import get_backend
    from latentrt.decode.coconut_serving import CoconutServing
    from latentrt.decode.coconut_serving_graph import StepPassRunner

    if not kernels.triton_available():
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    checked = GraphedCalls().install(monkeypatch)
    monkeypatch.setattr(StepPassRunner, "CAPTURE_AT", 1)  # every key captured at its first call, then replayed
    heads, real = [], CoconutServing._heads
    monkeypatch.setattr(CoconutServing, "_heads", lambda self, *a: heads.append(1) or real(self, *a))
    model = tiny_coconut(seed=2)
    reference = model.backend
    model.backend = get_backend("triton", model)
    engine = Engine(model, max_batch=4)
    pool, runner = engine.program.pool, engine.program.pass_runner
    assert pool.decode_attention is not None and pool.prefill_attention is not None and runner is not None
    model.backend = reference
    calls = []
    for name in ("decode_attention", "prefill_attention"):
        kernel = getattr(pool, name)
        setattr(pool, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    requests = [(p, dict(kw, max_new_tokens=min(kw["max_new_tokens"], 4))) for p, kw in coconut_requests(6)]
    served = [engine.submit(p, top_logprobs=0, **kw) for p, kw in requests]  # log-probs: K/V changes show
    with torch.no_grad(), SimulatedGraphs([runner, engine.program.heads_runner]) as sim:
        engine.run_until_idle()
    assert {"decode_attention", "prefill_attention"} <= set(calls)
    slots = [key[1] for name, key in sim.captured if name == "StepPassRunner" and key[1]]
    assert ((), ()) in [key for _, key in sim.captured] and slots, sim.captured  # (a key with the chunks' slot)
    assert ("HeadsRunner", None) in sim.captured
    # every pass went through a runner (the layers' or the head's), and every call but a capture replayed
    passes = checked.calls["StepPassRunner"] + checked.calls["HeadsRunner"]
    assert engine.metrics.graph_passes == engine.metrics.passes == passes
    assert checked.calls["HeadsRunner"] == len(heads)
    assert sim.replays == engine.metrics.passes - len(sim.captured) > len(sim.captured)
    assert not checked.hazards, checked.hazards
    V = model.config.vocab_size
    for req, (p, kw) in zip(served, requests):
        alone = latentrt.generate(model, p, return_logits=True, **kw)
        assert req.error is None, req.error
        assert req.tokens == alone.tokens, (p, kw)
        lp = alone.logits[:, :V].float().log_softmax(-1)
        assert [e.logprob for e in req.logprobs] == pytest.approx(
            [lp[i, t].item() for i, t in enumerate(req.tokens)], abs=1e-5
        )


def test_kv_pool_admits_by_the_slots_a_mode_needs():
    """Full mode at r=8 takes 8 slot rows, shared 1: with 10 slot rows, one full and two shared requests are
    resident together, a second full one waits; a mode that can never fit is refused at submit."""
    model = tiny_recurrent(seed=1)
    engine = Engine(model, max_batch=4, kv_slots=10)
    kw = dict(max_new_tokens=3, num_steps=8, init_scale=0.0)
    full = engine.submit([5, 6], kv_sharing="full", **kw)
    shared = [engine.submit([5, 7], kv_sharing="shared", **kw) for _ in range(2)]
    full2 = engine.submit([5, 8], kv_sharing="full", **kw)
    engine.step()
    assert [r in engine.resident for r in (full, *shared, full2)] == [True, True, True, False]
    pool = engine.program.pool
    assert pool.bytes_in_use() == pool.request_bytes(full.decoder.kv_mode) + 2 * pool.request_bytes(
        shared[0].decoder.kv_mode
    )
    # every slot row is held, one of the 4 rows is free: the capacity (/metrics) is in use but one row's plain layers
    assert pool.capacity_bytes() == pool.bytes_in_use() + pool.request_bytes(None) > pool.bytes_in_use()
    engine.run_until_idle()
    assert (
        full2.finish_reason == "length"
        and full2.tokens == latentrt.generate(model, [5, 8], kv_sharing="full", **kw).tokens
    )
    with pytest.raises(InputError, match="needs 16 K/V slots"):
        engine.submit([5], kv_sharing="full", num_steps=16, max_new_tokens=2)
    with pytest.raises(InputError, match="needs 16 K/V slots"):
        engine.submit([5], kv_sharing="skip", num_steps=16, max_new_tokens=2)
    with pytest.raises(InputError, match="needs 11 K/V slots"):  # the bounds: 10 slot rows, 20 positions
        engine.submit([5], kv_sharing="full", num_steps=11, max_new_tokens=2)
    at_bounds = engine.submit([5, 9], kv_sharing="full", num_steps=10, max_new_tokens=2, init_scale=0.0)
    short = Engine(model, max_len=20)
    with pytest.raises(InputError, match="context per request"):
        short.submit([5] * 13, max_new_tokens=8)
    longest_kw = dict(max_new_tokens=8, num_steps=2, init_scale=0.0, default_stops=False)
    longest = short.submit([5] * 12, **longest_kw)
    engine.run_until_idle()
    short.run_until_idle()
    assert at_bounds.tokens == latentrt.generate(model, [5, 9], num_steps=10, max_new_tokens=2, init_scale=0.0).tokens
    assert longest.tokens == latentrt.generate(model, [5] * 12, **longest_kw).tokens and len(longest.tokens) == 8


def test_a_pool_row_never_takes_more_entries_than_its_context():
    """The pool's own guard (a request that could not fit is refused at submit, above): a row's entries end at
    max_len; one more would be the trash entry, which padding queries write to and no query reads."""
    model = tiny_recurrent(seed=1)
    pool = KVPool(model.cache_layout(), 2, 6, 2, model.dtype, model.device)
    row = pool.allocate(None)
    pool.begin([row], 4)
    pool.begin([row], 2)
    with pytest.raises(RuntimeError, match="overflow: 7 positions > 6"):
        pool.begin([row], 1)


def lookup_requests(modes=("full", "skip", "always-last", "anchor-2", "ring-3", "shared"), cases=None):
    """Requests whose tokens or steps depend on the KV mode's rules (adaptive exits at several depths): each
    of five prompts in every mode of ``modes``; the tests assert the modes do differ on them."""
    cases = cases or [
        ([38, 19, 29, 6, 39, 25, 21, 37, 16, 19], "kl", 1e-3),
        ([18, 8], "entropy-diff", 1e-2),
        ([15, 3, 37, 35], "entropy-diff", 1e-2),
        ([36, 6, 9, 1, 26], "entropy-diff", 1e-2),
        ([37, 27, 3, 11, 29, 5, 17, 11], "latent-diff", 0.3),
    ]
    kw = dict(max_new_tokens=8, adaptive=True, num_steps=8, init_scale=0.0, default_stops=False)
    return [
        (p, dict(kw, exit_criterion=crit, exit_threshold=thr, kv_sharing=m)) for p, crit, thr in cases for m in modes
    ]


def assert_modes_differ(model, requests) -> None:
    """The published lookups change these requests: ``skip`` and ``always-last`` differ from ``full`` and
    from each other on some, ``anchor-2`` from ``full``, ``ring-3`` and ``shared`` on some (else serving them
    would not test the pool's rules)."""
    alone = {}
    for p, kw in requests:
        r = latentrt.generate(model, p, **kw)
        alone[tuple(p), kw["kv_sharing"]] = (r.tokens, r.steps)
    prompts = {p for p, _ in alone}
    assert any(alone[p, "skip"] != alone[p, "full"] for p in prompts)
    assert any(all(alone[p, "always-last"] != alone[p, m] for m in ("full", "skip")) for p in prompts)
    assert any(all(alone[p, "anchor-2"] != alone[p, m] for m in ("full", "ring-3", "shared")) for p in prompts)


def test_published_lookups_served_equal_generate_alone():
    """The published cache rules (``skip``: its default lookup under adaptive exit; ``always-last``;
    ``anchor-2``: its anchored cache) served side by side with the ring modes, each request equal to
    generate() alone, on requests where the rules change tokens or steps."""
    model = tiny_recurrent(seed=3)
    requests = lookup_requests()
    assert_modes_differ(model, requests)
    assert_served_equals_alone(model, requests, max_batch=8, kv_slots=48)


def test_bad_requests_get_generate_messages():
    model = tiny_recurrent()
    engine = Engine(model)
    for kw in (dict(num_steps=0), dict(exit_criterion="nope"), dict(temperature=-1), dict(kv_sharing="ring-x")):
        with pytest.raises(InputError) as served:
            engine.submit([5, 6], **kw)
        with pytest.raises(InputError) as alone:
            latentrt.generate(model, [5, 6], **kw)
        assert str(served.value) == str(alone.value)
    with pytest.raises(InputError, match="unknown generate"):
        engine.submit([5], bogus=1)
    with pytest.raises(InputError, match="one prompt"):
        engine.submit([[5], [6]])
    with pytest.raises(InputError, match="hooks"):
        engine.submit([5], hooks=[lambda e: None])
    with pytest.raises(InputError, match=r"runs in generate\(\) only"):
        engine.submit([5], decoding="speculative")


def test_queue_full_and_cancel_frees_the_row():
    model = tiny_recurrent()
    engine = Engine(model, max_batch=1, max_queue=2)
    a = engine.submit([5, 6], max_new_tokens=50, default_stops=False, init_scale=0.0)
    b = engine.submit([5, 7], max_new_tokens=3, init_scale=0.0)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([5], max_new_tokens=2)
    for _ in range(6):
        engine.step()
    assert a in engine.resident and 0 < len(a.tokens) < 50
    engine.cancel(a)
    engine.step()
    assert a.finish_reason == "cancelled" and a not in engine.resident and b in engine.resident
    engine.run_until_idle()
    assert b.tokens == latentrt.generate(model, [5, 7], max_new_tokens=3, init_scale=0.0).tokens


def test_a_step_admits_prompts_up_to_its_prefill_budget_and_a_longer_one_alone():
    """``prefill_budget``: the prompt positions a step admits (FIFO, so a long prompt does not stall decode),
    but the first request of a step enters whatever its length; each request still equals generate() alone."""
    model = tiny_recurrent()
    engine = Engine(model, max_batch=8, prefill_budget=10)
    prompts = [[5] * 6, [6] * 4, [7] * 3, [8] * 20, [9] * 2]
    kw = dict(max_new_tokens=3, init_scale=0.0, default_stops=False)
    served = [engine.submit(p, **kw) for p in prompts]
    admitted = []
    while engine.busy:
        before = {id(r) for r in engine.resident}
        engine.step()
        new = [served.index(r) for r in engine.resident if id(r) not in before and not r.finished]
        admitted += [new] if new else []
    assert admitted[:3] == [[0, 1], [2], [3]]  # 6 + 4 fit; 3 does not fit beside them; 20 enters alone
    for req, p in zip(served, prompts):
        assert req.tokens == latentrt.generate(model, p, **kw).tokens


@pytest.mark.parametrize("scheduler, async_scheduling", [("depth", False), ("depth", True), ("token", True)])
def test_arrivals_cancels_and_failures_at_random_steps_leave_the_others_as_alone(scheduler, async_scheduling):
    """Requests arrive at random steps, some are cancelled at random steps (waiting, resident, sampled but not
    yet read), some fail (a state that overflows); every other one equals generate() alone, and at the end
    nothing is resident and the pool holds no bytes: rows are freed on every path, whatever else is in
    flight."""
    model = tiny_recurrent(seed=3)
    rng = random.Random(7)
    reqs = recurrent_requests(16, seed=11)
    failing = {3, 10}
    for i in failing:  # fixed depth: the overflow is never an early exit
        reqs[i] = (reqs[i][0], dict(max_new_tokens=4, num_steps=3, init_scale=1e39, seed=1, temperature=0.8))
    engine = Engine(model, max_batch=4, scheduler=scheduler, async_scheduling=async_scheduling, max_queue=32)
    served, pending, cancelled = [], list(enumerate(reqs)), set()
    while pending or engine.busy:
        while pending and rng.random() < 0.4:
            i, (p, kw) = pending.pop(0)
            served.append((i, engine.submit(p, **kw)))
        if rng.random() < 0.08:
            i, req = rng.choice(served)
            if req.finish_reason is None and i not in failing:
                engine.cancel(req)
                cancelled.add(i)
        engine.step()
    assert 2 <= len(cancelled) and not engine.resident and engine.program.pool.bytes_in_use() == 0
    for i, req in served:
        p, kw = reqs[i]
        if i in failing:
            assert req.finish_reason == "error", (i, req.finish_reason)
        elif req.finish_reason != "cancelled":
            alone = generate_alone(model, p, **kw)
            assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (i, kw)


def test_a_failing_request_fails_alone():
    """A NaN state fails its request with generate()'s message; the others finish unchanged."""
    model = tiny_recurrent(seed=3)
    bad_kw = dict(max_new_tokens=4, init_scale=1e39, seed=1, temperature=0.8)  # the state overflows fp32
    with pytest.raises(NonFiniteStateError) as alone:
        latentrt.generate(model, [5, 6, 7], **bad_kw)
    reqs = recurrent_requests(6, seed=4)
    engine = Engine(model, max_batch=4)
    served = [engine.submit(p, **kw) for p, kw in reqs[:3]]
    bad = engine.submit([5, 6, 7], **bad_kw)
    served += [engine.submit(p, **kw) for p, kw in reqs[3:]]
    engine.run_until_idle()
    assert bad.finish_reason == "error" and str(bad.error) == str(alone.value)
    for req, (p, kw) in zip(served, reqs):
        assert req.tokens == latentrt.generate(model, p, **kw).tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failing_coconut_request_fails_alone(async_scheduling):
    """A Coconut request whose pass turns non-finite (a NaN position embedding at position 30, which only the
    long prompt reaches) fails with generate()'s message, while the others, sharing its passes (one Packed
    pass a step, one head pass) and then its row, finish as generate() alone serves them."""
    model = tiny_coconut(seed=2)
    with torch.no_grad():
        model.transformer.wpe.weight[30].fill_(float("nan"))
    long = [5, 6, 7] * 11 + [2, 4, 4, 3]
    with pytest.raises(NonFiniteStateError) as alone:
        latentrt.generate(model, long, max_new_tokens=2)
    rng = random.Random(3)
    short = [
        ([rng.randrange(5, 40) for _ in range(rng.randrange(1, 8))], dict(max_new_tokens=rng.randrange(1, 6)))
        for _ in range(8)
    ]
    short = [(p, dict(kw, num_thoughts=i % 4)) for i, (p, kw) in enumerate(short)]  # (under 30 positions)
    engine = Engine(model, max_batch=3, async_scheduling=async_scheduling)
    served = [engine.submit(p, **kw) for p, kw in short[:2]]
    bad = engine.submit(long, max_new_tokens=2)
    served += [engine.submit(p, **kw) for p, kw in short[2:]]
    engine.run_until_idle()
    assert bad.finish_reason == "error" and str(bad.error) == str(alone.value)
    assert any(r.row == bad.row for r in served[2:])  # (its row served a later request)
    for req, (p, kw) in zip(served, short):
        assert req.error is None and req.tokens == latentrt.generate(model, p, **kw).tokens, (p, kw)


def test_a_failed_requests_row_is_scrubbed_before_reuse():
    """A failed request leaves NaN K/V in its row; the short request that takes the row next attends
    (masked) over it while batched with a longer one, so the pool must zero it (``KVPool.release``): a
    finished request's finite K/V is left as it is, and masked it adds exactly nothing."""
    model = tiny_recurrent(seed=3)
    kw = dict(max_new_tokens=6, init_scale=0.0, default_stops=False)
    engine = Engine(model, max_batch=2)
    long = engine.submit(list(range(5, 25)), **kw)
    bad = engine.submit(list(range(5, 17)), max_new_tokens=4, init_scale=1e39, seed=1)  # overflows
    short = engine.submit([5, 7], **kw)
    engine.run_until_idle()
    assert bad.finish_reason == "error" and short.row == bad.row
    assert long.tokens == latentrt.generate(model, list(range(5, 25)), **kw).tokens
    assert short.tokens == latentrt.generate(model, [5, 7], **kw).tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_finished_requests_row_keeps_its_checked_entries_and_zeroes_the_rest(async_scheduling):
    """A request that finished leaves its K/V in the pool where every unit's token was read back finite, and
    zeroes the entries after them (never checked): after a length finish the last token's unit (the row is
    released when that token is sampled, before it is read); after a stop token the unit begun after it. With
    asynchronous scheduling one more in each case: at ``num_steps=1`` a unit ends on the host at its r_max, so
    the next token is sampled (and the next unit begins) before the previous token is read."""
    model = tiny_recurrent(seed=3)
    prompt, kw = [5, 6, 7], dict(max_new_tokens=6, init_scale=0.0, default_stops=False, num_steps=1)
    stop = latentrt.generate(model, prompt, **kw).tokens[2]
    engine = Engine(model, max_batch=1, async_scheduling=async_scheduling)
    pool = engine.program.pool
    for stops, reason in (([], "length"), ([stop], "stop")):
        dropped = 2 if async_scheduling else 1
        req = engine.submit(prompt, stop=stops, **kw)
        engine.run_until_idle()
        row = req.row
        begun = len(prompt) + 2 + dropped if reason == "stop" else len(prompt) + kw["max_new_tokens"] - 1
        assert req.finish_reason == reason and row in pool.free_rows and pool.lengths[row] == begun
        written = pool.plain_k[:, row, :, :begun].abs().sum(dim=(0, 1, 3))  # per entry
        kept = begun - dropped
        assert (written[:kept] > 0).all() and (written[kept:] == 0).all()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_row_is_free_once_its_requests_last_token_is_sampled(async_scheduling):
    """A request whose last token (``max_new_tokens``) is sampled needs its row no more: the row goes back to
    the pool then, before the token is read, and the next queued request takes it at the next admission (the
    next step; with asynchronous scheduling, which samples before it admits, the same step), not a step after
    the token is read. The first request's last token is still read, checked and recorded as usual."""
    model = tiny_recurrent(seed=3)
    kw = dict(max_new_tokens=3, init_scale=0.0, default_stops=False, num_steps=2)
    engine = Engine(model, max_batch=1, async_scheduling=async_scheduling)
    a, b = engine.submit([5, 6, 7], **kw), engine.submit([8, 9], **kw)
    steps = 0
    while a.sampled < kw["max_new_tokens"]:
        engine.step()
        steps += 1
    sampled_at = steps
    while b not in engine.resident:
        engine.step()
        steps += 1
    assert steps - sampled_at == (0 if async_scheduling else 1) and b.row == a.row
    engine.run_until_idle()
    for req, prompt in ((a, [5, 6, 7]), (b, [8, 9])):
        alone = latentrt.generate(model, prompt, **kw)
        assert (req.tokens, req.steps, req.finish_reason) == (alone.tokens, alone.steps, "length")
    assert engine.program.pool.bytes_in_use() == 0


def test_unexpected_error_fails_resident_requests_and_the_engine_goes_on(monkeypatch, caplog):
    """A fault no request can be blamed for (a bug, a device error) fails the running requests with its
    message, logs its traceback for the operator, and the engine serves the next requests."""
    model = tiny_recurrent()
    engine = Engine(model, max_batch=2)
    a = engine.submit([5, 6], max_new_tokens=3, init_scale=0.0)
    launch = type(engine.program).launch

    def broken(self, idle):
        raise RuntimeError("device fault")

    monkeypatch.setattr(type(engine.program), "launch", broken)
    with caplog.at_level("ERROR", logger="latentrt.serve"):
        engine.step()
    assert a.finish_reason == "error" and "device fault" in str(a.error)
    (record,) = [r for r in caplog.records if r.name == "latentrt.serve"]
    assert "1 running request(s)" in record.getMessage() and record.exc_info[1] is not None
    assert "raise RuntimeError" in caplog.text  # the traceback
    monkeypatch.setattr(type(engine.program), "launch", launch)
    b = engine.submit([5, 6], max_new_tokens=3, init_scale=0.0)
    engine.run_until_idle()
    assert b.tokens == latentrt.generate(model, [5, 6], max_new_tokens=3, init_scale=0.0).tokens


def test_streamed_events_spell_the_result():
    model = tiny_recurrent(seed=3)
    events = []
    engine = Engine(model)
    req = engine.submit("Tom is a cat", max_new_tokens=8, default_stops=False, init_scale=0.0, on_event=events.append)
    engine.run_until_idle()
    tokens = [e for e in events if e.kind == "token"]
    assert [e.token for e in tokens] == req.tokens and [e.steps for e in tokens] == req.steps
    assert "".join(e.text for e in tokens) == req.text and events[-1].kind == "done"


def test_unservable_family_and_bad_engine_options(monkeypatch):
    model = tiny_recurrent()
    with pytest.raises(InputError, match="scheduler"):
        Engine(model, scheduler="fifo")
    with pytest.raises(InputError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(InputError, match="max_len"):
        Engine(model, max_len=10_000)
    with pytest.raises(InputError, match=r"max_len must be an integer in \[2, "):  # no request fits 1 position
        Engine(model, max_len=1)
    # a pool larger than the memory is refused before any allocation (it was the allocator's RuntimeError)
    with pytest.raises(
        InputError,
        match=r"the KV pool's buffers for 1000000000 resident requests of \d+ positions "
        r"and \d+ looped-layer slot rows \(max_batch, max_len, kv_slots\) need [\d.]+ GB, more than the",
    ):
        Engine(model, max_batch=10**9)
    for bad in (-1, float("inf"), float("nan"), "1", True):
        with pytest.raises(InputError, match="edge_cost"):
            Engine(model, edge_cost=bad)
    with pytest.raises(InputError, match="async_scheduling must be true or false, got 'yes'"):
        Engine(model, async_scheduling="yes")
    # the bound on a request's iterations per token: never below the model's own default depth
    default = model.default_steps()
    for bad in (default - 1, 0, "64", True, 2.5):
        with pytest.raises(InputError, match=rf"max_num_steps must be an integer >= {default} \(the num_steps a "):
            Engine(model, max_num_steps=bad)
    assert Engine(model, max_batch=1).max_num_steps == 256
    deep = Engine(tiny_recurrent(mean_recurrence=300), max_batch=1, kv_slots=1)
    assert deep.max_num_steps == 300  # (a default request of a deeper model is served)
    model.generation_defaults = {"num_steps": 20}  # (the server's defaults: --override-generation-config)
    with pytest.raises(InputError, match=r"max_num_steps must be an integer >= 20 \(the num_steps a request gets by"):
        Engine(model, max_batch=1, max_num_steps=10)
    model.generation_defaults = {}
    bounded = Engine(model, max_batch=1, kv_slots=8, max_num_steps=default + 1)
    bounded.request([5, 6], num_steps=default + 1)
    with pytest.raises(InputError, match=rf"num_steps={default + 2} is above this server's limit of {default + 1} "):
        bounded.request([5, 6], num_steps=default + 2, kv_sharing="shared")
    from latentrt.decode.coconut_serving import CoconutServing

    monkeypatch.setattr(CoconutServing, "async_scheduling", False)  # (a program that reads each step's ends at once)
    with pytest.raises(InputError, match="Coconut continuous-thought models cannot be served with async_scheduling"):
        Engine(tiny_coconut(), async_scheduling=True)


def test_pool_gather_equals_the_generate_cache():
    """One row of the pool and a batch-1 KVCache hold the same K/V after the same request (full mode)."""
    model = tiny_recurrent(seed=2)
    kw = dict(
        max_new_tokens=5,
        adaptive=True,
        num_steps=6,
        exit_criterion="latent-diff",
        exit_threshold=0.3,
        init_scale=0.0,
        kv_sharing="full",
        default_stops=False,
    )
    engine = Engine(model, max_batch=2)
    req = engine.submit([5, 6, 7], **kw)
    while len(req.tokens) < 4:
        engine.step()
    pool, row = engine.program.pool, req.row
    gen = latentrt.engine.Generation(model, [5, 6, 7], latentrt.GenerateOptions(**kw))
    events = gen.events(stream=False)
    for _ in range(4):
        next(events)
    cache, n = gen.decoder.cache, 5  # the prompt and two complete token units in both
    written = pool.written[row, :n]
    assert torch.equal(written, cache.written[0, :n]) and int(written.max()) > 1
    for slot in range(int(written.max())):
        phys = int(pool.slot_table[row, slot])
        entries = written > slot  # entries that wrote this slot
        a = pool.core_k[:, phys, :, :n][:, :, entries]
        b = cache.core_k[:, slot, 0, :, :n][:, :, entries]
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(pool.plain_k[:, row, :, :n], cache.plain_k[:, 0, :, :n], atol=1e-5)


def test_a_packed_pass_equals_its_chunks_run_apart():
    """Prompt rows (ragged, padded) and decode rows in one pass (``Packed``): every output and every K/V entry
    equals running each chunk alone (to rounding)."""
    from latentrt.kv_pool import KVPool
    from latentrt.models.layers import Packed

    model = tiny_recurrent(seed=4)
    g = torch.Generator().manual_seed(0)
    outs = []
    for packed in (False, True):
        pool = KVPool(model.cache_layout(), 4, 16, 8, model.dtype, model.device)
        for _ in range(4):
            pool.allocate(None)
        a = pool.begin([0, 1], 3, [3, 2])
        b = pool.begin([2, 3], 1)
        ids = [torch.randint(1, 40, (2, 3), generator=g), torch.randint(1, 40, (2, 1), generator=g)]
        g.manual_seed(0)
        if packed:
            p = Packed([a, b], [None, None])
            rope = tuple(p.pack([model.rope(a)[i], model.rope(b)[i]]) for i in (0, 1))
            e = p.unpack(model.prelude(p.pack(ids), pool, p, rope))
        else:
            e = [model.prelude(x, pool, c, model.rope(c)) for x, c in zip(ids, (a, b))]
        outs.append((e, pool.plain_k.clone(), pool.plain_v.clone()))
    (e0, k0, v0), (e1, k1, v1) = outs
    # equal up to fp32 rounding: a matrix product over 8 rows may round apart from one over 6 and one over 2
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(e0, e1))
    assert torch.allclose(k0, k1, rtol=1e-5, atol=1e-6) and torch.allclose(v0, v1, rtol=1e-5, atol=1e-6)
    assert k0[:, 1, :, 2].abs().sum() == 0  # row 1's padding query wrote no real entry (its trash entry instead)


def _pool_passes(model, kernel):
    """Prompt groups and decode rows of mixed KV modes through packed prelude / core / head passes over a
    pool (with ``kernel`` as its decode attention, or the reference): the outputs and the pool's K/V."""
    from latentrt.kv_modes import parse_kv_mode
    from latentrt.kv_pool import KVPool
    from latentrt.models.layers import Packed

    g = torch.Generator().manual_seed(0)
    pool = KVPool(model.cache_layout(), 4, 24, 12, model.dtype, model.device, kernel)
    for mode in ("full", "shared", "ring-2", "ring-3"):
        pool.allocate(parse_kv_mode(mode, 6))
    d, outs = model.config.n_embd, []

    def run(chunks, t_of):
        actives = [torch.tensor([r % 3 != 1 or t_of(r) < 2 for r in c.rows.tolist()]) for c in chunks]
        for c, a in zip(chunks, actives):
            c.iterations = torch.tensor([t_of(r) for r in c.rows.tolist()])
            pool.mark_iteration(c, None, a)
        p = Packed(chunks, actives)
        rope = tuple(p.pack([model.rope(c)[i] for c in chunks]) for i in (0, 1))
        s, e = (torch.randn(1, p.offsets[-1] + p.sizes[-1], d, generator=g) for _ in range(2))
        kept = p.pack([a[:, None].expand(-1, c.n) for c, a in zip(chunks, actives)])[0]  # inactive: discarded
        outs.append(model.core_iteration(s, e, pool, p, None, None, rope)[:, kept])
        outs.append(model.head(s, pool, p, None, rope)[:, kept])

    prompts = pool.begin([0, 1, 2, 3], 5, [5, 3, 4, 2])
    p = Packed([prompts], [None])
    ids = torch.randint(1, 40, (1, 20), generator=g)
    outs.append(model.prelude(ids, pool, p, tuple(p.pack([model.rope(prompts)[i]]) for i in (0, 1))))
    assert pool.valid[:, :5].sum() == 14
    for t in range(3):
        run([prompts], lambda r, t=t: t)
    for token in range(4):  # decode rows at different depths, beside a second prompt for row 2 at times
        rows = [0, 1, 3] if token % 2 else [0, 1, 2, 3]
        decode = pool.begin(rows, 1)
        chunks = [decode] + ([pool.begin([2], 2)] if token % 2 else [])
        for t in range(1 + token):
            run(chunks, lambda r, t=t: (t + r) % 5)
    # every entry but the trash one (``pool.trash``: padding's and inactive rows' writes go there, never a key)
    return outs, [buf[..., : pool.trash, :] for buf in (pool.plain_k, pool.plain_v, pool.core_k, pool.core_v)]


@torch.no_grad()
def test_pool_decode_kernel_equals_the_reference_in_packed_passes():
    """The serving pool's fused decode attention (the Triton backend's: one launch per layer writes each
    decode row's K/V and attends over its own row, slots by its own iteration and KV mode) gives the
    reference's outputs and K/V (gathered keys + SDPA), prompt chunks beside decode rows, some rows
    inactive; run under the interpreter on the CPU."""
    from latentrt import kernels
    from latentrt.kernels import pool_attention

    if not kernels.triton_available():
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    model = tiny_recurrent(seed=6, num_key_value_heads=2)
    want, want_kv = _pool_passes(model, None)
    got, got_kv = _pool_passes(model, pool_attention.fused)
    assert len(got) == len(want) > 10
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    for a, b in zip(got_kv, want_kv):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _engine_on_triton(max_batch: int, async_scheduling: bool = False, scheduler: str = "depth"):
    """A tiny recurrent model and an engine built on its Triton backend (the pool's fused attention, the
    graphed decode passes; the interpreter on the CPU); the model then goes back to the reference backend,
    so generate() alone is the reference while the engine keeps its kernels."""
    from latentrt import kernels
    from latentrt.backends import get_backend

    if not kernels.triton_available():
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    model = tiny_recurrent(seed=3)
    reference = model.backend
    model.backend = get_backend("triton", model)
    engine = Engine(model, max_batch=max_batch, async_scheduling=async_scheduling, scheduler=scheduler)
    assert engine.program.pool.decode_attention is not None and engine.program.decode_core is not None
    model.backend = reference
    return model, engine


def test_served_on_the_triton_backend_equals_generate_alone(monkeypatch):
    """A server on the Triton backend (its pool's decode and prompt attention fused, the decode rows' core
    pass as one graphable launch sequence over all pool rows; under the interpreter on the CPU) serves each request as
    generate() on the reference backend serves it alone, reading the device once per step; the captured
    passes' launches read nothing and bring in no host data (what a capture refuses or bakes in)."""
    from host_syncs import GraphedCalls, HostSyncs

    checked = GraphedCalls().install(monkeypatch)
    model, engine = _engine_on_triton(max_batch=4)
    requests = [r for r in recurrent_requests(14, seed=5) if not r[1].get("adaptive_prefill")][:5]
    requests = [(p, dict(kw, max_new_tokens=min(kw["max_new_tokens"], 6))) for p, kw in requests]  # interpreted
    # the kernels' lookup rules where they matter: prompt [18, 8], on which each of the three modes changes tokens
    # or steps against full (asserted below)
    lookups = lookup_requests(("skip", "always-last", "anchor-2"))[3:6]
    requests += lookups
    served = [engine.submit(p, **kw) for p, kw in requests]
    calls = []

    def counted(runner):
        run, kind = runner.run, type(runner).__name__
        return lambda: calls.append(kind) or run()

    program = engine.program
    for runner in (program.decode_core, program.decode_head, program.decode_prelude):  # graphed (eager off CUDA)
        runner.run = counted(runner)
    prefill = program.pool.prefill_attention  # prompt chunks: the pool's multi-query kernel
    program.pool.prefill_attention = lambda *a: calls.append("prefill") or prefill(*a)
    steps, syncs = 0, HostSyncs()
    with torch.no_grad():
        while engine.busy:
            with syncs:
                engine.step()
            steps += 1
    assert 0 < calls.count("DecodeCoreRunner") < steps and {"DecodeHeadRunner", "DecodePreludeRunner"} <= set(calls)
    assert "prefill" in calls
    # the passes counted as captured are the runners' calls, and the metrics report them (benchmarks/serve.py)
    graphed = sum(calls.count(k) for k in ("DecodeCoreRunner", "DecodeHeadRunner", "DecodePreludeRunner"))
    assert program.graph_passes == graphed < program.passes
    assert engine.metrics.snapshot()["graph_passes_total"] == graphed
    assert sum(syncs.hits.values()) <= steps, syncs.hits  # one read per step at most
    assert sum(checked.calls.values()) == graphed and not checked.hazards, checked.hazards
    for req, (p, kw) in zip(served, requests):
        alone = latentrt.generate(model, p, **kw)
        assert req.error is None, req.error
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)
    full = latentrt.generate(model, lookups[0][0], **dict(lookups[0][1], kv_sharing="full"))
    for req, (_, kw) in zip(served[-len(lookups) :], lookups):
        assert (req.tokens, req.steps) != (full.tokens, full.steps), kw["kv_sharing"]  # the rule matters here


@pytest.mark.parametrize("family, scheduler", [("recurrent", "depth"), ("recurrent", "token"), ("coconut", "depth")])
def test_a_step_reads_the_device_once(family, scheduler):
    """Inside a scheduler step the host waits for the device at most once (a step that ran and sampled nothing
    reads nothing): the read of which units ended and the tokens sampled, with their log-probs where asked
    (everything else it sends is copied asynchronously, numbers written into device tensors included, nothing
    it needs is read back): counted on every operation that would synchronise on CUDA, mixed requests,
    prompts admitted mid-run."""
    from host_syncs import HostSyncs

    model = tiny_recurrent(seed=3) if family == "recurrent" else tiny_coconut(seed=2)
    engine = Engine(model, max_batch=6, scheduler=scheduler)
    requests = (recurrent_requests(18, seed=2) if family == "recurrent" else coconut_requests(17))[:18]
    for i, (p, kw) in enumerate(requests[:9]):
        engine.submit(p, top_logprobs=(None, 2)[i % 2], **kw)  # log-probs come back in the same read
    steps, syncs = 0, HostSyncs()
    with torch.no_grad():
        while engine.busy:
            if steps == 5:
                for p, kw in requests[9:]:
                    engine.submit(p, **kw)
            with syncs:
                engine.step()
            steps += 1
    assert engine.metrics.requests == 18 and steps > 20
    reads = {k: n for k, n in syncs.hits.items() if k[1] == "serve/readback.py" and k[0] == "tolist"}
    assert len(reads) == 1 and steps - 3 <= sum(reads.values()) <= steps, syncs.hits  # none where nothing ran
    assert sum(syncs.hits.values()) == sum(reads.values()), syncs.hits


def _served_on_cuda(engine) -> tuple[int, collections.Counter]:
    """Run ``engine`` until idle under CUDA's sync check (warn mode): the steps, and the syncs by the innermost
    latentrt line on the Python stack (the C++ warning itself knows only the innermost Python frame, often
    torch's); a runner's capture (its first call and the capture, backends/graph.py) is left out."""
    import traceback
    import warnings

    steps, where = 0, collections.Counter()

    def record(message, *_args, **_kwargs) -> None:
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        if any(f.name in ("_run_on_capture_stream", "_capture") for f in stack):
            return
        ours = [f for f in stack if "/latentrt/" in f.filename]
        f = ours[-1] if ours else stack[-1]
        where[f"{f.filename.split('latentrt/')[-1]}:{f.lineno} {f.line}"] += 1

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            while engine.busy:
                engine.step()
                steps += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    named = "\n".join(f"{n:5d} {line}" for line, n in where.most_common())
    print(f"syncs in {steps} steps:\n{named}")  # in full: pytest shortens an assertion's message
    return steps, where


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_on_cuda_a_step_synchronises_once_and_serves_as_generate_alone(async_scheduling):
    """On a GPU, with the Triton backend's pool kernel and the decode rows' core pass captured as a graph:
    CUDA's own sync check (warn mode) sees one host synchronisation per step (requests without state noise:
    torch's trunc_normal_ is not ours), and every request's tokens and steps equal generate() alone on the
    reference backend; also with asynchronous scheduling (the read waits on an event for a copy into pinned
    memory queued before the next launch)."""
    from latentrt.backends import get_backend

    model = tiny_recurrent(seed=3).cuda()
    model.backend = get_backend("triton", model)
    engine = Engine(model, max_batch=6, async_scheduling=async_scheduling)
    assert engine.program.pool.decode_attention is not None
    model.backend = get_backend("torch", model)
    requests = [(p, dict(kw, init_scale=0.0)) for p, kw in recurrent_requests(12, seed=4)]
    served = [engine.submit(p, **kw) for p, kw in requests]
    steps, where = _served_on_cuda(engine)
    assert engine.program.decode_core._graph is not None  # the decode rows' passes were captured and replayed
    assert engine.program.decode_head._graph is not None and engine.program.decode_prelude._graph is not None
    assert sum(where.values()) <= steps, where  # the step's one read (none where a step read nothing)
    for req, (p, kw) in zip(served, requests):
        alone = latentrt.generate(model, p, **kw)
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_on_cuda_a_coconut_server_captures_its_passes_and_serves_as_generate_alone(async_scheduling):
    """On a GPU a Coconut server's steps replay captured passes (StepPassRunner; prompt chunks in a slot),
    a step synchronises at most once, and every request's tokens equal generate() alone on the reference
    backend."""
    from latentrt.backends import get_backend

    model = tiny_coconut(seed=2).cuda()
    model.backend = get_backend("triton", model)
    engine = Engine(model, max_batch=6, async_scheduling=async_scheduling)
    assert engine.program.pass_runner is not None
    model.backend = get_backend("torch", model)
    requests = coconut_requests(12)
    served = [engine.submit(p, **kw) for p, kw in requests]
    steps, where = _served_on_cuda(engine)
    assert engine.program.pass_runner.captures >= 1 and engine.metrics.graph_passes > 3
    assert sum(where.values()) <= steps, where
    for req, (p, kw) in zip(served, requests):
        assert req.tokens == latentrt.generate(model, p, **kw).tokens, (p, kw)


def test_the_decode_pass_runs_eagerly_where_graph_capture_fails(monkeypatch):
    """If capturing the decode rows' pass fails (a torch version, a driver), the server warns once and runs
    the same pass eagerly: every request still equals generate() alone. (The failure is simulated: the
    runner sees a CUDA device, its first call runs eagerly here and the capture raises as a failed one would.)"""
    from latentrt.backends.graph import GraphedRunner

    model, engine = _engine_on_triton(max_batch=3)
    runner = engine.program.decode_core

    class OnCuda:  # the model, as the runner sees it: on a CUDA device
        device = torch.device("cuda")

        def __getattr__(self, name):
            return getattr(model, name)

    runner.model = engine.program.decode_head.model = engine.program.decode_prelude.model = OnCuda()
    monkeypatch.setattr(GraphedRunner, "_run_on_capture_stream", lambda self: self.run())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("capture")))
    requests = [(p, dict(kw, max_new_tokens=3)) for p, kw in recurrent_requests(6, seed=7)][:2]
    served = [engine.submit(p, **kw) for p, kw in requests]
    with pytest.warns(UserWarning, match="runs eagerly"):
        engine.run_until_idle()
    assert isinstance(runner.capture_error, RuntimeError) and engine.program.decode_head.capture_error is not None
    for req, (p, kw) in zip(served, requests):
        alone = latentrt.generate(model, p, **kw)
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)


@pytest.mark.parametrize("scheduler", ["depth", "token"])
def test_two_prompt_groups_in_the_captured_passes_beside_waiting_rows(monkeypatch, scheduler):
    """Two prompt groups resident at once (the second admitted while the first is in its loop), both checked by
    KL, so the head pass holds two slots (the second's positions after the first's in the packed sequence); and
    under the token-synchronous scheduler, decode rows that ended their token wait out the others' iterations
    unlaunched, still active in their loops. Every request equals generate() alone."""
    from latentrt.decode.recurrent_serving_graph import DecodeHeadRunner

    slots_seen = []
    run = DecodeHeadRunner.run
    monkeypatch.setattr(DecodeHeadRunner, "run", lambda self: slots_seen.append(len(self.slots)) or run(self))
    model, engine = _engine_on_triton(max_batch=6, scheduler=scheduler)
    kl = dict(max_new_tokens=3, adaptive=True, exit_criterion="kl", exit_threshold=1e-3, init_scale=0.0)
    first = [(list(range(3, 12)), dict(kl, num_steps=8)), ([7, 8, 9], dict(kl, num_steps=8, kv_sharing="ring-2"))]
    second = [(list(range(20, 26)), dict(kl, num_steps=6)), ([5] * 11, dict(kl, num_steps=7, kv_sharing="shared"))]
    fixed = [([4, 5, 6], dict(max_new_tokens=4, num_steps=2, init_scale=0.0))]
    served = [(engine.submit(p, **kw), p, kw) for p, kw in first + fixed]
    with torch.no_grad():
        for _ in range(2):
            engine.step()
        served += [(engine.submit(p, **kw), p, kw) for p, kw in second]
        engine.run_until_idle()
    assert max(slots_seen) == (2 if scheduler == "depth" else 1)  # (the token scheduler: one group at a time)
    for req, p, kw in served:
        alone = generate_alone(model, p, **kw)
        assert req.error is None and (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)


def _serve_with_simulated_graphs(monkeypatch, capture_at: int, async_scheduling: bool = False):
    """The workload of the per-set graph tests, served with the decode runners' graphs simulated faithfully to
    CUDA's (benchmarks/simulated_graphs.py: a replay recomputes the pass from the runner's static inputs into
    the outputs fixed at capture; so a replay of another set's graph, or inputs not refreshed, would change
    tokens or log-probs). Returns the model, the engine, (runner, key) per capture, the core runner's calls as
    (key, how: eager / capture / replay), the replays, each runner's (key, graph held, other sets' graphs) at
    the end, and the (request, (prompt, options)) pairs served."""
    from benchmarks.simulated_graphs import SimulatedGraphs
    from latentrt.decode.recurrent_serving_graph import GroupSlotsRunner

    monkeypatch.setattr(GroupSlotsRunner, "CAPTURE_AT", capture_at)
    model, engine = _engine_on_triton(max_batch=4, async_scheduling=async_scheduling)
    runner, head = engine.program.decode_core, engine.program.decode_head
    calls = []
    call = type(runner).__call__

    def logged(self):  # the core runner's calls, by how each ran
        graph, captures = self._graph, self.captures
        out = call(self)
        how = "replay" if graph is not None else "capture" if self.captures > captures else "eager"
        calls.append((self._key, how, self._serials))
        return out

    monkeypatch.setattr(type(runner), "__call__", logged)
    requests = [r for r in recurrent_requests(14, seed=5) if not r[1].get("adaptive_prefill")][:6]
    requests = [(p, dict(kw, max_new_tokens=min(kw["max_new_tokens"], 4))) for p, kw in requests]
    # admitted together, one group: the first's loop ends at its r_max (2) while the group runs on to 7, its
    # entries then masked (its loop still active: only the group's members mask says it left; in shared KV
    # mode an iteration it did not run would overwrite its one slot)
    fixed = dict(max_new_tokens=3, kv_sharing="shared", init_scale=0.0)
    requests = [([5, 6, 7, 8, 9], dict(fixed, num_steps=2)), ([9, 8, 7], dict(fixed, num_steps=7))] + requests
    # then, once the server is idle, prompts of other lengths in groups of earlier ones' shapes: (4, 16, 16),
    # then three in a slot of four members (4, 32, 32), checked by KL (the head of a padded slot every step)
    kl = dict(fixed, adaptive=True, num_steps=6, exit_criterion="kl", exit_threshold=1e-3)
    later = [(list(range(3, 13)), dict(fixed, num_steps=4)), (list(range(20, 32)), dict(fixed, num_steps=3))]
    later += [([6, 7, 8, 9], dict(fixed, num_steps=2)), (list(range(11, 20)), dict(fixed, num_steps=3))]
    later += [(list(range(5, 25)), kl), ([9] * 18, dict(kl, num_steps=3)), ([4, 5] * 9, dict(kl, exit_threshold=0.1))]
    served = [engine.submit(p, top_logprobs=0, **kw) for p, kw in requests]  # log-probs: K/V changes show
    with torch.no_grad(), SimulatedGraphs([runner, head]) as sim:
        engine.run_until_idle()
        for batch in (later[:4], later[4:]):
            served += [engine.submit(p, top_logprobs=0, **kw) for p, kw in batch]
            engine.run_until_idle()
        requests += later
        graphs = [(r._key, r._graph is not None, set(r._captured)) for r in (runner, head)]  # at the end
    return model, engine, sim.captured, calls, sim.replays, graphs, list(zip(served, requests))


def _assert_served_as_alone(model, served) -> None:
    V = model.config.vocab_size
    for req, (p, kw) in served:
        alone = generate_alone(model, p, return_logits=True, **kw)
        assert req.error is None, req.error
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), (p, kw)
        lp = alone.logits[:, :V].float().log_softmax(-1)
        assert [e.logprob for e in req.logprobs] == pytest.approx(
            [lp[i, t].item() for i, t in enumerate(req.tokens)], abs=1e-5
        )


def test_the_captured_pass_is_kept_per_key_of_group_shapes(monkeypatch):
    """The decode rows' captured core and head passes run every resident prompt group whole beside them, each
    in a slot of its bucket's shape (members out of their loop and padding masked), one graph per tuple of
    shapes: captured at its first call (``CAPTURE_AT`` 1 here), replayed while the set stands, and by later
    sets of other groups of the same shapes, restored when it comes back (the empty key); every request
    equals generate() alone (its tokens, steps and log-probs)."""
    from latentrt.backends.graph import GraphedRunner

    model, engine, captured, calls, replays, graphs, served = _serve_with_simulated_graphs(monkeypatch, 1)
    keys = set(captured)  # (runner, (criteria, shapes))
    assert len(captured) == len(keys), captured  # each key captured once
    for name in ("DecodeCoreRunner", "DecodeHeadRunner"):
        assert any(k[0] == name and k[1][1] == () for k in keys), captured
        assert sum(k[0] == name and k[1][1] != () for k in keys) >= 2, captured
    assert replays > len(captured)
    first = {}  # key -> the groups it was captured with
    for key, _, serials in calls:
        first.setdefault(key, serials)
    reused = [(key, serials) for key, how, serials in calls if how == "replay" and serials != first[key]]
    # the later group of (4, 16, 16) replays an earlier group's graph; that of (4, 32, 32) does not: the server's
    # criteria on states (part of the key) grew since its first capture
    assert {key[1] for key, _ in reused} == {((4, 16, 16),)}, calls
    assert all(r[0][1] == () and r[1] for r in graphs)  # at the end: a key without groups, the others kept
    assert any(k[1] == ((4, 16, 16),) for k in graphs[0][2])
    _assert_served_as_alone(model, served)
    assert GraphedRunner._graph is None  # (the class default untouched)


def test_a_key_of_group_shapes_is_captured_only_at_its_third_call(monkeypatch):
    """A key of group shapes runs eagerly at its first two calls (a capture costs about two eager calls; one
    seen twice is likely to come back), its third is captured, later ones replay, whatever groups fill its
    slots; the empty key is captured at its first call. Requests still equal generate() alone."""
    model, engine, captured, calls, _, _, served = _serve_with_simulated_graphs(monkeypatch, 3)
    seen: dict = {}
    for i, (key, how, _) in enumerate(calls):
        seen[key] = seen.get(key, 0) + 1
        if (key, "capture") in [c[:2] for c in calls[:i]]:
            expect = "replay"
        elif key[1] == ():  # (no groups)
            expect = "capture"
        else:
            expect = "eager" if seen[key] < 3 else "capture"
        assert how == expect, (i, key, how, seen[key], calls)
    assert any(key[1] == () and how == "capture" for key, how, _ in calls)
    assert any(how == "eager" for _, how, _ in calls)
    assert any(key[1] != () and how == "replay" for key, how, _ in calls)  # a key with groups captured, replayed
    assert engine.program.decode_core.captures == sum(how == "capture" for _, how, _ in calls)
    _assert_served_as_alone(model, served)


def test_async_scheduling_with_the_captured_passes_serves_as_alone(monkeypatch):
    """With async_scheduling each step launches before it reads the previous launch's exits: decode rows and prompt
    group members that exited run the next captured pass masked (their loops inactive), a group member at its
    r_max is left out of it (its loop still active: the slot's members mask says so), and the iterations the
    host counted for a unit that had exited are taken back. Every request still equals generate() alone."""
    model, engine, captured, _, replays, _, served = _serve_with_simulated_graphs(monkeypatch, 1, async_scheduling=True)
    assert captured and replays
    _assert_served_as_alone(model, served)


def test_keys_of_group_shapes_never_captured_are_dropped_before_captured_ones(monkeypatch):
    """At most MAX_GRAPHS keys are kept besides the current one: the oldest key not yet captured goes first (a
    captured key's graphs cost a capture to make again), then the oldest; the empty key never."""
    from latentrt.decode.recurrent_serving_graph import GroupSlotsRunner

    class Slot:  # (a key's slots: their shapes alone)
        def __init__(self, shape, program):
            self.shape, self.group = shape, None

        shape_of = staticmethod(lambda group, pool: group.shape)

        def load(self, group):
            self.group = group

    monkeypatch.setattr(GroupSlotsRunner, "SLOT", Slot)
    runner = GroupSlotsRunner()
    runner.program, runner.MAX_GRAPHS = SimpleNamespace(pool=None), 2
    group = [SimpleNamespace(serial=i, shape=(1, 8 * (i + 1), 8 * (i + 1))) for i in range(4)]
    runner._select([group[0]])
    runner._graph = "captured"  # (the key of group 0's shape: captured)
    for g in group[1:]:
        runner._select([g])
    keys = [((), ()), ((), (group[0].shape,))]  # (criteria, shapes)
    assert list(runner._captured) == keys  # group 1's key (never captured) went first
    runner._select([group[0]])  # back: its graph restored, its slot loaded again
    assert runner._graph == "captured" and [s.group for s in runner.slots] == [group[0]]
    assert list(runner._captured) == [((), ()), ((), (group[3].shape,))]
    runner = GroupSlotsRunner()  # every key captured: the oldest goes
    runner.program, runner.MAX_GRAPHS = SimpleNamespace(pool=None), 2
    for g in group[:3]:
        runner._select([g])
        runner._graph = f"graph {g.serial}"
    assert list(runner._captured) == [((), ()), ((), (group[1].shape,))] and runner._graph == "graph 2"


def test_latency_samples_are_bounded(monkeypatch):
    """A server runs for days: the engine keeps the latest LATENCY_SAMPLES first-token and inter-token
    latencies (lists of every one grew with every token served), and the served requests' are recorded."""
    from latentrt.serve import metrics

    monkeypatch.setattr(metrics, "LATENCY_SAMPLES", 5)
    engine = Engine(tiny_recurrent(seed=3), max_batch=2)
    reqs = [engine.submit([5, 6, 7], max_new_tokens=4, num_steps=2, init_scale=0.0) for _ in range(4)]
    while not all(r.finished for r in reqs):
        engine.step()
    assert all(len(r.tokens) == 4 for r in reqs) and engine.metrics.requests == 4
    assert len(engine.metrics.ttft) == 4 and len(engine.metrics.itl) == 5  # 12 inter-token gaps, the last 5
    stamps = [t for r in reqs for t in r.times["tokens"]]
    assert all(0 <= gap <= max(stamps) - min(stamps) for gap in engine.metrics.itl)


@pytest.mark.parametrize("scheduler", ["depth", "token"])
def test_asynchronous_scheduling_ends_loops_at_their_depth_before_the_next_launch(scheduler, monkeypatch):
    """A unit at its r_max is known to end without reading the device: with asynchronous scheduling it is
    ended and sampled before the next launch (``ended_on_host``), so fixed-depth requests do not wait a launch
    per token for their exits to be read: the run takes fewer steps than without it (a few more than without
    asynchronous scheduling: a finished request's last token, so its row, is read a step later), the depth
    scheduler runs the same row-iterations as without asynchronous scheduling, and all equal generate() alone."""
    from latentrt.decode.recurrent_serving import RecurrentServing

    model = tiny_recurrent(seed=3)
    rng = random.Random(1)
    fixed = dict(max_new_tokens=4, num_steps=3, default_stops=False, init_scale=0.0)
    requests = [([rng.randrange(1, 40) for _ in range(rng.randrange(1, 20))], fixed) for _ in range(10)]

    def served(mode):
        return assert_served_equals_alone(model, requests, max_batch=4, scheduler=scheduler, async_scheduling=mode)

    sync, ahead = served(False).metrics, served(True).metrics
    monkeypatch.setattr(RecurrentServing, "ended_on_host", lambda self: [])
    late = served(True).metrics  # (every exit read from the flags, a launch later)
    assert sync.steps < ahead.steps < late.steps
    assert ahead.iterations == sync.iterations
    if scheduler == "depth":  # (the token schedulers launch waiting rows masked: those steps count rows)
        assert ahead.launched_rows == sync.launched_rows


def test_prompts_admitted_together_give_their_first_tokens_in_the_same_step():
    """A prompt group whose loops all reach their r_max ends whole at once (``ended_on_host``): each member's
    first token comes in the step the longest wait allows, not one member per step."""
    model = tiny_recurrent(seed=1)
    engine = Engine(model, max_batch=4)
    kw = dict(max_new_tokens=2, num_steps=3, init_scale=0.0, default_stops=False)
    reqs = [engine.submit(p, **kw) for p in ([5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15])]
    first = {}
    for _ in range(20):  # (bounded: a member that never ends fails here rather than hang)
        engine.step()
        first.update({id(r): engine.metrics.steps for r in reqs if r.tokens and id(r) not in first})
    assert len(first) == len(reqs) and len(set(first.values())) == 1
    engine.run_until_idle()
    for r, p in zip(reqs, ([5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15])):
        assert r.tokens == latentrt.generate(model, p, **kw).tokens


def test_a_request_made_while_a_failed_step_replaces_the_program_waits_for_the_new_one():
    """A failed step replaces the program (``_reset``: the old pool freed first); ``request`` on another thread
    (the server's) reads the pool meanwhile: it waits for the new program, never finds none (found by
    tools.soak: an AttributeError on the server's thread)."""
    import threading
    import time

    engine = Engine(tiny_recurrent(seed=1))
    entered, release = threading.Event(), threading.Event()
    base = type(engine.program)

    class Slow(base):  # a program whose pool takes its time to allocate
        def __init__(self, *args, **kwargs) -> None:
            entered.set()
            release.wait(10)
            super().__init__(*args, **kwargs)

    engine.program.__class__ = Slow
    resetting = threading.Thread(target=engine._reset, args=(RuntimeError("a failed step"),))
    resetting.start()
    assert entered.wait(10)
    got: dict = {}

    def ask() -> None:
        try:
            got["request"] = engine.request([5, 6], latentrt.GenerateOptions(max_new_tokens=2))
        except Exception as exc:  # noqa: BLE001 (what the thread met, for the assertion)
            got["error"] = exc

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(0.2)
    assert asking.is_alive() and not got  # waiting for the new program
    release.set()
    resetting.join(10)
    asking.join(10)
    assert "error" not in got and got["request"].options.max_new_tokens == 2


def test_the_priority_policy_admits_the_lowest_priority_first_and_fcfs_refuses_one():
    """``scheduling_policy="priority"`` (vLLM's): a free row takes the queued request of lowest priority, the first
    come among equals; each request's tokens stay those of generate() alone. Under "fcfs" a priority other than
    0 is an error (as in vLLM), and priorities must be integers."""
    model = tiny_recurrent(seed=3)
    engine = Engine(model, max_batch=1, scheduling_policy="priority")
    priorities = [0, 5, -1, 0, 5, -3]
    reqs = [engine.submit([5 + i, 6], max_new_tokens=2, seed=i, priority=p) for i, p in enumerate(priorities)]
    engine.run_until_idle()
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].times["admitted"])
    assert order == sorted(range(len(reqs)), key=lambda i: (priorities[i], i)) == [5, 2, 0, 3, 1, 4]
    for i, req in enumerate(reqs):
        assert req.tokens == latentrt.generate(model, [5 + i, 6], max_new_tokens=2, seed=i).tokens
    fcfs = Engine(model, max_batch=1)
    with pytest.raises(InputError, match=r"priority=2 is read under the priority scheduling policy"):
        fcfs.submit([5, 6], max_new_tokens=1, priority=2)
    fcfs.submit([5, 6], max_new_tokens=1, priority=0)  # (0, the default, is every request's under fcfs)
    for bad in ("1", 1.5, True):
        with pytest.raises(InputError, match="priority must be an integer"):
            engine.submit([5, 6], max_new_tokens=1, priority=bad)
    with pytest.raises(InputError, match=r"scheduling_policy must be one of \['fcfs', 'priority'\], got 'lifo'"):
        Engine(model, scheduling_policy="lifo")

    # offline (vLLM's LLM.generate(priority=)): one per prompt, or one for all; the results in the prompts' order
    prompts = [[5 + i, 6] for i in range(4)]
    got = engine.generate(prompts, max_new_tokens=2, seed=1, priority=[3, 1, 2, 0])
    assert [r.tokens for r in got] == [latentrt.generate(model, p, max_new_tokens=2, seed=1).tokens for p in prompts]
    assert len(engine.generate(prompts[:2], max_new_tokens=1, priority=4)) == 2
    with pytest.raises(InputError, match="priority has 3 entries for 4 prompts"):
        engine.generate(prompts, max_new_tokens=1, priority=[0, 1, 2])
    with pytest.raises(InputError, match=r"prompts\[1\]: priority=1 is read under the priority scheduling policy"):
        fcfs.generate(prompts, max_new_tokens=1, priority=[0, 1, 0, 0])
