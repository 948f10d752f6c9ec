"""latentrt/distributions.py: sampled tokens' distributions through captured graphs, bit for bit the eager ones.

The graphs are simulated as on CUDA (benchmarks/simulated_graphs.py: a replay recomputes the pass from the
runner's static input into the outputs fixed at the capture), so a stale input or a replay of another key's
graph changes what generate() draws.
"""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent
from host_syncs import GraphedCalls

import latentrt
from benchmarks.simulated_graphs import SimulatedGraphs
from latentrt.distributions import Distributions
from latentrt.sampling import in_vocabulary, sampling_probs


def test_a_graphs_distribution_is_the_eager_one_bit_for_bit_at_a_real_vocabulary():
    """One row alone and a batch of rows, the head's padding columns left out, each settings' capture then
    replays: equal to ``sampling_probs`` on the same logits (the draw depends on the last bits)."""
    big = SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(vocab_size=50257))
    torch.manual_seed(0)
    for rows in (1, 3):
        logits = torch.randn(rows, 50304) * 4
        for args in [(0.8, 20, None, 0.0, False), (1.0, None, 0.9, 0.0, True), (0.7, 50, 0.95, 0.05, False)]:
            with SimulatedGraphs([dists := Distributions(big)]) as sim:
                for _ in range(Distributions.CAPTURE_AT + 1):  # (eager calls, the capture, a replay)
                    got = dists(args, logits)
            assert sim.replays == 1 and len(sim.captured) == 1
            assert torch.equal(got, sampling_probs(in_vocabulary(logits, 50257), *args))
    half = logits.bfloat16()  # (a graph per dtype too: its input is the caller's logits as they are)
    with SimulatedGraphs([dists := Distributions(big)]):
        for _ in range(Distributions.CAPTURE_AT + 1):
            got_half, got = dists(args, half), dists(args, logits)
        assert got_half.data_ptr() != got.data_ptr()
    assert torch.equal(got_half, sampling_probs(in_vocabulary(half, 50257), *args)) and len(dists.runners) == 2


@pytest.mark.parametrize("make", [tiny_recurrent, tiny_coconut], ids=["recurrent", "coconut"])
def test_generate_samples_through_its_models_graphs_as_it_does_eagerly(monkeypatch, make):
    """generate()'s sampled tokens take their distributions from the model's graphs (one per settings and
    shape, kept across calls; each captured here at its first call): seeded batches (each row's distribution
    on the row alone), one prompt, unseeded batches (one distribution over the batch) and the speculative
    sampler's draws. Tokens equal the eager run's, replays happen, and nothing is baked into a capture."""
    model = make(seed=1)
    prompts = [[5, 6, 7], [9, 13], [14, 11, 8, 12]]
    calls = [
        dict(prompt=prompts, temperature=0.9, top_k=5, seed=11, max_new_tokens=6),
        dict(prompt=prompts, temperature=0.7, top_p=0.8, min_p=0.05, seed=3, max_new_tokens=5),
        dict(prompt=prompts[0], temperature=1.1, seed=7, max_new_tokens=6),
        dict(prompt=prompts, temperature=0.8, max_new_tokens=4),  # (unseeded: torch's generator, seeded below)
    ]
    if make is tiny_recurrent:
        calls.append(dict(prompt=prompts[1], temperature=0.9, seed=5, max_new_tokens=6, decoding="speculative"))

    def run_all() -> list:
        out = []
        for kw in calls:
            kw = dict(kw)
            torch.manual_seed(0)
            out.append(latentrt.generate(model, kw.pop("prompt"), **kw).tokens)
        return out

    eager = run_all()
    checked = GraphedCalls().install(monkeypatch)
    monkeypatch.setattr(Distributions, "CAPTURE_AT", 1)
    dists = Distributions.of_model(model)
    assert Distributions.of_model(model) is dists
    with torch.no_grad(), SimulatedGraphs([dists]) as sim:
        graphed = run_all()
        graphed_again = run_all()  # (every key's graph replayed)
    assert graphed == eager and graphed_again == eager
    shapes = {key[1] for key in dists.runners}
    assert (1, model.config.vocab_size) in shapes and (3, model.config.vocab_size) in shapes, shapes
    assert sim.replays > 40 and not checked.hazards, checked.hazards


def test_a_copied_or_pickled_model_gets_its_own_empty_distributions():
    """The graphs stay with their model: a deep copy (tests and trainers copy models) or a pickled model
    (``torch.save(model)``) starts without them, and makes its own at its first sampled token."""
    model = tiny_recurrent(seed=2)
    latentrt.generate(model, [5, 6], temperature=0.8, seed=1, max_new_tokens=3)
    dists = Distributions.of_model(model)
    assert dists.runners
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.__dict__["_latentrt_distributions"] is None
        theirs = Distributions.of_model(copied)
        assert theirs is not dists and theirs.model is copied and not theirs.runners
        assert latentrt.generate(copied, [5, 6], temperature=0.8, seed=1, max_new_tokens=3).tokens == (
            latentrt.generate(model, [5, 6], temperature=0.8, seed=1, max_new_tokens=3).tokens
        )


def test_generate_holds_the_models_lock_from_a_distribution_to_its_draw(monkeypatch):
    """Threads generating with one model share its graphs (an input copied in, an output overwritten by the
    next replay): each sampled pick holds the lock across its distributions and draws."""
    model = tiny_recurrent(seed=2)
    held = []
    call = Distributions.__call__
    monkeypatch.setattr(Distributions, "__call__", lambda self, *a: held.append(self.lock.locked()) or call(self, *a))
    latentrt.generate(model, [[5, 6], [7, 8, 9]], temperature=0.8, seed=1, max_new_tokens=3)
    latentrt.generate(model, [[5, 6], [7, 8, 9]], temperature=0.8, max_new_tokens=3)
    assert len(held) == 3 * 2 + 3 and all(held)
    assert not Distributions.of_model(model).lock.locked()


@pytest.mark.gpu
def test_on_cuda_generate_samples_through_captured_graphs_as_it_does_eagerly(monkeypatch):
    """On a GPU the distributions' graphs are real CUDA graphs (captured at a key's first call here): a
    seeded batch, one prompt and an unseeded batch draw the tokens the eager distributions draw, on the
    Triton backend (a graphed decode beside them) and a 50k vocabulary's row alone equals the eager one."""
    from latentrt.backends import get_backend

    model = tiny_recurrent(seed=1).cuda()
    model.backend = get_backend("triton", model)
    prompts = [[5, 6, 7], [9, 13], [14, 11, 8, 12]]
    calls = [
        (prompts, dict(temperature=0.9, top_k=5, seed=11, max_new_tokens=8)),
        (prompts[0], dict(temperature=1.1, top_p=0.9, seed=7, max_new_tokens=8)),
        (prompts, dict(temperature=0.8, max_new_tokens=6)),
    ]

    def run_all() -> list:
        out = []
        for prompt, kw in calls:
            torch.manual_seed(0)
            out.append(latentrt.generate(model, prompt, **kw).tokens)
        return out

    monkeypatch.setattr(Distributions, "CAPTURE_AT", 10**9)  # (never captured: the eager distributions)
    eager = run_all()
    monkeypatch.setattr(Distributions, "CAPTURE_AT", 1)
    assert run_all() == eager and run_all() == eager
    assert Distributions.of_model(model).captures >= 3

    big = SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(vocab_size=50257))
    logits = torch.randn(1, 50304, device="cuda") * 4
    dists = Distributions(big)
    for _ in range(2):  # (the capture, then a replay)
        got = dists((0.7, 50, 0.95, 0.05, False), logits)
    assert dists.captures == 1
    assert torch.equal(got, sampling_probs(in_vocabulary(logits, 50257), 0.7, 50, 0.95, 0.05, False))


def test_the_least_recently_used_settings_graph_is_dropped_and_its_captures_still_counted(monkeypatch):
    """At most MAX_GRAPHS runners are kept; a new key drops the one used longest ago (a key used again moves to
    the end), and ``captures`` still counts the dropped runners' graphs. A model moved to another device gets
    new distributions (graphs hold the old device's memory)."""
    big = SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(vocab_size=7))
    monkeypatch.setattr(Distributions, "MAX_GRAPHS", 2)
    monkeypatch.setattr(Distributions, "CAPTURE_AT", 1)
    logits = torch.randn(1, 8)
    a, b, c = ((t, None, None, 0.0, False) for t in (0.5, 0.8, 1.2))
    with SimulatedGraphs([dists := Distributions(big)]):
        for settings in (a, b, a, c):  # (a used again after b: b is the least recently used when c comes)
            got = dists(settings, logits)
            assert torch.equal(got, sampling_probs(in_vocabulary(logits, 7), *settings))
    assert [key[0] for key in dists.runners] == [a, c] and dists.captures == 3

    class Moved:
        device = torch.device("cpu")

    model = Moved()
    first = Distributions.of_model(model)
    assert Distributions.of_model(model) is first
    model.device = torch.device("meta")
    assert Distributions.of_model(model) is not first and Distributions.of_model(model).device == model.device
