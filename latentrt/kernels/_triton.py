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
INTERPRETED = False  # under TRITON_INTERPRET=1 (a tl.constexpr for the kernels that must know)
if HAVE_TRITON:
    import os

    import torch

    TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _without_overflow_sanitizer(interpreter) -> None:
    """Skip the interpreter's int32-overflow sanitizer: it checks every integer op in Python (a third of the
    interpreted time) and compiled kernels do not run it either (their default). The kernels' index math stays
    in int64 where it can grow (row strides x rows)."""
    import dataclasses

    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is not None and getattr(builder.options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _rounding_bf16_to_nearest(interpreter) -> None:
    """Cast fp32 to bf16 to nearest even, as the GPU does (``cvt.rn``); the interpreter truncates, so every bf16
    kernel drifted from torch's rounding there and the CPU tests could not check the kernels' bf16 rounding
    (latentrt's fast path's dtype). NaN stays NaN."""
    import numpy as np

    builder = getattr(interpreter, "interpreter_builder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not hasattr(type(builder), "cast_impl"):  # pragma: no cover
        return
    cls = type(builder)
    truncating = cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = np.asarray(src.data, dtype=np.float32)
            bits = values.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return handle(np.where(np.isnan(values), np.uint16(0x7FC0), rounded), dst_type.scalar)
        return truncating(self, src, dst_type)

    cls.cast_impl = cast_impl


if INTERPRETED:  # (the CPU tests) the interpreter, adjusted to run as compiled kernels do
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:  # pragma: no cover - another Triton layout: keep its defaults
        _interpreter = None
    if _interpreter is not None:
        _without_overflow_sanitizer(_interpreter)
        _rounding_bf16_to_nearest(_interpreter)
