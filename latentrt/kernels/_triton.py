"""Triton import guard: the references in this package work without Triton; the kernels need it, at
MIN_TRITON or newer (an older one is treated as absent: the kernel modules use newer language features at
import, and torch 2.4 installs Triton 3.0 beside itself)."""

import os

from . import MIN_TRITON, _version

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = _version(getattr(triton, "__version__", "0")) >= MIN_TRITON
except ImportError:  # pragma: no cover - exercised on installs without triton
    HAVE_TRITON = False
if not HAVE_TRITON:
    triton = tl = None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreter_configs() -> bool:
    """Whether launches take the interpreter's configs: under TRITON_INTERPRET=1 (the CPU tests) the time goes
    per program and per op, not per element, so big tiles and few programs; unless LATENTRT_GPU_CONFIGS=1
    (tools/compile_check.py records the GPU's launches that way). Read at each launch: tests set it."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LATENTRT_GPU_CONFIGS") != "1"


def fitted_block(n: int, least: int = 1, most: int = 1 << 20) -> int:
    """The power of two covering ``n``, within [least, most]: a block the size of the work."""
    return min(most, max(least, next_pow2(n)))


def interpreter_block(n: int, gpu: int, least: int = 1, most: int = 1 << 20) -> int:
    """A launch block for ``n`` heads, rows or keys: ``gpu`` on a GPU; with the interpreter's configs
    (``interpreter_configs``) one block the size of the work (``fitted_block``): the interpreter's time goes
    mostly per program and per op, some per element (a tile op is numpy over the whole tile)."""
    return fitted_block(n, least, most) if interpreter_configs() else gpu


TORCH_TO_TL = {}
INTERPRETED = False  # under TRITON_INTERPRET=1 (a tl.constexpr for the kernels that must know)
if HAVE_TRITON:
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


def _patching_language_once(interpreter) -> None:
    """Patch ``triton.language`` once per kernel launch, not again at each ``@triton.jit`` helper it calls.

    The interpreter runs a kernel with ``triton.language`` patched for the CPU, and patches it again (~3 ms,
    an ``inspect.getmembers`` of the language's modules) at every helper call, in every program of the
    grid, although the launch's patch is in place: a third of the interpreted conformance check's time went
    there. Here a helper call inside a running launch skips the patch when the launch has patched every
    language module the helper sees (the patch acts on the modules, not on the function), and a launch
    reapplies what the first launch of the same modules set (the patched members are stateless wrappers of
    the one interpreter builder). Restoring after each launch is unchanged."""
    import threading

    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch is None or scope_type is None or executor is None or not hasattr(scope_type(), "_changes"):
        return  # pragma: no cover - another Triton layout: keep its behaviour
    running = threading.local()  # per thread, a stack: the language modules each running launch patched
    patched_members: dict[frozenset, list] = {}

    def modules_seen(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def patch_lang(fn):
        stack = getattr(running, "stack", None)
        modules = modules_seen(fn)
        if stack and stack[-1] is not None and modules <= stack[-1]:
            return scope_type()  # a helper inside a launch that patched its modules: nothing to do
        if stack and stack[-1] is None:
            stack[-1] = modules  # the launch's own patch
        members = patched_members.get(modules)
        if members is None:
            scope = patch(fn)
            patched_members[modules] = [(obj, name, getattr(obj, name)) for obj, name, _ in scope._changes]
            return scope
        scope = scope_type()
        for obj, name, value in members:
            scope.set_attr(obj, name, value)
        return scope

    launch = executor.__call__

    def launch_patching_once(self, *args, **kwargs):
        stack = running.__dict__.setdefault("stack", [])
        stack.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    interpreter._patch_lang = patch_lang
    executor.__call__ = launch_patching_once


def _typing_ops_once(interpreter, core, semantic) -> None:
    """Build fewer types per interpreted op: a tl op under the interpreter is a few hundred Python calls, most
    of them building and comparing types. Two changes, each leaving every value as it was:

    - A block type is made once per (element type, shape) and shared (types are values: compared by element
      type and shape, never changed), not again at every op: ``block_type.with_element_ty`` and the
      interpreter builder's ``get_block_ty``. Pointer element types (not hashable) are built as before.
    - Two blocks of one shape go into a binary op as they are. Triton 3.6's ``broadcast_impl_value`` compares
      each operand's shape (a tuple) with the result's (a list), never equal, so it broadcast both operands of
      every such op (a numpy view and a tensor each).
    - The numpy dtype of a Triton type is looked up once per type: the interpreter's ``_get_np_dtype`` builds
      its table of 17 types (hashing each) at every call, i.e. at every splat, masked load and cast.

    Only for the Triton this was written against (3.6.0, the pinned one); another keeps its behaviour.
    Measured on CI's CPU (2026-12-05, 20 launches each): a linear launch 11.9 -> 10.5 ms, a sandwich norm of
    3 rows 8.5 -> 7.2 ms, decode attention over 40 positions 33.0 -> 28.6 ms; the numpy dtypes (2026-12-06,
    best of 3 x 10 launches): linear 10.3 -> 9.0 ms, pool attention of 4 rows 78 -> 64 ms."""
    builder = getattr(interpreter, "InterpreterBuilder", None)
    known = builder is not None and hasattr(semantic, "TritonSemantic") and hasattr(interpreter, "_get_np_dtype")
    if triton.__version__ != "3.6.0" or not known:  # pragma: no cover
        return
    made: dict = {}

    def block_type(element, shape) -> object:
        key = (element, tuple(shape))
        try:
            made_type = made.get(key)
        except TypeError:  # a pointer element type: not hashable
            return core.block_type(element, list(shape))
        if made_type is None:
            made_type = made[key] = core.block_type(element, list(shape))
        return made_type

    core.block_type.with_element_ty = lambda self, scalar_ty: block_type(scalar_ty, self.shape)
    builder.get_block_ty = lambda self, dtype, shape: block_type(dtype, shape)
    broadcast = semantic.TritonSemantic.broadcast_impl_value

    def broadcast_impl_value(self, lhs, rhs):
        lt, rt = lhs.type, rhs.type
        if lt.is_block() and rt.is_block() and lt.shape == rt.shape:
            return lhs, rhs
        return broadcast(self, lhs, rhs)

    semantic.TritonSemantic.broadcast_impl_value = broadcast_impl_value
    np_dtype = interpreter._get_np_dtype
    np_dtypes: dict = {}

    def get_np_dtype(tt_dtype):
        try:
            found = np_dtypes.get(tt_dtype)
        except TypeError:  # a block of pointers: not hashable
            return np_dtype(tt_dtype)
        if found is None:
            found = np_dtypes[tt_dtype] = np_dtype(tt_dtype)
        return found

    interpreter._get_np_dtype = get_np_dtype


if INTERPRETED:  # (the CPU tests) the interpreter, adjusted to run as compiled kernels do
    try:
        from triton.runtime import interpreter as _interpreter
    except ImportError:  # pragma: no cover - another Triton layout: keep its defaults
        _interpreter = None
    if _interpreter is not None:
        _without_overflow_sanitizer(_interpreter)
        _rounding_bf16_to_nearest(_interpreter)
        _patching_language_once(_interpreter)
        from triton.language import core as _core
        from triton.language import semantic as _semantic

        _typing_ops_once(_interpreter, _core, _semantic)
