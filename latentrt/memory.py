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


def gigabytes(nbytes: int) -> str:
    """``nbytes`` as a reader wants it: 12.34 GB; 1.23e+09 GB when huge; a config's absurd sizes (beyond what a float
    holds, e.g. a width of 1e300) by their power of ten."""
    if nbytes >= 2**1000:
        return f"about 10**{len(str(nbytes)) - 1} bytes"
    gb = nbytes / GB
    return f"{gb:.2f} GB" if gb < 1e6 else f"{gb:.3g} GB"


def check_fits(nbytes: int, device: torch.device, what: str, error: type[Exception], hint: str = "") -> None:
    """Raise ``error`` when ``nbytes`` exceed the free memory of ``device`` (``hint``: what to do instead)."""
    free = available_bytes(device)
    if nbytes > free:
        message = f"{what} need {gigabytes(nbytes)}, more than the {free / GB:.2f} GB available on {device}"
        raise error(message + (f"; {hint}" if hint else ""))
