"""CPU ms/token of the reference decode path for a tiny model at two context lengths.

The decode cost should grow only by the attention over the longer cache, not by re-stacking or
re-computing the prefix. Usage: python -m benchmarks.decode_cpu [--contexts 64 1024] [--tokens 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import latentrt
from latentrt.families import build_model

from . import cli


def tiny_config(block_size: int):
    """The built-in recurrent model's shape (d=128, 1 + 2 x r + 1 layers) with a longer context."""
    import dataclasses

    from latentrt.train.builtin import recurrent_config

    return dataclasses.replace(recurrent_config(512), block_size=block_size)


def ms_per_token(model, context: int, new_tokens: int, **kw) -> float:
    """Median ms per decoded token after a prompt of ``context`` tokens (prefill excluded)."""
    ids = torch.randint(2, 500, (1, context), generator=torch.Generator().manual_seed(0))
    times = []
    stream = latentrt.generate(model, ids, max_new_tokens=new_tokens, stream=True, init_scale=0.0, **kw)
    last = None
    for _ in stream:
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    times.sort()
    return 1000 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_cpu", description=__doc__)
    ap.add_argument("--contexts", type=cli.at_least(1), nargs="+", default=[64, 1024])
    ap.add_argument("--tokens", type=cli.at_least(1), default=16)
    ap.add_argument("--steps", type=cli.at_least(1), default=8)
    args = ap.parse_args()
    with cli.reported(ap):
        run_flags(args)


def run_flags(args: argparse.Namespace) -> None:
    """Time both KV modes at each context (after the flags are parsed)."""
    torch.set_num_threads(1)
    model = build_model(tiny_config(max(args.contexts) + args.tokens + 1))
    print(f"| context | kv | ms/token (r={args.steps}) |\n|---|---|---|")
    for kv in ("full", "shared"):
        for ctx in args.contexts:
            ms = ms_per_token(model, ctx, args.tokens, num_steps=args.steps, kv_sharing=kv)
            print(f"| {ctx} | {kv} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
