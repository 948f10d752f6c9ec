"""The benchmark baselines compute what generate() computes: the static decoder of the torch.compile +
CUDA graph baseline, in every KV mode at fixed depth, eager and traced whole by torch.compile."""

import pytest
import torch
from conftest import draw_norm_weights, rel_err, tiny_recurrent

import latentrt
from benchmarks.compiled_baseline import StaticDecoder, compiled_step
from latentrt.kv_modes import parse_kv_mode


@pytest.mark.parametrize("kv", ["shared", "full", "ring-2"])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[5, 6, 7, 8, 9], [7, 8, 9]]], ids=["one", "left-padded"])
@torch.no_grad()  # as the benchmarks run (benchmarks/run.py)
def test_static_decoder_matches_generate(kv, compiled, prompts):
    """Token by token, the static decoder's logits are generate()'s, for one prompt and for a left-padded
    batch (each row's RoPE positions and its padding masked), with norm weights a left-out norm would change."""
    model = tiny_recurrent(seed=12)
    draw_norm_weights(model, 12)
    r, B, n = 3, len(prompts), max(map(len, prompts))
    want = latentrt.generate(
        model, prompts, max_new_tokens=3, num_steps=r, kv_sharing=kv, init_scale=0.0, return_logits=True
    )
    # prefill exactly as the engine does, into a cache the static decoder then continues
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts])
    cache = model.new_cache(B, n + 3, parse_kv_mode(kv, r, model.config.n_layers_in_recurrent_block))
    chunk = cache.begin(valid)
    rope = model.rope(chunk)
    e = model.prelude(ids, cache, chunk, rope)
    s = torch.zeros_like(e)
    on = torch.ones(B, dtype=torch.bool)
    for t in range(r):
        cache.mark_iteration(chunk, t, on)
        s = model.core_iteration(s, e, cache, chunk, t, on, rope)
    first = model.head(s, cache, chunk, on, rope)[:, -1]
    logits_of = want.logits  # (prompts as a list of lists: one [tokens, V] per row)
    for b in range(B):
        assert rel_err(first[b], logits_of[b][0]) < 1e-6
    dec = StaticDecoder(model, cache, r)
    # compiled: the iteration traced whole by dynamo (fullgraph: no graph break) and run through AOT autograd
    step = compiled_step(dec, backend="aot_eager") if compiled else dec.step
    tok = first.argmax(-1)
    for i in range(1, 3):
        dec.set_token(tok, n + i - 1)
        logits = step()
        for b in range(B):
            assert rel_err(logits[b], logits_of[b][i]) < 1e-5, (b, i)
        tok = logits.argmax(-1)


def test_rows_carry_their_ratio_to_the_same_runs_yardsticks():
    from benchmarks.run import add_ratios, table

    def row(name, ms, **config):
        cfg = dict(batch=1, r=32, kv="shared", adaptive=False, context=512) | config
        return {"suite": "decode_recurrent", "name": name, "backend": "x", "config": cfg, "median_ms": ms}

    records = [
        row("generate", 40.0),
        row("generate", 8.0, r=4),  # no yardstick at r=4 in this run: no ratio
        row("generate", 50.0, batch=8),
        row("generate", 30.0, adaptive=True),  # adaptive: against the fixed-depth baseline at its r
        row("torch-compile+cudagraph", 32.0),
        row("torch-compile+cudagraph", 40.0, batch=8),
        row("published-pattern", 280.0, kv="full"),
    ]
    add_ratios(records)
    b1, r4, b8, adaptive = records[:4]
    assert b1["vs_compiled"] == 0.8 and b1["vs_published"] == 7.0
    assert "vs_compiled" not in r4 and "vs_published" not in r4
    assert b8["vs_compiled"] == 0.8 and b8["vs_published"] == 8 * 280 / 50  # 8 tokens per step
    assert adaptive["vs_compiled"] == 32 / 30
    assert all("vs_compiled" not in r for r in records[4:])
    assert "0.80x compiled; 7.00x published" in table(records)


def test_adaptive_rows_carry_their_ratio_to_the_ideal_of_the_iterations_they_ran():
    """Per backend, batch, KV mode and context: the fixed-depth rows at r and 4 give the per-iteration time
    and the per-token passes; an adaptive row's ideal is those passes + its launches' iterations x the
    per-iteration time (without an r=4 row: time at r / r per iteration, the passes uncounted)."""
    from benchmarks.run import add_ratios, table

    def row(backend, ms, **config):
        cfg = dict(batch=1, r=32, kv="shared", adaptive=False, context=512) | config
        return {"suite": "decode_recurrent", "name": "generate", "backend": backend, "config": cfg, "median_ms": ms}

    records = [
        row("a", 36.0),  # 1 ms per iteration + 4 ms per token
        row("a", 8.0, r=4),
        row("a", 16.0, adaptive=True, mean_steps=10.0, launch_steps=10.0),  # ideal 4 + 10 = 14
        row("b", 64.0, batch=8),  # no r=4 row: 2 ms per iteration
        row("b", 40.0, batch=8, adaptive=True, mean_steps=12.5, launch_steps=18.0),  # ideal 36
        row("a", 99.0, batch=8, adaptive=True, launch_steps=3.0),  # no fixed row of its backend and batch
        row("b", 30.0, kv="full", adaptive=True, launch_steps=3.0),  # nor of its KV mode
        row("a", 36.0, context=70, launch_steps=32.0),  # a fixed-depth row: no ideal of its own
        row("a", 8.0, r=4, context=64),  # r = 4 both ways: 2 ms per iteration, the passes uncounted
        row("a", 10.0, r=4, context=64, adaptive=True, launch_steps=3.0),  # ideal 6
    ]
    add_ratios(records)
    b1, b8, r4 = records[2], records[4], records[9]
    assert b1["ideal_ms"] == 14.0 and b1["vs_ideal"] == 14.0 / 16.0
    assert b8["ideal_ms"] == 36.0 and b8["vs_ideal"] == 36.0 / 40.0
    assert r4["ideal_ms"] == 6.0 and r4["vs_ideal"] == 0.6
    assert not any("vs_ideal" in r for i, r in enumerate(records) if i not in (2, 4, 9))
    assert "0.88x ideal" in table(records) and "0.90x ideal" in table(records)


def test_timed_records_carry_their_floor_or_their_error():
    """A timing's record: its floor and the fraction of it reached (floor / median: 1.0 at the floor); a
    timing that raised is an error record naming the exception, not the end of the run."""
    from benchmarks.suites import timed_record

    t = {"median_ms": 4.0, "p10_ms": 3.5, "p90_ms": 5.0, "repeats": 20}
    rec = timed_record("micro", "gemv", "triton", {"batch": 1}, lambda: t, 3.0)
    assert rec == {"suite": "micro", "name": "gemv", "backend": "triton", "config": {"batch": 1}, **t,
                   "floor_ms": 3.0, "fraction_of_floor": 0.75}  # fmt: skip

    def fails():
        raise RuntimeError("out of resources")

    bad = timed_record("micro", "gemv", "cuda", {"batch": 32}, fails, 3.0)
    assert bad["error"] == "RuntimeError: out of resources" and "median_ms" not in bad


def test_step_counts_mean_per_sequence_and_per_launch():
    from benchmarks.suites import step_counts

    assert step_counts([[4, 8], [6, 2], [5]]) == {"mean_steps": 5.0, "launch_steps": (8 + 6 + 5) / 3}
    assert step_counts([]) == {"mean_steps": 0.0, "launch_steps": 0.0}


def test_decode_rows_time_each_persistent_kernel_variant(monkeypatch):
    """decode_recurrent times the CUDA backend once per latent-loop variant, the streamed kernel with both of
    its attentions, and leaves out the labels gpu_check.sh names in LATENTRT_BENCH_SKIP (a failed smoke)."""
    from types import SimpleNamespace

    from benchmarks import suites

    monkeypatch.setattr(suites.latentrt.backends, "get_backend", lambda name, model: SimpleNamespace(name=name))
    monkeypatch.delenv("LATENTRT_BENCH_SKIP", raising=False)
    rows = {label: b for label, b in suites._backends(None)}
    labels = ["torch", "triton", "triton-one-graph", "triton-pdl", "cuda", "cuda-stream", "cuda-stream-mma"]
    assert list(rows) == [*labels, "cuda-stream-tensor", "cuda-stream-cta", "cuda-counter-barrier"]
    assert rows["triton-one-graph"].early_stop is False and not hasattr(rows["triton"], "early_stop")
    cuda = {k: b for k, b in rows.items() if k.startswith("cuda")}
    variant = {
        k: (b.loop_kernel, b.barrier_mode, b.stream_attention, b.stream_copy, b.stream_gemv) for k, b in cuda.items()
    }
    assert variant == {
        "cuda": ("barrier", 0, "split", "rows", "auto"),
        "cuda-stream": ("stream", 0, "split", "rows", "auto"),
        "cuda-stream-mma": ("stream", 0, "split", "rows", "tensor-cores"),
        "cuda-stream-tensor": ("stream", 0, "split", "tensor", "auto"),
        "cuda-stream-cta": ("stream", 0, "cta", "rows", "auto"),
        "cuda-counter-barrier": ("barrier", 1, "split", "rows", "auto"),
    }
    monkeypatch.setenv("LATENTRT_BENCH_SKIP", "cuda-stream")
    assert [k for k, _ in suites._backends(None)] == [
        "torch",
        "triton",
        "triton-one-graph",
        "triton-pdl",
        "cuda",
        "cuda-stream-mma",
        "cuda-stream-tensor",
        "cuda-stream-cta",
        "cuda-counter-barrier",
    ]
    monkeypatch.delenv("LATENTRT_BENCH_SKIP")  # Coconut: the streamed thought loop has one attention
    assert "cuda-stream-cta" not in dict(suites._backends(None, stream_attentions=("split",)))
    monkeypatch.setenv("LATENTRT_BENCH_SKIP", "decode_coconut:cuda-stream")  # one suite's row only
    assert "cuda-stream" not in dict(suites._backends(None, ("split",), "decode_coconut"))
    assert "cuda-stream" in dict(suites._backends(None))
    assert "cuda-stream-tensor" not in dict(suites._backends(None, ("split",), "decode_coconut"))  # rows only there
    assert "cuda-stream-mma" not in dict(suites._backends(None, ("split",), "decode_coconut"))
    assert "triton-one-graph" not in dict(suites._backends(None, ("split",), "decode_coconut"))
    assert "triton-pdl" in dict(suites._backends(None, ("split",), "decode_coconut"))
    monkeypatch.setenv("LATENTRT_BENCH_SKIP", "triton-one-graph,decode_coconut:triton-pdl")
    assert {"triton-one-graph", "triton-pdl"} & set(dict(suites._backends(None, ("split",), "decode_coconut"))) == set()
    assert "triton-pdl" in dict(suites._backends(None)) and "triton-one-graph" not in dict(suites._backends(None))


@pytest.mark.triton
@pytest.mark.parametrize("suite", ["recurrent_decode", "coconut_decode"])
def test_the_pdl_row_times_the_triton_gemvs_launched_programmatically_dependent(monkeypatch, suite):
    """decode_recurrent's and decode_coconut's ``triton-pdl`` rows run under ``pdl_launches``: linear.fused's
    default is a programmatic dependent launch there and only there (restored after, also after an error)."""
    from benchmarks import suites
    from latentrt.kernels import linear

    seen = []

    def timed(*args, **kwargs):
        seen.append(linear.PDL_BY_DEFAULT)
        raise RuntimeError("not timed here")

    monkeypatch.setattr(suites, "_decode_ms", timed)
    monkeypatch.setattr(suites, "measure", timed)
    monkeypatch.setattr(linear, "PDL_BY_DEFAULT", False)
    plan = suites.Plan(torch.device("cpu"), quick=True)
    records = [r for r in getattr(suites, suite)(plan, 1e9) if "error" in r]
    assert len(records) == len(seen) and {r["error"] for r in records} == {"RuntimeError: not timed here"}
    by_backend = {}
    for r, pdl in zip(records, seen):
        by_backend.setdefault(r["backend"], set()).add(pdl)
    assert by_backend["triton-pdl"] == {True} and by_backend["triton"] == {False} and by_backend["torch"] == {False}
    assert linear.PDL_BY_DEFAULT is False


def test_recurrent_configs_time_the_acceptance_rows_and_every_ideals_fixed_rows():
    """On a GPU, --quick: issue #11's acceptance rows (fixed depth at batch 1, r=32 and r=4; batch 8 and 32)
    come first, and every adaptive row has the fixed-depth rows at its r and at r=4 of its batch and KV mode
    that its ideal needs; the full sweep: every batch, depth and KV mode, fixed and adaptive."""
    from benchmarks import suites

    quick = suites.recurrent_configs(suites.Plan(torch.device("cuda"), quick=True))
    acceptance = [dict(batch=b, r=r, kv="shared", adaptive=False) for b, r in ((1, 32), (1, 4), (8, 32), (32, 32))]
    assert [c for c in quick[:5] if not c["adaptive"]] == acceptance
    fixed = {(c["batch"], c["r"], c["kv"]) for c in quick if not c["adaptive"]}
    adaptive = [c for c in quick if c["adaptive"]]
    assert {c["batch"] for c in adaptive} == {1, 8, 32}
    assert all({(c["batch"], c["r"], c["kv"]), (c["batch"], 4, c["kv"])} <= fixed for c in adaptive)
    plan = suites.Plan(torch.device("cuda"), quick=False)
    full = suites.recurrent_configs(plan)
    assert len(full) == len(plan.batches) * len(plan.depths) * 2 * 2 and plan.batches == [1, 8, 32]
    assert {(c["batch"], c["r"], c["kv"], c["adaptive"]) for c in full} == {
        (b, r, kv, a) for b in (1, 8, 32) for r in (4, 16, 32) for kv in ("full", "shared") for a in (False, True)
    }
