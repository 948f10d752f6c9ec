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


def _interpreter_without_overflow_sanitizer() -> None:
    """Under TRITON_INTERPRET=1 (the CPU tests), skip the interpreter's int32-overflow sanitizer: it checks
    every integer op in Python (a third of the interpreted time) and compiled kernels do not run it either
    (their default). The kernels' index math stays in int64 where it can grow (row strides x rows)."""
    import dataclasses
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - another Triton layout: keep its defaults
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is not None and getattr(builder.options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


if HAVE_TRITON:
    _interpreter_without_overflow_sanitizer()
