"""Host values to the device without a host-device synchronisation.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the stream: every
call stalls the host until the device has run everything queued before it, which serialises a serving
step's scheduling with its kernels. ``to_device`` stages the values in pinned memory and copies them
asynchronously (PyTorch's caching host allocator keeps the staging block until the copy has run), so the
only synchronisation left in a step is the one read the scheduler asks for. On the CPU it is
``torch.tensor``.

A Python number written into a CUDA tensor is host data too: ``t[index] = 0`` wraps the 0 as a host tensor,
and where the index is a tensor (``index_put_``) or selects a single element (a 0-dim ``copy_``) torch copies
it over from pageable memory and waits (an H200 run counted 324 such waits in 80 serving steps, 2026-12-04).
``fill_rows`` writes the number with ``index_fill_`` / ``fill_``, kernels that take it as an argument.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _staged(values, dtype: torch.dtype, device) -> Tensor:
    """``values`` as a host tensor (whatever torch's default device), in pinned memory when bound for CUDA."""
    t = torch.tensor(values, dtype=dtype, device="cpu")
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def to_device(values, device, dtype: torch.dtype = torch.long) -> Tensor:
    """``values`` (a number or a list of them) as a tensor on ``device``, copied without a sync."""
    return _staged(values, dtype, device).to(device, non_blocking=True)


def copy_from_host(dst: Tensor, values) -> None:
    """``dst[:] = values`` (a list as long as ``dst``) without a sync, copied into ``dst`` itself (``to_device``
    then ``copy_`` would allocate a tensor and copy twice)."""
    dst.copy_(_staged(values, dst.dtype, dst.device), non_blocking=True)


def fill_rows(t: Tensor, index: Tensor | slice | int, value: bool | float) -> None:
    """``t[index] = value`` along dim 0 without a sync: ``index`` a device index tensor, a slice or a row."""
    if isinstance(index, Tensor):
        t.index_fill_(0, index, value)
    else:
        t[index].fill_(value)
