"""Reference PyTorch models of both families, and a constructor for freshly initialised ones."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, RecurrentConfig
from .coconut import CoconutGPT2
from .recurrent import RecurrentDepthLM


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    return RecurrentDepthLM if isinstance(cfg, RecurrentConfig) else CoconutGPT2


def build_model(
    cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """A freshly initialised model: small-normal weights (std sqrt(2/(5d)), output projections scaled
    down by depth, as in the papers' inits), unit norms, zero biases. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    model = model_class(cfg)(cfg)
    d = cfg.n_embd
    std = math.sqrt(2 / (5 * d))
    depth = (
        (cfg.n_layers_in_prelude + cfg.n_layers_in_recurrent_block * cfg.mean_recurrence + cfg.n_layers_in_coda)
        if isinstance(cfg, RecurrentConfig)
        else cfg.n_layer
    )
    out_std = std / math.sqrt(2 * max(depth, 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif name.endswith("bias") or name.endswith("qk_bias"):
                p.zero_()
            elif name.endswith("proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.to(device=device, dtype=dtype)
    model.init_buffers()
    from ..backends import get_backend

    model.backend = get_backend("torch", model)
    return model


__all__ = ["CoconutGPT2", "RecurrentDepthLM", "build_model", "model_class"]
