"""A scheduler step's one device -> host read, started when its values are queued and waited for when needed.

On CUDA the values are gathered into one fp64 tensor (exact for token ids, flags and fp32 log-probs), copied
asynchronously into pinned host memory and followed by an event; ``values`` waits for that event only, so a
launch queued after it does not delay the read (the engine's asynchronous scheduling: latentrt/serve/engine.py).
On the CPU the copy is the tensor itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Readback:
    """``parts`` (device tensors, flattened in order) on their way to the host; ``values()`` gives them as
    one list of floats, waiting for the copy if it has not landed."""

    def __init__(self, parts: list[Tensor]) -> None:
        self.event = None
        if not parts:
            self.host = None
            return
        # (one conversion: cat promotes the other parts to the first's fp64)
        packed = torch.cat([parts[0].reshape(-1).double(), *(p.reshape(-1) for p in parts[1:])])
        if packed.device.type == "cuda":
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = packed

    def values(self) -> list[float]:
        if self.host is None:
            return []
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
