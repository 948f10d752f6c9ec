"""Eager ops a serving step dispatches, counted over a whole run: what a GPU would launch op by op.

``benchmarks.serve --profile-steps`` counts a window of ten steps early in a run, where new shapes of prompt
groups are still being captured; this counts every step of a run of ``--requests`` requests submitted at once
(the serving benchmark's trace generator), the engine's captured passes capturing and replaying as on CUDA
(off CUDA simulated: benchmarks/simulated_graphs.py), replays left out (benchmarks/step_profile.py). Under the
Triton interpreter (``TRITON_INTERPRET=1``, the CPU) a kernel's insides are left out: one launch each on a GPU.

    TRITON_INTERPRET=1 python -m benchmarks.eager_ops --schedulers token,depth --requests 24

``--host-time`` runs the same instead untimed by any counter and prints each step's wall ms and host ms: the
wall time less the simulated replays and the interpreted kernels launched outside them, a CPU estimate of a
step's host work beside a GPU (what asynchronous scheduling can hide behind the device's).
"""

from __future__ import annotations

import argparse
import sys

import torch

import latentrt
from latentrt.backends import CHOICES, get_backend
from latentrt.decode.serving_graph import SlotsRunner
from latentrt.exits import CRITERIA
from latentrt.serve.engine import SCHEDULERS

from . import cli, step_profile
from .serve import THOUGHTS, _engine, _runners, make_trace, takes_thoughts
from .simulated_graphs import SimulatedGraphs


def count_run(
    model, scheduler: str, requests: int, max_batch: int, capture_at: int | None, trace_kw: dict, timed: bool = False
) -> dict:
    """Serve ``requests`` requests (submitted at once) to the end; eager ops, views and Triton launches a step,
    the steps, captures and replays of the run. ``timed``: instead of counting, each step's wall and host ms
    (step_profile.host_time: the counting's own cost would be in them)."""
    torch.manual_seed(0)
    trace = make_trace(requests, float("inf"), 0, **trace_kw)
    engine = _engine(
        model, group_capture_at=capture_at, max_batch=max_batch, max_queue=requests + 1, scheduler=scheduler
    )
    for t in trace:
        engine.submit(t.prompt, **t.options)
    steps = 0

    def run() -> None:
        nonlocal steps
        while engine.busy:
            engine.step()
            steps += 1

    runners = _runners(engine)
    with torch.no_grad(), SimulatedGraphs(runners if model.device.type != "cuda" else []) as sim:
        if timed:
            counted = step_profile.host_time(run, 1, sim)
        else:
            counted = step_profile.count_eager_ops(run, 1, lambda: sim.replaying > 0)
    groups = [r for r in runners if isinstance(r, SlotsRunner)]
    out = {"scheduler": scheduler, "capture_at": groups[0].CAPTURE_AT if groups else None}
    out |= {name: v / max(steps, 1) for name, v in counted.items()}  # (counted as one step: the run)
    out |= {"steps": steps, "captures": sum(r.captures for r in runners), "replays": sim.replays}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eager_ops", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:recurrent")
    ap.add_argument(
        "--backend", choices=CHOICES, default="triton", help="the serving backend (default triton: the captured passes)"
    )
    ap.add_argument("--schedulers", default="token,depth", help=f"comma-separated, of {','.join(SCHEDULERS)}")
    ap.add_argument("--requests", type=cli.at_least(1), default=24)
    ap.add_argument("--max-batch", type=cli.at_least(1), default=8)
    ap.add_argument(
        "--group-capture-at", type=cli.at_least(1), default=None, help="a key of group shapes captured at this call"
    )
    ap.add_argument("--exit-criterion", choices=sorted(CRITERIA), default="kl")
    ap.add_argument("--exit-threshold", type=cli.non_negative, default=1e-5)
    ap.add_argument("--num-steps", type=cli.at_least(1), default=16)
    ap.add_argument(
        "--host-time",
        action="store_true",
        help="time the run instead of counting: wall and host ms a step (the host's share of a step beside a GPU, "
        "estimated on the CPU: replays and interpreted kernels left out)",
    )
    args = ap.parse_args(argv)
    schedulers = [s.strip() for s in args.schedulers.split(",")]
    unknown = sorted({s for s in schedulers if s not in SCHEDULERS})
    if unknown:
        ap.error(f"unknown schedulers {unknown}; choose from {list(SCHEDULERS)}")
    with cli.reported(ap):
        return run_flags(args, schedulers)


def run_flags(args: argparse.Namespace, schedulers: list[str]) -> int:
    """Count (or time) each scheduler's run and print the table (after the flags are parsed)."""
    model = latentrt.load(args.model)
    model.backend = get_backend(args.backend, model)
    trace_kw = dict(criterion=args.exit_criterion, threshold=args.exit_threshold, num_steps=args.num_steps)
    if takes_thoughts(model):  # a Coconut model: thoughts, no exit criterion
        trace_kw["thoughts"] = THOUGHTS
    rows = [
        count_run(model, s, args.requests, args.max_batch, args.group_capture_at, trace_kw, args.host_time)
        for s in schedulers
    ]
    print(
        f"# {args.requests} requests at once, max batch {args.max_batch}, {args.exit_criterion} "
        f"{args.exit_threshold:g}, num_steps {args.num_steps}; {args.model} on {args.backend}, {model.device}"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
