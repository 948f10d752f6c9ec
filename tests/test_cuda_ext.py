"""The CUDA extension's persistent loops against the torch backend (gpu-marked: skipped without a GPU)."""

import pytest
import torch
from bf16_agreement import TWO_BF16_PATHS, splits_not_explained
from conftest import rel_err

from latentrt import cuda_ext

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_extension():
    ok, why = cuda_ext.available()
    if not ok:
        pytest.skip(why)


def test_device_info():
    info = cuda_ext.device_info(0)
    assert info["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count


def _bf16_pair(seed: int, **cfg):
    from conftest import tiny_recurrent

    from latentrt.backends import get_backend

    ref, fast = (tiny_recurrent(seed=seed, **cfg).to("cuda", torch.bfloat16) for _ in range(2))
    for m in (ref, fast):
        m.init_buffers()  # fp32 RoPE tables (.to cast them)
    ref.backend, fast.backend = get_backend("torch", ref), get_backend("cuda", fast)
    return ref, fast


PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [20, 21, 22, 23], [7, 7, 9]]


def _builtin_pair(name: str):
    """The shipped model twice in bf16 on the GPU (torch / cuda backends): trained weights give confident
    argmaxes, so token equality checks the kernel rather than bf16 near-ties of a random model."""
    import latentrt

    return tuple(
        latentrt.load(f"builtin:{name}", device="cuda", dtype="bfloat16", backend=b) for b in ("torch", "cuda")
    )


def _questions(model, n: int) -> list[list[int]]:
    from latentrt.train.data import generate_dataset

    return [model.tokenizer.encode(r.question).ids for r in generate_dataset(n, (1, 2, 3), seed=4242)]


def _fp32_run(prompts, kw):
    """The builtin recurrent model's run in fp32 on the torch backend, made only when asked (the anchor)."""
    import latentrt

    def run():
        model = latentrt.load("builtin:recurrent", device="cuda", dtype="float32", backend="torch")
        return latentrt.generate(model, prompts, **kw)

    return run


def _agree(a, b, fp32=None, steps_too: bool = True) -> None:
    """Same tokens, or where the kernel's differ, its first split from the fp32 run (``fp32``: a thunk making
    it) is a bf16 near-tie (tests/bf16_agreement.py); steps equal on >= 90% of tokens (exit tests near their
    threshold may flip in bf16); the first decoded position's logits (the kernel's first output) within two
    bf16 paths' distance: after 8 iterations x 2 core layers each bf16 path is 2-4% from fp32 (measured on an
    H200: torch 0.020-0.043, kernel 0.016-0.026), so two of them may differ by up to the sum. The error
    against fp32 itself is checked by test_persistent_loop_error_against_fp32_is_bf16_sized."""
    if a.tokens != b.tokens:
        assert fp32 is not None, (a.tokens, b.tokens)
        problems = splits_not_explained(b, fp32())
        assert not problems, problems
    if steps_too:
        pairs = [(x, y) for sa, sb in zip(a.steps, b.steps) for x, y in zip(sa, sb)]
        assert sum(x == y for x, y in pairs) >= 0.9 * len(pairs), (a.steps, b.steps)
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y[1], x[1]) < TWO_BF16_PATHS


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
@pytest.mark.parametrize("criterion", ["none", "latent-diff", "kl"])
def test_persistent_loop_equals_torch_backend(batch, kv, criterion):
    """One launch per token runs every iteration; tokens, steps and logits match the torch backend (bf16)."""
    import latentrt

    ref, fast = _builtin_pair("recurrent")
    prompts = _questions(ref, batch)
    kw = dict(max_new_tokens=6, num_steps=8, kv_sharing=kv, init_scale=0.0, return_logits=True)
    if criterion != "none":
        kw.update(adaptive=True, exit_criterion=criterion)
    a, b = latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw)
    assert b.backend == "cuda"
    _agree(a, b, _fp32_run(prompts, kw))


@pytest.mark.parametrize("criterion", ["latent-diff", "kl"])
def test_persistent_loop_check_schedule_equals_torch_backend(criterion):
    """min_steps and check_criterion_every_n_steps as published (latentrt/recurrence.py, rule 3): the kernel
    checks after the same iterations, against the state (logits) of the previous check."""
    import latentrt

    ref, fast = _builtin_pair("recurrent")
    prompts = _questions(ref, 4)
    kw = dict(max_new_tokens=6, num_steps=12, init_scale=0.0, return_logits=True, adaptive=True)
    kw.update(exit_criterion=criterion, min_steps=2, check_criterion_every_n_steps=3, kv_sharing="ring-3")
    a, b = latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw)
    assert b.backend == "cuda"
    _agree(a, b, _fp32_run(prompts, kw))


STREAM_VARIANTS = {  # label: (loop_kernel, stream_attention, stream_input[, stream_copy[, stream_gemv]])
    "barrier": ("barrier", "split", "staged"),
    "stream": ("stream", "split", "staged"),
    "stream-cta": ("stream", "cta", "staged"),  # the per-CTA attention
    "stream-l2": ("stream", "split", "l2"),  # every warp reads its input from L2
    "stream-tensor": ("stream", "split", "staged", "tensor"),  # the weights copied as tensor-map boxes
    "stream-mma": ("stream", "split", "staged", "rows", "tensor-cores"),  # mma.sync at batch 1-4 too
}


@pytest.mark.parametrize("kernel", list(STREAM_VARIANTS))
@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
def test_persistent_loop_error_against_fp32_is_bf16_sized(kv, kernel):
    """Against the fp32 torch path (the numbers bf16 approximates), the kernel's logits are as close as the
    torch backend's own bf16 logits (within 1.5x + 5e-3): a slot-rule or rounding bug shows up here as an
    error larger than bf16's, while bf16-vs-bf16 differences of two accumulation orders do not."""
    import warnings

    import latentrt

    ref32 = latentrt.load("builtin:recurrent", device="cuda", dtype="float32", backend="torch")
    ref16, fast = _builtin_pair("recurrent")
    b = fast.backend
    b.loop_kernel, b.stream_attention, b.stream_input, *rest = STREAM_VARIANTS[kernel]
    b.stream_copy, b.stream_gemv = (*rest, "rows", "auto")[:2] if len(rest) < 2 else rest
    prompts = _questions(ref16, 4)
    kw = dict(max_new_tokens=3, num_steps=8, kv_sharing=kv, init_scale=0.0, return_logits=True)
    a32, a16, b16 = (latentrt.generate(m, prompts, **kw) for m in (ref32, ref16, fast))
    same = [i for i in range(len(prompts)) if a32.tokens[i][0] == a16.tokens[i][0] == b16.tokens[i][0]]
    assert same, "no sequence decoded the same first token in fp32 and bf16"
    e16 = max(rel_err(a16.logits[i][1], a32.logits[i][1]) for i in same)
    efast = max(rel_err(b16.logits[i][1], a32.logits[i][1]) for i in same)
    warnings.warn(f"kv={kv}: logits error vs fp32: torch bf16 {e16:.4f}, {kernel} kernel {efast:.4f}", stacklevel=1)
    assert efast <= 1.5 * e16 + 5e-3, (efast, e16)


def _stream_launches(monkeypatch) -> list[str]:
    """The kernel of every persistent-loop launch from now on (the streamed tests must run that kernel, not
    a fallback)."""
    from latentrt.backends import cuda as cuda_backend

    kernels = []
    real = cuda_backend.PersistentTokenRunner.recurrence
    monkeypatch.setattr(
        cuda_backend.PersistentTokenRunner,
        "recurrence",
        lambda self, *a: kernels.append(self.kernel) or real(self, *a),
    )
    return kernels


def _assert_streamed_equals_torch(monkeypatch, batch: int, kv: str, criterion: str, **options) -> None:
    """The streamed latent loop (the backend's ``options`` set) decodes ``batch`` questions, 6 tokens at
    num_steps 8 in KV mode ``kv`` with ``criterion`` (adaptive unless "none"), every token through it: tokens,
    steps and logits as the torch backend's, anchored on fp32."""
    import latentrt

    ref, fast = _builtin_pair("recurrent")
    fast.backend.loop_kernel = "stream"
    for name, value in options.items():
        assert hasattr(fast.backend, name), name  # (a misspelt option would test the default)
        setattr(fast.backend, name, value)
    kernels = _stream_launches(monkeypatch)
    prompts = _questions(ref, batch)
    kw = dict(max_new_tokens=6, num_steps=8, kv_sharing=kv, init_scale=0.0, return_logits=True)
    if criterion != "none":
        kw.update(adaptive=True, exit_criterion=criterion)
    a, b = latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw)
    assert kernels and set(kernels) == {"stream"}, kernels
    _agree(a, b, _fp32_run(prompts, kw))


@pytest.mark.parametrize("batch", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("kv", ["full", "shared", "ring-3"])
@pytest.mark.parametrize("criterion", ["none", "latent-diff", "kl"])
def test_streamed_loop_equals_torch_backend(batch, kv, criterion, monkeypatch):
    """The streamed-weight kernel (csrc/stream_loop.cu) at issue #11's batches: 1 and 4 on CUDA-core GEMVs,
    8, 16 and 32 on tensor cores, every KV mode, rows exiting at their own iterations (KL: the coda and
    lm_head streamed at each check): tokens, steps and logits as the torch backend."""
    _assert_streamed_equals_torch(monkeypatch, batch, kv, criterion)


@pytest.mark.parametrize("batch", [1, 4, 8, 32])
@pytest.mark.parametrize("criterion", ["none", "kl"])
def test_streamed_loop_with_tensor_map_copies_equals_torch_backend(criterion, batch, monkeypatch):
    """The streamed kernel with its weights copied as 2D tensor-map boxes (``stream_copy="tensor"``, the
    2026-12-04 probe's fast stream; csrc/stream_tensor_map.h) on both GEMV paths (unswizzled 256-column
    boxes up to batch 4, 128-byte swizzled 64-column boxes on tensor cores), the KL head's matrices included:
    tokens, steps and logits as the torch backend."""
    _assert_streamed_equals_torch(monkeypatch, batch, "full", criterion, stream_copy="tensor")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("copy", ["rows", "tensor"])
@pytest.mark.parametrize("criterion", ["none", "kl"])
def test_streamed_loop_mma_at_small_batches_equals_torch_backend(criterion, copy, batch, monkeypatch):
    """``stream_gemv="tensor-cores"``: batches 1-4 multiply on mma.sync (the batch padded to its 8 columns)
    instead of CUDA-core dot products (all through the kernel's MB=1 instance), with row copies and with
    swizzled tensor-map boxes, the KL head's matrices included: tokens, steps and logits as the torch
    backend."""
    _assert_streamed_equals_torch(monkeypatch, batch, "shared", criterion, stream_copy=copy, stream_gemv="tensor-cores")


@pytest.mark.parametrize("batch", [4, 32])
def test_streamed_loop_input_from_l2_equals_torch_backend(batch, monkeypatch):
    """The streamed kernel with every consumer warp reading its input from L2 (``stream_input="l2"``, the
    probe's A/B of the staged input) on both GEMV paths: tokens, steps and logits as the torch backend."""
    import latentrt

    ref, fast = _builtin_pair("recurrent")
    fast.backend.loop_kernel, fast.backend.stream_input = "stream", "l2"
    kernels = _stream_launches(monkeypatch)
    prompts = _questions(ref, batch)
    kw = dict(max_new_tokens=6, num_steps=8, kv_sharing="ring-3", init_scale=0.0, return_logits=True)
    kw.update(adaptive=True, exit_criterion="kl")
    _agree(latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw), _fp32_run(prompts, kw))
    assert kernels and set(kernels) == {"stream"}, kernels


@pytest.mark.parametrize("batch", [4, 16])
def test_streamed_loop_check_schedule_and_cosine_equal_torch_backend(batch, monkeypatch):
    """min_steps / check_criterion_every_n_steps and the cosine criterion in the streamed kernel."""
    import latentrt

    ref, fast = _builtin_pair("recurrent")
    fast.backend.loop_kernel = "stream"
    kernels = _stream_launches(monkeypatch)
    prompts = _questions(ref, batch)
    kw = dict(max_new_tokens=6, num_steps=12, init_scale=0.0, return_logits=True, adaptive=True)
    for crit in ("latent-diff", "cosine"):
        kw.update(exit_criterion=crit, min_steps=2, check_criterion_every_n_steps=3, kv_sharing="ring-3")
        _agree(latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw), _fp32_run(prompts, kw))
    assert kernels and set(kernels) == {"stream"}, kernels


def test_streamed_loop_gqa_random_weights_logits(monkeypatch):
    """GQA and qk_bias on random weights through the streamed kernel (first decoded position's logits)."""
    import latentrt

    ref, fast = _bf16_pair(seed=6, num_attention_heads=4, num_key_value_heads=2)
    fast.backend.loop_kernel = "stream"
    kernels = _stream_launches(monkeypatch)
    kw = dict(max_new_tokens=2, num_steps=6, init_scale=0.0, return_logits=True)
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    assert kernels and set(kernels) == {"stream"}, kernels
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y[1], x[1]) < 3e-2


@pytest.mark.parametrize(
    ("attention", "kv", "batch"),
    [("split", "full", 1), ("split", "ring-3", 3), ("cta", "full", 3), ("cta", "ring-3", 1)],
)
def test_streamed_attention_over_a_long_context(attention, kv, batch, monkeypatch):
    """The streamed kernel's attention at 380-450 positions: split over positions (batch 1 on an H200: 29
    splits of 16 positions, merged by the last item of each head) and per CTA; head_dim 96 as
    Huginn-0125's (12 of a lane group's 16 lanes load); prompts of different lengths (the padding mask).
    The first decoded position's logits against the torch backend."""
    import latentrt

    shape = dict(n_embd=192, num_attention_heads=2, intermediate_size=256, block_size=512, vocab_size=64)
    ref, fast = _bf16_pair(seed=9, **shape)
    fast.backend.loop_kernel, fast.backend.stream_attention = "stream", attention
    kernels = _stream_launches(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 60, (450 - 37 * i,), generator=gen).tolist() for i in range(batch)]
    kw = dict(max_new_tokens=2, num_steps=6, kv_sharing=kv, init_scale=0.0, return_logits=True)
    a, b = latentrt.generate(ref, prompts, **kw), latentrt.generate(fast, prompts, **kw)
    assert kernels and set(kernels) == {"stream"}, kernels
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y[1], x[1]) < 3e-2


def test_streamed_loop_falls_back_with_a_reason(caplog, monkeypatch):
    """Past its 32 rows the streamed kernel says why and the Triton path runs the batch."""
    import latentrt

    ref, fast = _bf16_pair(seed=7)
    fast.backend.loop_kernel = "stream"
    kernels = _stream_launches(monkeypatch)
    with caplog.at_level("WARNING", logger="latentrt"):
        out = latentrt.generate(fast, [[5, 6, 7]] * 33, max_new_tokens=2, num_steps=4)
    assert "stream kernel: batch 33 is outside 1..32" in caplog.text and not kernels and out.backend == "cuda"


def test_persistent_loop_gqa_random_weights_logits():
    """GQA and qk_bias on random weights: the first decoded position's logits only (random models have
    near-tied argmaxes in bf16)."""
    import latentrt

    ref, fast = _bf16_pair(seed=6, num_attention_heads=4, num_key_value_heads=2)
    kw = dict(max_new_tokens=2, num_steps=6, init_scale=0.0, return_logits=True)
    a, b = latentrt.generate(ref, PROMPTS, **kw), latentrt.generate(fast, PROMPTS, **kw)
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y[1], x[1]) < 3e-2


def test_persistent_loop_is_used_and_falls_back_with_a_reason(caplog, monkeypatch):
    import latentrt
    from latentrt.backends import cuda as cuda_backend

    launches = []
    real = cuda_backend.PersistentTokenRunner.recurrence
    monkeypatch.setattr(
        cuda_backend.PersistentTokenRunner, "recurrence", lambda self, *a: launches.append(1) or real(self, *a)
    )
    ref, fast = _bf16_pair(seed=7)
    latentrt.generate(fast, PROMPTS, max_new_tokens=4, num_steps=4)
    assert len(launches) == 3
    with caplog.at_level("WARNING", logger="latentrt"):
        kw = dict(max_new_tokens=3, num_steps=4, adaptive=True, exit_criterion="entropy-diff")
        out = latentrt.generate(fast, PROMPTS, **kw)
    assert "not implemented in the kernel" in caplog.text
    assert len(launches) == 3 and out.backend == "cuda"


@pytest.mark.parametrize("kernel", ["barrier", "stream"])
@pytest.mark.parametrize("batch", [1, 4])
def test_persistent_thoughts_equal_torch_backend(batch, kernel, monkeypatch):
    """Every Coconut thought of the prompt in one launch (thought_loop.cu, or stream_thought.cu on the
    streamed ring); tokens and logits match the torch backend."""
    import latentrt

    ref, fast = _builtin_pair("coconut")
    fast.backend.loop_kernel = kernel
    ext, launches = cuda_ext._ext(), []
    launcher = "stream_thought" if kernel == "stream" else "thought_loop"
    real = getattr(ext, launcher)
    monkeypatch.setattr(ext, launcher, lambda *a: launches.append(1) or real(*a))
    kw = dict(max_new_tokens=6, num_thoughts=3, return_logits=True)
    a = latentrt.generate(ref, _questions(ref, batch), **kw)
    b = latentrt.generate(fast, _questions(ref, batch), **kw)
    assert launches, f"the {kernel} thought kernel did not run"
    assert b.num_thoughts == a.num_thoughts == [3] * batch
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        assert rel_err(y[0], x[0]) < 3e-2  # the answer's first logits come right after the thoughts


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_streamed_thoughts_kernel_answer_tokens_equal_torch_backend(batch):
    """With the ``stream`` kernel each Coconut answer token is one launch of stream_thought.cu (the layers over
    the token's embedding + wpe, then the LM head over ln_f), captured once and replayed: every answer token
    and its logits match the torch backend (bf16)."""
    import latentrt
    from latentrt.backends.cuda_coconut import StreamedAnswerRunner

    ref, fast = _builtin_pair("coconut")
    fast.backend.loop_kernel = "stream"
    made = []
    real = type(fast.backend).answer_runner
    fast.backend.answer_runner = lambda cache: made.append(real(fast.backend, cache)) or made[-1]
    kw = dict(max_new_tokens=8, num_thoughts=3, return_logits=True)
    a = latentrt.generate(ref, _questions(ref, batch), **kw)
    b = latentrt.generate(fast, _questions(ref, batch), **kw)
    assert len(made) == 1 and isinstance(made[0], StreamedAnswerRunner), made
    runner = made[0]
    assert runner._graph is not None and runner.capture_error is None  # later tokens replayed the graph
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        for t in range(1, len(x)):  # every answer token after the first (which comes from the prompt's pass)
            assert rel_err(y[t], x[t]) < 3e-2, t


def test_streamed_thoughts_fall_back_with_a_reason(caplog):
    """Past its 16 rows the streamed thought loop says why and the Triton column runner thinks instead."""
    import latentrt

    ref, fast = _builtin_pair("coconut")
    fast.backend.loop_kernel = "stream"
    prompts = _questions(ref, 1) * 17
    with caplog.at_level("WARNING", logger="latentrt"):
        out = latentrt.generate(fast, prompts, max_new_tokens=2, num_thoughts=2)
    assert "stream thought kernel: batch 17 is outside 1..16" in caplog.text and out.backend == "cuda"
