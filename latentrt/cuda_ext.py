"""The CUDA extension (``latentrt._cuda``, built from csrc/ when nvcc is present): whether it is usable here
and what it reads from the device. The persistent loops it holds are driven by backends/cuda.py, which
passes device pointers and the current stream from torch tensors, so the extension does not depend on how
torch was built."""

from __future__ import annotations

import torch


def available() -> tuple[bool, str]:
    try:
        from . import _cuda  # noqa: F401
    except ImportError as exc:
        return False, f"the CUDA extension is not built ({exc}); pip install . on a machine with nvcc and a GPU"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "built"


def _ext():
    from . import _cuda

    return _cuda


def device_info(device: int = 0) -> dict:
    """SM count, opt-in shared memory per block and L2 size, read from the device at run time."""
    return _ext().device_info(device)
