"""The samplers at a shape the built-in model does not have: their passes recorded on the built-in model,
replayed on a random-weight Huginn-0125 (``python -m benchmarks.sampler_replay --shape huginn``; issue #17's
GPU measurement).

A random-weight model neither converges nor agrees with its drafts, so the samplers cannot show their real
behaviour on it. Instead every pass each sampler runs on the built-in model over generated problems
(prelude, core iteration, head; how many positions each holds) is recorded (the torch backend: the passes
do not depend on it), and each distinct pass is timed on the target model through the calls the samplers
make (``model.prelude``, its backend's ``core_iteration``, ``model.head``) after a cache of the problems'
mean prompt length. A sampler's estimated time is the sum over its passes. Per sampler, for the decode phase
(the passes after each problem's first token) and end to end: estimated tokens/s and the ratio to
sequential decoding replayed the same way; beside them the target's real sequential ``generate()`` (its
fast path, e.g. a graph-captured token) and the one-token-per-pass HBM floor at ``num_steps`` (bytes a
token must move / the same run's copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

import latentrt
from latentrt.backends import get_backend
from latentrt.families import build_model, parse_config
from latentrt.kv_modes import parse_kv_mode
from latentrt.loader import parse_device
from latentrt.train.data import generate_dataset

from . import cli, floors
from .run import environment
from .samplers import configs
from .suites import HUGINN_0125, copy_bandwidth
from .timing import measure, sync

START = ("start", 0)  # a generation begins (recorded between passes)


@contextmanager
def record_passes(model):
    """Record (kind, positions) of every prelude / core iteration / head ``model`` runs (its backend's
    ``core_iteration``: the samplers' iteration call); ``head_last`` is a head whose logits are the last
    position's only."""
    calls: list[tuple[str, int]] = []
    backend = model.backend

    def wrap(owner, name: str):
        fn = getattr(owner, name)

        def call(*args, **kwargs):
            kind = {"prelude": "prelude", "core_iteration": "core"}.get(name, "head")
            if kind == "head" and (kwargs.get("last_only") or kwargs.get("at") is not None):
                kind = "head_last"
            calls.append((kind, int(args[0].shape[1])))
            return fn(*args, **kwargs)

        setattr(owner, name, call)  # an instance attribute: shadows the method until deleted

    wrap(model, "prelude"), wrap(model, "head"), wrap(backend, "core_iteration")
    try:
        yield calls
    finally:
        for owner, name in ((model, "prelude"), (model, "head"), (backend, "core_iteration")):
            delattr(owner, name)


def split_decode(calls: list[tuple[str, int]]) -> tuple[Counter, Counter]:
    """(every pass, the decode-phase passes): a generation's passes up to its first head give its first token."""
    every, decode = Counter(), Counter()
    prompt = False
    for c in calls:
        if c == START:
            prompt = True
            continue
        every[c] += 1
        if prompt:
            prompt = not c[0].startswith("head")
        else:
            decode[c] += 1
    return every, decode


def trace(model, questions: list[str], num_steps: int, max_new: int, lookahead: int, draft_steps: int) -> dict:
    """Each sampler's passes and tokens over ``questions`` on ``model`` (greedy, as benchmarks/samplers.py)."""
    model.backend = get_backend("torch", model)
    out = {}
    for name, kw in configs(num_steps, lookahead, draft_steps).items():
        tokens = firsts = 0
        with record_passes(model) as calls:
            for q in questions:
                calls.append(START)
                res = latentrt.generate(model, q, max_new_tokens=max_new, num_steps=num_steps, **kw)
                tokens += len(res.tokens)
                firsts += min(1, len(res.tokens))
        every, decode = split_decode(calls)
        out[name] = {"every": every, "decode": decode, "tokens": tokens, "decode_tokens": tokens - firsts}
    return out


def time_passes(model, keys: set, context: int, num_steps: int, repeats: int) -> dict:
    """ms of each distinct (kind, positions) pass on ``model`` after ``context`` cached positions."""
    dev, cfg = model.device, model.config
    width = max(w for _, w in keys)
    kv = parse_kv_mode("full", num_steps, cfg.n_layers_in_recurrent_block)
    cache = model.new_cache(1, context + width + 1, kv)
    for buf in (cache.plain_k, cache.plain_v, cache.core_k, cache.core_v):
        buf.normal_()  # never time on zeros
    cache.begin(torch.ones(1, context, dtype=torch.bool, device=dev))
    on = torch.ones(1, dtype=torch.bool, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for kind, w in sorted(keys):
        chunk = cache.begin(torch.ones(1, w, dtype=torch.bool, device=dev))
        rope = model.rope(chunk)
        ids = torch.randint(1, cfg.vocab_size, (1, w), generator=gen).to(dev)
        s = torch.randn(1, w, cfg.n_embd, generator=gen).to(dev, model.dtype)
        e = torch.randn(1, w, cfg.n_embd, generator=gen).to(dev, model.dtype)
        if kind == "prelude":
            fn = partial(model.prelude, ids, cache, chunk, rope)
        elif kind == "core":
            fn = partial(model.backend.core_iteration, s, e, cache, chunk, 0, on, rope)
        else:
            fn = partial(model.head, s, cache, chunk, on, rope, last_only=kind == "head_last")
        out[(kind, w)] = measure(fn, device=dev, repeats=repeats, warmup=2)["median_ms"]
        cache.truncate(context)
    return out


def sequential_generate(model, context: int, tokens: int, num_steps: int) -> float:
    """Decode-phase tokens/s of the target's own ``generate()`` at fixed depth (its fast path)."""
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    kw = dict(num_steps=num_steps, default_stops=False)
    latentrt.generate(model, ids, max_new_tokens=2, **kw)  # warm-up (graph capture, compiles)
    times = []
    for n in (1, tokens):
        sync(model.device)
        t0 = time.perf_counter()
        latentrt.generate(model, ids, max_new_tokens=n, **kw)
        sync(model.device)
        times.append(time.perf_counter() - t0)
    return (tokens - 1) / max(times[1] - times[0], 1e-9)


def estimate(traced: dict, cost: dict) -> list[dict]:
    rows = []
    for name, t in traced.items():
        ms = sum(n * cost[k] for k, n in t["every"].items())
        decode_ms = sum(n * cost[k] for k, n in t["decode"].items())
        rows.append(
            {
                "sampler": name,
                "passes": sum(t["every"].values()),
                "tokens": t["tokens"],
                "tokens_per_s": t["tokens"] / (ms / 1e3),
                "decode_tokens_per_s": t["decode_tokens"] / max(decode_ms / 1e3, 1e-12),
            }
        )
    base = {k: rows[0][k] for k in ("tokens_per_s", "decode_tokens_per_s")}  # sequential first (configs())
    for r in rows:
        r["vs_sequential"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["decode_vs_sequential"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_replay", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:recurrent", help="the model whose passes are recorded")
    p.add_argument("--shape", choices=["model", "huginn"], default="huginn", help="the model the passes run on")
    p.add_argument("--problems", type=cli.at_least(1), default=20)
    p.add_argument("--num-steps", type=cli.at_least(1), default=32)
    p.add_argument("--max-new-tokens", type=cli.at_least(1), default=16)
    p.add_argument("--lookahead", type=cli.at_least(1), default=6)
    p.add_argument("--draft-steps", type=cli.at_least(1), default=3)
    p.add_argument("--out", type=cli.output_file, default=None)
    p.add_argument("--quick", action="store_true", help="a few problems, few repeats (smoke test)")
    args = p.parse_args(argv)
    with cli.reported(p):
        return run_flags(args)


def run_flags(args: argparse.Namespace) -> int:
    """Record the passes, time them on the target and print the table (after the flags are parsed)."""
    if args.quick:
        args.problems = min(args.problems, 3)
    device = parse_device(None)  # CUDA when available, else the CPU
    env = environment(device)
    recorder = latentrt.load(args.model)  # the passes do not depend on the device: recorded on the CPU
    questions = [r.question for r in generate_dataset(args.problems, seed=12345)]
    traced = trace(recorder, questions, args.num_steps, args.max_new_tokens, args.lookahead, args.draft_steps)
    context = round(statistics.fmean(len(recorder.tokenizer.encode(q)) for q in questions))
    if args.shape == "huginn":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        target = build_model(parse_config(dict(HUGINN_0125)), device=device, dtype=dtype, seed=0)
    else:
        target = latentrt.load(args.model, device=device)
    keys = {k for t in traced.values() for k in t["every"]}
    cost = time_passes(target, keys, context, args.num_steps, 3 if args.quick else 10)
    rows = estimate(traced, cost)
    real = sequential_generate(target, context, 4 if args.quick else 8, args.num_steps)
    bw = copy_bandwidth((4 << 30) if device.type == "cuda" else (256 << 20), device, 3 if args.quick else 5)["value"]
    el = torch.finfo(target.dtype).bits // 8
    step = floors.recurrent_step_bytes(target.config, batch=1, context=context, steps=args.num_steps, element_size=el)
    floor = bw / step["total"]
    print(
        f"# {env['card']}, torch {env['torch']}, commit {env['commit']}, {env['date']}; passes of {args.model} "
        f"on {args.problems} problems (num_steps {args.num_steps}, lookahead {args.lookahead}, draft_steps "
        f"{args.draft_steps}) replayed on {'a random-weight Huginn-0125' if args.shape == 'huginn' else args.model}"
        f" ({target.backend.name} backend), context {context}"
    )
    print(
        f"# the target's own generate() at num_steps {args.num_steps}: {real:.1f} tokens/s (decode); "
        f"one-token-per-pass floor {floor:.1f} tokens/s (copy bandwidth {bw / 1e12:.3f} TB/s)"
    )
    cols = ["passes", "tokens", "tokens_per_s", "vs_sequential", "decode_tokens_per_s", "decode_vs_sequential"]
    print("| sampler | " + " | ".join(cols) + " | decode vs floor |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        print(
            f"| {r['sampler']} | "
            + " | ".join(f"{r[c]:.3g}" for c in cols)
            + f" | {r['decode_tokens_per_s'] / floor:.2f}x |"
        )
    if args.out:
        record = {
            "environment": env,
            "args": vars(args),
            "context": context,
            "pass_ms": {f"{k}:{w}": v for (k, w), v in cost.items()},
            "sequential_generate_tokens_per_s": real,
            "floor_tokens_per_s": floor,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
