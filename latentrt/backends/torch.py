"""The reference backend: every seam is the model's own PyTorch method (backends/base.py)."""

from __future__ import annotations

from .base import Backend


class TorchBackend(Backend):
    name = "torch"
