"""The engine's metrics in the Prometheus text format (prometheus_client, the ``serve`` extra).

A collector reads ``EngineMetrics.snapshot()`` at scrape time into its own registry (no process-global
state: several engines in one process, e.g. in tests, never collide).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# snapshot key -> (metric name, help); keys ending in _total are counters
METRICS = {
    "queue_length": ("latentrt_queue_length", "Requests waiting for a row"),
    "resident_sequences": ("latentrt_resident_sequences", "Requests holding a row of the K/V pool"),
    "tokens_per_second": ("latentrt_tokens_per_second", "Tokens produced per second over the last steps"),
    "iterations_per_token": (
        "latentrt_iterations_per_token",
        "Mean latent iterations (recurrent) or thoughts (Coconut) per produced token",
    ),
    "kv_bytes_in_use": ("latentrt_kv_bytes_in_use", "K/V bytes held by resident requests"),
    "kv_bytes_capacity": ("latentrt_kv_bytes_capacity", "K/V bytes of the pool"),
    "slot_utilisation": ("latentrt_slot_utilisation", "Row-launches needed / row-launches executed"),
    "scheduler_overhead": ("latentrt_scheduler_overhead", "Share of step time spent scheduling on the host"),
    "tokens_total": ("latentrt_tokens", "Tokens produced"),
    "requests_total": ("latentrt_requests", "Requests finished"),
    "iterations_total": ("latentrt_iterations", "Latent iterations (recurrent) or thoughts (Coconut) run"),
    "launched_row_iterations_total": ("latentrt_launched_row_iterations", "Row-iterations launched"),
    "steps_total": ("latentrt_steps", "Scheduler steps"),
    "passes_total": ("latentrt_passes", "Passes over a set of the model's layers (each reads those weights)"),
    "weight_reads_total": ("latentrt_weight_reads", "Weights read by those passes, in core iterations' weights"),
    "graph_passes_total": (
        "latentrt_graph_passes",
        "Of those passes, those through a captured launch sequence (a CUDA graph on a GPU)",
    ),
    "prompt_tokens_total": ("latentrt_prompt_tokens", "Prompt tokens of the requests finished"),
}
# EngineMetrics.distributions' names -> help (exported as latentrt_NAME histograms; of finished requests)
HISTOGRAMS = {
    "time_to_first_token_seconds": "Seconds from a request's arrival to its first token",
    "inter_token_latency_seconds": "Seconds between a request's consecutive tokens",
    "e2e_request_latency_seconds": "Seconds from a request's arrival to its end",
    "request_queue_time_seconds": "Seconds a request waited for a row of the K/V pool",
    "request_prompt_tokens": "Prompt tokens per request",
    "token_latent_iterations": "Latent iterations each token ran (recurrent depth: its loop's exit depth)",
}


class EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        snap = self.engine.metrics.snapshot()
        for key, (name, doc) in METRICS.items():
            family = CounterMetricFamily if key.endswith("_total") else GaugeMetricFamily
            yield family(name, doc, value=snap[key])
        metrics = self.engine.metrics
        for key, doc in HISTOGRAMS.items():
            hist = metrics.distributions[key]
            buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in hist.cumulative()]
            yield HistogramMetricFamily(f"latentrt_{key}", doc, buckets=buckets, sum_value=hist.total)
        ended = CounterMetricFamily("latentrt_requests_ended", "Requests ended, by finish reason", labels=["reason"])
        for reason, n in sorted(metrics.ended.items()):
            ended.add_metric([reason], n)
        yield ended


def render(engine) -> bytes:
    registry = getattr(engine, "_prometheus", None)
    if registry is None:
        registry = engine._prometheus = CollectorRegistry()
        registry.register(EngineCollector(engine))
    return generate_latest(registry)
