"""Timing per the device method: warm up, device events (or host clock on CPU), many repeats, median,
inputs rotated so caches do not flatter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def measure(
    fn: Callable[..., object],
    inputs: Sequence[tuple] = ((),),
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str = "cpu",
    inner: int = 1,
) -> dict[str, float]:
    """Median/p10/p90 milliseconds of ``fn(*inputs[i % len(inputs)])`` over ``repeats`` calls.

    ``inner`` > 1 times that many back-to-back calls per sample and divides: for kernels shorter than
    the host's launch latency, where events around one call measure Python, not the GPU (seen on an H200:
    every 14 us GEMV read as ~70 us with inner=1)."""
    device = torch.device(device)
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for j in range(inner):
                fn(*inputs[(i * inner + j) % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            times.append(1000 * (time.perf_counter() - t0))
    return summarize(times)


def measure_graph(
    fn: Callable[..., object],
    inputs: Sequence[tuple] = ((),),
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str = "cpu",
    inner: int = 20,
) -> dict[str, float]:
    """Like ``measure``, but on CUDA the ``inner`` calls (rotating through ``inputs``) are captured in one CUDA
    graph and each sample is one replay: back-to-back kernels with no Python or launch latency between them,
    as the decode path's own graphs run them (a 14 us kernel is not timed as launch overhead). Where the
    capture fails (a host sync in ``fn``) or off CUDA: ``measure`` (``graph`` says which)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {**measure(fn, inputs, warmup=warmup, repeats=repeats, device=device), "graph": False}
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i in range(warmup):
                fn(*inputs[i % len(inputs)])
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(inner):
                fn(*inputs[j % len(inputs)])
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception:  # not capturable: time launches instead
        torch.cuda.synchronize(device)
        return {**measure(fn, inputs, warmup=warmup, repeats=repeats, device=device, inner=inner), "graph": False}
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return {**summarize(times), "graph": True}


def rotating_copies(nbytes: int, device: torch.device | str, at_least: int = 2, cap: int = 64) -> int:
    """How many copies of an input of ``nbytes`` to rotate through so that together they exceed the L2 cache
    four times (each call then reads its input from HBM, as a weight-streaming decode does)."""
    device = torch.device(device)
    if device.type != "cuda" or nbytes <= 0:
        return at_least
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(at_least, min(cap, -(-4 * l2 // nbytes)))


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(times_ms)
    q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
    return {"median_ms": statistics.median(s), "p10_ms": q[0], "p90_ms": q[-1], "repeats": len(s)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
