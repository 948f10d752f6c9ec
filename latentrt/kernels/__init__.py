"""Kernel families (``latentrt.kernels``).

Each module holds one family: its PyTorch ``reference``, its Triton kernel(s) where written,
``make_inputs(shape, device, dtype, seed)`` at the shapes that matter (huginn, gpt2, tiny) and
``bytes_moved(inputs)`` for the bandwidth floor. ``FAMILIES`` lists them for tests and benchmarks. The
formulas the kernels share with the models live in ``reference``. This package imports nothing from
latentrt: it is the leaf of the dependency graph.
"""

from __future__ import annotations

import importlib
import os

FAMILIES = ("norms", "linear", "feedback", "rope_kv", "decode_attention", "pool_attention", "pool_prefill", "exits")

SHAPES = {
    # name: (n_embd, heads, head_dim, ffn, vocab)
    "huginn": (5280, 55, 96, 17920, 65536),
    "gpt2": (768, 12, 64, 3072, 50257),
    "tiny": (64, 2, 32, 128, 320),
}


def family(name: str):
    return importlib.import_module(f".{name}", __name__)


def fused_of(fam):
    """A family's Triton implementation with the signature of its ``reference`` (None without one)."""
    return getattr(fam, "fused_as_reference", None) or getattr(fam, "fused", None)


def triton_status(device=None) -> tuple[bool, str]:
    """Whether the Triton kernels can run for tensors on ``device`` (None: any CUDA device), and why not:
    on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    import torch

    on_cuda = torch.cuda.is_available() if device is None else getattr(device, "type", str(device)) == "cuda"
    if on_cuda:
        return True, "CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1 (interpreter on the CPU: for tests, slow)"
    return False, "the model is not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"


def triton_available() -> bool:
    """Triton kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    return triton_status()[0]
