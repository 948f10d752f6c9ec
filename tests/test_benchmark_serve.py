"""The serving load generator runs its three schedulers on one trace and reports what it promises; the
replayed-depth criterion exits after exactly the depths it replays. Checks that it runs, not the numbers."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import tiny_recurrent

import latentrt
from benchmarks import replay_exit
from benchmarks.serve import (
    TraceRequest,
    _serve,
    lockstep_bound,
    main,
    make_trace,
    parse_scheduler,
    pass_costs,
    percentile,
    replay,
    sampling_bound,
    weight_read_bounds,
    word_ids,
)
from latentrt.exits import CRITERIA
from latentrt.train.data import generate_dataset


def test_trace_is_poisson_mixed_and_reproducible():
    a = make_trace(40, 10.0, 3, "kl", 1e-3, 16)
    assert a == make_trace(40, 10.0, 3, "kl", 1e-3, 16)
    gaps = [y.arrival - x.arrival for x, y in zip(a, a[1:])]
    assert all(g >= 0 for g in gaps) and 0.03 < sum(gaps) / len(gaps) < 0.3  # mean 1 / rate
    assert len({len(r.prompt) for r in a}) > 5 and len({r.options["max_new_tokens"] for r in a}) > 1
    assert {r.options["exit_criterion"] for r in a} == {"kl"}  # one criterion and threshold for all
    assert any("temperature" in r.options for r in a) and any("temperature" not in r.options for r in a)
    seeds = [r.options["seed"] for r in a if "seed" in r.options]
    assert len(set(seeds)) == len(seeds) > 1  # each sampled request its own seed
    # the questions shuffled: generate_dataset cycles difficulties 1-4, the trace's arrivals do not
    questions = [r.question for r in generate_dataset(40, seed=3)]
    assert [r.prompt for r in a] != questions and sorted(r.prompt for r in a) == sorted(questions)


def test_lockstep_bound_and_percentiles():
    assert lockstep_bound([3, 3, 3], 8) == pytest.approx(1.0)
    assert lockstep_bound([1, 9], 1) == pytest.approx(1.0, abs=0.05)
    assert lockstep_bound([1, 9], 16) == pytest.approx(9 / 5, rel=0.01)  # the max is 9 almost surely
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4
    assert percentile([4, 1, 3, 2], 50) == 2 and percentile([4, 1, 3, 2], 25) == 1  # (unsorted)
    assert math.isnan(percentile([], 50))  # no sample: no figure (not a zero latency)


def test_pass_costs_put_the_head_where_the_criterion_runs_it():
    """A criterion that needs logits runs the head every iteration; the others once a token, with the prelude."""
    run = {"prelude_cost": 0.25, "head_cost": 0.5}
    assert pass_costs(run, "kl") == (1.5, 0.25) and pass_costs(run, "entropy-diff") == (1.5, 0.25)
    assert pass_costs(run, "latent-diff") == (1.0, 0.75) and pass_costs(run, "none") == (1.0, 0.75)
    assert not CRITERIA["latent-diff"].needs_logits and CRITERIA["kl"].needs_logits


def test_word_ids_stay_in_range_and_name_a_word_alike():
    ids = word_ids("Alex is a wumpus . Alex is a rompus .", 7)
    assert len(ids) == 10 and all(1 <= i <= 7 for i in ids) and ids[:3] == ids[5:8]
    assert set(word_ids(" ".join(map(str, range(200))), 3)) == {1, 2, 3}  # (id 0 never)


def test_arrivals_interleave_with_steps():
    """_serve submits each request at its arrival time and steps the engine meanwhile: a request that arrives
    later does not hold back the steps of one already there, and an idle engine sleeps until the next arrival."""

    class Engine:
        def __init__(self):
            self.events, self.pending = [], 0

        @property
        def busy(self):
            return self.pending > 0

        def submit(self, prompt, **options):
            self.events.append(("submit", prompt))
            self.pending += 1
            return prompt

        def step(self):
            self.events.append(("step", None))
            self.pending -= 1

    engine, sleeps = Engine(), []
    real_sleep = time.sleep

    def sleep(seconds):
        sleeps.append(seconds)
        real_sleep(seconds)

    trace = [TraceRequest(0.0, "a"), TraceRequest(0.1, "b")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "sleep", sleep)
        assert _serve(engine, trace, engine.step) == ["a", "b"]
    assert engine.events == [("submit", "a"), ("step", None), ("submit", "b"), ("step", None)]
    assert sleeps and 0.05 < sum(sleeps) < 0.11  # (one idle wait for b, not a busy loop)


def test_a_failed_request_fails_the_run():
    """A request that ends in an error (here a state that overflows fp32) fails the scheduler's run, naming it,
    rather than counting as served."""
    model = tiny_recurrent(seed=3)
    ok = dict(max_new_tokens=2, adaptive=True, num_steps=4, exit_criterion="kl", exit_threshold=1e-5)
    trace = [TraceRequest(0.0, [5, 6, 7], ok), TraceRequest(0.0, [5, 6], dict(ok, init_scale=1e39, seed=1))]
    with pytest.raises(RuntimeError, match="1 requests failed under depth: NonFiniteStateError"):
        replay(model, trace, "depth", max_batch=2)


def test_weight_read_bounds_count_the_per_token_passes():
    # depths 1 and 9 at 16 rows: a lockstep round reads 9 iterations (+ the per-token passes once) for 16
    # tokens; depth-level steps read 16 / 5 tokens' worth per iteration
    free, every = weight_read_bounds([1, 9], 16, per_iteration=1.5, per_token=0.5)
    assert free == pytest.approx((9 * 1.5 + 0.5) / (5 * 1.5), rel=0.01)
    assert every == pytest.approx((9 * 1.5 + 0.5) / (5 * 2.0), rel=0.01)
    assert weight_read_bounds([4, 4], 8, 1.0, 0.0) == pytest.approx((1.0, 1.0))


def test_sampling_bound_lies_between_sampling_every_step_and_for_free():
    """Sampling every k steps: free per-token passes give the lockstep bound at k = 1; costly ones make
    waiting pay (k > 1) and land between weight_read_bounds' two; with equal-cost passes (a CPU) the built-in
    trace's depths cap depth-level batching near 1.2x."""
    depths = [1, 9]
    assert sampling_bound(depths, 16, 1.0, 0.0) == (pytest.approx(lockstep_bound(depths, 16)), 1)
    free, every = weight_read_bounds(depths, 16, 1.0, 2.0)
    bound, k = sampling_bound(depths, 16, 1.0, 2.0)
    assert every <= bound <= free and k > 1
    # by hand at k: 16 / (5 + (k - 1) / 2) tokens for 1 + 2 / k passes, against 16 tokens for 9 + 2
    assert bound == pytest.approx(16 / (5 + (k - 1) / 2) / (1 + 2 / k) / (16 / 11), rel=0.01)
    builtin = [2] * 60 + [3] * 25 + [4] * 8 + [5] * 4 + [6] * 2 + [7]  # mean ~2.6, max 7: the built-in's shape
    assert 1.0 < sampling_bound(builtin, 16, 1.0, 2.0)[0] < 1.35


def test_replayed_depths_are_the_depths_run():
    model = tiny_recurrent(seed=1)
    with replay_exit.registered([2, 5], seed=0) as name:
        out = latentrt.generate(model, [3, 4, 5], max_new_tokens=12, adaptive=True, exit_criterion=name, num_steps=8)
        assert set(out.steps) <= {2, 5} and len(set(out.steps)) == 2
    assert name not in CRITERIA  # registered for the block only


@pytest.mark.parametrize("shape", ["model", "tiny"])
def test_load_generator_smoke(tmp_path, capsys, shape):
    out = tmp_path / "serve.json"
    argv = ["--quick", "--requests", "6", "--rate", "inf", "--shape", shape, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lockstep bound" in printed and "| depth |" in printed and "| static |" in printed
    record = json.loads(out.read_text())
    runs = {r["scheduler"]: r for r in record["runs"]}
    assert set(runs) == {"depth", "depth@0", "token", "static"}
    # --quick caps the trace and the batch; the exit left unset is the defaults'
    args = {k: record["args"][k] for k in ("requests", "max_batch", "criterion", "threshold", "num_steps")}
    assert args == dict(requests=6, max_batch=4, criterion="kl", threshold=1e-5, num_steps=32)
    for r in runs.values():
        assert r["requests"] == 6 and r["tokens"] == len(r["depths"]) > 0 and "outputs" not in r
        assert 0 < r["slot_utilisation"] <= 1 and 0 <= r["scheduler_overhead"] < 1
        # the figures are the run's counts over its time: per second, per step, per pass
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(r["tokens"])
        assert r["requests_per_s"] * r["seconds"] == pytest.approx(6)
        assert r["iterations_per_token"] == pytest.approx(sum(r["depths"]) / r["tokens"])
        assert 0 < r["step_ms"] * r["steps"] <= 1e3 * r["seconds"]
        assert 0 < r["tokens_per_pass"] <= 4 and 0 < r["tokens_per_weight_read"] <= 4  # (a pass: 4 rows at most)
        # six requests at once in a batch of four: several rows a step (the pool holds every row in full KV
        # mode), the last two requests' first tokens after the first four's
        assert 1.5 < r["rows_per_step"] <= 4 and not r["async_scheduling"]
        assert r["ttft_p50_ms"] < r["ttft_p99_ms"] and r["itl_p50_ms"] < r["itl_p99_ms"]
    lines = printed.splitlines()
    assert next(x for x in lines if x.startswith("| token |")).endswith("| 1.00x |")
    ratio = runs["depth"]["tokens_per_s"] / runs["token"]["tokens_per_s"]
    assert next(x for x in lines if x.startswith("| depth |")).endswith(f"| {ratio:.2f}x |")
    realised = 1 / runs["token"]["slot_utilisation"]
    assert f"realised lockstep loss in the token run (1 / its slot utilisation): {realised:.2f}" in printed
    # depth-level batching launches a row only while its loop runs
    assert runs["depth"]["slot_utilisation"] >= runs["token"]["slot_utilisation"]
    assert record["bound"] >= 1 and record["weight_read_bounds"][0] >= record["weight_read_bounds"][1]
    assert set(record["sampling_bounds"]) == {"weights", "passes"} and "in passes" in printed
    # the bounds of the depth run's depths; kl needs logits: a step's core iteration runs the head too
    depths, costs = runs["depth"]["depths"], pass_costs(runs["depth"], "kl" if shape == "model" else "none")
    assert record["bound"] == lockstep_bound(depths, 4)
    assert record["sampling_bounds"]["weights"] == list(sampling_bound(depths, 4, *costs))
    passes = (2.0, 1.0) if shape == "model" else (1.0, 2.0)
    assert record["sampling_bounds"]["passes"] == list(sampling_bound(depths, 4, *passes))


def test_load_generator_serves_a_coconut_model(tmp_path, capsys):
    """A Coconut model's trace: each request with its own count of continuous thoughts (``--thoughts``); slot
    utilisation counts passes (depth-level batching launches a row only for a pass it may need), and the depth
    bounds, which need a latent loop, are left out; the options of a recurrent-depth model are not sent."""
    out = tmp_path / "serve.json"
    argv = ["--model", "builtin:coconut", "--quick", "--requests", "8", "--rate", "inf", "--thoughts", "0,2,5"]
    assert main([*argv, "--schedulers", "token,depth", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "thoughts 0,2,5" in printed and "lockstep bound" not in printed and "| depth |" in printed
    record = json.loads(out.read_text())
    runs = {r["scheduler"]: r for r in record["runs"]}
    assert "bound" not in record  # (a unit begun before its request's stop token is read is the depth run's waste)
    assert 0 < runs["token"]["slot_utilisation"] < runs["depth"]["slot_utilisation"] <= 1.0
    assert runs["depth"]["tokens"] == runs["token"]["tokens"]  # (greedy or seeded: the same tokens)
    assert runs["depth"]["iterations_per_token"] == runs["token"]["iterations_per_token"] > 0  # (thoughts)
    trace = make_trace(30, float("inf"), 0, "kl", 1e-5, 16, thoughts=(0, 2, 5))
    assert {r.options["num_thoughts"] for r in trace} == {0, 2, 5}
    assert not any("num_steps" in r.options or "adaptive" in r.options for r in trace)
    # at a shape of its own (random weights, ids below the latent markers): the same trace's thoughts
    assert main([*argv, "--shape", "tiny-gpt2", "--schedulers", "depth", "--out", str(out)]) == 0
    assert "tiny-gpt2 shape, random weights (Coconut" in capsys.readouterr().out
    shaped = json.loads(out.read_text())["runs"][0]
    assert shaped["requests"] == 8 and shaped["iterations_per_token"] > 0
    for bad, why in [
        (["--thoughts", "-1"], "--thoughts must be integers >= 0"),
        (["--shape", "tiny"], "--shape tiny is a recurrent-depth model's shape; builtin:coconut is a Coconut model"),
        (["--criterion", "kl", "--num-steps", "8"], "--criterion, --num-steps set a recurrent-depth model's exit"),
    ]:
        with pytest.raises(SystemExit):
            main([*argv, *bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--shape", "gpt2"])
    assert "--shape gpt2 is a Coconut model's shape; builtin:recurrent is a recurrent-depth model" in (
        capsys.readouterr().err
    )


@pytest.mark.triton
def test_eager_ops_leave_out_replays_alone():
    """count_eager_ops counts every aten op a step dispatches (views apart) and, under the interpreter, every
    Triton launch, but those of replays; under simulated graphs a runner's eager calls (its first, its
    capture's) count and its replays do not."""
    import triton
    import triton.language as tl

    from benchmarks.simulated_graphs import SimulatedGraphs
    from benchmarks.step_profile import count_eager_ops
    from latentrt.backends.graph import GraphedRunner

    @triton.jit
    def one(x_ptr):
        tl.store(x_ptr, 1.0)

    class Model:
        device = torch.device("cpu")

    class Runner(GraphedRunner):
        def __init__(self):
            self.model = Model()

        def run(self):
            x = torch.ones(3)  # ones
            one[(1,)](x)  # a launch
            return x * 2  # mul

    runner = Runner()
    model = runner.model
    y = torch.zeros(1)

    def step():
        one[(1,)](y)  # a launch outside
        x = torch.zeros(4) + 1  # zeros, add
        x.view(2, 2)  # a view
        return runner()

    with SimulatedGraphs([runner]) as sim:
        counted = count_eager_ops(step, 2, lambda: sim.replaying > 0)
        # (2 + 2 eager + 2 + 0 replayed) / 2 ops, (1 + 1 + 1 + 0) / 2 launches
        assert counted == {
            "eager_ops_per_step": 3.0,
            "eager_views_per_step": 1.0,
            "eager_triton_launches_per_step": 1.5,
        }
        assert runner.captures == 1 and sim.replays == 1 and sim.captured == [("Runner", None)]
        out = step()
        assert torch.equal(out, torch.full((3,), 2.0)) and out is runner._outputs  # the replay's outputs
    assert runner.model is model and runner._graph is None and "_capture" not in vars(runner)  # restored
    again = count_eager_ops(step, 1)  # eager again
    assert again == {"eager_ops_per_step": 4.0, "eager_views_per_step": 1.0, "eager_triton_launches_per_step": 2.0}


# two requests in a pool of two rows (the pool kernels run every row: eight rows for two requests cost twice the time)
EAGER_OPS_RUN = "--requests 2 --max-batch 2 --schedulers depth --num-steps 3 --group-capture-at 1".split()


@pytest.mark.triton
def test_eager_ops_over_a_whole_run(capsys):
    """benchmarks.eager_ops serves its requests to the end with the captured passes simulated (captures and
    replays happen off CUDA) and prints the eager ops a step over every step of the run."""
    from benchmarks import eager_ops

    assert eager_ops.main(EAGER_OPS_RUN) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| depth")]
    assert len(lines) == 1
    _, capture_at, ops, views, launches, steps, captures, replays = [c.strip() for c in lines[0].strip("|").split("|")]
    assert capture_at == "1" and int(steps) > 3 and float(ops) > 0 and float(launches) > 0
    assert 0 < int(captures) < int(replays)  # (simulated: off CUDA nothing is captured otherwise)
    # a Coconut model's run: its trace draws thoughts, its captured pass (StepPassRunner) is simulated too (its one
    # prompt's chunk runs eagerly: a key with a chunk slot is captured at its third call)
    assert eager_ops.main("--model builtin:coconut --requests 1 --max-batch 1 --schedulers token".split()) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| token"))
    _, capture_at, ops, views, launches, steps, captures, replays = [c.strip() for c in line.strip("|").split("|")]
    assert capture_at == "3" and float(ops) > 0 and int(captures) in (1, 2) and int(replays) > 1  # (2: it samples)


@pytest.mark.triton
def test_host_time_leaves_out_what_a_gpu_runs_on_the_device(capsys):
    """``--host-time``: the same run timed instead of counted; a step's host ms is its wall ms less the
    simulated replays and the interpreted kernels outside them, so it is positive and below the wall."""
    from benchmarks import eager_ops

    assert eager_ops.main([*EAGER_OPS_RUN, "--host-time"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(x for x in out if x.startswith("| scheduler"))
    assert [c.strip() for c in header.strip("|").split("|")][2:4] == ["step_ms", "host_ms"]
    row = next(x for x in out if x.startswith("| depth"))
    _, _, step_ms, host_ms, steps, captures, replays = [c.strip() for c in row.strip("|").split("|")]
    assert 0 < float(host_ms) < float(step_ms) and int(steps) > 3 and 0 < int(captures) < int(replays)


def test_async_schedulers_run_beside_the_others(tmp_path, capsys):
    """``+async`` runs a scheduler with the engine's asynchronous scheduling, on the same trace, with the same
    tokens (the benchmark says when requests' outputs differ between schedulers)."""
    out = tmp_path / "serve.json"
    argv = ["--quick", "--requests", "4", "--rate", "inf", "--schedulers", "token,depth,token+async,depth+async"]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| depth+async |" in captured.out and "| token+async |" in captured.out
    assert "differ between schedulers" not in captured.err
    runs = {r["scheduler"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["depth+async"]["tokens"] == runs["depth"]["tokens"] > 0
    assert [runs[s]["async_scheduling"] for s in ("token", "depth", "token+async", "depth+async")] == [
        False,
        False,
        True,
        True,
    ]


def test_outputs_that_differ_between_schedulers_are_noted(monkeypatch, capsys):
    """A request's tokens are the same under every scheduler unless rounding flips an exit; when they are not,
    the benchmark says how many requests differ."""
    import benchmarks.serve as serve

    real = serve.replay

    def replay(model, trace, scheduler, *args, **kw):
        run = real(model, trace, scheduler, *args, **kw)
        if scheduler == "depth":
            run["outputs"][1] = [*run["outputs"][1], 0]
        return run

    monkeypatch.setattr(serve, "replay", replay)
    assert main(["--quick", "--requests", "3", "--rate", "inf", "--schedulers", "token,depth"]) == 0
    assert "note: 1 of 3 requests' tokens differ between schedulers" in capsys.readouterr().err


@pytest.mark.triton
def test_group_capture_at_is_set_on_the_engines_runners_alone(tmp_path, capsys):
    """--group-capture-at reaches the served engines' captured passes (their own attribute: the runtime's
    default stays), each run records its captures (none off CUDA), and the header says which step captures."""
    from benchmarks.serve import _engine
    from latentrt.backends import get_backend
    from latentrt.decode.recurrent_serving_graph import GroupSlotsRunner

    model = latentrt.load("builtin:recurrent")
    model.backend = get_backend("triton", model)
    engine = _engine(model, group_capture_at=1, max_batch=2, max_len=64, kv_slots=64)
    assert engine.program.decode_core.CAPTURE_AT == engine.program.decode_head.CAPTURE_AT == 1
    assert GroupSlotsRunner.CAPTURE_AT == 3 and _engine(model, max_batch=2).program.decode_core.CAPTURE_AT == 3
    assert engine.distributions.CAPTURE_AT == 3  # (the sampled distributions' graphs keep their own)
    out = tmp_path / "serve.json"
    argv = ["--quick", "--requests", "3", "--rate", "inf", "--schedulers", "depth", "--group-capture-at", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "a key of prompt-group slot shapes captured at its call 2" in capsys.readouterr().out
    assert [r["captures"] for r in json.loads(out.read_text())["runs"]] == [0]  # (graphs are CUDA's)
    with pytest.raises(SystemExit):
        main([*argv[:-1], "0"])
    assert "--group-capture-at" in capsys.readouterr().err


def test_synthetic_depths_are_replayed_and_named(tmp_path, capsys):
    """--depths replays a given depth distribution on the random-weight model (and says so); on the trained
    model itself it is refused."""
    out = tmp_path / "serve.json"
    argv = ["--quick", "--requests", "4", "--rate", "inf", "--shape", "tiny", "--schedulers", "token,depth"]
    assert main([*argv, "--depths", "2,9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "depths replayed from the synthetic --depths 2,9" in printed
    runs = {r["scheduler"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs["depth"]["depths"]) == {2, 9} and set(runs["token"]["depths"]) == {2, 9}  # (num_steps 9)
    for bad, why in [(["--depths", "2,x"], "comma-separated integers"), (["--depths", "0"], ">= 1")]:
        with pytest.raises(SystemExit):
            main([*argv, *bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--depths", "2,9"])
    assert "--shape huginn or tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--model", "builtin:coconut", "--shape", "tiny-gpt2", "--depths", "2,9"])
    assert "--depths replays a recurrent-depth model's exit depths; builtin:coconut is a Coconut model" in (
        capsys.readouterr().err
    )


def test_bad_scheduler_names_are_refused(capsys):
    for bad in ("fifo", "depth@x", "depth+later"):
        with pytest.raises(SystemExit):
            main(["--quick", "--schedulers", bad])
        err = capsys.readouterr().err
        assert "unknown schedulers" in err or "not a number" in err
    assert parse_scheduler("depth@0+async") == ("depth", 0.0, True)
    assert parse_scheduler("token") == ("token", None, False)


def test_profiled_steps_count_what_a_step_runs(tmp_path, capsys):
    """--profile-steps serves the trace again, untimed, and profiles that many steps of each scheduler: per
    step the kernel and graph launches, syncs (0 on the CPU: no CUDA), aten ops (each eager op) and time."""
    out = tmp_path / "serve.json"
    argv = ["--quick", "--requests", "6", "--rate", "inf", "--schedulers", "token,depth", "--profile-steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "| scheduler | kernel_launches_per_step |" in capsys.readouterr().out
    for run in json.loads(out.read_text())["runs"]:
        p = run["profile"]
        assert p["steps"] == 3 and p["aten_ops_per_step"] > 10 and p["wall_ms_per_step"] > 0, p
        assert p["kernel_launches_per_step"] == p["graph_launches_per_step"] == p["gpu_busy_ms_per_step"] == 0
        assert p["eager_ops_per_step"] > 0 and p["eager_views_per_step"] >= 0, p  # (the torch backend: all eager)
    with pytest.raises(SystemExit):
        main([*argv[:-1], "-1"])
    assert ">= 0" in capsys.readouterr().err
