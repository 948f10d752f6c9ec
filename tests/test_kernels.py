"""Every Triton kernel against its PyTorch reference on random inputs, outputs poisoned first.

On CPU these run under TRITON_INTERPRET=1 at small shapes, in fp32 and in bf16 (which latentrt makes the
interpreter round as a GPU does: latentrt/kernels/_triton.py); gpu-marked tests run bf16 at the Huginn-0125 and
GPT-2 shapes on a CUDA device."""

import os

import pytest
import torch
from conftest import rel_err

import latentrt.kernels as kernels
from latentrt.kernels._triton import next_pow2

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_status()[1])
CPU = not torch.cuda.is_available()
DEV = "cpu" if CPU else "cuda"


def _close(a, b, tol):
    assert torch.isfinite(a).all(), "unwritten or non-finite output"
    assert rel_err(a.float(), b.float()) < tol, rel_err(a.float(), b.float())


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The GPU's launch blocks under the interpreter too (LATENTRT_GPU_CONFIGS=1: e.g. the key blocks
    of 64 a test's block boundaries are placed for)."""
    monkeypatch.setenv("LATENTRT_GPU_CONFIGS", "1")


@pytest.fixture(params=["gpu", "interpreter"])
def configs(request, monkeypatch):
    """Each test twice: with the GPU's launch configs (LATENTRT_GPU_CONFIGS=1) and with the interpreter's (on a
    CPU; on a GPU both runs take the GPU's)."""
    monkeypatch.setenv("LATENTRT_GPU_CONFIGS", "1" if request.param == "gpu" else "0")
    return request.param


@pytest.mark.parametrize("rows,d,eps", [(1, 64, 1e-6), (5, 96, 0.1), (3, 130, 1e-6)])
@pytest.mark.parametrize("with_y,with_b", [(True, True), (False, True), (True, False)])
def test_sandwich_norms(rows, d, eps, with_y, with_b, configs):
    """(An epsilon of 0.1 against mean squares about 1: each norm's epsilon is seen.)"""
    from latentrt.kernels import norms

    g = torch.Generator().manual_seed(rows * d)
    res, y = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    wa, wb = 1 + 0.2 * torch.randn(d, generator=g), 1 + 0.2 * torch.randn(d, generator=g)
    out, normed = norms.fused(res, y if with_y else None, wa, wb if with_b else None, eps)
    want_out, want_normed = norms.reference(res, y if with_y else torch.zeros_like(y), wa, wb, eps)
    _close(out, want_out, 1e-6)
    if with_b:
        _close(normed, want_normed, 1e-6)


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (3, 70, 100), (17, 33, 48)])
@pytest.mark.parametrize("mode", ["plain", "add", "gate", "slice"])
def test_linear(m, n, k, mode):
    from latentrt.kernels import linear

    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(2 * n if mode == "gate" else n, 2 * k if mode == "slice" else k, generator=g)
    if mode == "slice":
        w = w[:, :k]  # the adapter's W[:, :d] view: row stride 2k
    add = torch.randn(m, n, generator=g) if mode == "add" else None
    out = torch.full((m, n), float("nan"))
    linear.fused(x, w, add, gate=mode == "gate", out=out)
    _close(out, linear.reference(x, w, add, gate=mode == "gate"), 1e-5)


REDUCE_CONFIGS = [dict(kind="reduce", BLOCK_N=8, BLOCK_K=64, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (3, 70, 100), (16, 33, 48)])
@pytest.mark.parametrize("mode", ["add", "gate", "slice", "norm"])
def test_linear_register_reduction_variant(m, n, k, mode):
    """The launch config that sums products in registers (no tensor cores) computes what the dot one does,
    every flag included: add, gate, column slice, sumsq epilogue + prenorm prologue, frozen rows."""
    from latentrt.kernels import linear

    cfg = REDUCE_CONFIGS[0]
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(2 * n if mode == "gate" else n, 2 * k if mode == "slice" else k, generator=g)
    if mode == "slice":
        w = w[:, :k]
    active = torch.ones(m, dtype=torch.bool)
    active[-1] = m == 1
    if mode == "norm":
        ss = torch.zeros(m)
        w_a, w_norm = torch.randn(k, k, generator=g) * 0.1, 1 + 0.2 * torch.randn(k, generator=g)
        h = linear.fused(x, w_a, add=x, active=active, sumsq=ss, config=cfg)
        out = torch.full((m, n), float("nan"))
        linear.fused(h, w, active=active, prenorm=(ss, w_norm, 1e-6), out=out, config=cfg)
        want_h, want = linear.norm_prologue_reference(x, w_a, x, w_norm, w, 1e-6)
        _close(ss[active], want_h[active].pow(2).sum(-1), 1e-5)
    else:
        add = torch.randn(m, n, generator=g) if mode == "add" else None
        out = torch.full((m, n), float("nan"))
        linear.fused(x, w, add, active=active, gate=mode == "gate", out=out, config=cfg)
        want = linear.reference(x, w, add, gate=mode == "gate")
    _close(out[active], want[active], 1e-5)
    assert out[~active].isnan().all()


@pytest.mark.parametrize("m,d,f", [(1, 64, 96), (3, 48, 80)])
@pytest.mark.parametrize("kind", ["dot", "reduce"])
def test_linear_gpt2_epilogues_and_layernorm_prologue(m, d, f, kind):
    """GPT-2's sublayer chain on the GEMV: residual + bias with (sum, sum of squares) statistics in the
    epilogue, then ln_2 in the next product's prologue, bias, tanh GELU, and the second residual: equal
    to F.layer_norm / addmm / gelu_new."""
    import torch.nn.functional as F

    from latentrt.kernels import linear
    from latentrt.models.layers import gelu_new

    g = torch.Generator().manual_seed(m * d + f)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    att, x = r(m, d), r(m, d) * 3 + 1  # a residual stream with a non-zero mean
    w_proj, b_proj, w_fc, b_fc, w_out, b_out = r(d, d) * 0.2, r(d), r(f, d) * 0.2, r(f), r(d, f) * 0.2, r(d)
    ln_w, ln_b = 1 + 0.2 * r(d), 0.1 * r(d)
    active = torch.ones(m, dtype=torch.bool)
    active[-1] = m == 1
    cfg = dict(linear.FEW_ROWS_CONFIG if kind == "dot" else REDUCE_CONFIGS[0], BLOCK_N=16)
    st1, st2 = torch.zeros(m, 2), torch.zeros(m, 2)
    mid = linear.fused(att, w_proj, add=x, bias=b_proj, stats=st1, active=active, config=cfg)
    hid = linear.fused(mid, w_fc, bias=b_fc, gelu=True, ln_prenorm=(st1, ln_w, ln_b, 1e-5), active=active, config=cfg)
    out = linear.fused(hid, w_out, add=mid, bias=b_out, stats=st2, active=active, config=cfg)
    want_mid = x + torch.addmm(b_proj, att, w_proj.T)
    want_hid = gelu_new(torch.addmm(b_fc, F.layer_norm(want_mid, (d,), ln_w, ln_b, 1e-5), w_fc.T))
    want_out = want_mid + torch.addmm(b_out, want_hid, w_out.T)
    _close(mid[active], want_mid[active], 1e-5)
    _close(st1[active], torch.stack([want_mid.sum(-1), want_mid.pow(2).sum(-1)], -1)[active], 1e-5)
    _close(hid[active], want_hid[active], 1e-5)
    _close(out[active], want_out[active], 1e-5)
    _close(st2[active], torch.stack([want_out.sum(-1), want_out.pow(2).sum(-1)], -1)[active], 1e-5)
    assert (st1[~active] == 0).all()


@pytest.mark.parametrize("mode", ["add", "prenorm", "ln_prenorm", "gelu"])
def test_linear_bf16_prologues_and_epilogues_round_as_the_reference(mode):
    """In bf16 each prologue and epilogue rounds where the reference does: the product rounded before the
    residual is added (then rounded again), Huginn's rms_norm rounded before its weight and again after,
    F.layer_norm rounded once, GELU on the rounded product in fp32 rounded once; element for element but for
    an order of summation (K = 64)."""
    import torch.nn.functional as F

    from latentrt.kernels import linear
    from latentrt.kernels.reference import gelu_new, rms_norm

    g = torch.Generator().manual_seed(4)
    bf = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)  # noqa: E731
    x, w, eps = bf(6, 64, scale=3.0) + 1, bf(96, 64, scale=0.2), 0.1
    x32 = x.float()
    if mode == "add":
        add = bf(6, 96)
        got, want = linear.fused(x, w, add=add), F.linear(x, w) + add
    elif mode == "prenorm":
        nw = bf(64, scale=0.2) + 1
        got = linear.fused(x, w, prenorm=(x32.pow(2).sum(-1), nw, eps))
        want = F.linear(rms_norm(x, nw, eps), w)
    elif mode == "ln_prenorm":
        nw, nb = bf(64, scale=0.2) + 1, bf(64, scale=0.1)
        got = linear.fused(x, w, ln_prenorm=(torch.stack([x32.sum(-1), x32.pow(2).sum(-1)], -1), nw, nb, eps))
        want = F.linear(F.layer_norm(x32, (64,), nw.float(), nb.float(), eps).to(torch.bfloat16), w)
    else:
        b = bf(96)
        got, want = linear.fused(x, w, bias=b, gelu=True), gelu_new(torch.addmm(b, x, w.T).float()).to(torch.bfloat16)
        tail = want.abs() < 1e-3  # 1 + tanh(u) as 2 - 2 / (exp(2u) + 1): where it nears 0, fp32 units apart
        assert (got - want)[tail].abs().max() < 1e-4
        got, want = got[~tail], want[~tail]
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got == want).float().mean() >= 0.99, (got != want).float().mean()


def test_linear_skips_frozen_rows_and_fully_frozen_launches():
    from latentrt.kernels import linear

    x, w = torch.randn(4, 32), torch.randn(24, 32)
    active = torch.tensor([True, False, True, False])
    out = torch.full((4, 24), -7.0)
    linear.fused(x, w, active=active, out=out)
    _close(out[active], linear.reference(x[active], w), 1e-5)
    assert (out[~active] == -7.0).all()
    out2 = torch.full((4, 24), -7.0)
    linear.fused(x, w, active=torch.zeros(4, dtype=torch.bool), out=out2)
    assert (out2 == -7.0).all()


@pytest.mark.parametrize("m,d,n,eps", [(1, 64, 40, 1e-6), (5, 96, 70, 0.1), (3, 130, 33, 1e-6)])
def test_adapter_epilogue_sumsq_and_norm_prologue(m, d, n, eps):
    """The adapter product's epilogue sums squares; the next product normalises in its prologue: together
    they equal rms_norm between two plain products (core layer 0's norm_1, folded; an epsilon of 0.1 is seen
    beside mean squares about 1.6)."""
    from latentrt.kernels import linear

    g = torch.Generator().manual_seed(m * d)
    s, w_a, add = torch.randn(m, d, generator=g), torch.randn(d, d, generator=g) * 0.1, torch.randn(m, d, generator=g)
    w_norm, w_next = 1 + 0.2 * torch.randn(d, generator=g), torch.randn(n, d, generator=g)
    active = torch.ones(m, dtype=torch.bool)
    active[-1] = m == 1
    ss = torch.zeros(m)
    h = linear.fused(s, w_a, add=add, active=active, sumsq=ss)
    out = torch.full((m, n), float("nan"))
    linear.fused(h, w_next, active=active, prenorm=(ss, w_norm, eps), out=out)
    want_h, want_out = linear.norm_prologue_reference(s, w_a, add, w_norm, w_next, eps)
    _close(h[active], want_h[active], 1e-5)
    _close(ss[active], want_h[active].pow(2).sum(-1), 1e-5)
    _close(out[active], want_out[active], 1e-5)
    assert out[~active].isnan().all()  # frozen rows are not written


def test_decode_attention_frozen_rows_read_nothing():
    from latentrt.kernels import decode_attention as da

    q, ks, vs, written, valid, slot = da.make_inputs("tiny", "cpu", torch.float32, batch=3, context=20)
    active = torch.tensor([True, False, True])
    ks[:, 1] = float("nan")  # a frozen row's cache is never read
    out = da.fused(q, ks, vs, written, valid, slot, torch.tensor([20]), active)
    want = da.fused(q, ks, vs, written, valid, slot, torch.tensor([20]))
    _close(out[active], want[active], 1e-6)
    assert (out[1] == 0).all()


def test_linear_env_config_parses_every_candidate_and_names_a_bad_one(monkeypatch):
    """LATENTRT_GEMV selects any candidate the benchmarks time; a malformed value is a ValueError naming the
    variable (not an unpacking error, nor a launch with a block of 0)."""
    from latentrt.kernels import linear

    for cfg in linear.CANDIDATE_CONFIGS:
        monkeypatch.setenv(
            "LATENTRT_GEMV", ",".join(str(cfg[k]) for k in ("kind", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
        )
        assert linear._env_config() == cfg
    for bad in (
        "dot,64,256,8",
        "dot,64,256,8,3,1",
        "wide,64,256,8,3",
        "dot,48,256,8,3",
        "dot,64,0,8,3",
        "dot,x,256,8,3",
        "reduce,2,1024,4,0",
    ):
        monkeypatch.setenv("LATENTRT_GEMV", bad)
        with pytest.raises(ValueError, match="LATENTRT_GEMV must be"):
            linear._env_config()
    monkeypatch.setenv("LATENTRT_GEMV", "")
    assert linear._env_config() is None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8])
def test_linear_every_candidate_config_bf16(m):
    """Every launch config the benchmarks time (and LATENTRT_GEMV may select) is right at Huginn's width."""
    from latentrt.kernels import linear

    g = torch.Generator(device="cpu").manual_seed(m)
    x = torch.randn(m, 5280, generator=g).cuda().bfloat16()
    w = (torch.randn(2 * 1024, 5280, generator=g) * 0.02).cuda().bfloat16()
    want = linear.reference(x.float(), w.float(), gate=True)
    for cfg in linear.CANDIDATE_CONFIGS:
        out = torch.full((m, 1024), float("nan"), device="cuda", dtype=torch.bfloat16)
        linear.fused(x, w, gate=True, out=out, config=cfg)
        assert rel_err(out.float(), want) < 2e-2, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["huginn", "gpt2"])
def test_kernels_bf16_full_shapes(shape):
    from latentrt.kernels import linear, norms

    inp = norms.make_inputs(shape, "cuda", torch.bfloat16)
    out, normed = norms.fused(*inp[:4], inp[4])
    ref_out, ref_normed = norms.reference(*[t.float() if torch.is_tensor(t) else t for t in inp])
    _close(out, ref_out, 1e-2)
    _close(normed, ref_normed, 1e-2)
    x, w, _, _, _ = linear.make_inputs(shape, "cuda", torch.bfloat16)
    _close(linear.fused(x, w, gate=True), linear.reference(x.float(), w.float(), gate=True), 2e-2)


def test_interpreter_flag_documented():
    assert CPU is False or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 32), (4, 2, 16), (3, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_epilogue_writes_slot_for_active_rows(H, Hkv, D, bias, configs):
    """q rotated (poisoned first), k rotated and v copied into the slot of active rows only; a program per head
    (the GPU's) or every head of a row in one (the interpreter's)."""
    from latentrt.kernels import rope_kv
    from latentrt.kernels._triton import interpreter_block

    assert interpreter_block(H + Hkv, gpu=1) == (1 if configs == "gpu" or not CPU else {4: 4, 6: 8}[H + Hkv])
    from latentrt.models.layers import rope_tables

    B, T, pos = 3, 10, 6
    g = torch.Generator().manual_seed(H * D)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g)
    qk_bias = torch.randn(2, 1, H, D, generator=g) if bias else None
    cos, sin = rope_tables(D, 16, 50000.0)
    rp = torch.tensor([4, 6, 0])
    active = torch.tensor([True, False, True])
    kc, vc = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    q_poisoned = torch.full((B, H, D), float("nan"))
    q = rope_kv.fused(qkv, qk_bias, cos[rp], sin[rp], kc, vc, torch.tensor([pos]), active, H, Hkv, out=q_poisoned)
    want_q = rope_kv.reference(qkv[:, None], qk_bias, cos[rp][:, None], sin[rp][:, None], kc2, vc2, pos, active, H, Hkv)
    _close(q, want_q[:, :, 0], 1e-6)
    _close(kc, kc2, 1e-6)
    _close(vc, vc2, 1e-7)
    assert torch.equal(kc[1], kc2[1])  # the inactive row kept its entry


@pytest.mark.parametrize(
    "slots,use_written,drops", [(1, False, False), (4, True, False), (4, False, False), (4, True, True)]
)
@pytest.mark.parametrize("H,Hkv,T", [(2, 2, 70), (4, 1, 9)])
def test_decode_attention_slot_lookup(slots, use_written, drops, H, Hkv, T, configs):
    """(``drops``: the skip mode, positions that ran no more than ``slot`` iterations are not attended)"""
    from latentrt.kernels import decode_attention as da

    B, D = 3, 16
    g = torch.Generator().manual_seed(T + slots)
    q = torch.randn(B, H, D, generator=g)
    ks, vs = torch.randn(slots, B, Hkv, T, D, generator=g), torch.randn(slots, B, Hkv, T, D, generator=g)
    written = torch.randint(1, slots + 3, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    valid[2, T // 2] = False
    slot = slots - 1
    length = T - 2  # attend over the first T-2 positions only
    valid[0, length - 1] = False  # the query's own position, attended whatever its flag
    out = da.fused(
        q,
        ks,
        vs,
        written if use_written else None,
        valid,
        slot,
        torch.tensor([length]),
        drops_missing=drops,
        out=_poisoned(q),
    )
    w = written if use_written else torch.full_like(written, 10**6)
    ref_valid = valid[:, :length].clone()
    ref_valid[:, length - 1] = True  # the query's own position
    want = da.reference(q, ks[:, :, :, :length], vs[:, :, :, :length], w[:, :length], ref_valid, slot, drops)
    _close(out, want, 1e-5)
    if drops:  # some positions were dropped, so the lookups differ
        kept = da.reference(q, ks[:, :, :, :length], vs[:, :, :, :length], w[:, :length], ref_valid, slot)
        assert (written[:, : length - 1] <= slot).any() and not torch.allclose(want, kept)


@pytest.mark.usefixtures("gpu_blocks")
@pytest.mark.parametrize("use_written", [False, True])
def test_decode_attention_whole_key_blocks_of_padding(use_written):
    """A row left-padded over whole key blocks (a short prompt batched with long ones: found on an H200,
    a NaN latent at the first decoded token): a block with no valid key must leave the running softmax as
    it is, not rescale it by exp(-inf - -inf). Poisoned padding: its K/V are never read either."""
    from latentrt.kernels import decode_attention as da

    B, H, Hkv, T, D, slots = 3, 2, 2, 200, 16, 3
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, D, generator=g)
    ks, vs = torch.randn(slots, B, Hkv, T, D, generator=g), torch.randn(slots, B, Hkv, T, D, generator=g)
    written = torch.randint(1, slots + 2, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :64] = False  # exactly the first block
    valid[2, :150] = False  # two whole blocks and part of a third
    want = da.reference(q, ks, vs, written if use_written else torch.full_like(written, 10**6), valid, slots - 1)
    pad = (~valid)[None, :, None, :, None].expand_as(ks)
    ks[pad], vs[pad] = float("nan"), float("nan")
    out = da.fused(q, ks, vs, written if use_written else None, valid, slots - 1, torch.tensor([T]))
    _close(out, want, 1e-5)


@pytest.mark.parametrize("H,Hkv,T", [(2, 2, 70), (4, 1, 9)])
def test_decode_attention_reads_last_rows(H, Hkv, T, configs):
    """The always-last mode: flagged rows read each position's last entry (slot n_p - 1, deeper than the
    query's iteration too), the others min(slot, n_p - 1); the output (poisoned first) equals the reference
    and differs from the plain lookup on the flagged rows."""
    from latentrt.kernels import decode_attention as da

    B, D, slots = 3, 16, 6
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, D, generator=g)
    ks, vs = torch.randn(slots, B, Hkv, T, D, generator=g), torch.randn(slots, B, Hkv, T, D, generator=g)
    written = torch.randint(1, slots + 1, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    slot, length = 2, T - 2
    last = torch.tensor([True, False, True])
    out = da.fused(q, ks, vs, written, valid, slot, torch.tensor([length]), reads_last=last, out=_poisoned(q))
    ref_valid = valid[:, :length].clone()
    ref_valid[:, length - 1] = True
    args = (q, ks[:, :, :, :length], vs[:, :, :, :length], written[:, :length], ref_valid, slot)
    want = da.reference(*args, reads_last=last)
    _close(out, want, 1e-5)
    plain = da.reference(*args)
    assert torch.allclose(want[1], plain[1]) and not torch.allclose(want[0], plain[0])


@pytest.mark.parametrize("cosine", [False, True])
def test_latent_diff_and_cosine(cosine):
    from latentrt.exits import ExitTracker, make_criterion
    from latentrt.kernels import exits

    g = torch.Generator().manual_seed(5)
    prev, new = torch.randn(3, 4, 40, generator=g), torch.randn(3, 4, 40, generator=g)
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    got = exits.latent_diff_fused(prev, new, valid, cosine=cosine)
    _close(got, (exits.cosine_reference if cosine else exits.latent_diff_reference)(prev, new, valid), 1e-6)
    thr = float(got[1])  # the reference criterion agrees on which side of a threshold each row is
    tracker = ExitTracker(make_criterion("cosine" if cosine else "latent-diff", thr + 1e-6), 3, 10, "cpu")
    assert tracker.update(prev, new, None, valid).tolist() == (got < thr + 1e-6).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cosine", [False, True])
def test_latent_diff_and_cosine_round_as_the_reference(cosine, dtype):
    """On low-precision states the fused criterion rounds where the reference (the published formula in the
    states' dtype) rounds, so its value is the reference's to within summation order; computed in fp32 it
    would not be. A zero state gives NaN (no exit) in both; a padded position's NaN counts for nothing."""
    from latentrt.kernels import exits

    g = torch.Generator().manual_seed(7)
    prev = torch.randn(48, 3, 300, generator=g)
    new = (prev + 0.05 * torch.randn(48, 3, 300, generator=g)).to(dtype)
    prev = prev.to(dtype)
    prev[0], new[1, 0] = 0.0, 0.0  # row 0: a zero previous state; row 1: a zero state at a padded position
    valid = torch.rand(48, 3, generator=g) > 0.3
    valid[:2] = torch.tensor([[True, True, True], [False, True, True]])
    reference = exits.cosine_reference if cosine else exits.latent_diff_reference
    want = reference(prev, new, valid)
    out = exits.latent_diff_fused(prev, new, valid, cosine=cosine)
    assert out.dtype == want.dtype == dtype
    got, want = out.float(), want.float()
    assert torch.isnan(got[0]) == torch.isnan(want[0]) == cosine  # |new - 0| / |new| = 1: no NaN
    assert torch.isfinite(got[1:]).all() and torch.isfinite(want[1:]).all()
    ulp = torch.finfo(dtype).eps * want[1:].abs()
    assert ((got[1:] - want[1:]).abs() <= ulp).all()  # at most one unit in the last place apart
    assert (got[1:] == want[1:]).float().mean() >= 0.9
    in_fp32 = reference(prev.float(), new.float(), valid)[1:]
    assert (in_fp32 != want[1:]).float().mean() >= 0.5  # the rounding is what is tested


@pytest.mark.parametrize("cosine", [False, True])
def test_latent_diff_and_cosine_bitwise_on_short_states(cosine):
    """States of 4 elements, new and previous far apart: each product and difference the reference rounds to
    bf16 moves its value by more than the summation order does, so the fused criterion must round them all to
    equal the reference bit for bit (about 15% of these rows move when new - prev is left in fp32)."""
    from latentrt.kernels import exits

    g = torch.Generator().manual_seed(1)
    prev = torch.randn(200, 2, 4, generator=g)
    new = (0.5 * prev + torch.randn(200, 2, 4, generator=g)).to(torch.bfloat16)
    prev = prev.to(torch.bfloat16)
    valid = torch.rand(200, 2, generator=g) > 0.2
    valid[:, 1] = True
    reference = exits.cosine_reference if cosine else exits.latent_diff_reference
    got = exits.latent_diff_fused(prev, new, valid, cosine=cosine)
    assert torch.equal(got, reference(prev, new, valid))


def test_kl_fused():
    from latentrt.kernels import exits

    logits, prev = exits.make_inputs("tiny", "cpu", torch.float32)
    kl, logp = exits.kl_fused(logits, prev)
    want_kl, want_logp = exits.kl_reference(logits, prev)
    _close(logp, want_logp, 1e-6)
    _close(kl, want_kl, 1e-5)


def test_kl_fused_over_several_vocabulary_blocks():
    """A vocabulary of more than one block (4096: Huginn's 65,536 is 16), its largest logit in a later block:
    the running sum of the first pass is rescaled when the maximum grows."""
    from latentrt.kernels import exits

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 9000, generator=g)
    logits[:, 8500] += 12.0
    prev = torch.log_softmax(torch.randn(3, 9000, generator=g), -1)
    kl, logp = exits.kl_fused(logits, prev)
    want_kl, want_logp = exits.kl_reference(logits, prev)
    _close(logp, want_logp, 1e-6)
    _close(kl, want_kl, 1e-5)


@pytest.mark.parametrize("d", [None, 96])
def test_coconut_feedback(d):
    """(d 96: a row narrower than its block, as GPT-2's 768 in a block of 1024: the masked columns count for
    nothing in the statistics.)"""
    from latentrt.kernels import feedback

    h, fw, fb, _, lw, lb, eps = feedback.make_inputs("tiny", "cpu", torch.float32, rows=5)
    if d is not None:
        g = torch.Generator().manual_seed(d)
        h = torch.randn(5, d, generator=g) * 2 + 1
        fw, fb, lw, lb = (1 + 0.1 * torch.randn(d, generator=g) for _ in range(4))
    wpe = torch.randn(30, h.shape[1])
    pos = torch.tensor([3, 7, 0, 29, 12])
    x, y = feedback.coconut_fused(h, fw, fb, wpe, pos, lw, lb, eps)
    wx, wy = feedback.coconut_reference(h, fw, fb, wpe[pos], lw, lb, eps)
    _close(x, wx, 1e-6)
    _close(y, wy, 1e-6)


def _as_float(inputs):
    return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]


def _clone(inputs):
    return [t.clone() if torch.is_tensor(t) else t for t in inputs]


def _flat(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]


@pytest.mark.parametrize("family", kernels.FAMILIES)
def test_every_family_fused_equals_reference_tiny(family):
    fam = kernels.family(family)
    inputs = fam.make_inputs("tiny", DEV, torch.float32, seed=3)
    got = _flat(kernels.fused_of(fam)(*_clone(inputs)))
    want = _flat(fam.reference(*_clone(inputs)))
    for g, w in zip(got, want):
        _close(g, w, 1e-5)


@pytest.mark.parametrize("family", kernels.FAMILIES)
def test_every_family_bf16_tiny_rounds_as_the_bf16_reference(family):
    """bf16 kernels against the bf16 reference (and anchored on fp32). Under the interpreter, which rounds fp32
    to bf16 to nearest even as the GPU does (latentrt/kernels/_triton.py; it truncated), the families whose
    reductions are short round as the reference does, element for element, almost everywhere (the rest: an
    order of summation apart), so the CPU tests check the fast path's dtype too."""
    fam = kernels.family(family)
    inputs = fam.make_inputs("tiny", DEV, torch.bfloat16, seed=3)
    got = _flat(kernels.fused_of(fam)(*_clone(inputs)))
    want = _flat(fam.reference(*_clone(inputs)))
    anchor = _flat(fam.reference(*_as_float(_clone(inputs))))
    for g, w, a in zip(got, want, anchor):
        assert g.dtype == w.dtype
        _close(g, w, 1e-2)
        _close(g, a, 2e-2)
        if CPU and family in ("norms", "linear", "feedback", "rope_kv"):
            assert (g == w).float().mean() >= 0.99, family


@pytest.mark.gpu
@pytest.mark.parametrize("family", kernels.FAMILIES)
@pytest.mark.parametrize("shape", ["huginn", "gpt2"])
def test_every_family_bf16_full_shapes(family, shape):
    """bf16 kernels against the fp32 reference on the same (bf16-rounded) inputs; outputs poisoned first."""
    fam = kernels.family(family)
    inputs = fam.make_inputs(shape, "cuda", torch.bfloat16, seed=4)
    got = _flat(kernels.fused_of(fam)(*_clone(inputs)))
    want = _flat(fam.reference(*_as_float(_clone(inputs))))
    for g, w in zip(got, want):
        _close(g, w, 2e-2)


def _pool_family_inputs(name: str, looped: bool, heads, dtype, seed: int, **shape):
    """A pool family's module and tiny inputs; a plain layer's without the four lookup inputs."""
    fam = kernels.family(name)
    inputs = list(fam.make_inputs("tiny", DEV, dtype, seed=seed, heads=heads, **shape))
    if not looped:
        inputs[-4:] = [None] * 4
    return fam, inputs


def _mark_read(read, table, mode, t: int, written, valid, entries, first: int) -> None:
    """Mark in ``read`` [storage rows, entries] what one launch row reads of its pool row's ``entries``, by
    the rules of latentrt/kv_modes.py written out: mode (K, a, lookup) writes slot t below a, else
    a + (t - a) mod (K - a); entry p from slot min(that, n_p - 1); with lookup 1 (skip), not an entry
    before ``first`` that ran no more than t iterations; with lookup 2 (always-last), when such an entry
    exists, every entry from slot n_p - 1."""
    k, a, lookup = (int(x) for x in mode)
    slot = t if t < a else a + (t - a) % (k - a)
    missed = any(valid[p] and int(written[p]) <= t for p in range(first))
    cap = k - 1 if lookup == 2 and missed else slot
    for p in entries:
        if valid[p] and not (lookup == 1 and p < first and int(written[p]) <= t):
            read[table[min(max(int(written[p]) - 1, 0), cap)], p] = True


def test_missed_iteration_counts_valid_entries_before_the_first_only():
    """always-last's test (kernels/reference.py, which the cache and both pool references ask): a row missed
    iteration t when a valid entry before its ``first`` ran no more than t iterations; padding (invalid, never
    run) does not count, nor do the row's own entries from ``first`` on; ``iterations`` / ``first`` per row or
    shared."""
    from latentrt.kernels.reference import missed_iteration

    written = torch.tensor([[0, 0, 5, 6, 1], [0, 4, 5, 6, 1], [3, 6, 6, 6, 1], [6, 6, 6, 2, 2]])
    valid = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = missed_iteration(written, valid, torch.tensor([4, 4, 3, 4]), torch.tensor([4, 4, 4, 3]))
    assert got.tolist() == [False, True, True, False]
    assert missed_iteration(written, valid, 4, 4).tolist() == [False, True, True, True]


def test_pool_modes_encode_the_kv_modes_write_rule():
    """A pool row's (K, kept, lookup) gives ``KVMode.slot`` for every iteration of every mode (the pool's
    kernels and the cache write the same slots), and the test pools exercise what the rules distinguish:
    rows past their anchor, skip rows with entries dropped, always-last rows reading deeper entries, in
    both families' inputs."""
    from latentrt.kernels.pool_attention import TEST_MODES, mode_slot
    from latentrt.kv_modes import parse_kv_mode

    specs = [("full", 12), ("shared", 12), ("ring-3", 12), ("anchor-4", 12), ("anchor-8", 5), ("skip", 9)]
    for spec, r_max in specs + [("always-last", 7)]:
        mode = parse_kv_mode(spec, r_max)
        t = torch.arange(r_max)
        row = torch.tensor([[mode.slots, mode.kept, mode.pool_lookup]]).expand(r_max, 3)
        assert mode_slot(row, t).tolist() == [mode.slot(i) for i in range(r_max)], spec
    assert [parse_kv_mode(s, 8).pool_lookup for s in ("full", "ring-3", "skip", "always-last")] == [0, 0, 1, 2]
    assert {tuple(m) for m in TEST_MODES} >= {(1, 0, 0), (5, 4, 0), (32, 0, 1), (32, 0, 2)}
    for family in (_pool_inputs, _prefill_inputs):  # the seeds their tests use, together
        seen = set()
        for seed in (0, 1):
            inputs = family(True, seed=seed)[1]
            if (
                len(inputs) == 13
            ):  # decode: rows, entry (the pass's first entry), valid, ..., modes, iterations, written
                rows, first, valid, modes, iterations, written = (inputs[i] for i in (5, 6, 7, 10, 11, 12))
            else:  # prefill: rows, q_idx, valid, ..., modes, iterations, written
                rows, q_idx, valid, modes, iterations, written = (inputs[i] for i in (3, 4, 6, 8, 9, 10))
                first = q_idx[:, 0]
            m = modes[rows]
            p = torch.arange(written.shape[1])[None, :]
            earlier = (p < first[:, None]) & valid[rows]
            stale = (written[rows] <= iterations[:, None]) & earlier
            deeper = (written[rows] - 1 > iterations[:, None]) & earlier
            seen |= {"past anchor"} if ((m[:, 1] > 0) & (iterations > m[:, 1])).any() else set()
            seen |= {"skip drops"} if (stale & (m[:, 2] == 1)[:, None]).any() else set()
            seen |= {"last reads deeper"} if (stale.any(1) & deeper.any(1) & (m[:, 2] == 2)).any() else set()
        assert seen == {"past anchor", "skip drops", "last reads deeper"}, family


def _pool_inputs(looped: bool, heads=(2, 2), dtype=torch.float32, seed: int = 0):
    return _pool_family_inputs("pool_attention", looped, heads, dtype, seed, context=90)


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("looped", [True, False])
def test_pool_attention_per_row_lookup_and_write(heads, looped, configs):
    """Each row over its own pool row, slot rows by its own iteration and KV mode (shared, ring-3, full),
    GQA / MQA, a program per row and head (the GPU's) or one for every row and head (the interpreter's: lanes
    of 8 rows for the 6, 8 heads for 6, the rest masked): outputs (poisoned first) equal the reference, and the
    K/V written are exactly the reference's: at the active rows' entries only, in the slot their iteration
    writes."""
    pa, inputs = _pool_inputs(looped, heads)
    interpreted = configs == "interpreter" and os.environ.get("TRITON_INTERPRET") == "1"
    assert pa.launch_lanes(6, heads[0]) == ((8, next_pow2(heads[0])) if interpreted else (1, 1))
    want, want_k, want_v = pa.reference(*_clone(inputs))
    got_inputs = _clone(inputs)
    out = torch.full_like(inputs[0], float("nan"))
    got, got_k, got_v = pa.fused(*got_inputs, out=out)
    _close(got, want, 1e-5)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    changed = (got_k != inputs[3]).any(-1).any(1)  # [storage rows, entries] written
    active = inputs[8]
    assert int(changed.sum()) == int(active.sum()), "one entry per active row, nothing else"


@pytest.mark.parametrize("looped", [True, False])
def test_pool_attention_whole_key_blocks_invalid(looped, configs):
    """A row whose first key blocks are all invalid entries: its output stays finite and equals the
    reference. (This kernel seeds its softmax with the row's own key, so no block starts from -inf; the
    test keeps it so should that change: decode_attention's step once turned such a block into NaN.)"""
    pa, inputs = _pool_inputs(looped, (4, 2))
    rows, entry, valid = inputs[5], inputs[6], inputs[7]
    assert int(entry[0]) >= 80
    valid[rows[0], :75] = False  # launch row 0's pool row: one whole block of 64 and part of the next
    want = pa.reference(*_clone(inputs))[0]
    out = torch.full_like(inputs[0], float("nan"))
    _close(pa.fused(*_clone(inputs), out=out)[0], want, 1e-5)


def test_pool_attention_reads_nothing_outside_its_rows_entries(configs):
    """Storage a row must not read (other requests' slot rows, its later entries, its invalid entries,
    slots its lookup does not pick; for an inactive row, everything) is NaN: the outputs stay finite and
    equal, zeros for the inactive row. (That an inactive row loads nothing, rather than masking what it
    loaded, is by construction: its key loop has no iteration. Outputs cannot show it.)"""
    pa, inputs = _pool_inputs(True, (4, 2), seed=1)
    want = pa.reference(*_clone(inputs))[0]
    _, _, _, k_buf, v_buf, rows, entry, valid, active, table, modes, iterations, written = inputs
    assert not active.all() and (want[~active] == 0).all()
    read = torch.zeros(k_buf.shape[0], k_buf.shape[2], dtype=torch.bool)
    for r in active.nonzero()[:, 0].tolist():
        row, n = int(rows[r]), int(entry[r])
        _mark_read(read, table[row], modes[row], int(iterations[r]), written[row], valid[row], range(n), n)
    poisoned = _clone(inputs)
    poisoned[3][~read[:, None, :, None].expand_as(k_buf)] = float("nan")
    poisoned[4][~read[:, None, :, None].expand_as(v_buf)] = float("nan")
    _close(pa.fused(*poisoned)[0], want, 1e-5)


def _prefill_inputs(looped: bool, heads=(2, 2), dtype=torch.float32, seed: int = 0):
    return _pool_family_inputs("pool_prefill", looped, heads, dtype, seed, n=20, context=80)


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("looped", [True, False])
@pytest.mark.parametrize("blocks", ["gpu", "interpreter"])
def test_pool_prefill_ragged_prompts_per_row_lookup(heads, looped, blocks):
    """Ragged prompt chunks (20 queries: two blocks of the GPU's 16, or the interpreter's one of 32; keys in
    blocks of 32 or 64), padding at the trash entry, each row over its own pool row with its own KV mode and
    iteration, GQA / MQA: outputs (poisoned first) equal the reference."""
    from latentrt.kernels.pool_prefill import GPU_BLOCKS, launch_blocks

    pp, inputs = _prefill_inputs(looped, heads)
    assert launch_blocks(20) == ((32, 64) if os.environ.get("TRITON_INTERPRET") == "1" else GPU_BLOCKS)
    want = pp.reference(*_clone(inputs))
    out = torch.full_like(inputs[0], float("nan"))
    got = pp.fused(*_clone(inputs), out=out, blocks=GPU_BLOCKS if blocks == "gpu" else None)
    _close(got, want, 1e-5)


@pytest.mark.usefixtures("gpu_blocks")
def test_pool_prefill_reads_nothing_outside_its_rows_entries():
    """Storage a query must not read (other requests' slot rows, entries after the chunk, invalid entries,
    slots the lookup does not pick) is NaN: the real queries' outputs stay finite and equal."""
    pp, inputs = _prefill_inputs(True, (4, 2), seed=1)
    want = pp.reference(*_clone(inputs))
    q, k_buf, v_buf, rows, q_idx, end, valid, table, modes, iterations, written = inputs
    read = torch.zeros(k_buf.shape[0], k_buf.shape[2], dtype=torch.bool)
    real = q_idx < valid.shape[1] - 1  # not the trash entry
    for r in range(len(rows)):
        row, last = int(rows[r]), int(q_idx[r][real[r]].max())
        span = range(last + 1)
        _mark_read(read, table[row], modes[row], int(iterations[r]), written[row], valid[row], span, int(q_idx[r, 0]))
    poisoned = _clone(inputs)
    poisoned[1][~read[:, None, :, None].expand_as(k_buf)] = float("nan")
    poisoned[2][~read[:, None, :, None].expand_as(v_buf)] = float("nan")
    got = pp.fused(*poisoned)
    mask = real[:, None, :, None].expand_as(want)
    _close(got[mask], want[mask], 1e-5)


@pytest.mark.parametrize("blocks", ["gpu", "interpreter"])
def test_pool_prefill_whole_key_blocks_invalid(blocks):
    """A row whose entries before its chunk are invalid over whole key blocks (32 on a GPU, 64 with the
    interpreter's blocks): a block where a query has no key yet leaves its running softmax as it is (no
    exp(-inf - -inf)), so the output stays finite and equals the reference."""
    from latentrt.kernels.pool_prefill import GPU_BLOCKS

    pp, inputs = _pool_family_inputs("pool_prefill", True, (4, 2), torch.float32, 0, n=20, context=160)
    rows, q_idx, valid = inputs[3], inputs[4], inputs[6]
    r = int(torch.argmax(q_idx[:, 0]))
    assert int(q_idx[r, 0]) >= 70
    valid[rows[r], :70] = False
    want = pp.reference(*_clone(inputs))
    out = torch.full_like(inputs[0], float("nan"))
    _close(pp.fused(*_clone(inputs), out=out, blocks=GPU_BLOCKS if blocks == "gpu" else None), want, 1e-5)


@pytest.mark.usefixtures("gpu_blocks")
def test_pool_prefill_bf16_anchored_on_fp32():
    pp, inputs = _prefill_inputs(True, (4, 2), torch.bfloat16, seed=2)
    got = pp.fused(*_clone(inputs))
    want = pp.reference(*_as_float(_clone(inputs)))
    _close(got, want, 2e-2)


@pytest.mark.usefixtures("gpu_blocks")
@pytest.mark.parametrize("family", ["pool_attention", "pool_prefill"])
def test_pool_always_last_rows_read_last_entries_only_when_one_missed(family):
    """Every row ``always-last`` (full's slots), some at iteration 0 (every earlier entry ran it: each
    reads slot t, as ``full``) and the rest at 12 (some entry missed it: each reads its last slot): kernel
    (poisoned output) = reference, both kinds present, and the two lookups do differ from ``full``'s."""
    from latentrt.kernels.pool_attention import LAST, SLOT

    fam = kernels.family(family)
    shape = {"context": 90} if family == "pool_attention" else {"n": 20, "context": 80}
    inputs = list(fam.make_inputs("tiny", DEV, torch.float32, seed=3, kv_modes=((32, 0, LAST),), heads=(4, 2), **shape))
    it = 11 if family == "pool_attention" else 9  # the iterations' index
    inputs[it][::2] = 0  # half the launch rows at iteration 0: no earlier entry missed it
    inputs[it][1::2] = 12  # the others where some entry missed it and some ran deeper (written: 1-39)
    want = fam.reference(*_clone(inputs))
    out = torch.full_like(inputs[0], float("nan"))
    got = fam.fused(*_clone(inputs), out=out)
    got, want = (got[0], want[0]) if family == "pool_attention" else (got, want)
    _close(got, want, 1e-5)
    as_full = _clone(inputs)
    as_full[it - 1][:, 2] = SLOT
    full = fam.reference(*as_full)
    full = full[0] if family == "pool_attention" else full
    same = (want == full).flatten(1).all(1)
    later = torch.arange(len(same)) % 2 == 1
    if family == "pool_attention":  # an inactive row reads nothing (zeros either way)
        same, later = same[inputs[8]], later[inputs[8]]
    assert later.any() and (~later).any()
    assert same[~later].all() and not same[later].any(), "iteration 0 reads as full; a missed iteration differs"


@pytest.mark.usefixtures("gpu_blocks")
@pytest.mark.parametrize("family", ["pool_attention", "pool_prefill"])
def test_pool_always_last_an_entry_that_ran_t_iterations_missed_iteration_t(family):
    """Iteration t (counted from 0) is an entry's (t + 1)-th: one that ran exactly t iterations missed it. Every
    row at t = 12, every entry ran 13 or more, except in every other row one earlier entry that ran 12: those
    rows (only those) read last slots, as the reference does."""
    from latentrt.kernels.pool_attention import LAST, SLOT

    fam = kernels.family(family)
    on_pool = family == "pool_attention"
    shape = {"context": 90} if on_pool else {"n": 20, "context": 80}
    inputs = list(fam.make_inputs("tiny", DEV, torch.float32, seed=4, kv_modes=((32, 0, LAST),), heads=(4, 2), **shape))
    rows, valid, iterations, written = (inputs[i] for i in ((5, 7, 11, 12) if on_pool else (3, 6, 9, 10)))
    first = inputs[6] if on_pool else inputs[4][:, 0]
    iterations[:] = 12
    written.clamp_(min=13)
    missed = (torch.arange(len(rows)) % 2 == 1) & (first > 3)
    if on_pool:
        missed &= inputs[8]  # (an inactive row reads nothing)
    for r in missed.nonzero()[:, 0].tolist():
        written[rows[r], 3], valid[rows[r], 3] = 12, True
    want = fam.reference(*_clone(inputs))
    got = fam.fused(*_clone(inputs), out=torch.full_like(inputs[0], float("nan")))
    got, want = (got[0], want[0]) if on_pool else (got, want)
    _close(got, want, 1e-5)
    as_full = _clone(inputs)
    as_full[10 if on_pool else 8][:, 2] = SLOT
    full = fam.reference(*as_full)
    same = (want == (full[0] if on_pool else full)).flatten(1).all(1)
    assert missed.any() and (same == ~missed).all()


def test_pool_attention_bf16_anchored_on_fp32():
    pa, inputs = _pool_inputs(True, (4, 2), torch.bfloat16, seed=2)
    got = pa.fused(*_clone(inputs))[0]
    want = pa.reference(*_as_float(_clone(inputs)))[0]
    _close(got, want, 2e-2)


if kernels.triton_available():  # module level: the interpreter looks a kernel's helpers up in its globals
    import triton
    import triton.language as tl

    @triton.jit
    def _twice_plus(x, y):
        return x * 2 + tl.abs(y)

    @triton.jit
    def _broadcasting_kernel(x_ptr, y_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        x = tl.load(x_ptr + r[:, None] * C + c[None, :])  # [R, C]
        y = tl.load(y_ptr + c)  # [C]
        same = x * x + x  # blocks of one shape
        mixed = same - y[None, :] + (r[:, None] == 1) * 2.0  # [R, C] with [1, C] and [R, 1]
        tl.store(out_ptr + r[:, None] * C + c[None, :], mixed + 0.5)  # and a scalar

    @triton.jit
    def _helper_calling_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        acc = x
        for _ in range(3):
            acc = _twice_plus(acc, x)
        tl.store(out_ptr + offs, acc, mask=m)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's type building")
def test_the_interpreter_shares_block_types_and_keeps_values():
    """Under the interpreter latentrt builds a block type once per (element type, shape), lets blocks of one
    shape into a binary op without broadcasting them and looks each type's numpy dtype up once
    (latentrt/kernels/_triton.py, on the pinned Triton): the types equal fresh ones, pointer blocks are still
    built, every type keeps its numpy dtype, and a kernel mixing same-shape, broadcast and scalar operands
    computes what torch does."""
    import numpy as np
    import triton as triton_module
    from triton.runtime import interpreter

    fresh = tl.core.block_type(tl.float32, [4, 8])
    shared = fresh.with_element_ty(tl.float32)
    if triton_module.__version__ == "3.6.0":
        assert shared is fresh.with_element_ty(tl.float32)  # made once
    assert shared == fresh and shared.shape == (4, 8) and shared.with_element_ty(tl.int32) != fresh
    pointers = fresh.with_element_ty(tl.pointer_type(tl.float32))
    assert pointers.element_ty == tl.pointer_type(tl.float32) and pointers.shape == (4, 8)
    stored = {tl.int1: bool, tl.int32: np.int32, tl.int64: np.int64, tl.float32: np.float32, tl.bfloat16: np.uint16}
    for element, want in stored.items():  # twice: the second from the lookup's cache
        for t in (element, tl.core.block_type(element, [2, 4]), element, fresh.with_element_ty(element)):
            assert interpreter._get_np_dtype(t) == np.dtype(want), t
    for t in (tl.pointer_type(tl.float32), pointers, pointers):
        assert interpreter._get_np_dtype(t) == np.dtype(np.uint64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    out = torch.full_like(x, float("nan"))
    _broadcasting_kernel[(1,)](x, y, out, R=4, C=8)
    want = x * x + x - y[None, :] + (torch.arange(4)[:, None] == 1) * 2.0 + 0.5
    assert torch.equal(out, want)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's language patching")
def test_the_interpreter_patches_the_language_once_per_launch_not_per_helper_call(monkeypatch):
    """Under the interpreter a kernel's ``@triton.jit`` helpers run without patching triton.language again
    (latentrt/kernels/_triton.py: it cost ~3 ms a call, in every program), their results unchanged, and the
    language is restored after each launch, also when the kernel raises."""
    from triton.runtime import interpreter

    real = {name: getattr(tl, name) for name in ("load", "abs", "arange", "program_id")}
    x = torch.randn(37)
    want = x.clone()
    for _ in range(3):
        want = want * 2 + x.abs()
    out = torch.full_like(x, float("nan"))
    _helper_calling_kernel[(5,)](x, out, 37, BLOCK=8)  # warm: the first launch may patch for real
    assert torch.equal(out, want)
    patches = []
    full_patch = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: patches.append(a[0]) or full_patch(*a))
    out.fill_(float("nan"))
    _helper_calling_kernel[(5,)](x, out, 37, BLOCK=8)  # 5 programs x 3 helper calls
    assert torch.equal(out, want)
    assert patches == []  # neither the helpers nor the launch went through the language's members again
    assert {name: getattr(tl, name) for name in real} == real  # restored after the launch
    with pytest.raises(Exception, match="power of 2"):
        _helper_calling_kernel[(5,)](x, out, 37, BLOCK=7)  # (arange's length: raises inside the launch)
    assert {name: getattr(tl, name) for name in real} == real
    out.fill_(float("nan"))
    _helper_calling_kernel[(5,)](x, out, 37, BLOCK=8)  # a launch after one that raised runs patched again
    assert torch.equal(out, want)
