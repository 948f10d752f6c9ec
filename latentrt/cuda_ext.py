"""The CUDA extension (``latentrt._cuda``, built from csrc/ when nvcc is present): whether it is usable here
and what it reads from the device. The persistent loops it holds are driven by backends/cuda.py, which
passes device pointers and the current stream from torch tensors, so the extension does not depend on how
torch was built."""

from __future__ import annotations

from pathlib import Path

import torch

from .cuda_sources import source_digest

REBUILD = "LATENTRT_FORCE_CUDA=1 python setup.py build_ext --inplace"


def built() -> tuple[bool, str]:
    """Whether the extension imports and, in a source checkout (csrc/ beside the package), was built from the
    checkout's sources: an extension whose ``source_digest`` is another (csrc/ edited since the in-place
    build, or a build carried from an older tree) is refused, naming both digests, rather than run."""
    try:
        ext = _ext()
    except ImportError as exc:
        return False, f"the CUDA extension is not built ({exc}); pip install . on a machine with nvcc and a GPU"
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir():
        want, got = source_digest(csrc), getattr(ext, "source_digest", "")
        if got != want:
            return False, (
                f"the CUDA extension is stale: built from other sources (digest {got or 'none'}) than this "
                f"checkout's csrc/ ({want}); rebuild it: {REBUILD}"
            )
    return True, "built"


def available() -> tuple[bool, str]:
    ok, why = built()
    if not ok:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "built"


def _ext():
    from . import _cuda

    return _cuda


def device_info(device: int = 0) -> dict:
    """SM count, opt-in shared memory per block and L2 size, read from the device at run time."""
    return _ext().device_info(device)
