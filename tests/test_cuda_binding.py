"""The persistent kernel's host side without a GPU: the pybind11 argument structs, the workspace size and
the launch planner's refusals (runs wherever the extension was compiled, e.g. CI's nvcc build)."""

import pytest
import torch
from conftest import tiny_recurrent

_cuda = pytest.importorskip("latentrt._cuda", reason="the CUDA extension is not built here")


def _args(batch=2, **cfg):
    from latentrt.backends.cuda import loop_args
    from latentrt.exits import make_criterion
    from latentrt.kv_modes import parse_kv_mode
    from latentrt.recurrence import LoopSpec

    model = tiny_recurrent(seed=1, num_attention_heads=4, num_key_value_heads=2, **cfg).to(torch.bfloat16)
    cache = model.new_cache(batch, 24, parse_kv_mode("ring-3", 6))
    return model, cache, loop_args(_cuda, model, cache, LoopSpec(6, make_criterion("kl"), 2, 3))


def test_loop_args_describe_model_and_cache():
    model, cache, a = _args()
    cfg = model.config
    assert (a.batch, a.d, a.n_head, a.n_kv, a.head_dim) == (2, cfg.n_embd, 4, 2, cfg.head_dim)
    assert (a.ffn, a.max_len, a.vocab, a.r_max, a.min_steps, a.criterion) == (
        cfg.intermediate_size,
        24,
        cfg.padded_vocab_size,
        6,
        2,
        3,
    )
    assert a.check_every == 3  # checks after iterations 2, 5 (latentrt/recurrence.py, rule 3)
    assert len(a.core) == cfg.n_layers_in_recurrent_block and len(a.coda) == cfg.n_layers_in_coda
    blk = model.transformer.core_block[1]
    assert a.core[1].wqkv == blk.attn.Wqkv.weight.data_ptr() and a.core[1].slots == 3
    assert a.core[1].k_cache == cache.core_k[1].data_ptr() and a.coda[0].slots == 1
    assert a.adapter == model.transformer.adapter.weight.data_ptr() and a.ld_adapter == 2 * cfg.n_embd
    hd = cfg.num_attention_heads * cfg.head_dim
    assert _cuda.loop_scratch_elems(a) == 2 * (4 * cfg.n_embd + 2 * hd + cfg.intermediate_size)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(batch=17), "batch 17 is outside 1..16"),
        (dict(batch=0), "batch 0 is outside 1..16"),
        (dict(head_dim=130), "head_dim"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(ffn=60), "multiples of 8"),
        (dict(n_kv=3), "multiple of n_kv"),
        (dict(n_kv=0), "multiple of n_kv"),
        (dict(check_every=0), "check_every"),
        (dict(criterion=3, ln_f=0), "kl needs the head weights"),
    ],
)
def test_loop_plan_refuses_unsupported_shapes_with_a_reason(change, reason):
    _, _, a = _args()
    for k, v in change.items():
        setattr(a, k, v)
    plan = _cuda.loop_plan(a, 0)
    assert not plan["ok"] and reason in plan["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device answer")
def test_loop_plan_without_a_device_says_so():
    _, _, a = _args()
    plan = _cuda.loop_plan(a, 0)
    assert not plan["ok"] and "device" in plan["reason"]


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(batch=33), "batch 33 is outside 1..32"),
        (dict(head_dim=130), "head_dim"),
        (dict(ffn=60), "multiples of 8"),
        (dict(n_kv=3), "multiple of n_kv"),
        (dict(check_every=0), "check_every"),
        (dict(criterion=3, lm_head=0), "kl needs the head weights"),
        (dict(criterion=3, coda=[]), "coda layers"),
        (dict(criterion=3, coda=5), "criterion kl: 1 to 4 coda layers"),
        (dict(criterion=3, ln_f=0), "kl needs the head weights"),
        (dict(criterion=3, vocab=0), "kl needs the head weights"),
        (dict(criterion=3, vocab=100), "the vocabulary must be a multiple of 8"),
        (dict(criterion=4), "unknown exit criterion"),
        (dict(criterion=-1), "unknown exit criterion"),
        (dict(core=[]), "core layers"),
        (dict(core=9), "1 to 8 core layers"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(n_kv=0), "multiple of n_kv"),
        (dict(d=100), "multiples of 8"),
        (dict(ld_adapter=100), "multiples of 8"),
        (dict(min_steps=-1), "min_steps >= 0"),
        (dict(slots=0), "every core layer needs at least one KV slot"),
    ],
)
def test_stream_loop_plan_refuses_unsupported_shapes_with_a_reason(change, reason):
    _, _, a = _args()
    a.criterion = 1  # latent-diff: the streamed kernel's criteria are none / latent-diff / cosine
    for k, v in change.items():
        if k in ("core", "coda") and isinstance(v, int):  # that many layers (copies of the first)
            v = [getattr(a, k)[0]] * v
        if k == "slots":  # the last core layer's
            layers = a.core
            layers[-1].slots = v
            k, v = "core", layers
        setattr(a, k, v)
    plan = _cuda.stream_loop_plan(a, 0)
    assert not plan["ok"] and reason in plan["reason"]


def test_stream_loop_workspace_and_table():
    """The workspace holds the bf16 activations and the fp32 sums of every GEMV (256-byte aligned pieces);
    without a plan (no device here, or an unsupported shape) there is no tile table and no launch."""
    model, _, a = _args(batch=3)
    a.criterion = 1
    cfg = model.config
    B, d, ffn = 3, cfg.n_embd, cfg.intermediate_size
    hd, qkv = 4 * cfg.head_dim, (4 + 2 * 2) * cfg.head_dim
    up = lambda n: -(-n // 256) * 256  # noqa: E731
    bf16 = up(B * d * 2) * 3 + up(B * hd * 2) + up(B * ffn * 2)
    fp32 = up(B * d * 4) * 3 + up(B * qkv * 4) + up(B * 2 * ffn * 4) + up(4 * 2 * 32 * 4) + up(2 * 32 * 4 * 4)
    # split attention (the default): per (row, head, split) item m, l and head_dim sums, at most
    # attention_split_max splits; and one arrival counter per (row, head)
    heads = B * 4
    split = up(heads * _cuda.attention_split_max(heads) * (2 + cfg.head_dim) * 4) + up(heads * 4)
    assert a.split_attention == 1 and cfg.head_dim % 8 == 0
    assert _cuda.stream_loop_scratch_bytes(a) == bf16 + fp32 + split
    a.split_attention = 0  # attention one (row, head) per CTA: no partials
    assert _cuda.stream_loop_scratch_bytes(a) == bf16 + fp32 + up(heads * 4)
    a.criterion = 3  # KL: lm_head's fp32 sums too
    assert _cuda.stream_loop_scratch_bytes(a) == bf16 + fp32 + up(heads * 4) + up(B * cfg.padded_vocab_size * 4)
    a.head_dim, a.split_attention = 12, 1  # not a multiple of 8 (the 16-byte loads): no split attention either
    unsplit = _cuda.stream_loop_scratch_bytes(a)
    a.split_attention = 0
    assert _cuda.stream_loop_scratch_bytes(a) == unsplit
    if not torch.cuda.is_available():
        assert _cuda.stream_loop_table(a, 0) == []
        with pytest.raises(ValueError, match="unsupported"):
            _cuda.stream_loop(a, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device answer")
def test_stream_loop_plan_without_a_device_says_so():
    _, _, a = _args()
    a.criterion = 1
    plan = _cuda.stream_loop_plan(a, 0)
    assert not plan["ok"] and "device" in plan["reason"]


def test_thought_args_describe_gpt2_with_transposed_weights():
    from conftest import tiny_coconut

    from latentrt.backends.cuda import CudaBackend

    model = tiny_coconut(seed=2).to(torch.bfloat16)
    backend = CudaBackend(model, reason="test")
    cache = model.new_cache(3, 20)
    a = backend.thought_args(cache, 4)
    cfg = model.config
    assert (a.batch, a.d, a.n_head, a.head_dim, a.ffn, a.n_thoughts) == (3, 32, 2, 16, cfg.inner_size, 4)
    assert len(a.layers) == cfg.n_layer
    blk, w = model.transformer.h[1], backend._transposed[1]
    assert torch.equal(w["attn"], blk.attn.c_attn.weight.t()) and w["attn"].is_contiguous()
    assert a.layers[1].attn_w == w["attn"].data_ptr() and a.layers[1].attn_b == blk.attn.c_attn.bias.data_ptr()
    assert a.layers[1].scale == pytest.approx(blk.attn.scale)
    assert _cuda.thought_table_bytes(a) >= cfg.n_layer * 14 * 8
    assert _cuda.thought_scratch_elems(a) == 3 * (6 * 32 + cfg.inner_size)
    plan = _cuda.thought_plan(a, 0)
    assert not plan["ok"] and plan["reason"]


def test_stream_thought_workspace_table_and_refusals():
    """The streamed thought loop (csrc/stream_thought.cu): its workspace holds the residual rows, every CTA's
    own LayerNorm and GELU outputs (its GEMV inputs), the split attention's partials, then the fp32 sums and
    the attention's counters (256-byte aligned pieces); its device table the ops, the layers and each op's
    tile runs per CTA. Refusals name the problem; without a device there is no plan and no launch."""
    from conftest import tiny_coconut

    from latentrt.backends.cuda import CudaBackend

    model = tiny_coconut(seed=2).to(torch.bfloat16)
    a = CudaBackend(model, reason="test").thought_args(model.new_cache(3, 20), 4)
    cfg = model.config
    B, d, ffn, H, D, layers = 3, 32, cfg.inner_size, 2, 16, cfg.n_layer
    up = lambda n: -(-n // 256) * 256  # noqa: E731
    for ctas in (1, 132):
        own = up(ctas * B * d * 2) + up(ctas * B * ffn * 2)
        partials = up(B * H * _cuda.attention_split_max(B * H) * (2 + D) * 4)
        sums = up(B * 3 * d * 4) + up(B * d * 4) + up(B * ffn * 4) + up(B * d * 4) + up(B * H * 4)
        assert _cuda.stream_thought_scratch_bytes(a, ctas) == 3 * up(B * d * 2) + own + partials + sums
    runs = _cuda.stream_thought_table_bytes(a, 133) - _cuda.stream_thought_table_bytes(a, 1)
    assert runs == layers * 4 * 132 * 4  # int32 tile runs: one more per CTA for each of 4 ops a layer
    assert _cuda.stream_thought_table_bytes(a, 1) >= layers * (4 * 56 + 10 * 8) + layers * 4 * 2 * 4
    plan = _cuda.stream_thought_plan(a, 0)
    assert not plan["ok"] and plan["reason"]
    if not torch.cuda.is_available():
        assert "device" in plan["reason"]
        with pytest.raises(ValueError, match="unsupported"):
            _cuda.stream_thought(a, 0)
    for field, value, reason in [
        ("batch", 17, "batch 17 is outside 1..16"),
        ("head_dim", 12, "head_dim must be d / n_head, a multiple of 8"),
        ("n_thoughts", 0, "nothing to run"),
        ("layers", [], "1 to 48 layers"),
        ("layers", 49, "1 to 48 layers"),
        ("head_dim", 24, "head_dim must be d / n_head, a multiple of 8"),  # 2 x 24 is not d = 32
        ("head_dim", 8, "head_dim must be d / n_head, a multiple of 8"),
        ("ffn", 100, "widths must be multiples of 8"),
        ("d", 36, "head_dim must be d / n_head"),
    ]:
        b = CudaBackend(model, reason="test").thought_args(model.new_cache(3, 20), 4)
        setattr(b, field, [b.layers[0]] * value if field == "layers" and value else value)
        assert _cuda.stream_thought_plan(b, 0)["reason"].startswith(reason), (field, value)
    b.n_head, b.head_dim, b.d = 257, 8, 2056  # a row wider than the LayerNorm's staged shared memory
    assert _cuda.stream_thought_plan(b, 0)["reason"] == "d must be <= 2048"
    b.n_head, b.head_dim, b.d = 8, 4, 32  # d / n_head, but narrower than a 16-byte load
    assert _cuda.stream_thought_plan(b, 0)["reason"].startswith("head_dim must be d / n_head, a multiple of 8")
    for field, value, reason in [  # the barrier kernel (csrc/thought_loop.cu)
        ("batch", 0, "batch 0 is outside 1..16"),
        ("head_dim", 24, "head_dim must be d / n_head"),
        ("layers", [], "nothing to run"),
        ("table_uploaded", True, "answer tokens, device-held positions and prepared tables run on stream_thought"),
    ]:
        b = CudaBackend(model, reason="test").thought_args(model.new_cache(3, 20), 4)
        setattr(b, field, value)
        assert _cuda.thought_plan(b, 0)["reason"].startswith(reason), (field, value)


def test_stream_thought_answer_token_table_on_the_host():
    """An answer token's launch (csrc/stream_thought.cu with ``embeds`` and ``lm_head``): its device table,
    planned here for 4 SMs with an H200's shared memory (no device needed), holds each layer's four ops, then
    the LM head [vocab, d] reading every CTA's staged ln_f(h) into the caller's ``logits``; every op's tile
    runs lie in the table and cover its tiles in order; the layers' pointers are the model's. The workspace
    does not grow (the logits are the caller's); the barrier kernel refuses answer tokens."""
    import struct

    from conftest import tiny_coconut

    from latentrt.backends.cuda import CudaBackend

    model = tiny_coconut(seed=2).to(torch.bfloat16)
    cache = model.new_cache(3, 20)
    backend = CudaBackend(model, reason="test")
    a = backend.thought_args(cache, 1)
    scratch_bytes = _cuda.stream_thought_scratch_bytes(a, 4)
    V, d = model.lm_head.weight.shape
    ffn, L = model.config.inner_size, model.config.n_layer
    logits = torch.zeros(3, V)
    a.embeds, a.lm_head, a.vocab, a.logits = 1 << 36, model.lm_head.weight.data_ptr(), V, logits.data_ptr()
    assert _cuda.stream_thought_table(a, 0, sms=4, smem_optin=232448) == b""  # no table without its buffers
    base, scratch = 1 << 40, 1 << 41  # device addresses, only recorded in the table
    a.layer_table, a.scratch = base, scratch
    if not torch.cuda.is_available():
        assert _cuda.stream_thought_table(a, 0) == b""  # no device: no plan
    ctas = 4
    t = _cuda.stream_thought_table(a, 0, sms=ctas, smem_optin=232448)
    n_ops = 4 * L + 1
    assert len(t) == _cuda.stream_thought_table_bytes(a, ctas) == n_ops * 56 + L * 88 + n_ops * (ctas + 1) * 4
    assert _cuda.stream_thought_scratch_bytes(a, ctas) == scratch_bytes
    ops = [struct.unpack_from("<QQQiiiiiiQ", t, 56 * o) for o in range(n_ops)]
    runs_at = n_ops * 56 + L * 88
    xs, y, g = ops[0][1], ops[1][1], ops[3][1]
    assert all(scratch <= p < scratch + scratch_bytes for p in (xs, y, g)) and len({xs, y, g}) == 3
    shapes = [(3 * d, d, d), (d, d, d), (ffn, d, d), (d, ffn, ffn)] * L + [(V, d, d)]  # rows, cols, ldx
    for o, (w, x, out, rows, cols, ldw, ldx, split_k, row_tiles, first) in enumerate(ops):
        assert (rows, cols, ldx) == shapes[o] and ldw == cols
        if o < 4 * L:
            assert w == backend._transposed[o // 4][("attn", "proj", "fc", "out")[o % 4]].data_ptr()
        assert x == (y if o % 4 == 1 and o < 4 * L else g if o % 4 == 3 and o < 4 * L else xs)
        assert first == base + runs_at + o * (ctas + 1) * 4
        runs = struct.unpack_from(f"<{ctas + 1}i", t, runs_at + o * (ctas + 1) * 4)
        assert runs[0] == 0 and runs[-1] == row_tiles * split_k and list(runs) == sorted(runs)
        if o < 4 * L:
            assert scratch <= out < scratch + scratch_bytes
    w, _, out, *_ = ops[-1]
    assert (w, out) == (model.lm_head.weight.data_ptr(), logits.data_ptr())
    for i, blk in enumerate(model.transformer.h):
        *ptrs, scale = struct.unpack_from("<10Qf", t, n_ops * 56 + i * 88)
        assert ptrs[0] == blk.ln_1.weight.data_ptr() and ptrs[7] == blk.mlp.c_proj.bias.data_ptr()
        assert ptrs[8:] == [cache.plain_k[i].data_ptr(), cache.plain_v[i].data_ptr()]
        assert scale == pytest.approx(blk.attn.scale)
    a.vocab = 0
    assert _cuda.stream_thought_plan(a, 0)["reason"] == "an LM head needs vocab >= 1"
    assert "run on stream_thought only" in _cuda.thought_plan(a, 0)["reason"]


def test_answer_tokens_fall_back_to_the_column_runner_with_a_reason(caplog, monkeypatch):
    """With the ``stream`` kernel the CUDA backend offers the streamed answer-token runner only where it can
    run: an fp32 model or no plan (no device here) logs why once and answers with the column runner (its
    layers, then ln_f and the LM head); the ``barrier`` kernel always answers with the column runner."""
    from conftest import tiny_coconut

    from latentrt.backends import cuda as cuda_backend
    from latentrt.backends.triton.column import ColumnAnswerRunner

    monkeypatch.setattr(cuda_backend, "_logged", set())
    for dtype, reason in [(torch.float32, "dtype torch.float32"), (torch.bfloat16, "stream answer kernel: ")]:
        model = tiny_coconut(seed=2).to(dtype)
        backend = cuda_backend.CudaBackend(model, reason="test")
        backend.loop_kernel = "stream"
        with caplog.at_level("WARNING", logger="latentrt"):
            runner = backend.answer_runner(model.new_cache(2, 16))
        assert isinstance(runner, ColumnAnswerRunner) and reason in caplog.text, caplog.text
        backend.loop_kernel = "barrier"
        assert isinstance(backend.answer_runner(model.new_cache(2, 16)), ColumnAnswerRunner)


def test_the_streamed_input_mode_reaches_both_kernels_arguments():
    """``stream_input`` (LATENTRT_STREAM_INPUT) sets ``stage_input`` in the streamed latent loop's and the
    streamed thought loop's launch arguments; an unknown value set after the backend is an InputError."""
    from conftest import tiny_coconut

    from latentrt.backends import cuda as cuda_backend
    from latentrt.errors import InputError

    coconut = tiny_coconut(seed=2).to(torch.bfloat16)
    backend = cuda_backend.CudaBackend(coconut, reason="test")
    cache = coconut.new_cache(2, 16)
    assert backend.thought_args(cache, 2).stage_input == 1
    backend.stream_input = "l2"
    assert backend.thought_args(cache, 2).stage_input == 0
    backend.stream_input = "smem"
    with pytest.raises(InputError, match="stream_input must be one of"):
        backend.thought_args(cache, 2)
    assert _cuda.LoopArgs().stage_input == 1 and _cuda.ThoughtLoopArgs().stage_input == 1


def test_the_streamed_loop_options_reach_its_launch_arguments():
    """``stream_attention``, ``stream_input``, ``stream_copy`` and ``stream_gemv`` set the streamed latent
    loop's ``split_attention``, ``stage_input``, ``tensor_copy`` and ``tensor_core_gemv``; an unknown value set
    after the backend is an InputError naming it."""
    from latentrt.backends import cuda as cuda_backend
    from latentrt.errors import InputError

    backend = cuda_backend.CudaBackend(tiny_recurrent(seed=1), reason="test")
    args = _cuda.LoopArgs()
    fields = lambda: (args.split_attention, args.stage_input, args.tensor_copy, args.tensor_core_gemv)  # noqa: E731
    assert fields() == (1, 1, 0, 0)
    backend.stream_options(args)
    assert fields() == (1, 1, 0, 0)
    backend.stream_attention, backend.stream_input, backend.stream_copy = "cta", "l2", "tensor"
    backend.stream_gemv = "tensor-cores"
    backend.stream_options(args)
    assert fields() == (0, 0, 1, 1)
    backend.stream_copy = "packed"
    with pytest.raises(InputError, match="stream_copy must be one of"):
        backend.stream_options(args)
    backend.stream_copy, backend.stream_gemv = "rows", "fma"
    with pytest.raises(InputError, match="stream_gemv must be one of"):
        backend.stream_options(args)


def test_stream_watchdog_report_names_the_wait_that_hung(monkeypatch):
    """The streamed kernel's watchdog writes what a hung wait waited for into pinned host memory; the report
    reads it back (no CUDA call: it works after the context died)."""
    from latentrt.backends import cuda as cuda_backend

    barrier, stage = torch.tensor([1, 35, 17, 4488, 4620, 0, 0, 0]), torch.tensor([2, 0, 3, 5, 6, 1, 0, 0])
    monkeypatch.setattr(cuda_backend, "_watches", [torch.zeros(8, dtype=torch.int32)])
    assert cuda_backend.stream_watchdog_report() is None
    monkeypatch.setattr(cuda_backend, "_watches", [barrier])
    assert cuda_backend.stream_watchdog_report() == (
        "streamed loop hang: CTA 17 waited at consumer barrier 35 (4488 of 4620 arrivals)"
    )
    monkeypatch.setattr(cuda_backend, "_watches", [stage])
    assert "CTA 3 consumer warp 5 waited for ring stage 6 (parity 1)" in cuda_backend.stream_watchdog_report()


def test_streamed_token_runner_runs_eagerly_where_graph_capture_fails(monkeypatch):
    """The streamed kernel's token is one CUDA graph; if capturing it fails (a torch version, a driver) the
    runner keeps the eager call's outputs, warns once and runs later tokens eagerly (a second eager run of
    the same token would count its timeline entry twice). The barrier kernel's runner never captures."""
    from latentrt.backends import cuda as cuda_backend
    from latentrt.backends.graph import GraphedRunner

    class OnCuda:
        device = torch.device("cuda")

    runner = object.__new__(cuda_backend.PersistentTokenRunner)
    runner.kernel, runner.model, runs = "stream", OnCuda(), []
    runner.run = lambda: runs.append(1) or f"eager {len(runs)}"
    monkeypatch.setattr(GraphedRunner, "_run_on_capture_stream", lambda self: self.run())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("capture")))
    with pytest.warns(UserWarning, match="PersistentTokenRunner runs eagerly"):
        assert runner() == "eager 1"  # the first call's outputs stand
    assert isinstance(runner.capture_error, RuntimeError)
    assert runner() == "eager 2" and runs == [1, 1]  # one run per call, no capture attempted again
    barrier = object.__new__(cuda_backend.PersistentTokenRunner)
    barrier.kernel, barrier.run = "barrier", lambda: "eager"
    assert barrier() == "eager" and barrier.capture_error is None


@pytest.mark.parametrize(
    ("env", "attr", "default", "other"),
    [
        ("LATENTRT_CUDA_LOOP", "loop_kernel", "barrier", "stream"),
        ("LATENTRT_STREAM_ATTENTION", "stream_attention", "split", "cta"),
        ("LATENTRT_STREAM_INPUT", "stream_input", "staged", "l2"),
        ("LATENTRT_STREAM_COPY", "stream_copy", "rows", "tensor"),
        ("LATENTRT_STREAM_GEMV", "stream_gemv", "auto", "tensor-cores"),
    ],
)
def test_the_latent_loop_kernel_comes_from_the_environment(monkeypatch, env, attr, default, other):
    """LATENTRT_CUDA_LOOP picks the CUDA backend's latent-loop kernel (CLI, server, benchmarks), and
    LATENTRT_STREAM_ATTENTION the streamed kernel's attention, LATENTRT_STREAM_INPUT its input chunks,
    LATENTRT_STREAM_COPY its weight copies, LATENTRT_STREAM_GEMV what multiplies them; a value
    none knows is an InputError naming the variable, when the backend is made, not at the first token."""
    from latentrt.backends import cuda as cuda_backend
    from latentrt.errors import InputError

    names = (cuda_backend.LOOP_KERNEL_ENV, cuda_backend.STREAM_ATTENTION_ENV, cuda_backend.STREAM_INPUT_ENV)
    assert env in (*names, cuda_backend.STREAM_COPY_ENV, cuda_backend.STREAM_GEMV_ENV)
    model = tiny_recurrent(seed=1)
    monkeypatch.delenv(env, raising=False)
    assert getattr(cuda_backend.CudaBackend(model), attr) == default
    monkeypatch.setenv(env, other)
    assert getattr(cuda_backend.CudaBackend(model), attr) == other
    monkeypatch.setenv(env, "fast")
    with pytest.raises(InputError, match=f"{env} must be one of"):
        cuda_backend.CudaBackend(model)


def test_the_extension_carries_the_digest_of_the_sources_it_was_built_from():
    """setup.py compiles csrc/'s digest into the extension; CI builds this checkout, so they agree (and
    cuda_ext.built() takes it as this checkout's)."""
    from pathlib import Path

    from latentrt import cuda_ext
    from latentrt.cuda_sources import source_digest

    assert _cuda.source_digest == source_digest(Path(__file__).parent.parent / "csrc")
    assert cuda_ext.built() == (True, "built")
