"""The samplers benchmark runs and reports what it promises (checks that it runs, not the numbers)."""

from __future__ import annotations

import json

import pytest

from benchmarks.samplers import main, wilson
from latentrt.train.data import generate_dataset


def test_wilson_interval():
    lo, hi = wilson(66, 100)
    assert lo == pytest.approx(0.563, abs=1e-3) and hi == pytest.approx(0.745, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)  # no problem: nothing known


def test_accuracy_and_speed_table(tmp_path, capsys, monkeypatch):
    """--quick caps the problems at 4 (and the ProsQA file's records at 2); the samplers run with the flags'
    lookahead, draft steps and new tokens."""
    from benchmarks import samplers

    prosqa = tmp_path / "prosqa.json"  # (the shared file's format: a JSON list of records)
    names = ("Alex", "Bob", "Carol")
    prosqa.write_text(
        json.dumps(
            [
                dict(question=f"{n} is a wumpus. Is {n} a wumpus or rompus?", steps=[], answer=f"{n} is a wumpus.")
                for n in names
            ]
        )
    )
    monkeypatch.setattr(samplers, "SHARED_PROSQA", prosqa)
    calls, real = [], samplers.run_set

    def run_set(model, records, kws, num_steps, max_new):
        calls.append((len(records), kws["speculative"]["decoding_options"], num_steps, max_new))
        return real(model, records, kws, num_steps, max_new)

    monkeypatch.setattr(samplers, "run_set", run_set)
    out = tmp_path / "s.json"
    flags = ["--lookahead", "2", "--draft-steps", "1", "--max-new-tokens", "5", "--num-steps", "3"]
    assert main(["--quick", "--problems", "9", *flags, "--out", str(out)]) == 0
    options = dict(lookahead=2, draft_steps=1)
    assert calls == [(4, options, 3, 5), (2, options, 3, 5)]  # generated, then the ProsQA file's
    runs = {r["sampler"]: r for r in json.loads(out.read_text())["runs"] if r["set"] == "generated"}
    assert set(runs) == {"sequential", "speculative", "wavefront"}
    assert runs["sequential"]["tokens_per_pass"] == 1.0 and runs["sequential"]["vs_sequential"] == 1.0
    assert runs["sequential"]["decode_vs_sequential"] == 1.0
    assert runs["sequential"]["iterations_per_token"] == 3  # (every token at num_steps: fixed depth)
    assert runs["sequential"]["draft_acceptance"] is None and runs["wavefront"]["draft_acceptance"] is None
    assert 0 <= runs["speculative"]["draft_acceptance"] <= 1
    # timings are reported, not asserted (a loaded machine once timed the prefill apart longer than a run)
    assert all(r["prefill_share"] > 0 for r in runs.values())
    for r in runs.values():
        assert r["n"] == 4 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["tokens"] > 0
    assert "| wavefront |" in capsys.readouterr().out
    calls.clear()
    assert main(["--quick", "--problems", "1", "--prosqa", "0", *flags]) == 0
    assert [n for n, *_ in calls] == [1]  # (no ProsQA set)


def test_passes_are_the_units_a_sampler_ran():
    """``passes`` reads a generation's passes (a head each) and core iterations from its decoding record; they
    are the head and core calls the model made (sampler_replay's recording), for every sampler."""
    import latentrt
    from benchmarks.sampler_replay import record_passes
    from benchmarks.samplers import configs, passes

    model = latentrt.load("builtin:recurrent")
    question = generate_dataset(1, seed=12345)[0].question
    for draft_steps in (1, 2):
        for name, kw in configs(4, lookahead=3, draft_steps=draft_steps).items():
            with record_passes(model) as calls:
                out = latentrt.generate(model, question, max_new_tokens=10, num_steps=4, **kw)
            if name == "speculative":
                out.decoding["draft_steps"] = draft_steps  # (as run_set adds it)
            heads = sum(kind.startswith("head") for kind, _ in calls)
            assert passes(out, 4) == (heads, sum(kind == "core" for kind, _ in calls)), (name, draft_steps)


def test_rates_time_the_runs_and_the_decode_leaves_out_the_prefill(monkeypatch):
    """On a clock where a generation costs 1 s plus 0.1 s a token: tokens/s over the runs' time, and the
    decode phase's rate (the prompt timed apart and every first token subtracted) 10 tokens/s exactly."""
    import types

    import latentrt
    from benchmarks import samplers

    clock = [0.0]
    real = latentrt.generate

    def generate(model, prompt, **kw):
        out = real(model, prompt, **kw)
        clock[0] += 1.0 + 0.1 * len(out.tokens)
        return out

    monkeypatch.setattr(samplers.latentrt, "generate", generate)
    monkeypatch.setattr(samplers, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = latentrt.load("builtin:recurrent")
    records = generate_dataset(2, seed=12345)
    rows = {r["sampler"]: r for r in samplers.run_set(model, records, samplers.configs(4), 4, 6)}
    for r in rows.values():
        n = r["tokens"]
        assert r["tokens_per_s"] == pytest.approx(n / (2 + 0.1 * n))
        assert r["decode_tokens_per_s"] == pytest.approx(10.0) and r["decode_vs_sequential"] == pytest.approx(1.0)
        assert r["prefill_share"] == pytest.approx(2 * 1.1 / (2 + 0.1 * n))
        assert r["vs_sequential"] == pytest.approx(r["tokens_per_s"] / rows["sequential"]["tokens_per_s"])
    # accuracy: the answer after '###' (the first problem right, the second wrong at 4 steps)
    right = [real(model, r.question, max_new_tokens=6, num_steps=4).text == f"### {r.answer}" for r in records]
    assert right == [True, False] and rows["sequential"]["accuracy"] == 0.5


def test_pass_cost_table(tmp_path):
    out = tmp_path / "p.json"
    assert main(["--pass-cost", "--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["pass_cost"]
    assert [r["W"] for r in rows] == [1, 2, 4, 8] and rows[0]["vs_W1"] == 1.0 and all(r["ms"] > 0 for r in rows)


def test_replayed_passes_split_at_each_first_token():
    from collections import Counter

    from benchmarks.sampler_replay import START, split_decode

    calls = [START, ("prelude", 7), ("core", 7), ("head_last", 7), ("prelude", 1), ("core", 1), ("head_last", 1)]
    calls += [START, ("prelude", 5), ("core", 5), ("head_last", 5), ("prelude", 3), ("core", 3), ("head", 3)]
    every, decode = split_decode(calls)
    assert sum(every.values()) == 12 and every[("core", 7)] == 1
    assert decode == Counter(
        {("prelude", 1): 1, ("core", 1): 1, ("head_last", 1): 1, ("prelude", 3): 1, ("core", 3): 1, ("head", 3): 1}
    )


def test_sampler_replay_smoke(tmp_path, capsys, monkeypatch):
    """The whole run on the built-in model: the flags reach the recording and the timing (at the problems' mean
    prompt length, --quick capping the problems at 3), and the floor is the copy bandwidth over a token's bytes."""
    import latentrt
    from benchmarks import floors, sampler_replay
    from benchmarks.sampler_replay import main, record_passes

    seen = {}
    trace, time_passes = sampler_replay.trace, sampler_replay.time_passes

    def traced(model, questions, *args):
        seen["questions"], seen["trace"] = questions, args
        return trace(model, questions, *args)

    def timed(model, keys, context, num_steps, repeats):
        seen["time"] = (context, num_steps)
        return time_passes(model, keys, context, num_steps, repeats)

    monkeypatch.setattr(sampler_replay, "trace", traced)
    monkeypatch.setattr(sampler_replay, "time_passes", timed)
    monkeypatch.setattr(sampler_replay, "copy_bandwidth", lambda nbytes, device, repeats: {"value": 1e12})
    out = tmp_path / "r.json"
    argv = ["--quick", "--shape", "model", "--problems", "5", "--num-steps", "4", "--lookahead", "2"]
    assert main([*argv, "--draft-steps", "1", "--max-new-tokens", "6", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    model = latentrt.load("builtin:recurrent")
    context = round(sum(len(model.tokenizer.encode(q)) for q in seen["questions"]) / 3)
    assert len(seen["questions"]) == 3 and seen["trace"] == (4, 6, 2, 1) and seen["time"] == (context, 4)
    assert rec["context"] == context
    step = floors.recurrent_step_bytes(model.config, batch=1, context=context, steps=4, element_size=4)
    assert rec["floor_tokens_per_s"] == pytest.approx(1e12 / step["total"])
    rows = {r["sampler"]: r for r in rec["rows"]}
    assert set(rows) == {"sequential", "speculative", "wavefront"} and rows["sequential"]["vs_sequential"] == 1.0
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rec["pass_ms"] and rec["sequential_generate_tokens_per_s"] > 0
    assert "| wavefront |" in capsys.readouterr().out
    with record_passes(model) as calls:
        latentrt.generate(model, [3, 4, 5], max_new_tokens=2, num_steps=3)
    # sequential: per unit a prelude, num_steps iterations, a head; the methods are the class's again after
    assert calls.count(("core", 1)) == 3 and calls[0] == ("prelude", 3) and "prelude" not in vars(model)


def test_replayed_estimates_sum_each_samplers_passes_at_their_cost():
    """estimate: a sampler's time is the sum of its passes' costs, end to end and for the decode phase alone;
    the ratios are to sequential decoding (configs()' first)."""
    from collections import Counter

    from benchmarks.sampler_replay import estimate

    cost = {("prelude", 1): 1.0, ("core", 1): 2.0, ("head", 1): 0.5, ("core", 4): 3.0}
    traced = {
        "sequential": dict(
            every=Counter({("prelude", 1): 4, ("core", 1): 8, ("head", 1): 4}),
            decode=Counter({("prelude", 1): 3, ("core", 1): 6, ("head", 1): 3}),
            tokens=4,
            decode_tokens=3,
        ),
        "speculative": dict(
            every=Counter({("core", 4): 2, ("head", 1): 2}), decode=Counter({("core", 4): 1}), tokens=5, decode_tokens=4
        ),
    }
    seq, spec = estimate(traced, cost)
    assert (seq["sampler"], seq["passes"], seq["tokens"]) == ("sequential", 16, 4)
    assert seq["tokens_per_s"] == pytest.approx(4 / 0.022) and seq["decode_tokens_per_s"] == pytest.approx(3 / 0.0165)
    assert spec["passes"] == 4 and spec["tokens_per_s"] == pytest.approx(5 / 0.007)
    assert spec["decode_tokens_per_s"] == pytest.approx(4 / 0.003)
    assert seq["vs_sequential"] == seq["decode_vs_sequential"] == 1.0
    assert spec["vs_sequential"] == pytest.approx((5 / 0.007) / (4 / 0.022))
    assert spec["decode_vs_sequential"] == pytest.approx((4 / 0.003) / (3 / 0.0165))


def test_traced_passes_and_the_targets_own_rate(monkeypatch):
    """trace counts every sampler's passes and tokens (sequential at fixed depth: a prelude, num_steps core
    iterations and a head a token; the first token of each problem is the prompt's); sequential_generate is the
    decode rate from two timed runs (1 and n tokens: the prompt's cost cancels)."""
    import types

    import latentrt
    from benchmarks import sampler_replay

    model = latentrt.load("builtin:recurrent")
    questions = [r.question for r in generate_dataset(2, seed=12345)]
    traced = sampler_replay.trace(model, questions, 3, 5, 2, 1)
    assert set(traced) == {"sequential", "speculative", "wavefront"}
    seq = traced["sequential"]
    n, prompts = seq["tokens"], [len(model.tokenizer.encode(q).ids) for q in questions]
    assert seq["decode_tokens"] == n - 2
    decode = {("prelude", 1): n - 2, ("core", 1): 3 * (n - 2), ("head_last", 1): n - 2}  # (a head: the last logits)
    assert seq["decode"] == decode and seq["every"] == decode | {
        (kind, w): 3 if kind == "core" else 1 for w in prompts for kind in ("prelude", "core", "head_last")
    }
    assert model.backend.name == "torch"

    clock, calls = [0.0], []

    def generate(model, ids, max_new_tokens, **kw):  # 1 s for the prompt, 0.1 s a token
        calls.append((max_new_tokens, kw))
        clock[0] += 1.0 + 0.1 * max_new_tokens

    monkeypatch.setattr(sampler_replay.latentrt, "generate", generate)
    monkeypatch.setattr(sampler_replay, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert sampler_replay.sequential_generate(model, 7, 6, 4) == pytest.approx(10.0)
    assert calls == [(n, dict(num_steps=4, default_stops=False)) for n in (2, 1, 6)]  # (a warm-up, then timed)


def test_each_pass_is_timed_as_the_sampler_ran_it():
    """time_passes runs each distinct pass at its width after the cached context: a head_last pass with
    last_only (the logits of its last position only), a head pass without; each one a timing."""
    import latentrt
    from benchmarks.sampler_replay import time_passes

    model = latentrt.load("builtin:recurrent")
    heads, real = [], model.head

    def head(*args, **kwargs):
        heads.append((int(args[0].shape[1]), kwargs.get("last_only")))
        return real(*args, **kwargs)

    model.head = head
    keys = {("head", 3), ("head_last", 3), ("core", 2), ("prelude", 1)}
    cost = time_passes(model, keys, context=5, num_steps=2, repeats=2)
    assert set(cost) == keys and all(ms > 0 for ms in cost.values())
    assert set(heads) == {(3, False), (3, True)}
