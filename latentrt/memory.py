"""What a load or a generate() call will allocate, checked against what the device has before allocating.

A config with a billion-row vocabulary or a million core layers, or a request whose KV cache cannot fit,
gets a clear error naming both figures instead of a raw allocation failure minutes later.
"""

from __future__ import annotations

import os

import torch

GB = 1024**3


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free figure, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def check_fits(nbytes: int, device: torch.device, what: str, error: type[Exception], hint: str = "") -> None:
    """Raise ``error`` when ``nbytes`` exceed the free memory of ``device`` (``hint``: what to do instead)."""
    free = available_bytes(device)
    if nbytes > free:
        message = f"{what} need {nbytes / GB:.2f} GB, more than the {free / GB:.2f} GB available on {device}"
        raise error(message + (f"; {hint}" if hint else ""))
