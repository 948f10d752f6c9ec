"""What a serving step launches (``python -m benchmarks.serve --profile-steps N``): torch.profiler over N
engine steps, summarised per step.

On the H200 at Huginn-0125's shape a serving step took 3-13 ms where its bytes take 0.8-1.7 ms (RESULTS.md,
2026-12-04), and the depth scheduler's steps cost 1.55-1.97x the token scheduler's; the profile says where a
step's time goes: kernel launches from Python (eager passes) against CUDA graph replays, host syncs, aten ops,
and the CPU time of the step against its GPU time.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# the runtime / driver calls a step makes, by what they mean (names as the profiler records them)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> dict:
    """Run ``step`` ``steps`` times under the profiler; per step: kernel launches (eager), graph launches,
    host syncs, aten ops, wall ms, and the GPU's busy ms (kernel time; 0 off CUDA)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    counts: dict[str, int] = {}
    gpu_us = 0.0
    for e in prof.key_averages():
        counts[e.key] = counts.get(e.key, 0) + e.count
        gpu_us += getattr(e, "self_device_time_total", 0.0) or 0.0
    per = 1.0 / max(steps, 1)
    return {
        "steps": steps,
        "kernel_launches_per_step": per * sum(counts.get(n, 0) for n in LAUNCHES),
        "graph_launches_per_step": per * sum(counts.get(n, 0) for n in GRAPH_LAUNCHES),
        "syncs_per_step": per * sum(counts.get(n, 0) for n in SYNCS),
        "aten_ops_per_step": per * sum(c for k, c in counts.items() if k.startswith("aten::")),
        "wall_ms_per_step": 1e3 * wall * per,  # with the profiler's own overhead
        "gpu_busy_ms_per_step": 1e-3 * gpu_us * per,
    }


# aten ops that make views or aliases: no kernel, a host cost of their own (counted apart)
VIEWS = frozenset(
    "view slice select unsqueeze squeeze expand as_strided alias t transpose permute _unsafe_view detach unbind "
    "split split_with_sizes lift_fresh _reshape_alias".split()
)


class EagerOps(TorchDispatchMode):
    """The aten ops dispatched while ``replaying()`` is false (a replay on a GPU dispatches none: every other
    op is a launch or a host operation of its own), views apart. Under the Triton interpreter (the CPU's tests)
    what a kernel does inside is left out (it is one launch on a GPU)."""

    def __init__(self, replaying: Callable[[], bool]) -> None:
        super().__init__()
        self.ops = self.views = 0
        self.replaying = replaying
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.replaying() and not (
            self.interpreted and any("/triton/" in f.filename for f in traceback.extract_stack(limit=60))
        ):
            if func.__name__.split(".")[0] in VIEWS:
                self.views += 1
            else:
                self.ops += 1
        return func(*args, **(kwargs or {}))


def count_eager_ops(step: Callable[[], None], steps: int, replaying: Callable[[], bool] = lambda: False) -> dict:
    """Run ``step`` ``steps`` times counting, per step, the aten ops a GPU would launch or run on the host one
    by one: every op dispatched while ``replaying()`` is false. On CUDA a captured pass's replay dispatches
    nothing (its eager calls, before and at its capture, count); on the CPU pass the simulation's
    ``replaying`` (benchmarks/simulated_graphs.py), under which the runners call as on CUDA. Under the Triton
    interpreter also the Triton kernels launched outside replays (``eager_triton_launches_per_step``: aten
    ops leave them out; on a GPU the profiler's kernel launches count them)."""
    counter = EagerOps(replaying)
    launches = [0]
    interpreter = None
    if counter.interpreted:
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__

        def counted(self, *args, **kwargs):
            launches[0] += not replaying()
            return launch(self, *args, **kwargs)

        interpreter.GridExecutor.__call__ = counted
    try:
        with counter:
            for _ in range(steps):
                step()
    finally:
        if interpreter is not None:
            interpreter.GridExecutor.__call__ = launch
    per = 1.0 / max(steps, 1)
    counted = {"eager_ops_per_step": per * counter.ops, "eager_views_per_step": per * counter.views}
    if interpreter is not None:
        counted["eager_triton_launches_per_step"] = per * launches[0]
    return counted
