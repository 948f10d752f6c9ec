"""Backends implement the seams for one model (the contract and the registry: backends/base.py).

``torch`` is the reference and runs everywhere. ``triton`` runs the decode-time seams as fused kernels
on a CUDA GPU (or on the CPU under TRITON_INTERPRET=1, for tests). ``cuda`` runs each decode token's
core iterations (a Coconut prompt's thoughts) as one persistent kernel launch (the compiled extension,
bf16). ``auto`` takes the fastest measured one that can run on the model's device and says why in
``backend.reason`` (printed by ``latentrt info``).
"""

from .base import BACKENDS, CHOICES, Backend, Capabilities, availability, backend_class, get_backend

__all__ = ["BACKENDS", "CHOICES", "Backend", "Capabilities", "availability", "backend_class", "get_backend"]
