"""Multi-token samplers against sequential decoding, batch 1 (``python -m benchmarks.samplers``).

On the built-in recurrent model over generated ProsQA-style problems and the shared ProsQA file: the
accuracy of each sampler and of sequential decoding (exact answer after '###', with a 95% Wilson
interval), the tokens committed per pass (sequential: one token per prelude -> r iterations -> head unit;
speculative: per draft or verify unit; wavefront: per window step), core iterations per committed token
and wall-clock tokens/s relative to sequential decoding in the same run: end to end, and of the decode
phase alone (every sampler first runs the prompt at num_steps, which gives the first token: that prefill,
timed per problem in the same interleaved run, is subtracted, as are the first tokens).

``--pass-cost`` measures what the samplers bank on: the time of one core iteration over W positions
relative to one position, for W = 1 ... 128, with a cache of ``--context`` entries (at Huginn-0125's shape
with random weights on a GPU, ``--shape huginn``; the built-in shape otherwise). On a GPU a W-position pass
is a small GEMM that costs about what one position does until the tensor cores fill; on a CPU it grows
with W.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import latentrt
from latentrt.evaluate import is_correct
from latentrt.families import build_model, parse_config
from latentrt.loader import parse_device
from latentrt.prompts import prompt_ids
from latentrt.records import load_records
from latentrt.train.data import generate_dataset

from . import cli
from .run import environment
from .suites import HUGINN_0125
from .timing import sync

SHARED_PROSQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prosqa_valid.json"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def configs(num_steps: int, lookahead: int = 4, draft_steps: int = 2) -> dict[str, dict]:
    """The samplers compared, at one depth."""
    return {
        "sequential": dict(),
        "speculative": dict(
            decoding="speculative", decoding_options=dict(lookahead=lookahead, draft_steps=draft_steps)
        ),
        "wavefront": dict(decoding="wavefront"),
    }


def passes(result, num_steps: int) -> tuple[int, int]:
    """(passes, core iterations) a generation ran (see module docstring)."""
    d = result.decoding
    if d is None:
        return len(result.tokens), sum(result.steps)
    if d["sampler"] == "speculative":
        n = d["draft_passes"] + d["verify_passes"]
        draft = d.get("draft_steps", 0)
        return n, d["verify_passes"] * num_steps + d["draft_passes"] * draft
    return 1 + d["steps"], d["core_passes"] - 1 + num_steps


def run_set(model, records, kws: dict[str, dict], num_steps: int, max_new: int) -> list[dict]:
    """Every sampler on every problem, interleaved per problem (so a busy machine slows them alike)."""
    acc = {name: dict(correct=0, tokens=0, passes=0, iters=0, seconds=0.0, drafted=0, accepted=0) for name in kws}
    prefill, firsts = 0.0, 0  # the prompt at num_steps and its first token: the same for every sampler
    for kw in [{}, *kws.values()]:  # warm-up, untimed: first calls pay one-time costs (lazy imports, allocations)
        latentrt.generate(model, records[0].question, max_new_tokens=2, num_steps=num_steps, **kw)
    for rec in records:
        t0 = time.perf_counter()
        first = latentrt.generate(model, rec.question, max_new_tokens=1, num_steps=num_steps)
        prefill += time.perf_counter() - t0
        firsts += len(first.tokens)
        for name, kw in kws.items():
            a = acc[name]
            t0 = time.perf_counter()
            out = latentrt.generate(model, rec.question, max_new_tokens=max_new, num_steps=num_steps, **kw)
            a["seconds"] += time.perf_counter() - t0
            a["correct"] += int(
                is_correct(model.tokenizer, prompt_ids(model.tokenizer.encode(rec.question)), out.tokens, rec.answer)
            )
            a["tokens"] += len(out.tokens)
            if out.decoding and out.decoding["sampler"] == "speculative":
                out.decoding["draft_steps"] = kw["decoding_options"]["draft_steps"]
                a["drafted"] += out.decoding["draft_passes"]
                a["accepted"] += out.decoding["drafts_accepted"]
            p, it = passes(out, num_steps)
            a["passes"] += p
            a["iters"] += it

    def decode_rate(a: dict) -> float:
        """Tokens after the first per second after the prefill; NaN where the run took no longer than the
        prefill timed apart (a loaded machine: the two timings cannot be told apart, 2026-12-04)."""
        decode = a["seconds"] - prefill
        return (a["tokens"] - firsts) / decode if decode > 0 else float("nan")

    rows = []
    for name, a in acc.items():
        lo, hi = wilson(a["correct"], len(records))
        rows.append(
            {
                "sampler": name,
                "n": len(records),
                "accuracy": a["correct"] / len(records),
                "ci95": [lo, hi],
                "tokens": a["tokens"],
                "tokens_per_pass": a["tokens"] / a["passes"],
                "iterations_per_token": a["iters"] / a["tokens"],
                "tokens_per_s": a["tokens"] / a["seconds"],
                "draft_acceptance": a["accepted"] / a["drafted"] if a["drafted"] else None,
                "vs_sequential": (a["tokens"] / a["seconds"])
                / (acc["sequential"]["tokens"] / acc["sequential"]["seconds"]),
                "decode_tokens_per_s": decode_rate(a),
                "decode_vs_sequential": decode_rate(a) / decode_rate(acc["sequential"]),
                "prefill_share": prefill / a["seconds"],
            }
        )
    return rows


def pass_cost(model, context: int, widths: list[int], repeats: int) -> list[dict]:
    """ms of one core iteration over W positions after ``context`` cached ones, per W."""
    dev = model.device
    rows = []
    for w in widths:
        cache = model.new_cache(1, context + w, _full(model))
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=dev)
        chunk = cache.begin(torch.ones(1, context, dtype=torch.bool, device=dev))
        model.prelude(ids, cache, chunk, model.rope(chunk))
        chunk = cache.begin(torch.ones(1, w, dtype=torch.bool, device=dev))
        rope = model.rope(chunk)
        e = torch.randn(1, w, model.config.n_embd, device=dev, dtype=model.dtype)
        s = torch.randn_like(e)
        active = torch.ones(1, dtype=torch.bool, device=dev)
        args = (s, e, cache, chunk, 0, active, rope)
        for _ in range(3):
            model.backend.core_iteration(*args)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.backend.core_iteration(*args)
        sync(dev)
        rows.append({"W": w, "ms": 1e3 * (time.perf_counter() - t0) / repeats})
    base = rows[0]["ms"]
    for r in rows:
        r["vs_W1"] = r["ms"] / base
    return rows


def _full(model):
    from latentrt.kv_modes import parse_kv_mode

    return parse_kv_mode("shared", 1, model.config.n_layers_in_recurrent_block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.samplers", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:recurrent")
    p.add_argument("--problems", type=cli.at_least(1), default=100, help="generated problems (difficulty 1-4)")
    p.add_argument("--prosqa", type=cli.at_least(0), default=100, help="records of the shared ProsQA file (0: none)")
    p.add_argument("--num-steps", type=cli.at_least(1), default=8)
    p.add_argument("--max-new-tokens", type=cli.at_least(1), default=16)
    p.add_argument("--lookahead", type=cli.at_least(1), default=4, help="speculative: drafts per round")
    p.add_argument("--draft-steps", type=cli.at_least(1), default=2, help="speculative: iterations per draft")
    p.add_argument("--pass-cost", action="store_true", help="only the W-position pass cost")
    p.add_argument("--shape", choices=["model", "huginn"], default="model")
    p.add_argument("--context", type=cli.at_least(1), default=512)
    p.add_argument("--out", type=cli.output_file, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    with cli.reported(p):
        return run_flags(args)


def run_flags(args: argparse.Namespace) -> int:
    """Run the samplers (or the pass cost) and print the tables (after the flags are parsed)."""
    device = parse_device(None)  # CUDA when available, else the CPU
    env = environment(device)
    print(f"# {env['card']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")
    record = {"environment": env, "args": vars(args)}
    if args.pass_cost:
        if args.shape == "huginn":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            model = build_model(parse_config(dict(HUGINN_0125)), device=device, dtype=dtype, seed=0)
        else:
            model = latentrt.load(args.model, device=device)
        widths = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128]
        context = min(args.context, 64) if args.quick else args.context
        rows = pass_cost(model, context, widths, 3 if args.quick else 20)
        print(f"# one core iteration over W positions after {context} cached ({args.shape} shape)")
        print("| W | ms | vs W=1 |\n|---|---|---|")
        for r in rows:
            print(f"| {r['W']} | {r['ms']:.3f} | {r['vs_W1']:.2f} |")
        record["pass_cost"] = rows
    else:
        if args.quick:
            args.problems, args.prosqa = min(args.problems, 4), min(args.prosqa, 2)
        model = latentrt.load(args.model, device=device)
        sets = {"generated": generate_dataset(args.problems, seed=12345)}
        if args.prosqa and SHARED_PROSQA.exists():
            sets["prosqa_valid"] = load_records(SHARED_PROSQA)[: args.prosqa]
        record["runs"] = []
        for set_name, records in sets.items():
            print(f"\n## {set_name} ({len(records)} problems, num_steps {args.num_steps}, batch 1)")
            cols = "accuracy | 95% interval | tokens/pass | iterations/token | drafts accepted | tokens/s"
            cols += " | vs sequential | prefill share | decode tokens/s | decode vs sequential"
            print(f"| sampler | {cols} |")
            print("|---" * (cols.count("|") + 2) + "|")
            kws = configs(args.num_steps, args.lookahead, args.draft_steps)
            for r in run_set(model, records, kws, args.num_steps, args.max_new_tokens):
                r["set"], name = set_name, r["sampler"]
                record["runs"].append(r)
                print(
                    f"| {name} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                    f"{r['tokens_per_pass']:.2f} | {r['iterations_per_token']:.1f} | "
                    f"{'-' if r['draft_acceptance'] is None else format(r['draft_acceptance'], '.2f')} | "
                    f"{r['tokens_per_s']:.1f} | {r['vs_sequential']:.2f}x | {r['prefill_share']:.0%} | "
                    f"{r['decode_tokens_per_s']:.1f} | {r['decode_vs_sequential']:.2f}x |"
                )
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
