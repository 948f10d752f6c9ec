"""Triton import guard: the references in this package work without Triton; the kernels need it."""

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAVE_TRITON = False


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


TORCH_TO_TL = {}
if HAVE_TRITON:
    import torch

    TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
