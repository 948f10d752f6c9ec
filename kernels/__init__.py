"""Kernel families. Each module holds one family: its PyTorch ``reference``, its Triton kernel(s) where
written, ``make_inputs(shape, device, dtype, seed)`` at the shapes that matter (huginn, gpt2, tiny) and
``bytes_moved(inputs)`` for the bandwidth floor. ``FAMILIES`` lists them for tests and benchmarks."""

from __future__ import annotations

import importlib

FAMILIES = ("norms", "linear", "feedback", "rope_kv", "decode_attention", "exits")

SHAPES = {
    # name: (n_embd, heads, head_dim, ffn, vocab)
    "huginn": (5280, 55, 96, 17920, 65536),
    "gpt2": (768, 12, 64, 3072, 50257),
    "tiny": (64, 2, 32, 128, 320),
}


def family(name: str):
    return importlib.import_module(f"kernels.{name}")


def fused_of(fam):
    """A family's Triton implementation with the signature of its ``reference`` (None without one)."""
    return getattr(fam, "fused_as_reference", None) or getattr(fam, "fused", None)


def triton_available() -> bool:
    """Triton kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
