"""End to end: the triton backend gives the torch backend's tokens and step counts (fp32, interpreter on CPU)."""

import os

import pytest
import torch
from conftest import draw_norm_weights, rel_err, tiny_coconut, tiny_recurrent

import latentrt
import latentrt.kernels as kernels
from latentrt.backends import get_backend
from latentrt.errors import InputError

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_status()[1])
PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23]]


@pytest.fixture(autouse=True)
def _cpu_models_need_the_interpreter(request):
    """The tests not marked gpu build their models on the CPU for the Triton interpreter; on a GPU machine (no
    interpreter: the Triton backend refuses a CPU model) they skip, and the gpu-marked ones run."""
    if "gpu" not in request.keywords and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU models through the Triton interpreter (TRITON_INTERPRET=1; on a GPU the gpu tests run)")


def _pair(seed=1, visible_norms: bool = False, **cfg):
    """(``visible_norms``: every RMSNorm weight drawn around 1, see conftest's ``draw_norm_weights``; the adaptive
    tests' thresholds are set for the init's ones.)"""
    ref = tiny_recurrent(seed=seed, **cfg)
    fast = tiny_recurrent(seed=seed, **cfg)
    for model in (ref, fast) if visible_norms else ():
        draw_norm_weights(model, seed)
    fast.backend = get_backend("triton", fast)
    return ref, fast


# thresholds at which this tiny model's sequences exit at different iterations (the test checks that)
THRESHOLDS = {"latent-diff": 0.3, "kl": 0.02, "entropy-diff": 0.01, "argmax-stability": 2, "cosine": 0.03}


# every criterion once and every KV mode with several criteria: the criteria's kernels do not depend on the
# KV mode, and any criterion whose rows exit at different iterations exercises the modes' lookup rule
# (rows' entries written by different iteration counts); the full cross product cost CI 40 s more
ADAPTIVE_CASES = [
    ("latent-diff", "full"),
    ("kl", "shared"),
    ("kl", "ring-3"),
    ("entropy-diff", "ring-3"),
    ("argmax-stability", "shared"),
    ("cosine", "full"),
    ("cosine", "ring-3"),
    ("kl", "skip"),
    ("latent-diff", "skip"),
    ("kl", "anchor-2"),
    ("entropy-diff", "anchor-2"),
    ("entropy-diff", "always-last"),
    ("argmax-stability", "always-last"),
]


def test_adaptive_cases_cover_every_criterion_and_kv_mode():
    assert {c for c, _ in ADAPTIVE_CASES} == set(THRESHOLDS)
    modes = ("full", "shared", "ring-3", "skip", "anchor-2", "always-last")
    assert all(sum(k == kv for _, k in ADAPTIVE_CASES) >= 2 for kv in modes)


@pytest.mark.parametrize("criterion,kv", ADAPTIVE_CASES)
def test_triton_equals_torch_adaptive(kv, criterion, monkeypatch):
    """(Every call of the token runner, a CUDA graph on a GPU, is also checked for what its capture would
    refuse or bake in: tests/host_syncs.py.)"""
    from host_syncs import GraphedCalls

    checked = GraphedCalls().install(monkeypatch)
    ref, fast = _pair()
    kw = dict(
        max_new_tokens=3,
        adaptive=True,
        num_steps=6,
        exit_criterion=criterion,
        exit_threshold=THRESHOLDS[criterion],
        kv_sharing=kv,
        init_scale=0.0,
        return_logits=True,
    )
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    assert a.tokens == b.tokens and a.steps == b.steps
    assert len({s for seq in a.steps for s in seq}) > 1, "no early exit: the test would not check the masks"
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y, x) < 1e-4
    assert b.backend == "triton"
    assert checked.calls["RecurrentTokenRunner"] == 2 and not checked.hazards, checked.hazards
    if kv in ("skip", "always-last"):  # the lookup differs from full's here (the check can fail)
        full = latentrt.generate(ref, PROMPTS, **dict(kw, kv_sharing="full"))
        # (100x the Triton-torch agreement asserted above)
        assert any(rel_err(y, x) > 1e-4 for x, y in zip(full.logits, a.logits) if x.shape == y.shape)


@pytest.mark.parametrize(
    "kv,shape",
    [
        ("full", dict(num_attention_heads=4, num_key_value_heads=2, qk_bias=False)),  # GQA
        ("shared", dict(num_attention_heads=4, num_key_value_heads=2, qk_bias=False)),
        ("full", dict(num_attention_heads=4, num_key_value_heads=1, qk_bias=True)),  # one K/V head, a key per query
        ("ring-2", dict(n_layers_in_prelude=0, n_layers_in_coda=0)),  # the core block alone between ln_f's
    ],
)
def test_triton_equals_torch_fixed_depth_other_shapes(kv, shape):
    ref, fast = _pair(seed=2, visible_norms=True, **shape)
    kw = dict(max_new_tokens=4, num_steps=3, kv_sharing=kv, init_scale=0.0, return_logits=True)
    a, b = latentrt.generate(ref, PROMPTS[0], **kw), latentrt.generate(fast, PROMPTS[0], **kw)
    assert a.tokens == b.tokens
    assert rel_err(b.logits, a.logits) < 1e-4


def test_decode_tokens_run_as_one_token_runner(monkeypatch):
    """Without hooks every decode token goes through the token runner (the CUDA-graph unit); with hooks
    the decoder loops over core_iteration so the hooks can run between iterations; both equal the torch
    backend."""
    from latentrt.backends.triton.token import RecurrentTokenRunner

    runs = []
    real_run = RecurrentTokenRunner.run
    monkeypatch.setattr(RecurrentTokenRunner, "run", lambda self: runs.append(1) or real_run(self))
    ref, fast = _pair(seed=3, visible_norms=True)
    kw = dict(max_new_tokens=3, num_steps=5, continuous=True, kv_sharing="ring-2", seed=7, return_logits=True)
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    assert len(runs) == 2  # tokens 2 and 3; the prompt is a prefill
    assert a.tokens == b.tokens and a.steps == b.steps
    assert rel_err(torch.cat(b.logits), torch.cat(a.logits)) < 1e-4
    seen = []
    c = latentrt.generate(fast, PROMPTS, hooks=[lambda ev: seen.append(ev.step)], **kw)
    assert len(runs) == 2 and len(seen) > 0
    assert c.tokens == a.tokens


def test_hooks_see_the_same_iterations_on_every_backend():
    """With an adaptive exit, hooks are called after the iterations some sequence runs, as on the torch
    backend: the Triton path (whose loop keeps exit masks on the device) called them for every iteration up to
    num_steps, the later ones with nobody active. A hook's replaced state gives the same tokens and steps, and
    the states it sees are the same, a frozen sequence's (its last state, kept) included."""
    ref, fast = _pair(seed=5)
    kw = dict(max_new_tokens=3, num_steps=8, adaptive=True, exit_criterion="kl", exit_threshold=0.05, seed=3)
    logs, states = [], []
    for model in (ref, fast):
        log, seen = [], []

        def hook(ev, log=log, seen=seen):
            log.append((ev.kind, ev.step, ev.token_index, tuple(ev.active.tolist())))
            seen.append(ev.state.clone())
            return ev.state * 0.9

        out = latentrt.generate(model, PROMPTS, hooks=hook, **kw)
        logs.append((out.tokens, out.steps, log))
        states.append(seen)
    assert logs[0] == logs[1]
    assert any(not all(active) for *_, active in logs[0][2])  # (frozen sequences were seen)
    for a, b in zip(*states):
        assert rel_err(b, a) < 1e-4
    assert max(max(s) for s in logs[0][1]) < 8  # (every sequence exited early: iterations were left to skip)


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["none", "latent-diff", "kl"])
def test_cuda_graph_replay_equals_torch_backend(criterion):
    """On a GPU the decode tokens replay one captured graph; tokens and steps equal the torch backend."""
    ref, fast = (tiny_recurrent(seed=4).cuda() for _ in range(2))
    fast.backend = get_backend("triton", fast)
    ref.backend = get_backend("torch", ref)
    kw = dict(max_new_tokens=6, num_steps=8, adaptive=criterion != "none", exit_criterion=criterion, init_scale=0.0)
    if criterion == "latent-diff":
        kw["exit_threshold"] = 0.5
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    assert a.tokens == b.tokens and a.steps == b.steps


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [1e9, 0.5])  # every sequence exits at the first check / at its own
def test_cuda_graph_replay_with_early_stop_equals_torch_backend(threshold, monkeypatch):
    """With ``early_stop`` a decode token is one graph per stretch of its loop (token.exit_boundaries), replayed
    up to the boundary where no sequence is active: tokens, steps and logits as without it and as the torch
    backend (the graphs share one memory pool; a skipped stretch must leave the last one's inputs intact)."""
    from latentrt.backends.triton.token import RecurrentTokenRunner

    runners = []
    real_init = RecurrentTokenRunner.__init__
    monkeypatch.setattr(RecurrentTokenRunner, "__init__", lambda self, *a: runners.append(self) or real_init(self, *a))
    ref, fast = (tiny_recurrent(seed=4).cuda() for _ in range(2))
    fast.backend = get_backend("triton", fast)
    ref.backend = get_backend("torch", ref)
    kw = dict(max_new_tokens=6, num_steps=16, adaptive=True, exit_criterion="latent-diff", init_scale=0.0)
    kw.update(exit_threshold=threshold, return_logits=True)
    assert fast.backend.early_stop  # the default
    fast.backend.early_stop = False  # the whole token one graph
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    fast.backend.early_stop = True
    c = latentrt.generate(fast, PROMPTS, **kw)
    assert a.tokens == b.tokens == c.tokens and a.steps == b.steps == c.steps
    assert torch.equal(torch.cat(c.logits), torch.cat(b.logits))
    assert len(runners[-1]._graphs) == len(runners[-1].stops) + 1 > 2  # the stretches, each captured


@pytest.mark.gpu
def test_cuda_graph_coconut_thoughts_equal_torch_backend():
    ref, fast = tiny_coconut(seed=6).cuda(), tiny_coconut(seed=6).cuda()
    ref.backend, fast.backend = get_backend("torch", ref), get_backend("triton", fast)
    ids = [[5, 6, 7, 2] + [4] * 6 + [3], [8, 9, 2] + [4] * 6 + [3]]
    a = latentrt.generate(ref, ids, max_new_tokens=4, return_logits=True)
    b = latentrt.generate(fast, ids, max_new_tokens=4, return_logits=True)
    assert a.tokens == b.tokens and b.num_thoughts == [6, 6]
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y, x) < 1e-4


def test_triton_coconut_thought_columns_equal_torch(monkeypatch):
    """Thought columns and answer tokens run as the column runner (one CUDA graph on GPU; eager here) and
    equal the torch path."""
    from host_syncs import GraphedCalls

    from latentrt.backends.triton.column import ColumnRunner

    checked = GraphedCalls().install(monkeypatch)  # (a CUDA graph on a GPU: nothing its capture refuses)
    runs, fused = [], []
    real_run, real_fused = ColumnRunner.run, ColumnRunner._fused_layers
    monkeypatch.setattr(ColumnRunner, "run", lambda self: runs.append(1) or real_run(self))
    monkeypatch.setattr(ColumnRunner, "_fused_layers", lambda self, *a: fused.append(1) or real_fused(self, *a))
    ref, fast = tiny_coconut(seed=5), tiny_coconut(seed=5)
    fast.backend = get_backend("triton", fast)
    a, b = _same_generation(ref, fast, [[5, 6, 7, 2, 4, 4, 4, 3], [8, 9, 2, 4, 4, 4, 3]], max_new_tokens=4)
    assert len(runs) == 3 + 3 and len(fused) == len(runs) and b.num_thoughts == a.num_thoughts == [3, 3]  # + 3 answers
    assert checked.calls["ColumnRunner"] == len(runs) and not checked.hazards, checked.hazards
    # published_recompute: the thoughts through the column runner, each later answer token's pass over the whole
    # sequence through the model's modules (the published generate's eager passes), as on the torch backend
    runs.clear()
    _same_generation(ref, fast, [[5, 6, 7, 2, 4, 4, 4, 3]], max_new_tokens=4, published_recompute=True)
    assert len(runs) == 3  # no answer token through the runner


def _same_generation(ref, fast, ids, tol: float = 1e-5, **kw):
    """generate() on both models: the same tokens, logits within ``tol``; returns both results."""
    a = latentrt.generate(ref, ids, return_logits=True, **kw)
    b = latentrt.generate(fast, ids, return_logits=True, **kw)
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y, x) < tol
    return a, b


def test_coconut_fused_layers_follow_weight_updates():
    """The transposed weight copies are remade after an in-place update (a training step): no stale copies."""
    ref, fast = tiny_coconut(seed=8), tiny_coconut(seed=8)
    fast.backend = get_backend("triton", fast)
    ids = [[5, 6, 7, 2, 4, 4, 3]]
    latentrt.generate(fast, ids, max_new_tokens=1)
    with torch.no_grad():
        for m in (ref, fast):
            for blk in m.transformer.h:
                blk.mlp.c_fc.weight.mul_(1.5)
    _same_generation(ref, fast, ids, max_new_tokens=3)


@pytest.mark.parametrize(
    "other",
    [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False), dict(activation_function="gelu")],
)
def test_coconut_thoughts_without_fused_layers_for_other_configs(other):
    """GPT-2 configs the fused layer path does not cover (attention scaled by the inverse layer index or not
    scaled, GELU's exact form) run the thought columns through the model's own modules, still equal to the
    torch path."""
    from latentrt.backends.triton.column import fused_layers_apply

    assert fused_layers_apply(tiny_coconut(seed=5).config) is None
    ref = tiny_coconut(seed=5, **other)
    fast = tiny_coconut(seed=5, **other)
    fast.backend = get_backend("triton", fast)
    assert fused_layers_apply(fast.config) is not None
    ids = [[5, 6, 7, 2, 4, 4, 3]]
    _same_generation(ref, fast, ids, max_new_tokens=3)


def test_backend_choice_and_errors(monkeypatch):
    m = tiny_recurrent()
    assert get_backend("auto", m).name == ("triton" if torch.cuda.is_available() else "torch")
    assert "reference" in get_backend("auto", m).reason or torch.cuda.is_available()
    with pytest.raises(InputError, match="unknown backend"):
        get_backend("fast", m)
    with pytest.raises(InputError, match="unknown backend"):
        get_backend(["torch"], m)
    with pytest.raises(InputError, match="'cuda'"):
        get_backend("cuda", m)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="not on a CUDA device"):
            get_backend("triton", m)


@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
def test_triton_bf16_anchored_on_fp32(kv):
    """bf16, the fast path's dtype, under the interpreter (which rounds to bf16 as a GPU does: kernels/_triton.py):
    the torch backend's bf16 tokens, and logits as close to the fp32 run's as the torch backend's bf16 ones are
    (each about 1% off it: the decode kernels add no error of their own beyond bf16's)."""
    ref32, ref, fast = (tiny_recurrent(seed=3) for _ in range(3))
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    fast.backend = get_backend("triton", fast)
    kw = dict(max_new_tokens=4, num_steps=6, kv_sharing=kv, init_scale=0.0, return_logits=True)
    anchor, a, b = (latentrt.generate(m, PROMPTS, **kw) for m in (ref32, ref, fast))
    assert a.tokens == b.tokens and b.backend == "triton"
    compared = 0
    for i in range(len(PROMPTS)):
        for t in range(kw["max_new_tokens"]):
            if anchor.tokens[i][:t] == a.tokens[i][:t]:  # the same prefix: comparable logits
                bf16_error = rel_err(a.logits[i][t], anchor.logits[i][t])
                assert 1e-3 < bf16_error < 3e-2  # bf16's own error (not 0: the cast happened)
                assert rel_err(b.logits[i][t], anchor.logits[i][t]) < 2 * bf16_error + 5e-3
                compared += 1
    assert compared >= 9


def test_triton_coconut_thoughts_bf16_anchored_on_fp32():
    """Continuous thoughts in bf16 through the Triton feedback path under the interpreter: the torch backend's
    bf16 tokens, logits as close to the fp32 run's as its bf16 ones."""
    ref32, ref, fast = (tiny_coconut(seed=6) for _ in range(3))
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    fast.backend = get_backend("triton", fast)
    kw = dict(max_new_tokens=5, num_thoughts=3, return_logits=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    anchor, a, b = (latentrt.generate(m, prompts, **kw) for m in (ref32, ref, fast))
    assert a.tokens == b.tokens == anchor.tokens and b.backend == "triton"
    for x, y, z in zip(a.logits, b.logits, anchor.logits):
        bf16_error = rel_err(x, z)
        assert 1e-3 < bf16_error < 3e-2
        assert rel_err(y, z) < 2 * bf16_error + 5e-3


def test_exit_boundaries_follow_the_checks_doubling_then_every_four():
    """The early-stopping runner reads back after the first check at or after 1, 2, 4 and 8 iterations, then
    every 4, and after the last iteration; nothing without an exit test."""
    from latentrt.backends.triton.token import exit_boundaries
    from latentrt.exits import make_criterion
    from latentrt.recurrence import LoopSpec

    kl = make_criterion("kl")
    assert exit_boundaries(LoopSpec(32, kl)) == {0, 1, 3, 7, 11, 15, 19, 23, 27, 31}
    assert exit_boundaries(LoopSpec(32, kl, min_steps=2, check_every=3)) == {2, 5, 11, 17, 23, 29, 31}
    assert exit_boundaries(LoopSpec(5, kl)) == {0, 1, 3, 4}
    assert exit_boundaries(LoopSpec(32, make_criterion("none"))) == frozenset()


@pytest.mark.parametrize(
    ("criterion", "opts"),
    [
        ("latent-diff", dict(exit_threshold=1e9, num_steps=8)),  # every sequence exits at its first check
        ("latent-diff", dict(exit_threshold=1e9, num_steps=8, min_steps=2, check_criterion_every_n_steps=3)),
        ("kl", dict(exit_threshold=THRESHOLDS["kl"], num_steps=16)),  # sequences exit at different iterations
    ],
)
def test_early_stop_skips_the_iterations_after_the_last_exit_and_changes_nothing(monkeypatch, criterion, opts):
    """With ``early_stop`` the token runner's loop stops at a boundary once no sequence is active: fewer core
    iterations run, and tokens, steps and logits are those of the runner without it and of the torch
    backend (the iterations left out would have changed nothing: every sequence had exited)."""
    from latentrt.backends.triton import token

    ref, fast = _pair(seed=5)
    kw = dict(max_new_tokens=3, adaptive=True, exit_criterion=criterion, seed=3, return_logits=True)
    kw.update(opts)
    calls, real = [], token.core_iteration
    monkeypatch.setattr(token, "core_iteration", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for early in (False, True):
        fast.backend.early_stop = early
        calls.clear()
        runs[early] = (latentrt.generate(fast, PROMPTS, **kw), len(calls))
    (full, n_full), (early, n_early) = runs[False], runs[True]
    a = latentrt.generate(ref, PROMPTS, **kw)
    assert early.tokens == full.tokens == a.tokens and early.steps == full.steps == a.steps
    assert torch.equal(torch.cat(early.logits), torch.cat(full.logits))
    assert rel_err(torch.cat(early.logits), torch.cat(a.logits)) < 1e-4
    assert n_early < n_full == 2 * kw["num_steps"]  # two decode tokens, every iteration without early stop


def test_graphed_calls_find_what_a_capture_would_refuse_or_bake_in(monkeypatch):
    """The check the Triton workloads' runners run under (tests/host_syncs.py, ``GraphedCalls``): a read to
    the host or host data copied in, inside a runner's launches, is named with its line; a boundary's read
    (``stop``) is not."""
    from host_syncs import GraphedCalls

    from latentrt.backends.graph import GraphedRunner
    from latentrt.transfer import to_device

    class Runner(GraphedRunner):
        model = tiny_recurrent()  # (on the CPU: every call runs its launches eagerly)
        x = torch.ones(3)

        def segments(self):
            yield "boundary"
            if self.bad:
                self.x.sum().item()
                return self.x + to_device([1, 2, 3], "cpu")
            return self.x * 2

        def stop(self, marker):
            return bool(self.x.sum() > 10)  # a host read, at a boundary

    checked = GraphedCalls().install(monkeypatch)
    runner = Runner()
    runner.bad = False
    assert runner().tolist() == [2, 2, 2] and not checked.hazards and checked.calls == {"Runner": 1}
    runner.bad = True
    runner()
    assert {(k[0], k[1]) for k in checked.hazards} == {("Runner", "item"), ("Runner", "host data: tensor")}
    assert "stop" not in vars(runner)  # the boundary wrapper is gone after the call


def test_the_early_stop_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("LATENTRT_TRITON_EARLY_STOP", raising=False)
    model = tiny_recurrent(seed=1)
    assert get_backend("triton", model).early_stop is True  # the default since the H200 measured it
    monkeypatch.setenv("LATENTRT_TRITON_EARLY_STOP", "0")
    assert get_backend("triton", model).early_stop is False
    monkeypatch.setenv("LATENTRT_TRITON_EARLY_STOP", "1")
    assert get_backend("triton", model).early_stop is True
    monkeypatch.setenv("LATENTRT_TRITON_EARLY_STOP", "yes")
    with pytest.raises(InputError, match="LATENTRT_TRITON_EARLY_STOP must be 0 or 1"):
        get_backend("triton", model)


def test_a_runner_with_boundaries_captures_a_graph_per_stretch_and_replays_up_to_its_stop(monkeypatch):
    """GraphedRunner.segments: on CUDA each stretch between boundaries is captured as its own graph in one
    memory pool, in order; a call replays them in order, asks ``stop`` at each boundary but the last (the
    last stretch runs anyway) and jumps to the last stretch where it says so. (Graphs are stand-ins here:
    the CPU has none; what is checked is the order and the pool.)"""
    from latentrt.backends.graph import GraphedRunner

    events = []

    class Graph:
        def __init__(self):
            self.n = sum(e[0] == "capture" for e in events)

        def replay(self):
            events.append(("replay", self.n))

        def pool(self):
            return "pool"

    class Capture:
        def __init__(self, graph, pool=None, stream=None):
            self.graph, self.pool = graph, pool

        def __enter__(self):
            events.append(("capture", self.graph.n, self.pool))

        def __exit__(self, *exc):
            return False

    class OnCuda:
        device = torch.device("cuda")

    class Runner(GraphedRunner):
        model = OnCuda()

        def segments(self):
            for marker in ("m0", "m1"):
                if (yield marker):
                    break
            return "out"

        def stop(self, marker):
            events.append(("stop?", marker))
            return marker in self.stop_at

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(GraphedRunner, "_run_on_capture_stream", lambda self: self.run())
    runner = Runner()
    runner.stop_at, runner._stream = set(), None
    assert runner() == "out"  # the first call: eagerly (asking at each boundary), then captured
    assert [e for e in events if e[0] == "capture"] == [
        ("capture", 0, None),
        ("capture", 1, "pool"),
        ("capture", 2, "pool"),
    ]
    events.clear()
    assert runner() == "out"
    assert events == [("replay", 0), ("stop?", "m0"), ("replay", 1), ("replay", 2)]  # no read before the last
    events.clear()
    runner.stop_at = {"m0"}
    runner()
    assert events == [("replay", 0), ("stop?", "m0"), ("replay", 2)]


def test_an_older_triton_counts_as_none_and_everything_else_runs():
    """torch 2.4 installs Triton 3.0 beside itself: the kernel modules (which use newer language features at
    import) are then left out as without Triton, so the serving engine and the benchmarks still import, ``auto``
    stays on the torch backend and ``backend="triton"`` names the version (it was an ImportError from
    importing latentrt.serve, found on torch 2.4.1 / Triton 3.0.0)."""
    import subprocess
    import sys

    script = """
import triton
triton.__version__ = "3.0.0"
import latentrt, latentrt.serve.engine, latentrt.kernels.linear as linear, benchmarks.suites
from latentrt.errors import InputError
assert not linear.HAVE_TRITON and linear.triton is None
assert latentrt.load("builtin:recurrent").backend.name == "torch"
try:
    latentrt.load("builtin:recurrent", backend="triton")
    raise SystemExit("no error")
except InputError as exc:
    assert "triton 3.0.0 is older than 3.2" in str(exc), exc
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
