"""Backends implement the seams (core-block iteration, exit formulas, Coconut feedback) for one model.

``torch`` is the reference and runs everywhere. ``triton`` runs the decode-time seams as fused kernels
on a CUDA GPU (or on the CPU under TRITON_INTERPRET=1, for tests). ``cuda`` runs each decode token's
core iterations as one persistent kernel launch (the compiled extension, bf16, batch <= 16). ``auto``
takes the fastest measured one that can run on the model's device and says why in ``backend.reason``
(printed by ``latentrt info``): triton for recurrent models, cuda for bf16 Coconut models when built.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .torch import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cuda")


def triton_status(device) -> tuple[bool, str]:
    """Whether Triton kernels can run for a model on ``device``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        return True, "CUDA device"
    if interpret:
        return True, "TRITON_INTERPRET=1 (interpreter on the CPU: for tests, slow)"
    return False, "the model is not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"


def availability(model) -> dict[str, str]:
    """For each backend, 'available' or why not, for a model on its device (``latentrt info``)."""
    out = {}
    for name in BACKENDS[1:]:
        try:
            get_backend(name, model)
            out[name] = "available"
        except InputError as exc:
            out[name] = str(exc).split(": ", 1)[-1]
    return out


def get_backend(name: str, model):
    """Instantiate the named backend for ``model``; ``auto`` explains its choice in ``.reason``."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "torch":
        return TorchBackend(model, reason="requested")
    device = getattr(model, "device", None) if model is not None else None
    ok, why = triton_status(device)
    if name == "triton":
        if not ok:
            raise InputError(f"backend 'triton' is not available: {why}")
        from .triton import TritonBackend

        return TritonBackend(model, reason=f"requested ({why})")
    if name == "cuda":
        from .. import cuda_ext

        built, why_not = cuda_ext.available()
        if not built:
            raise InputError(f"backend 'cuda' is not available: {why_not}")
        if getattr(device, "type", "") != "cuda" or not ok:
            raise InputError(f"backend 'cuda' is not available: {why}")
        from .cuda import CudaBackend

        return CudaBackend(model, reason="requested (persistent latent-loop kernel; Triton for prelude and head)")
    # auto: the choices below follow the H200 measurements in benchmarks/RESULTS.md (2026-11-26)
    if ok and getattr(device, "type", "") == "cuda":
        import torch

        from .. import cuda_ext

        gpt2 = getattr(getattr(model, "config", None), "model_type", "") == "gpt2"
        if gpt2 and getattr(model, "dtype", None) == torch.bfloat16 and cuda_ext.available()[0]:
            from .cuda import CudaBackend

            return CudaBackend(
                model,
                reason="auto: persistent thought-loop kernel for Coconut thoughts (0.22 ms per thought against "
                "Triton's 0.75 ms on an H200); Triton kernels for the rest",
            )
        from .triton import TritonBackend

        return TritonBackend(
            model,
            reason="auto: fused Triton kernels in one CUDA graph per token (faster than the persistent kernel "
            "for recurrent decode on an H200: 40.8 against 54.4 ms/token at batch 1, r=32)",
        )
    return TorchBackend(model, reason=f"auto: PyTorch reference ({'no GPU' if not ok else why})")
