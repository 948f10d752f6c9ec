"""What both trainers share: options, AdamW with warmup + cosine, clipping, autocast, resumable checkpoints."""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..errors import InputError


@dataclass
class TrainOptions:
    steps: int = 1000  # optimizer steps (per curriculum stage for Coconut)
    batch_size: int = 32  # per process
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    out: str | None = None  # checkpoint folder; None: do not save
    save_every: int = 0  # 0: only at the end (and at each Coconut stage end)
    log_every: int = 20
    checkpoint_activations: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms / biases / qk_bias do not."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2 or n.endswith("qk_bias")]
    decay = [p for p in decay if all(p is not q for q in no_decay)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.95),
    )


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr over opts.steps."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def optimizer_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, opts: TrainOptions
) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, opts)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), opts.grad_clip)
    optimizer.step()
    return float(norm)


def save_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: str | Path,
    step: int,
    opts: TrainOptions,
    extra: dict | None = None,
) -> Path:
    """The published layout (config.json + model.safetensors + tokenizer.json) that latentrt.load reads,
    plus trainer_state.pt (optimizer, step, RNG states, options) for resuming."""
    tied = model.lm_head.weight is model.transformer.wte.weight
    folder = save_checkpoint(model, folder, tie_key="lm_head.weight" if tied else None)
    state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "options": asdict(opts),
        "extra": extra or {},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    torch.save(state, folder / "trainer_state.pt")
    return folder


def load_training(folder: str | Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore optimizer and RNG states saved by save_training; returns the saved state dict."""
    state = torch.load(Path(folder) / "trainer_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


def prepare(model: nn.Module, tokenizer, opts: TrainOptions) -> tuple[int, int, torch.device]:
    """Validate options, join the process group (torchrun), seed per rank, and put the model in training
    mode on its device with the tokenizer attached (so checkpoints carry tokenizer.json)."""
    from . import distributed

    opts.validate()
    rank, world, device = distributed.init()
    seed_all(opts.seed + rank)
    model.to(device).train()
    model.requires_grad_(True)
    model.tokenizer = tokenizer
    return rank, world, device
