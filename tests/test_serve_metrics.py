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


def test_metrics_export_the_distributions_of_finished_requests():
    """/metrics' histograms (Prometheus text, parsed back): each finished request's latencies, prompt and each
    token's latent iterations (the loop's exit depth), and every ended request by its reason."""
    pytest.importorskip("prometheus_client")
    from conftest import tiny_recurrent
    from prometheus_client.parser import text_string_to_metric_families

    from latentrt.serve import Engine
    from latentrt.serve.prometheus import render

    engine = Engine(tiny_recurrent(seed=3), max_batch=2)
    opts = dict(adaptive=True, num_steps=6, exit_criterion="latent-diff", exit_threshold=0.3, temperature=0)
    done = engine.generate([[5, 6, 7], [8, 9], [10] * 4], max_new_tokens=4, **opts)
    gone = engine.submit([5, 6], max_new_tokens=4)
    engine.cancel(gone)
    engine.run_until_idle()
    families = {f.name: f for f in text_string_to_metric_families(render(engine).decode())}

    def histogram(name):
        samples = {(s.name, s.labels.get("le")): s.value for s in families[name].samples}
        return samples, samples[(name + "_count", None)], samples[(name + "_sum", None)]

    steps = [s for r in done for s in r.steps]
    samples, count, total = histogram("latentrt_token_latent_iterations")
    assert (count, total) == (len(steps), sum(steps)) and len(set(steps)) > 1  # (adaptive: depths differ)
    for le in ("1.0", "4.0", "+Inf"):
        bound = float(le)
        assert samples[("latentrt_token_latent_iterations_bucket", le)] == sum(s <= bound for s in steps)
    _, count, total = histogram("latentrt_request_prompt_tokens")
    assert (count, total) == (3, 3 + 2 + 4) and families["latentrt_prompt_tokens"].samples[0].value == 9
    ttft = histogram("latentrt_time_to_first_token_seconds")
    e2e = histogram("latentrt_e2e_request_latency_seconds")
    assert ttft[1] == e2e[1] == histogram("latentrt_request_queue_time_seconds")[1] == 3
    assert 0 < ttft[2] <= e2e[2]
    assert histogram("latentrt_inter_token_latency_seconds")[1] == sum(len(r.tokens) - 1 for r in done)
    ended = {s.labels["reason"]: s.value for s in families["latentrt_requests_ended"].samples}
    assert [r.finish_reasons for r in done] == [["length"]] * 3 and ended == {"length": 3, "cancelled": 1}


def test_a_histograms_buckets_hold_what_is_at_most_their_bound():
    from latentrt.serve.metrics import Histogram

    h = Histogram((1, 2, 4))
    for value in (0, 1, 1.5, 2, 3, 9):
        h.observe(value)
    assert h.cumulative() == [(1, 2), (2, 4), (4, 5), (float("inf"), 6)] and (h.n, h.total) == (6, 16.5)
