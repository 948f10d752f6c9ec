"""Torch-facing wrappers of the CUDA extension (``latentrt._cuda``, built from csrc/ when nvcc and a GPU
are present): the building blocks of the persistent latent-loop kernel. They take device pointers and the
current stream from torch tensors, so the extension does not depend on how torch was built."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def available() -> tuple[bool, str]:
    try:
        from . import _cuda  # noqa: F401
    except ImportError as exc:
        return False, f"the CUDA extension is not built ({exc}); pip install . on a machine with nvcc and a GPU"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "built"


def _ext():
    from . import _cuda

    return _cuda


def device_info(device: int = 0) -> dict:
    """SM count, opt-in shared memory per block and L2 size, read from the device at run time."""
    return _ext().device_info(device)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def gemv_bf16(x: Tensor, w: Tensor, add: Tensor | None = None, active: Tensor | None = None) -> Tensor:
    """out = x @ w.T (+ add) in bf16 with fp32 accumulation; x [M, K], w [N, K] (row stride may exceed K)."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or not x.is_cuda:
        raise ValueError("gemv_bf16 takes bf16 CUDA tensors")
    M, K = x.shape
    N = w.shape[0]
    x = x.contiguous()
    if active is None:
        active = torch.ones(M, dtype=torch.bool, device=x.device)
    out = torch.zeros(M, N, dtype=torch.bfloat16, device=x.device)
    add_ptr = add.contiguous().data_ptr() if add is not None else 0
    sms = device_info(x.device.index or 0)["sm_count"]
    _ext().gemv_bf16(
        x.data_ptr(),
        w.data_ptr(),
        add_ptr,
        active.to(torch.uint8).data_ptr(),
        out.data_ptr(),
        M,
        N,
        K,
        w.stride(0),
        sms,
        _stream(),
    )
    return out


def decode_attention_bf16(
    q: Tensor, k_slots: Tensor, v_slots: Tensor, written: Tensor | None, valid: Tensor, slot: int, length: int
) -> Tensor:
    """Same contract as kernels.decode_attention.fused (length as a host int here)."""
    K, B, Hkv, T, D = k_slots.shape
    H = q.shape[1]
    out = torch.empty_like(q)
    w = written if written is not None else torch.ones(B, T, dtype=torch.long, device=q.device)
    v8 = valid.to(torch.uint8)
    _ext().decode_attention_bf16(
        q.contiguous().data_ptr(),
        k_slots.data_ptr(),
        v_slots.data_ptr(),
        w.data_ptr(),
        v8.data_ptr(),
        out.data_ptr(),
        B,
        H,
        Hkv,
        D,
        length,
        slot,
        int(written is not None),
        *k_slots.stride()[:4],
        w.stride(0),
        v8.stride(0),
        1.0 / math.sqrt(D),
        _stream(),
    )
    return out
