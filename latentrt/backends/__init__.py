"""Backends implement the seams (core-block iteration, Coconut feedback) for one loaded model.

``torch`` is the reference and runs everywhere. Faster backends register here and are chosen by
``load(..., backend=...)``; ``auto`` takes the fastest one that can run on the model's device.
"""

from __future__ import annotations

from ..errors import InputError
from .torch import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cuda")


def get_backend(name: str, model):
    """Instantiate the named backend for ``model``; ``auto`` explains its choice in ``.reason``."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "torch":
        return TorchBackend(model, reason="requested")
    if name == "auto":
        return TorchBackend(model, reason="auto: the only backend implemented in this version")
    raise InputError(f"backend {name!r} is not available in this version of latentrt (use 'torch')")
