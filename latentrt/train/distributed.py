"""DistributedDataParallel under torchrun: gloo on CPU, NCCL on GPU; a no-op for a single process."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, env_number


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; initialises the process group once."""
    world, rank, local = env_number("WORLD_SIZE", 1, 1), env_number("RANK", 0), env_number("LOCAL_RANK", 0)
    if rank >= world:
        raise InputError(f"environment variable RANK must be below WORLD_SIZE={world}, got {rank}")
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    if dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def no_sync(module: nn.Module, skip: bool):
    """Under DistributedDataParallel with ``skip``, a backward that does not all-reduce (a micro-batch whose
    gradients are accumulated, not yet the step's last); otherwise nothing."""
    if skip and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
