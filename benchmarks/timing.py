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


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    s = sorted(times_ms)
    q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
    return {"median_ms": statistics.median(s), "p10_ms": q[0], "p90_ms": q[-1], "repeats": len(s)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
