"""latentrt/serve/metrics.py by hand: the figures /metrics exports from the engine's counters."""

from types import SimpleNamespace

import pytest

from latentrt.serve.metrics import EngineMetrics


def _engine(queue: int, resident: int, passes: int):
    pool = SimpleNamespace(bytes_in_use=lambda: 300, capacity_bytes=lambda: 1000)
    program = SimpleNamespace(passes=passes, weight_reads=1.5 * passes, graph_passes=passes - 1, pool=pool)
    return SimpleNamespace(queue=[None] * queue, resident=[None] * resident, program=program)


def test_the_engines_figures_by_hand(monkeypatch):
    m = EngineMetrics()
    empty = m.snapshot()
    assert (empty["tokens_per_second"], empty["iterations_per_token"]) == (0.0, 0.0)
    assert (empty["slot_utilisation"], empty["scheduler_overhead"]) == (1.0, 0.0)
    clock = iter([10.0, 10.5, 12.0])
    monkeypatch.setattr("latentrt.serve.metrics.time.perf_counter", lambda: next(clock))
    for tokens, launched, passes in ((2, 4, 3), (5, 4, 5), (11, 8, 9)):
        m.tokens = tokens
        m.step(0.5, 0.4, launched, _engine(queue=2, resident=3, passes=passes))
    m.iterations, m.needed = 44, 12
    # a request's first token 0.25 s after it came, then tokens 0.5 and 1.25 s apart
    m.finished(SimpleNamespace(times={"submitted": 1.0, "tokens": [1.25, 1.75, 3.0]}))
    m.finished(SimpleNamespace(times={"submitted": 2.0}))  # (ended before a token: no latency)
    got = m.snapshot()
    assert got["tokens_per_second"] == pytest.approx((11 - 2) / (12.0 - 10.0))
    assert got["iterations_per_token"] == pytest.approx(44 / 11)
    assert got["slot_utilisation"] == pytest.approx(12 / 16) and got["scheduler_overhead"] == pytest.approx(0.2)
    assert (got["steps_total"], got["launched_row_iterations_total"], got["requests_total"]) == (3, 16, 2)
    assert (got["passes_total"], got["weight_reads_total"], got["graph_passes_total"]) == (9, 13.5, 8)
    assert (got["queue_length"], got["resident_sequences"]) == (2, 3)
    assert (got["kv_bytes_in_use"], got["kv_bytes_capacity"]) == (300, 1000)
    assert list(m.ttft) == [0.25] and list(m.itl) == [0.5, 1.25]
