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


# The oldest Triton the kernels are tested with (their interpreter tests pass on 3.2 to 3.6; 3.0 and 3.1 refuse
# ``tl.arange(0, BLOCK)``'s literal start under TRITON_INTERPRET=1, and lack ``gdc_wait``, which linear.py imports);
# the GPU measurements used 3.6. An older Triton counts as none (kernels/_triton.py: HAVE_TRITON).
MIN_TRITON = (3, 2)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "3.2.0+git1234"."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def triton_status(device=None) -> tuple[bool, str]:
    """Whether the Triton kernels can run for tensors on ``device`` (None: any CUDA device), and why not:
    on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests), with a Triton of MIN_TRITON or newer."""
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    found = getattr(triton, "__version__", "0")
    if _version(found) < MIN_TRITON:
        return (
            False,
            f"triton {found} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the kernels are tested with",
        )
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
