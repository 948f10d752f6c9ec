"""Skinny matrix products for decode (few rows, large weights): out[M, N] = x[M, K] @ W[N, K]^T (+ add).

Decode is bound by reading W, so the kernel's job is to stream W once at full bandwidth. Two extras:
- ``active`` [M] bool: when no row is active (every sequence exited) the kernel returns before reading W,
  so frozen work costs a launch, not a weight pass; inactive rows are not written.
- ``gate=True``: W is Huginn's fc [2I, K]; the program computes the gate and up columns together and
  writes silu(gate) * up [M, I] (the gated MLP without a round trip of the 2I-wide activation).
- RMSNorm across two products without materialising the normed row (the recurrent adapter -> core layer
  0's norm_1): ``sumsq=`` [M] fp32 (zeroed) makes the epilogue add each output row's sum of squares (of
  the rounded outputs) atomically; ``prenorm=(sumsq, weight, eps)`` makes the next product's prologue
  load x as rms_norm(x, weight, eps) with Huginn's rounding (see ``norm_prologue_reference``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAVE_TRITON, INTERPRETED, fitted_block, interpreter_configs, next_pow2, tl, triton
from .reference import rms_norm


def reference(
    x: Tensor, w: Tensor, add: Tensor | None = None, active: Tensor | None = None, gate: bool = False
) -> Tensor:
    """F.linear (+ add); with gate, silu of the first half times the second half."""
    y = F.linear(x, w)
    if gate:
        g, u = y.chunk(2, -1)
        return F.silu(g) * u
    return y + add if add is not None else y


def norm_prologue_reference(h: Tensor, w_adapter: Tensor, add: Tensor, w_norm: Tensor, w_next: Tensor, eps: float):
    """What the sumsq/prenorm pair computes: h = x W_a^T + add, then rms_norm(h, w_norm) @ W_next^T."""
    out = reference(h, w_adapter, add)
    return out, F.linear(rms_norm(out, w_norm, eps), w_next)


if HAVE_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _dot_rows(x, w):
        """x [BM, BK] @ w[BN, BK]^T with fp32 accumulation: bf16/fp16 operands go to the tensor cores
        (exact products, as cuBLAS does); fp32 operands use the IEEE fp32 path (no TF32 rounding). The
        interpreter's 16-bit dot is wrong (bf16: garbage): there the operands go to fp32, whose products of
        16-bit values are as exact, so the CPU tests check the 16-bit kernels too."""
        if w.dtype == tl.float32 or INTERPRETED:
            return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        return tl.dot(x.to(w.dtype), tl.trans(w))

    @triton.jit
    def _prefetch_rows(w_ptr, rows, rows_ok, K, stride_wn, LINE: tl.constexpr, CHUNK: tl.constexpr):
        """Ask L2 for weight rows ``rows`` (K elements each; LINE elements a 128-byte line), CHUNK lines of each
        row at a time (a few addresses a thread: a whole row's at once would spill): one ``prefetch.global.L2``
        a line. A hint: nothing waits for it and nothing is read."""
        for k0 in range(0, K, CHUNK * LINE):
            line = k0 + tl.arange(0, CHUNK) * LINE
            ok = rows_ok[:, None] & (line[None, :] < K)
            # (a line out of range asks for the row's first line again: cheaper than a branch, never a fault)
            ptrs = w_ptr + rows[:, None] * stride_wn + tl.where(ok, line[None, :], 0)
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
            )

    @triton.jit
    def _linear_kernel(
        x_ptr,
        w_ptr,
        add_ptr,
        act_ptr,
        out_ptr,
        ss_out_ptr,
        ss_in_ptr,
        nw_ptr,
        nb_ptr,
        bias_ptr,
        eps,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_ADD: tl.constexpr,
        GATE: tl.constexpr,
        SUMSQ: tl.constexpr,
        PRENORM: tl.constexpr,
        LAYERNORM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        REDUCE: tl.constexpr,
        PDL: tl.constexpr = False,
        PDL_LINE: tl.constexpr = 64,
        PDL_CHUNK: tl.constexpr = 1,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if PDL and not INTERPRETED:  # launched before the previous kernel ended (programmatic dependent launch):
            # this program's weights stream into L2 meanwhile (they depend on nothing), then it waits for the
            # previous kernel's writes before reading anything else, and lets the next kernel launch likewise
            _prefetch_rows(w_ptr, rn, n_ok, K, stride_wn, PDL_LINE, PDL_CHUNK)
            if GATE:
                _prefetch_rows(w_ptr, rn + N, n_ok, K, stride_wn, PDL_LINE, PDL_CHUNK)
            gdc_wait()
            gdc_launch_dependents()
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        act = tl.load(act_ptr + rm, mask=m_ok, other=0)
        if tl.sum(act.to(tl.int32), 0) == 0:  # every row frozen: skip the weight pass
            return
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # REDUCE: products summed in registers per k lane, reduced once after the loop (no tensor cores,
        # no shared memory): W streams straight from global memory into registers
        if REDUCE:  # (allocated only for this kind: the interpreter would build it for every program)
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc3_up = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        if PRENORM:
            if LAYERNORM:  # statistics are (sum, sum of squares) pairs
                mean = tl.load(ss_in_ptr + 2 * rm, mask=m_ok, other=0.0) / K
                var = tl.maximum(tl.load(ss_in_ptr + 2 * rm + 1, mask=m_ok, other=0.0) / K - mean * mean, 0.0)
                rstd = tl.rsqrt(var + eps)
            else:  # rms_norm(x) on the fly: fp32 x * rsqrt(mean(x^2) + eps), rounded, times the weight
                rstd = tl.rsqrt(tl.load(ss_in_ptr + rm, mask=m_ok, other=0.0) / K + eps)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if PRENORM:
                xdt = x.dtype
                nw = tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                if LAYERNORM:  # F.layer_norm: fp32 (x - mean) * rstd * w + b, rounded once
                    nb = tl.load(nb_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                    x = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :]).to(xdt)
                else:
                    x = ((x.to(tl.float32) * rstd[:, None]).to(xdt).to(tl.float32) * nw[None, :]).to(xdt)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if REDUCE:
                acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            else:
                acc += _dot_rows(x, w)
            if GATE:
                wu = tl.load(
                    w_ptr + (rn[:, None] + N) * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
                )
                if REDUCE:
                    acc3_up += x.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :]
                else:
                    acc_up += _dot_rows(x, wu)
        if REDUCE:
            acc = tl.sum(acc3, 2)
            acc_up = tl.sum(acc3_up, 2)
        dt = out_ptr.dtype.element_ty
        if HAS_BIAS:  # added before the one rounding, as addmm does
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATE:  # round like the reference: fc output in the storage dtype, silu, product
            g = acc.to(dt).to(tl.float32)
            u = acc_up.to(dt).to(tl.float32)
            y = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)
        elif HAS_ADD:
            a = tl.load(add_ptr + rm[:, None] * stride_om + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            y = (acc.to(dt).to(tl.float32) + a.to(tl.float32)).to(dt)
        elif GELU:  # GPT-2's tanh form on the rounded product, in fp32, rounded once
            g = acc.to(dt).to(tl.float32)
            u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            y = (0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))).to(dt)  # 1 + tanh(u)
        else:
            y = acc.to(dt)
        ok = m_ok[:, None] & n_ok[None, :] & (act[:, None] != 0)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=ok)
        if SUMSQ:
            yf = tl.where(ok, y.to(tl.float32), 0.0)
            if LAYERNORM:
                tl.atomic_add(ss_out_ptr + 2 * rm, tl.sum(yf, 1), mask=m_ok)
                tl.atomic_add(ss_out_ptr + 2 * rm + 1, tl.sum(yf * yf, 1), mask=m_ok)
            else:
                tl.atomic_add(ss_out_ptr + rm, tl.sum(yf * yf, 1), mask=m_ok)


DEFAULT_CONFIG = dict(kind="dot", BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3)  # many rows (prefill)
# decode rows, measured on an H200 (benchmarks/RESULTS.md, 2026-11-26): Huginn-0125 decode at r=32 went from
# 51.9 to 40.8 ms/token at batch 1 (one row: products summed in registers, 2 weight rows x 1024 columns per
# program) and from 54.5 to 43.0 ms/token at batch 8 (tensor-core tiles of 64 x 256, 8 warps)
ONE_ROW_CONFIG = dict(kind="reduce", BLOCK_N=2, BLOCK_K=1024, num_warps=4, num_stages=1)
FEW_ROWS_CONFIG = dict(kind="dot", BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=3)


def interpreter_config(n: int, k: int) -> dict:
    """The interpreter's tiles for an [n, k] weight: its time goes mostly per program and per op, and some per
    element (a tile op is numpy over the whole tile), so one tile the size of the product, up to 512 x 256.
    Measured on CI's CPU (2026-12-05): a product with 320 rows of 64 took 12.7 ms in one 512 x 64 tile, 34 ms in
    three of 128 x 128; one fixed 512 x 256 tile took 20 ms there and 22.5 ms for 64 x 128 (12.4 fitted)."""
    return dict(
        kind="dot", BLOCK_N=fitted_block(n, 16, 512), BLOCK_K=fitted_block(k, 16, 256), num_warps=4, num_stages=1
    )


def default_config(rows: int, dtype: torch.dtype = torch.bfloat16, n: int = 512, k: int = 256) -> dict:
    """The launch config for ``rows`` rows of x and an [n, k] weight when the caller names none.
    FEW_ROWS_CONFIG's tiles need 288 KB of shared memory with fp32 weights (the limit is 227 KB): 16-bit weights
    only. With the interpreter's configs (``interpreter_configs``), ``interpreter_config`` (every config computes
    the same function: tests/test_kernels.py checks each kind)."""
    if interpreter_configs():
        return interpreter_config(n, k)
    if rows == 1:
        return ONE_ROW_CONFIG
    return FEW_ROWS_CONFIG if rows <= 16 and dtype.itemsize == 2 else DEFAULT_CONFIG


# candidates the GPU benchmarks time against the default (benchmarks.suites.linear_configs)
CANDIDATE_CONFIGS = [
    dict(kind=kind, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
    for kind, n, k, w, st in [
        ("dot", 32, 64, 4, 3),
        ("dot", 32, 128, 4, 4),
        ("dot", 64, 256, 8, 3),
        ("reduce", 4, 512, 4, 1),
        ("reduce", 8, 256, 4, 1),
        ("reduce", 8, 512, 8, 1),
        ("reduce", 16, 256, 8, 1),
        ("reduce", 16, 128, 4, 2),
        ("reduce", 2, 1024, 4, 1),
        ("reduce", 8, 256, 4, 3),
        ("reduce", 1, 2048, 4, 1),
        ("reduce", 2, 2048, 8, 1),
        ("reduce", 4, 1024, 8, 1),
        ("dot", 64, 128, 8, 4),
    ]
]


def fused(
    x: Tensor,
    w: Tensor,
    add: Tensor | None = None,
    active: Tensor | None = None,
    gate: bool = False,
    out: Tensor | None = None,
    sumsq: Tensor | None = None,
    prenorm: tuple[Tensor, Tensor, float] | None = None,
    zero_frozen: bool = True,
    config: dict | None = None,
    bias: Tensor | None = None,
    gelu: bool = False,
    stats: Tensor | None = None,
    ln_prenorm: tuple[Tensor, Tensor, Tensor, float] | None = None,
    pdl: bool | None = None,
) -> Tensor:
    """Triton version of ``reference`` for 2-D x [M, K]; W may be a column slice (row stride != K).
    ``config``: launch parameters (kind, BLOCK_N, BLOCK_K, num_warps, num_stages); default_config(M) if None.
    ``sumsq`` / ``prenorm``: see the module docstring; ``stats`` / ``ln_prenorm=(stats, w, b, eps)`` are
    their LayerNorm forms (GPT-2), with [M, 2] fp32 (sum, sum of squares) per row. ``bias`` [N] is added
    before rounding (addmm); ``gelu`` applies GPT-2's tanh GELU to the result. Rows of frozen sequences
    are left unwritten: zeros in a fresh ``out``, or whatever memory held with ``zero_frozen=False``
    (callers that mask those rows save a memset per call). ``pdl``: a programmatic dependent launch (sm_90+;
    default: LATENTRT_PDL=1): the kernel starts while the previous one ends and streams its weights into L2
    before it waits for the previous kernel's writes (a probe's question: benchmarks/probes/gemv_chain.py)."""
    M, K = x.shape
    N = w.shape[0] // 2 if gate else w.shape[0]
    assert w.stride(1) == 1 and x.stride(1) == 1
    if out is None:
        alloc = torch.zeros if active is not None and zero_frozen else torch.empty
        out = alloc(M, N, dtype=x.dtype, device=x.device)
    if active is None:
        active = torch.ones(M, dtype=torch.bool, device=x.device)
    cfg = {**DEFAULT_CONFIG, **(config or _env_config() or default_config(M, w.dtype, N, K))}
    if cfg["kind"] == "reduce" and M > 16:  # many rows (prefill): the tensor-core tiles
        cfg = dict(DEFAULT_CONFIG)
    reduce = cfg.pop("kind") == "reduce"
    block_m = next_pow2(M) if reduce else fitted_block(M, 16, 64)
    if reduce:  # the register accumulator is [rows, BLOCK_N, BLOCK_K]: keep it the same size for any rows
        cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] // block_m)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, block_m))
    assert not (sumsq is not None and stats is not None) and not (prenorm is not None and ln_prenorm is not None)
    layernorm = stats is not None or ln_prenorm is not None
    assert not (layernorm and (sumsq is not None or prenorm is not None)), "one norm kind per product"
    stats_out = stats if stats is not None else sumsq
    pre = ln_prenorm if ln_prenorm is not None else (prenorm[0], prenorm[1], None, prenorm[2]) if prenorm else None
    _linear_kernel[grid](
        x,
        w,
        add if add is not None else out,
        active,
        out,
        stats_out if stats_out is not None else out,
        pre[0] if pre is not None else out,
        pre[1] if pre is not None else out,
        pre[2] if pre is not None and pre[2] is not None else out,
        bias if bias is not None else out,
        pre[3] if pre is not None else 0.0,
        M,
        N,
        K,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        HAS_ADD=add is not None,
        GATE=gate,
        SUMSQ=stats_out is not None,
        PRENORM=pre is not None,
        LAYERNORM=layernorm,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        BLOCK_M=block_m,
        REDUCE=reduce,
        **cfg,
        **(_pdl_launch(w, cfg) if (pdl if pdl is not None else PDL_BY_DEFAULT) and _pdl_capable(w) else {}),
    )
    return out


PDL_BY_DEFAULT = os.environ.get("LATENTRT_PDL") == "1"


def _pdl_capable(w: Tensor) -> bool:
    """Programmatic dependent launch needs sm_90 or later (the interpreter runs the kernel without its waits)."""
    return INTERPRETED or (w.is_cuda and torch.cuda.get_device_capability(w.device) >= (9, 0))


def _pdl_launch(w: Tensor, cfg: dict) -> dict:
    """The constexprs and launch option of a programmatic dependent launch: 128-byte lines of elements, and
    lines a row prefetched at a time (4 addresses a thread)."""
    chunk = max(1, 4 * 32 * cfg["num_warps"] // cfg["BLOCK_N"])
    pdl = dict(PDL=True, PDL_LINE=128 // w.element_size(), PDL_CHUNK=chunk)
    return pdl if INTERPRETED else dict(pdl, launch_pdl=True)


def _env_config() -> dict | None:
    """LATENTRT_GEMV="kind,BLOCK_N,BLOCK_K,num_warps,num_stages" overrides the launch config (benchmarks
    use it to time whole decode steps under a candidate)."""
    spec = os.environ.get("LATENTRT_GEMV")
    if not spec:
        return None
    fields = spec.split(",")
    numbers = [int(f) if f.strip().isdigit() else 0 for f in fields[1:]]
    powers = all(n > 0 and n & (n - 1) == 0 for n in numbers[:3])
    if len(fields) != 5 or fields[0] not in ("dot", "reduce") or not powers or numbers[-1] < 1:
        raise ValueError(
            "LATENTRT_GEMV must be 'kind,BLOCK_N,BLOCK_K,num_warps,num_stages' (kind dot or reduce; the blocks and"
            f" num_warps powers of two; num_stages >= 1), got {spec!r}"
        )
    n, k, w, st = numbers
    return dict(kind=fields[0], BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)


def make_inputs(shape: str, device, dtype, seed: int = 0, rows: int = 8):
    from . import SHAPES

    d, _, _, ffn, _ = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (
        torch.randn(rows, d, generator=g).to(device, dtype),
        (torch.randn(2 * ffn, d, generator=g) * 0.02).to(device, dtype),
        None,
        None,
        True,
    )


def bytes_moved(inputs) -> int:
    x, w = inputs[0], inputs[1]
    return (w.numel() + x.numel() + x.shape[0] * w.shape[0] // 2) * w.element_size()
