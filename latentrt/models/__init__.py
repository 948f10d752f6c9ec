"""Reference PyTorch models of every family (a fresh one: latentrt.families.build_model)."""

from __future__ import annotations

from .base import CacheLayout, LatentModel
from .coconut import CoconutGPT2, GPT2Config
from .recurrent import RecurrentConfig, RecurrentDepthLM

__all__ = [
    "CacheLayout",
    "CoconutGPT2",
    "GPT2Config",
    "LatentModel",
    "RecurrentConfig",
    "RecurrentDepthLM",
]
