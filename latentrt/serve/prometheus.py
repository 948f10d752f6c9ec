"""The engine's metrics in the Prometheus text format (prometheus_client, the ``serve`` extra).

A collector reads ``EngineMetrics.snapshot()`` at scrape time into its own registry (no process-global
state: several engines in one process, e.g. in tests, never collide).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
}


class EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        snap = self.engine.metrics.snapshot()
        for key, (name, doc) in METRICS.items():
            family = CounterMetricFamily if key.endswith("_total") else GaugeMetricFamily
            yield family(name, doc, value=snap[key])


def render(engine) -> bytes:
    registry = getattr(engine, "_prometheus", None)
    if registry is None:
        registry = engine._prometheus = CollectorRegistry()
        registry.register(EngineCollector(engine))
    return generate_latest(registry)
