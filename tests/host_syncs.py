"""Count the operations that make the host wait for a CUDA device, on any device (the CPU tests included).

A ``TorchFunctionMode`` sees every torch call; these would synchronise on CUDA: reading values to the host
(``item``, ``tolist``, ``bool()`` / ``int()`` / ``float()`` / ``__index__`` of a tensor), data-dependent
shapes (``nonzero``, masked selection, indexing with a bool tensor), host data copied to a device by
``torch.tensor(..., device=...)`` or by indexing with a Python list (pageable memory: the copy waits for the
stream), and ``torch.multinomial`` (it checks its input with two ``.item()`` reads first; an H200 run counted
these among a serving step's syncs, 2026-12-04), and a ``__setitem__`` whose value is a Python number (on a
CUDA tensor torch wraps the number as a host tensor and copies it over, a pageable copy that waits: an H200
run named ``active[rows] = True`` and its kind 260 times in 80 serving steps, 2026-12-04). What torch's
``nn.init.trunc_normal_`` does inside is its own (the published initial state's draw) and is left out.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select", "argwhere"}
READS |= {"multinomial", "equal", "allclose", "unique", "bincount", "repeat_interleave"}


def _bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, tuple | list):
        return any(_bool_index(i) for i in index)
    return False


def _list_index(index) -> bool:
    """An advanced index given as a Python list (torch makes a host tensor of it and copies it over)."""
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def _number_copied(t: torch.Tensor, index) -> bool:
    """Whether ``t[index] = number`` copies the number to the device: an index with a tensor in it
    (``index_put_`` moves its host value over) or one selecting a single element (a 0-dim ``copy_``);
    a slice of more than one element is filled by ``fill_``, which takes the number as an argument."""
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) for i in parts):
        return True
    return len(parts) == t.dim() and all(isinstance(i, int) and not isinstance(i, bool) for i in parts)


def _ours(filename: str) -> bool:
    """A latentrt file a hit is named by: the innermost on the stack, transfer.py's helpers passed over (their
    caller is the place to look)."""
    return "/latentrt/" in filename and not filename.endswith("/latentrt/transfer.py")


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as syncs: ...``; ``syncs.hits``: (operation, latentrt file, line) -> count."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = self.hit(getattr(func, "__name__", str(func)), args, kwargs)
        if hit is not None:
            stack = traceback.extract_stack()[:-1]
            if not any(f.filename.replace("\\", "/").endswith("torch/nn/init.py") for f in stack):
                ours = [f for f in stack if _ours(f.filename.replace("\\", "/"))]
                where = ours[-1] if ours else stack[-1]
                self.hits[(hit, where.filename.split("latentrt/")[-1], where.lineno)] += 1
        return func(*args, **kwargs)

    def hit(self, name: str, args: tuple, kwargs: dict) -> str | None:
        """What of the call would synchronise on CUDA (None: nothing)."""
        hit = None
        if name in READS:
            hit = name
        elif name in ("__getitem__", "__setitem__") and _bool_index(args[1]):
            hit = f"{name}[bool]"
        elif name in ("__getitem__", "__setitem__") and _list_index(args[1]):
            hit = f"{name}[list]"
        elif name == "__setitem__" and isinstance(args[2], bool | int | float) and _number_copied(args[0], args[1]):
            hit = "__setitem__(number)"
        elif name in ("tensor", "as_tensor") and kwargs.get("device") not in (None, "cpu"):  # host data to a device
            hit = "tensor(device=...)"
        return hit


class CaptureHazards(HostSyncs):
    """What a CUDA graph's capture refuses or gets wrong, on any device: HostSyncs' reads (a capture refuses
    a synchronisation), and host data brought in (``torch.tensor`` / ``as_tensor`` / ``from_numpy`` /
    ``pin_memory``, ``to_device``'s staging included: a capture records the copy from the host buffer of
    its own call, so every replay would copy that buffer's values again, not the call's)."""

    HOST_DATA = {"tensor", "as_tensor", "from_numpy", "pin_memory"}
    paused = 0  # nonzero: calls are not looked at

    def hit(self, name: str, args: tuple, kwargs: dict) -> str | None:
        if self.paused:
            return None
        if name in self.HOST_DATA:
            return f"host data: {name}"
        return super().hit(name, args, kwargs)


class GraphedCalls:
    """Every call of a graphed runner (backends/graph.py; off CUDA each one runs its launches eagerly) under
    ``CaptureHazards``, the runner's boundaries (``stop``: a host read between two captured stretches, by
    design) excepted. ``calls``: runner class -> calls checked; ``hazards``: (runner class, hit, file, line)
    -> count. ``install(monkeypatch)`` for a test's duration."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.hazards: collections.Counter = collections.Counter()

    def install(self, monkeypatch) -> GraphedCalls:
        from latentrt.backends.graph import GraphedRunner

        def subclasses(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from subclasses(sub)

        for cls in (GraphedRunner, *subclasses(GraphedRunner)):  # every class with a ``__call__`` of its own
            if "__call__" in vars(cls):
                monkeypatch.setattr(cls, "__call__", self._checked(vars(cls)["__call__"]))
        return self

    def _checked(self, call):
        checked = self

        def checked_call(runner):
            if "stop" in vars(runner):  # (a subclass's call through its base's: checked once, outermost)
                return call(runner)
            kind, mode = type(runner).__name__, CaptureHazards()
            stop = runner.stop

            def boundary(marker):  # (the host read between stretches: outside every capture)
                mode.paused += 1
                try:
                    return stop(marker)
                finally:
                    mode.paused -= 1

            runner.stop = boundary
            try:
                with mode:
                    out = call(runner)
            finally:
                del runner.stop
            checked.calls[kind] += 1
            checked.hazards.update({(kind, *k): n for k, n in mode.hits.items()})
            return out

        return checked_call
