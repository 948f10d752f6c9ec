"""The timing helpers off CUDA: graph-captured timing falls back to timed calls and says so."""

from benchmarks.timing import measure_graph, rotating_copies


def test_measure_graph_falls_back_off_cuda():
    calls = []
    t = measure_graph(lambda x: calls.append(x), [(1,), (2,)], warmup=2, repeats=4, device="cpu")
    assert t["graph"] is False and t["repeats"] == 4 and t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
    assert calls == [1, 2, 1, 2, 1, 2]  # warm-up, then the inputs in turn
    assert rotating_copies(10**9, "cpu") == 2 and rotating_copies(10, "cpu", at_least=3) == 3
