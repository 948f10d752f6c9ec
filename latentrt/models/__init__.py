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
    """A freshly initialised model, allocated directly on ``device`` in ``dtype``: small-normal weights
    (std sqrt(2/(5d)), output projections scaled down by depth, as in the papers' inits), unit norms,
    zero biases. Deterministic for a (seed, device) pair."""
    device = torch.device(device)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    if model.lm_head.weight.shape == model.transformer.wte.weight.shape and tied_head(cfg):
        model.lm_head.weight = model.transformer.wte.weight
    gen = torch.Generator(device).manual_seed(seed)
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
            else:
                p.normal_(0.0, out_std if name.endswith("proj.weight") else std, generator=gen)
    model.init_buffers()
    from ..backends import get_backend

    model.backend = get_backend("torch", model)
    return model


def tied_head(cfg: ModelConfig) -> bool:
    """Whether lm_head shares the token embedding."""
    return cfg.tie_embeddings if isinstance(cfg, RecurrentConfig) else cfg.tie_word_embeddings


__all__ = ["CoconutGPT2", "RecurrentDepthLM", "build_model", "model_class", "tied_head"]
