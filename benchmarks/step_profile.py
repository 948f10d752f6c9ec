"""What a serving step launches (``python -m benchmarks.serve --profile-steps N``): torch.profiler over N
engine steps, summarised per step.

On the H200 at Huginn-0125's shape a serving step took 3-13 ms where its bytes take 0.8-1.7 ms (RESULTS.md,
2026-12-04), and the depth scheduler's steps cost 1.55-1.97x the token scheduler's; the profile says where a
step's time goes: kernel launches from Python (eager passes) against CUDA graph replays, host syncs, aten ops,
and the CPU time of the step against its GPU time.
"""

from __future__ import annotations

import itertools
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


def _in_triton(depth: int = 60) -> bool:
    """Whether one of the ``depth`` innermost frames runs Triton's code (the interpreter running a kernel): by
    the frames' file names alone (``traceback.extract_stack`` also read each frame's source line: most of a
    counted run's time)."""
    frames = itertools.islice(traceback.walk_stack(None), depth)
    return any("/triton/" in frame.f_code.co_filename for frame, _ in frames)


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
        if not self.replaying() and not (self.interpreted and _in_triton()):
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
    with counter, InterpretedLaunches(replaying) as launches:
        for _ in range(steps):
            step()
    per = 1.0 / max(steps, 1)
    counted = {"eager_ops_per_step": per * counter.ops, "eager_views_per_step": per * counter.views}
    if launches.interpreted:
        counted["eager_triton_launches_per_step"] = per * launches.count
    return counted


class InterpretedLaunches:
    """Under the Triton interpreter (``TRITON_INTERPRET=1``), the kernels launched while ``replaying()`` is
    false: how many and the seconds the interpreter took to run them (a launch's host cost on a GPU is
    neither). Off the interpreter it counts nothing (``interpreted`` false)."""

    def __init__(self, replaying: Callable[[], bool] = lambda: False) -> None:
        self.replaying = replaying
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        self.count, self.seconds = 0, 0.0

    def __enter__(self) -> InterpretedLaunches:
        if self.interpreted:
            from triton.runtime import interpreter

            self._executor = interpreter.GridExecutor
            launch = self._launch = self._executor.__call__

            def timed(executor, *args, **kwargs):
                if self.replaying():
                    return launch(executor, *args, **kwargs)
                t0 = time.perf_counter()
                try:
                    return launch(executor, *args, **kwargs)
                finally:
                    self.count += 1
                    self.seconds += time.perf_counter() - t0

            self._executor.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.interpreted:
            self._executor.__call__ = self._launch


def host_time(step: Callable[[], None], steps: int, sim) -> dict:
    """Run ``step`` ``steps`` times (uncounted) under ``sim`` (benchmarks/simulated_graphs.py); per step its
    wall ms and its host ms, a CPU estimate of what a step's host work takes beside a GPU: the wall time less
    what a GPU would run on the device, the simulated replays and (under the Triton interpreter) the kernels
    launched outside them. Each eager op's launch cost on a GPU is not in it."""
    replayed = sim.replay_seconds
    with InterpretedLaunches(lambda: sim.replaying > 0) as launches:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    device = sim.replay_seconds - replayed + launches.seconds
    per = 1e3 / max(steps, 1)
    return {"step_ms": per * wall, "host_ms": per * (wall - device)}
