"""Serving load generator: one Poisson trace, three schedulers (``python -m benchmarks.serve``).

The trace: ProsQA-style questions (latentrt.train.data) of mixed lengths, arriving as a Poisson process,
each with its own options (new tokens, greedy or seeded sampling) and one exit criterion and threshold for
all. The same trace is replayed in real time against a fresh ``Engine`` per scheduler (``static``: batches
that wait for their slowest sequence; ``token``: continuous batching at token granularity; ``depth``:
continuous batching at iteration granularity), the engine stepping on this thread, and each run reports
throughput (tokens/s, requests/s), TTFT and inter-token latency p50/p99, latent iterations per token, slot
utilisation (iterations needed / row-iterations executed) and scheduler overhead (host share of step time).

The theoretical bound of depth-level over token-level batching for the trace: with B rows in lockstep a
token costs the deepest of the B rows' loops, with depth-level batching its own, so at full batches the
gain is at most E[max of B depths] / E[depth], estimated from the depths the depth run recorded.

``--shape huginn`` (for a GPU) serves a random-weight model at Huginn-0125's shape, whose exit depths are
those recorded from the built-in model on the same trace, replayed (benchmarks/replay_exit.py).

A Coconut model (``--model builtin:coconut``) is served the same way, each request with its own count of
continuous thoughts (``--thoughts``, drawn uniformly): a request holds its row for a pass per thought while
its prompt runs, as a recurrent request does for an iteration; slot utilisation counts passes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

import latentrt
from latentrt.backends import CHOICES, get_backend
from latentrt.decode.serving_graph import SlotsRunner
from latentrt.exits import CRITERIA
from latentrt.families import build_model, family_for, parse_config
from latentrt.loader import parse_device
from latentrt.serve.engine import SCHEDULERS, Engine
from latentrt.train.data import generate_dataset

from . import cli, replay_exit, step_profile
from .run import environment
from .simulated_graphs import SimulatedGraphs
from .suites import GPT2_124M, HUGINN_0125, TINY_GPT2, TINY_RECURRENT

SHAPES = {"huginn": HUGINN_0125, "tiny": TINY_RECURRENT}  # random-weight models with replayed depths
# random-weight Coconut models (the trace's thoughts; the latent markers the last ids of the vocabulary)
MARKERS = dict(latent_id=-1, start_latent_id=-2, end_latent_id=-3)
COCONUT_SHAPES = {
    name: dict(shape, **{k: shape["vocab_size"] + v for k, v in MARKERS.items()})
    for name, shape in (("gpt2", GPT2_124M), ("tiny-gpt2", TINY_GPT2))
}
SHAPES |= COCONUT_SHAPES
THOUGHTS = (0, 1, 2, 3, 4, 5, 6)  # a Coconut trace's counts of thoughts (the built-in was trained with 3)


def takes_thoughts(model) -> bool:
    """Whether ``model`` is served with continuous thoughts (a Coconut model: no latent loop, no exit)."""
    return "num_thoughts" in family_for(model).decoder.OPTIONS


@dataclass
class TraceRequest:
    arrival: float  # seconds after the start
    prompt: str | list[int]
    options: dict = field(default_factory=dict)


RUNNERS = (
    "decode_core",
    "decode_head",
    "decode_prelude",
    "pass_runner",
    "heads_runner",
)  # the programs' captured passes


def _runners(engine: Engine) -> list:
    """The engine's captured passes (GraphedRunner instances; none where its program has none), then its sampled
    tokens' distributions (``Distributions``: a maker of runners, one per sampling settings)."""
    return [r for r in (getattr(engine.program, name, None) for name in RUNNERS) if r is not None] + [
        engine.distributions
    ]


def _engine(model, group_capture_at: int | None = None, **kw) -> Engine:
    """An engine; ``group_capture_at`` set on its captured passes' runners (theirs alone)."""
    engine = Engine(model, **kw)
    for runner in _runners(engine):
        if group_capture_at is not None and isinstance(runner, SlotsRunner):
            runner.CAPTURE_AT = group_capture_at
    return engine


def make_trace(
    n: int,
    rate: float,
    seed: int,
    criterion: str,
    threshold: float,
    num_steps: int,
    new_tokens=(4, 8, 12, 16),
    thoughts: tuple[int, ...] | None = None,
) -> list[TraceRequest]:
    """``n`` questions arriving at ``rate`` per second (Poisson), mixed lengths (difficulty 1-4) and options:
    a recurrent-depth model's exit (``criterion``, ``threshold``, ``num_steps``), or with ``thoughts`` a Coconut
    model's, each request's count of continuous thoughts drawn from them."""
    rng = random.Random(seed)
    questions = [r.question for r in generate_dataset(n, seed=seed)]
    rng.shuffle(questions)
    trace, t = [], 0.0
    for i, q in enumerate(questions):
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        opts = dict(max_new_tokens=rng.choice(new_tokens))
        if thoughts is None:
            opts.update(adaptive=True, num_steps=num_steps, exit_criterion=criterion, exit_threshold=threshold)
        else:
            opts.update(num_thoughts=rng.choice(thoughts))
        if rng.random() < 0.3:
            opts.update(temperature=0.8, top_k=20, seed=1000 + i)
        trace.append(TraceRequest(t, q, opts))
    return trace


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def parse_scheduler(name: str) -> tuple[str, float | None, bool]:
    """``depth``, ``depth@COST``, either with ``+async``, ``token+async``: a scheduler, for ``depth`` the
    engine's ``edge_cost`` (default: the program's estimate from the weights; 0: ended units sampled at every
    step), and whether the engine schedules asynchronously (``async_scheduling``: a step launches before it
    reads the last)."""
    name, plus, suffix = name.partition("+")
    if plus and suffix != "async":
        raise ValueError(f"{name}+{suffix}: the only suffix is +async")
    scheduler, _, cost = name.partition("@")
    return scheduler, float(cost) if cost else None, bool(plus)


def replay(
    model,
    trace: list[TraceRequest],
    scheduler: str,
    max_batch: int,
    max_len: int = 256,
    profile_steps: int = 0,
    group_capture_at: int | None = None,
) -> dict:
    """Serve ``trace`` in real time with one scheduler; the figures of the run and every request's depths.
    ``profile_steps``: then serve it again, untimed, and profile that many steps from the tenth
    (benchmarks/step_profile.py; the record's ``profile``). ``group_capture_at``: the engine's captured
    passes record a key of prompt-group slot shapes at its N-th call (None: the runtime's default)."""
    max_len = min(max_len, model.config.block_size)
    slots = max_batch * max(r.options.get("num_steps", 1) for r in trace)  # room for every row in full KV mode
    kind, edge_cost, async_scheduling = parse_scheduler(scheduler)
    kw = dict(max_batch=max_batch, max_len=max_len, kv_slots=slots, scheduler=kind, edge_cost=edge_cost)
    kw["async_scheduling"] = async_scheduling
    kw["group_capture_at"] = group_capture_at
    warm = _engine(model, **kw)  # first launches (allocations, kernels)
    warm.submit(trace[0].prompt, **trace[0].options)
    warm.run_until_idle()
    del warm
    engine = _engine(model, max_queue=len(trace) + 1, **kw)
    start = time.perf_counter()
    requests = _serve(engine, trace, engine.step)
    wall = time.perf_counter() - start
    failed = [r for r in requests if r.finish_reason not in ("stop", "length")]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed under {scheduler}: {failed[0].error!r}")
    m = engine.metrics
    tokens = sum(len(r.steps) for r in requests)
    profiled = _profiled(model, trace, kw, profile_steps) if profile_steps else None
    return {
        "profile": profiled,
        "scheduler": scheduler,
        "requests": len(requests),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(requests) / wall,
        "ttft_p50_ms": 1e3 * percentile(m.ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(m.ttft, 99),
        "itl_p50_ms": 1e3 * percentile(m.itl, 50),
        "itl_p99_ms": 1e3 * percentile(m.itl, 99),
        "iterations_per_token": sum(r.latent_work for r in requests) / max(tokens, 1),  # (Coconut: thoughts)
        "slot_utilisation": m.utilisation(),
        "scheduler_overhead": m.overhead(),
        "steps": m.steps,
        "rows_per_step": m.launched_rows / max(m.steps, 1),  # rows launched a step (waiting rows included)
        "async_scheduling": engine.async_scheduling,
        "step_ms": 1e3 * m.step_seconds / max(m.steps, 1),
        "tokens_per_pass": tokens / max(m.passes, 1),  # a pass reads its layers' weights once
        # tokens per core iteration's worth of weights read (prelude and head passes at their weights' share)
        "tokens_per_weight_read": tokens / max(m.weight_reads, 1e-9),
        # passes through the captured launch sequences (CUDA graphs on a GPU; the rest launch op by op from
        # Python: on the H200 at Huginn-0125's shape a step cost 3-13 ms where its bytes take 0.8-1.7)
        "graph_share": m.graph_passes / max(m.passes, 1),
        "decode_graph": getattr(getattr(engine.program, "decode_core", None), "_graph", None) is not None,
        # CUDA graphs recorded by the captured passes' runners (a capture costs about two eager passes and a
        # synchronize; a key of prompt-group slot shapes is captured at its --group-capture-at-th call)
        "captures": sum(r.captures for r in _runners(engine)),
        # the program's passes beside a core iteration's, in weights read (its own estimate, from the weights)
        "prelude_cost": engine.program.prelude_cost,
        "head_cost": engine.program.head_cost,
        "depths": [d for r in requests for d in r.steps],
        "outputs": [r.tokens for r in requests],
    }


def _serve(engine, trace: list[TraceRequest], step) -> list:
    """Submit the trace's requests at their arrival times (real time) while ``step`` drives the engine; the
    requests once every one has ended."""
    requests, i = [], 0
    start = time.perf_counter()
    while i < len(trace) or engine.busy:
        now = time.perf_counter() - start
        while i < len(trace) and trace[i].arrival <= now:
            requests.append(engine.submit(trace[i].prompt, **trace[i].options))
            i += 1
        if engine.busy:
            step()
        elif i < len(trace):
            time.sleep(max(0.0, trace[i].arrival - (time.perf_counter() - start)))
    return requests


def _profiled(model, trace: list[TraceRequest], kw: dict, steps: int) -> dict | None:
    """The trace served again by a fresh engine, ``steps`` of its steps from the tenth profiled (None if the
    run had fewer; no request is submitted during them), then the aten ops a GPU would launch one by one
    counted over the next ``steps`` (``eager_ops_per_step``, views apart, replays of captured passes left out;
    absent if the run ended first). Off CUDA the engine's captured passes capture and replay as on CUDA
    throughout (benchmarks/simulated_graphs.py), so the count includes their eager calls, as a GPU's would."""
    engine = _engine(model, max_queue=len(trace) + 1, **kw)
    done, result = 0, None
    simulated = SimulatedGraphs(_runners(engine) if model.device.type != "cuda" else [])

    def step():
        nonlocal done, result
        done += 1
        if done == 10:
            result = step_profile.profile_steps(lambda: engine.busy and engine.step(), steps, model.device)
        elif done == 11 and result is not None and engine.busy:  # the next steps: ops a GPU launches one by one
            captures = sum(r.captures for r in _runners(engine))
            result.update(
                step_profile.count_eager_ops(
                    lambda: engine.busy and engine.step(), steps, lambda: simulated.replaying > 0
                )
            )
            result["captures_per_step"] = (sum(r.captures for r in _runners(engine)) - captures) / steps
        else:
            engine.step()

    with simulated:
        _serve(engine, trace, step)
    return result


def lockstep_bound(depths: list[int], rows: int, samples: int = 20000, seed: int = 0) -> float:
    """E[max of ``rows`` depths] / E[depth], the depths drawn from ``depths``: what depth-level batching can
    gain over token-level batching at full batches of ``rows``."""
    if not depths:
        return float("nan")
    rng = random.Random(seed)
    mean_max = statistics.fmean(max(rng.choices(depths, k=rows)) for _ in range(samples))
    return mean_max / statistics.fmean(depths)


def weight_read_bounds(depths: list[int], rows: int, per_iteration: float, per_token: float) -> tuple[float, float]:
    """Depth-level over token-level batching in tokens per weight read, at full batches of ``rows`` and
    without prompts: a lockstep round reads ``per_iteration`` (a core iteration, plus the head where the
    criterion needs logits every iteration) E[max of rows] times and ``per_token`` (the prelude, and the head
    unless the criterion ran it) once, for ``rows`` tokens; a depth-level step reads ``per_iteration`` for
    rows / E[depth] tokens, plus ``per_token`` when it samples. Returns (the bound when sampling is free, i.e.
    amortised over many steps; the bound when every step samples): a scheduler that waits to sample in
    groups lands between them."""
    if not depths:
        return float("nan"), float("nan")
    mean = statistics.fmean(depths)
    token = lockstep_bound(depths, rows) * mean * per_iteration + per_token  # read per round of `rows` tokens
    return token / (mean * per_iteration), token / (mean * (per_iteration + per_token))


def sampling_bound(
    depths: list[int], rows: int, per_iteration: float, per_token: float, most_k: int = 64
) -> tuple[float, int]:
    """Depth-level over token-level batching in tokens per cost, at full batches of ``rows`` and without
    prompts, when depth-level batching samples the rows that ended every k steps (the engine waits so that
    the per-token passes run for many rows at once), at the best k: a row that ended waits (k - 1) / 2 steps
    on average, so a step yields rows / (E[depth] + (k - 1) / 2) tokens for ``per_iteration`` +
    ``per_token`` / k; a lockstep round yields ``rows`` tokens for E[max of rows] x ``per_iteration`` +
    ``per_token``. Between weight_read_bounds' two (k = 1: sampling every step; waiting free). Returns (the
    bound, its k)."""
    if not depths:
        return float("nan"), 0
    mean = statistics.fmean(depths)
    token = rows / (lockstep_bound(depths, rows) * mean * per_iteration + per_token)
    best, k = max((rows / (mean + (k - 1) / 2) / (per_iteration + per_token / k), k) for k in range(1, most_k + 1))
    return best / token, k


def pass_costs(run: dict, criterion: str) -> tuple[float, float]:
    """(per_iteration, per_token) weight reads of a run's serving program, in core iterations' weights: the
    head runs every iteration where the criterion needs logits, else once per token with the prelude."""
    prelude, head = run["prelude_cost"], run["head_cost"]
    logits = criterion in CRITERIA and CRITERIA[criterion].needs_logits
    return (1.0 + head, prelude) if logits else (1.0, prelude + head)


def word_ids(prompt: str, top: int) -> list[int]:
    """The prompt's words as ids of a random-weight model, one a word, in 1..``top`` (a word's id fixed by its
    CRC: the same word the same id in every request); id 0 left out."""
    return [zlib.crc32(w.encode()) % top + 1 for w in prompt.split()]


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model of a named shape (Huginn-0125's: 7 GB in bf16; ``tiny``: the CPU test's)."""
    return build_model(parse_config(dict(SHAPES[shape])), device=device, dtype=dtype, seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:recurrent", help="model to serve (and to record depths from)")
    p.add_argument(
        "--shape",
        choices=["model", *SHAPES],
        default="model",
        help="huginn/tiny: random weights, replayed depths; gpt2/tiny-gpt2: a random-weight Coconut model (the "
        "trace's thoughts)",
    )
    p.add_argument("--device", type=cli.device, default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--backend",
        choices=CHOICES,
        default="auto",
        help="the model's backend (triton / cuda: the pool's fused decode attention)",
    )
    p.add_argument("--requests", type=cli.at_least(1), default=64)
    p.add_argument("--rate", type=cli.rate, default=200.0, help="arrivals per second (Poisson; inf: all at once)")
    p.add_argument("--max-batch", type=cli.at_least(1), default=16)
    # a recurrent-depth model's exit (None: the default here; a Coconut model refuses them)
    p.add_argument("--criterion", choices=sorted(CRITERIA), default=None, help="default kl")
    p.add_argument("--threshold", type=cli.non_negative, default=None, help="default 1e-5")
    p.add_argument("--num-steps", type=cli.at_least(1), default=None, help="default 32")
    p.add_argument(
        "--new-tokens",
        default="4,8,12,16",
        help="max_new_tokens of the requests, drawn uniformly (longer answers: decode outweighs the prompts)",
    )
    p.add_argument(
        "--thoughts",
        default=",".join(map(str, THOUGHTS)),
        help="a Coconut model's requests: their counts of continuous thoughts, drawn uniformly (a request holds "
        "its row for a pass per thought)",
    )
    p.add_argument(
        "--schedulers",
        default="static,token,depth,depth@0",
        help="depth@COST: depth with that edge_cost (0: ended units sampled every step; default: from the "
        "weights); +async (depth+async, token+async): the engine's asynchronous scheduling (each step launches "
        "before reading the last)",
    )
    p.add_argument(
        "--depths",
        default=None,
        help="with --shape huginn/tiny: replay these exit depths (comma-separated, each unit draws one) instead "
        "of the model's (a synthetic depth distribution: say so beside its numbers)",
    )
    p.add_argument(
        "--group-capture-at",
        type=cli.at_least(1),
        default=None,
        help="capture the passes of a key of prompt-group slot shapes at its N-th call (default: the "
        "runtime's, 3; 1: at its first)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=cli.output_file, default=None, help="write the records as JSON here")
    p.add_argument("--quick", action="store_true", help="a short trace (smoke test)")
    p.add_argument(
        "--profile-steps",
        type=cli.at_least(0),
        default=0,
        help="also profile this many steps of each scheduler (a second, untimed run): launches, graph replays, "
        "syncs per step",
    )
    args = p.parse_args(argv)
    with cli.reported(p):
        return run_flags(args, p)


def depth_bounds(run: dict, args: argparse.Namespace) -> dict:
    """Print the bounds of depth-level over token-level batching for the depths ``run`` recorded (the depth
    run's): lockstep, in weights read (sampling every step / for free), and with ended units sampled every k
    steps; returns them (``--out``'s record)."""
    depths = run["depths"]
    bound = lockstep_bound(depths, args.max_batch)
    costs = pass_costs(run, args.criterion if args.shape == "model" else "none")
    read_bounds = weight_read_bounds(depths, args.max_batch, *costs)
    # the same in passes, every pass one unit: the cost model of a CPU at these widths (overheads, not bytes)
    logits = args.shape == "model" and CRITERIA[args.criterion].needs_logits
    passes = (2.0, 1.0) if logits else (1.0, 2.0)  # (core [+ head] a step, prelude [+ head] a token)
    waits = {c: sampling_bound(depths, args.max_batch, *cost) for c, cost in (("weights", costs), ("passes", passes))}
    print(
        f"# depths: mean {statistics.fmean(depths):.2f}, max {max(depths)}; lockstep bound "
        f"E[max of {args.max_batch}]/E[depth] = {bound:.2f}; in weights read (a pass costs {costs[0]:.2f} core "
        f"iterations per iteration, {costs[1]:.2f} per token; no prompts): {read_bounds[1]:.2f} sampling every "
        f"step, {read_bounds[0]:.2f} sampling for free"
    )
    print(
        f"# sampling every k steps (a row that ended waits (k-1)/2 steps), at the best k: in weights read "
        f"{waits['weights'][0]:.2f} (k={waits['weights'][1]}); in passes, each the same cost (a CPU at tiny "
        f"widths: overheads, not bytes) {waits['passes'][0]:.2f} (k={waits['passes'][1]})"
    )
    return {"bound": bound, "weight_read_bounds": read_bounds, "sampling_bounds": waits}


def _counts(p: argparse.ArgumentParser, flag: str, text: str, least: int) -> tuple[int, ...]:
    """A flag's comma-separated integers, each at least ``least`` (else the parser's error naming the flag)."""
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        p.error(f"{flag} must be comma-separated integers, got {text!r}")
    if min(counts) < least:
        p.error(f"{flag} must be integers >= {least}")
    return counts


def run_flags(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Run the trace under every scheduler and print the table (after the flags are parsed)."""
    if args.quick:
        args.requests, args.max_batch = min(args.requests, 10), min(args.max_batch, 4)
    device = parse_device(args.device)  # (checked by the flag's type; default: CUDA when available)
    schedulers = args.schedulers.split(",")
    try:
        unknown = {s for s in schedulers if parse_scheduler(s)[0] not in SCHEDULERS}
    except ValueError as exc:
        p.error(f"a scheduler's edge cost is not a number, or its suffix not +async: {exc}")
    if unknown:
        p.error(f"unknown schedulers {sorted(unknown)}; choose from {list(SCHEDULERS)} (depth@COST, +async too)")

    new_tokens = _counts(p, "--new-tokens", args.new_tokens, 1)
    thoughts = _counts(p, "--thoughts", args.thoughts, 0)
    synthetic = None
    if args.depths is not None:
        if args.shape == "model":
            p.error("--depths replays depths on a random-weight model: give --shape huginn or tiny")
        synthetic = list(_counts(p, "--depths", args.depths, 1))
    model = latentrt.load(args.model, device=device, backend=args.backend)
    coconut = takes_thoughts(model)
    if args.shape != "model" and coconut != (args.shape in COCONUT_SHAPES):
        kinds = ("a recurrent-depth", "a Coconut")
        p.error(f"--shape {args.shape} is {kinds[not coconut]} model's shape; {args.model} is {kinds[coconut]} model")
    if coconut and synthetic:
        p.error(f"--depths replays a recurrent-depth model's exit depths; {args.model} is a Coconut model")
    exit_flags = {"--criterion": args.criterion, "--threshold": args.threshold, "--num-steps": args.num_steps}
    given = [flag for flag, value in exit_flags.items() if value is not None]
    if coconut and given:
        p.error(f"{', '.join(given)} set a recurrent-depth model's exit; {args.model} is a Coconut model")
    for name, default in (("criterion", "kl"), ("threshold", 1e-5), ("num_steps", 32)):
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    trace = make_trace(
        args.requests,
        args.rate,
        args.seed,
        args.criterion,
        args.threshold,
        args.num_steps,
        new_tokens,
        thoughts if coconut else None,
    )
    prof = args.profile_steps

    def serve_all(trace: list[TraceRequest]) -> dict:
        kw = dict(profile_steps=prof, group_capture_at=args.group_capture_at)
        return {s: replay(model, trace, s, args.max_batch, **kw) for s in schedulers}

    runs = {} if synthetic or args.shape in COCONUT_SHAPES else serve_all(trace)
    recorded = synthetic or (runs[schedulers[0]]["depths"] if runs else None)
    differ = sum(len({json.dumps(r["outputs"][i]) for r in runs.values()}) > 1 for i in range(len(trace)))
    if differ:  # a request's output is the same under every scheduler unless rounding flips an exit (README)
        print(f"note: {differ} of {len(trace)} requests' tokens differ between schedulers", file=sys.stderr)
    source = args.model
    if args.shape != "model":  # the same trace on a random-weight model of that shape
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        del model
        model = random_model(args.shape, device, dtype)
        model.backend = get_backend(args.backend, model)
        top = model.config.vocab_size - (len(MARKERS) if coconut else 0) - 1  # (ids below a Coconut's markers)

        def ids(r: TraceRequest) -> list[int]:
            return word_ids(str(r.prompt), top)

        if coconut:  # (its passes are the trace's thoughts: nothing to replay)
            runs = serve_all([TraceRequest(r.arrival, ids(r), r.options) for r in trace])
            source = f"{args.shape} shape, random weights (Coconut: the trace's thoughts)"
        else:  # the depths replayed
            with replay_exit.registered(recorded, seed=args.seed) as name:
                replayed = dict(exit_criterion=name, exit_threshold=0.0, num_steps=max(recorded))
                runs = serve_all([TraceRequest(r.arrival, ids(r), dict(r.options, **replayed)) for r in trace])
            origin = f"the synthetic --depths {args.depths}" if synthetic else args.model
            source = f"{args.shape} shape, random weights, depths replayed from {origin}"

    env = environment(device)
    if coconut:
        knobs = f"thoughts {args.thoughts}"
    else:
        exit_rule = f"{args.criterion} {args.threshold}" if args.shape == "model" else "replay-depths"
        knobs = f"{exit_rule}, num_steps {args.num_steps}"
    print(
        f"# serving: {source}; {args.requests} requests ({args.new_tokens} new tokens), Poisson {args.rate}/s, "
        f"max batch {args.max_batch}, {knobs}; {env['card']}, torch {env['torch']}, commit {env['commit']}, "
        f"{env['date']}"
    )
    fused = model.backend.pool_attention() is not None
    graphs = ", ".join(s for s, r in runs.items() if r["decode_graph"]) or "none"
    print(
        f"# backend {model.backend.name}: pool decode attention {'fused (Triton)' if fused else 'reference'}; "
        f"decode rows' core pass captured as a CUDA graph in: {graphs}; a key of prompt-group slot shapes "
        f"captured at its call {args.group_capture_at or SlotsRunner.CAPTURE_AT}"
    )
    if coconut:
        counts = [t.options["num_thoughts"] for t in trace]
        print(
            f"# Coconut: {statistics.fmean(counts):.2f} thoughts a request (max {max(counts)}), a pass each while "
            "its prompt runs; an answer token is one pass (no latent loop: the depth bounds do not apply)"
        )
        bounds = {}
    else:
        bounds = depth_bounds(runs.get("depth", runs[schedulers[0]]), args)
    if "token" in runs:  # the lockstep loss the token run met: rows of a round exit at correlated depths
        realised = 1 / max(runs["token"]["slot_utilisation"], 1e-9)
        print(
            f"# realised lockstep loss in the token run (1 / its slot utilisation): {realised:.2f}"
            + ("" if coconut else " (the bound above draws each row's depth independently)")
        )
    cols = ["tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    cols += ["iterations_per_token", "slot_utilisation", "scheduler_overhead", "step_ms", "tokens_per_pass"]
    cols += ["tokens_per_weight_read", "graph_share", "captures"]
    print("| scheduler | " + " | ".join(cols) + " | vs token |")
    print("|" + "---|" * (len(cols) + 2))
    base = runs.get("token", {}).get("tokens_per_s")
    for s, r in runs.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {s} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + f" | {ratio} |")
    profiled = {s: r["profile"] for s, r in runs.items() if r["profile"]}
    if profiled:
        keys = list(dict.fromkeys(k for r in profiled.values() for k in r if k != "steps"))
        print(
            f"# per step, over {prof} profiled steps from the tenth of a second, untimed run (step_profile.py); "
            f"eager ops: the next {prof} steps' aten ops outside replays of captured passes (views apart; off CUDA "
            "with the captures simulated), captures_per_step over the same steps"
        )
        print("| scheduler | " + " | ".join(keys) + " |")
        print("|" + "---|" * (len(keys) + 1))
        for s, r in profiled.items():
            print(f"| {s} | " + " | ".join(f"{r.get(k, float('nan')):.3g}" for k in keys) + " |")
    if args.out:
        records = [{k: v for k, v in r.items() if k != "outputs"} for r in runs.values()]
        with open(args.out, "w") as f:
            json.dump({"environment": env, "args": vars(args), **bounds, "runs": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
