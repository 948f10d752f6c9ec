"""What a running engine measures: throughput, latency, latent work per token, slot utilisation, overhead.

Plain counters updated by the engine's thread once per step (no locks: single writer; readers see a
consistent-enough snapshot). ``snapshot`` gives the figures the server exports at ``/metrics`` (Prometheus)
and the load generator (benchmarks/serve.py) reports.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field

LATENCY_SAMPLES = 100_000  # per latency kind: a few MB; a benchmark trace's requests and tokens all fit
# the histograms' bucket bounds (upper, inclusive): a request's seconds, a token's gap, a token's latent work,
# a prompt's tokens
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITERATIONS = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
PROMPT_TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class Histogram:
    """Observations counted per bucket (``bounds``: each bucket's inclusive upper bound; one more bucket above
    the last), their sum and number: what a Prometheus histogram exports."""

    bounds: tuple
    counts: list = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def n(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most it) per bucket, the last one's bound infinite."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append((bound, running))
        return out


def histograms() -> dict[str, Histogram]:
    """The per-request and per-token distributions /metrics exports, by name."""
    return {
        "time_to_first_token_seconds": Histogram(SECONDS),
        "inter_token_latency_seconds": Histogram(TOKEN_GAPS),
        "e2e_request_latency_seconds": Histogram(SECONDS),
        "request_queue_time_seconds": Histogram(SECONDS),
        "request_prompt_tokens": Histogram(PROMPT_TOKENS),
        "token_latent_iterations": Histogram(ITERATIONS),
    }


@dataclass
class EngineMetrics:
    steps: int = 0
    step_seconds: float = 0.0  # wall time of every step
    compute_seconds: float = 0.0  # of which launching, reading back and sampling (the rest: scheduling)
    launched_rows: int = 0  # row-iterations executed (rows launched per step, waiting rows included)
    passes: int = 0  # passes over a set of the model's layers (prelude, core, head, prompt: each reads its weights)
    weight_reads: float = 0.0  # those passes' weights, in core iterations' (what a weight-bound GPU pays)
    graph_passes: int = 0  # of the passes, those through a captured launch sequence (a CUDA graph on a GPU)
    iterations: int = 0  # latent work: the units' loops' iterations (recurrent), the prompts' thoughts (Coconut)
    needed: int = 0  # row-launches the units needed (recurrent: their iterations; Coconut: their passes)
    tokens: int = 0  # tokens produced
    requests: int = 0  # requests finished (stop or length)
    # seconds from submit to first token per request, and between consecutive tokens: the latest
    # LATENCY_SAMPLES of each (a server runs for days; a list of every one grew without end)
    ttft: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    itl: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, tokens) per step
    distributions: dict = field(default_factory=histograms)  # of the finished requests (stop or length)
    prompt_tokens: int = 0  # of the finished requests
    ended: Counter = field(default_factory=Counter)  # requests ended, by finish reason (cancelled, error too)
    queue_length: int = 0
    resident: int = 0
    kv_bytes: int = 0
    kv_capacity: int = 0

    def step(self, seconds: float, compute: float, launched: int, engine) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.compute_seconds += compute
        self.launched_rows += launched
        self.passes = engine.program.passes
        self.weight_reads = engine.program.weight_reads
        self.graph_passes = engine.program.graph_passes
        self.recent.append((time.perf_counter(), self.tokens))
        self.queue_length, self.resident = len(engine.queue), len(engine.resident)
        pool = engine.program.pool
        self.kv_bytes, self.kv_capacity = pool.bytes_in_use(), pool.capacity_bytes()

    def finished(self, req) -> None:
        """A request that stopped or reached its length: its latencies, prompt and latent work per token."""
        self.requests += 1
        hist, times = self.distributions, req.times
        tokens = times.get("tokens", [])
        if tokens:
            first = tokens[0] - times["submitted"]
            self.ttft.append(first)
            hist["time_to_first_token_seconds"].observe(first)
            gaps = [b - a for a, b in zip(tokens, tokens[1:])]
            self.itl.extend(gaps)
            for gap in gaps:
                hist["inter_token_latency_seconds"].observe(gap)
        if "finished" in times:
            hist["e2e_request_latency_seconds"].observe(times["finished"] - times["submitted"])
        if "admitted" in times:
            hist["request_queue_time_seconds"].observe(times["admitted"] - times["submitted"])
        prompt = getattr(req, "prompt_tokens", None)
        if prompt is not None:
            self.prompt_tokens += prompt
            hist["request_prompt_tokens"].observe(prompt)
        for steps in getattr(req, "steps", ()):
            hist["token_latent_iterations"].observe(steps)

    def tokens_per_second(self) -> float:
        """Over the last steps (up to 256)."""
        if len(self.recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def utilisation(self) -> float:
        """Row-launches the units needed / row-launches executed (1.0: no launched row wasted); a launch runs a
        recurrent row's core iteration or a Coconut row's pass."""
        return self.needed / self.launched_rows if self.launched_rows else 1.0

    def overhead(self) -> float:
        """Share of step time spent in the scheduler's own host work."""
        return 1 - self.compute_seconds / self.step_seconds if self.step_seconds else 0.0

    def snapshot(self) -> dict:
        return {
            "queue_length": self.queue_length,
            "resident_sequences": self.resident,
            "tokens_total": self.tokens,
            "requests_total": self.requests,
            "tokens_per_second": self.tokens_per_second(),
            "iterations_total": self.iterations,
            "iterations_per_token": self.iterations / self.tokens if self.tokens else 0.0,
            "launched_row_iterations_total": self.launched_rows,
            "slot_utilisation": self.utilisation(),
            "scheduler_overhead": self.overhead(),
            "steps_total": self.steps,
            "passes_total": self.passes,
            "weight_reads_total": self.weight_reads,
            "graph_passes_total": self.graph_passes,
            "kv_bytes_in_use": self.kv_bytes,
            "kv_bytes_capacity": self.kv_capacity,
            "prompt_tokens_total": self.prompt_tokens,
        }
