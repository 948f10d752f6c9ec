"""The backend contract and the backend registry.

A backend runs a model's decode-time seams. Each seam has a reference (the model's own PyTorch methods,
which ``Backend`` calls by default); a backend overrides the ones it makes faster:

- ``core_iteration(s, e, cache, chunk, iteration, active, rope)``: one iteration of the recurrent block.
- ``token_runner(cache, spec)``: a whole generated token of a recurrent model (prelude -> the latent loop
  of latentrt/recurrence.py -> head) as one fixed launch sequence, or None.
- ``column_runner(cache, embeds, latent, mask)``: one timeline position of a GPT-2 model for the batch (a
  Coconut thought, a prompt token between thoughts, or an answer token), or None.
- ``answer_runner(cache)``: a Coconut answer token (token embeddings at the next timeline position -> the
  LM logits) for the batch, or None.
- ``feedback(h_pre, positions)``: Coconut's hidden -> input feedback.
- ``exit_ops`` and ``sync_free``: the exit formulas as device masks, and whether the reference loop may
  read them on the host (it stops early then).
- ``pool_attention()`` / ``pool_prefill()``: the serving pool's attention for decode rows (per-row K/V
  write and attention over pool rows) and prompt chunks (latentrt/kv_pool.py), or None for the reference.

A runner (backends/graph.py) has static input/output buffers: ``prepare(...)`` fills them,
calling it runs (or replays a captured CUDA graph). ``Capabilities`` say what a backend can serve;
``unavailable`` says why not for a given model. ``BACKENDS`` is the registry that ``get_backend``
(``auto`` included), ``latentrt info`` and the CLI read: a new backend is its own module plus one line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import InputError, is_choice


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves (checked when it is requested; its seams fall back where a call is outside)."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    criteria: frozenset[str] | None = None  # exit criteria its fused paths decide on the device (None: all)
    max_batch: int | None = None  # batch its fused paths take (None: any)
    notes: tuple[str, ...] = field(default=())


class Backend:
    """The reference implementation of every seam (see module docstring)."""

    name: ClassVar[str] = "base"
    capabilities: ClassVar[Capabilities] = Capabilities()
    sync_free: ClassVar[bool] = False  # True: exit masks stay on the device (no host read per iteration)
    exit_ops = None  # the exit criteria's formulas (None: latentrt.exits.ReferenceExitOps)
    requested: str = "auto"  # the name get_backend was given (latentrt.lora.merge_lora asks for it again)

    def __init__(self, model, reason: str = "") -> None:
        self.model = model
        self.reason = reason

    @classmethod
    def unavailable(cls, model, auto: bool = False) -> str | None:
        """Why this backend cannot serve ``model`` on its device (None when it can); ``auto``: whether it
        is a good choice there (e.g. not an interpreter)."""
        return None

    # ---------------------------------------------------------------- recurrent depth
    def core_iteration(self, s: Tensor, e: Tensor, cache, chunk, iteration: int, active: Tensor, rope) -> Tensor:
        """One recurrent-block iteration (adapter + core layers), K/V into the iteration's slot."""
        return self.model.core_iteration(s, e, cache, chunk, iteration, active, rope)

    def token_runner(self, cache, spec):
        """A graph-capturable decode token, or None: the decoder then loops over ``core_iteration``."""
        return None

    # ---------------------------------------------------------------- serving
    def pool_attention(self):
        """A kernel with latentrt/kernels/pool_attention.py's ``fused`` signature for the server's decode rows,
        or None: the pool gathers each row's keys and attends with PyTorch (the reference)."""
        return None

    def pool_prefill(self):
        """A kernel with latentrt/kernels/pool_prefill.py's ``fused`` signature for the server's prompt
        chunks (several queries per row), or None: the reference gathers each row's keys."""
        return None

    # ---------------------------------------------------------------- continuous thought
    def column_runner(self, cache, embeds: Tensor, latent: Tensor, mask: Tensor):
        """A graph-capturable GPT-2 column, or None: the model's modules run it."""
        return None

    def answer_runner(self, cache):
        """A graph-capturable Coconut answer token, or None: the model's modules run it. ``prepare(embeds
        [B, 1, d], alive [B])`` takes the tokens' embeddings (positions are added inside) and reserves the
        next timeline position; calling it returns the LM logits [B, V] (fp32)."""
        return None

    def feedback(self, h_pre: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Coconut: (ln_f(h) + wpe[pos], layer 0's ln_1 of it) for the next thought."""
        return self.model.feedback(h_pre, positions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason})"


# name -> "module:Class", imported on first use (triton and the CUDA extension are optional)
BACKENDS: dict[str, str] = {
    "torch": "latentrt.backends.torch:TorchBackend",
    "triton": "latentrt.backends.triton:TritonBackend",
    "cuda": "latentrt.backends.cuda:CudaBackend",
}
CHOICES = ("auto", *BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if not is_choice(name, BACKENDS):
        raise InputError(f"unknown backend {name!r}; choose one of {list(CHOICES)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, model) -> Backend:
    """The named backend for ``model``; ``auto`` takes the first of the model's measured preferences (its
    class's ``AUTO_BACKENDS``, in the family's model file) that can run here well, and says why in ``.reason``."""
    if _unmerged_adapters(model) and name in BACKENDS and name != "torch":
        raise InputError(
            f"backend {name!r} cannot run the model's LoRA adapters unmerged (only the torch backend runs wrapped "
            "layers): merge them first (latentrt.lora.merge_lora(model), or load(model, adapter=...))"
        )
    backend = _chosen(name, model)
    backend.requested = name
    return backend


def _unmerged_adapters(model) -> bool:
    """Whether the model runs LoRA adapters beside its weights (latentrt/lora.py, lora_serving.py): wrapped
    layers, which only the module calls of the torch backend run."""
    return getattr(model, "lora", None) is not None or getattr(model, "adapter_bank", None) is not None


def _chosen(name: str, model) -> Backend:
    if name == "auto":
        if _unmerged_adapters(model):
            from .torch import TorchBackend

            return TorchBackend(model, reason="auto: LoRA adapters not merged, which the PyTorch reference runs")
        tried = []
        for choice, why in getattr(model, "AUTO_BACKENDS", ()):
            cls = backend_class(choice)
            not_here = cls.unavailable(model, auto=True)
            if not_here is None:
                return cls(model, reason=f"auto: {why}")
            tried.append(f"{choice}: {not_here}")
        from .torch import TorchBackend

        passed = "; ".join(tried) if tried else "no other choice"
        return TorchBackend(model, reason=f"auto: PyTorch reference, as no other runs here well; {passed}")
    cls = backend_class(name)
    not_here = cls.unavailable(model)
    if not_here is not None:
        raise InputError(f"backend {name!r} is not available: {not_here}")
    return cls(model, reason="requested")


def availability(model) -> dict[str, str]:
    """For each backend, 'available' or why not, for a model on its device (``latentrt info``)."""
    return {name: backend_class(name).unavailable(model) or "available" for name in BACKENDS}
