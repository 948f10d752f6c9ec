"""Several LoRA adapters served by one model at once (vLLM's ``--enable-lora --lora-modules``).

``serve_adapters(model, {name: adapter folder})`` keeps the base weights as they are and wraps every layer an
adapter adapts in a ``BankedLoraLinear`` that holds all the adapters side by side: A stacked as one [N*r, in]
matrix, B (its scaling folded in) as one [out, N*r], each adapter padded to the largest rank with zeros. A token's
update is ``((x A^T) * its adapter's columns) B^T``: one pass over every token of a batch whatever adapters its
rows use, without a host sync (a token of the base model, slot 0, selects no column and gets nothing added).

Which adapter a token uses comes from the ``AdapterBank``: the serving engine sets each pool row's slot when it
admits a request (``row_slots``), and a pre-hook on every block reads the pass's rows from its ``Packed`` chunks
(latentrt/models/layers.py); any other pass (``generate()``) uses the one slot ``using(model, name)`` selects.
So a request served with an adapter gets, bit for bit, what ``generate()`` gives it alone under ``using`` (the
same unmerged arithmetic); a merged model (``load(adapter=...)``) computes ``(W + s B A) x`` instead, equal up to
rounding. The wrapped layers run on the torch backend (the fused backends read the base weights themselves).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import CheckpointError, InputError
from .lora import Adapter, _is_linear, _model_layer, _shape, read_adapter
from .models.layers import Packed

BASE_SLOT = 0  # the base model: no adapter


@dataclass
class AdapterBank:
    """The served adapters' names (slots 1..N, in the order given), the slot of each pool row and the slot of
    passes that are not the server's (``using``)."""

    names: dict[str, int]
    sources: dict[str, str]
    device: torch.device
    row_slots: Tensor = field(init=False)  # [pool rows] (bind_rows)
    call_slot: int = BASE_SLOT
    current: Tensor | None = None  # the running pass's slots: [tokens] or 0-d
    chunk: object = None  # a serving pass's one pool chunk, where its blocks get no Packed (``pass_over``)

    def __post_init__(self) -> None:
        self.row_slots = torch.zeros(0, dtype=torch.long, device=self.device)

    def slot(self, name: str | None) -> int:
        """An adapter's slot (None: the base model); an unknown name is an error naming the served ones."""
        if name is None:
            return BASE_SLOT
        if not isinstance(name, str) or name not in self.names:
            raise InputError(f"no LoRA adapter {name!r} is served here; the served adapters: {list(self.names)}")
        return self.names[name]

    def bind_rows(self, rows: int) -> None:
        """A serving engine's pool rows, each on the base model until a request is admitted to it."""
        self.row_slots = torch.zeros(rows, dtype=torch.long, device=self.device)

    def select(self, args: tuple) -> None:
        """Before a block runs: its tokens' slots, from its ``Packed`` chunks' pool rows (the server's passes; or
        the one chunk of a pass that has none, ``pass_over``) or the call's slot."""
        packed = next((a for a in args if isinstance(a, Packed)), None)
        chunks = packed.chunks if packed is not None else [self.chunk] if self.chunk is not None else None
        if chunks is None or not len(self.row_slots):
            self.current = torch.tensor(self.call_slot, device=self.device)
            return
        rows = [c.rows.repeat_interleave(c.n) for c in chunks]
        self.current = self.row_slots[rows[0] if len(rows) == 1 else torch.cat(rows)]


class BankedLoraLinear(nn.Module):
    """A frozen linear layer plus every served adapter's update, each token its own (see module docstring)."""

    def __init__(self, base: nn.Module, bank: AdapterBank, rank: int, updates: dict[int, tuple]) -> None:
        super().__init__()
        n_in, n_out = _shape(base)
        slots = len(bank.names)
        self.base_layer, self.bank = base, bank
        device = base.weight.device
        a = torch.zeros(slots * rank, n_in, device=device)
        b = torch.zeros(n_out, slots * rank, device=device)
        for slot, (a_i, b_i, scaling) in updates.items():  # slot 1..N: columns [(slot - 1) r, (slot - 1) r + r_i)
            at, r_i = (slot - 1) * rank, a_i.shape[0]
            a[at : at + r_i] = a_i.float()
            b[:, at : at + r_i] = b_i.float() * scaling
        self.register_buffer("lora_A", a, persistent=False)
        self.register_buffer("lora_B", b, persistent=False)
        column_slot = torch.arange(1, slots + 1, device=device).repeat_interleave(rank)
        self.register_buffer("column_slot", column_slot, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        slots = self.bank.current
        xa = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype) @ self.lora_A.t()
        chosen = slots.reshape(-1, 1) == self.column_slot  # [tokens or 1, N*r]
        update = (xa * chosen) @ self.lora_B.t()
        return y + update.view(*y.shape).to(y.dtype)


def _read(model: nn.Module, source) -> Adapter:
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    for layer in adapter.tensors:
        name, module = _model_layer(model, layer)
        if module is None or not _is_linear(module):
            raise CheckpointError(f"adapter {adapter.source}: {layer!r} is not a linear layer of this model")
    return adapter


def serve_adapters(model: nn.Module, adapters: dict[str, str | os.PathLike | Adapter]) -> AdapterBank:
    """Serve ``adapters`` (name -> a PEFT adapter folder, Hub id or read ``Adapter``) from ``model`` (see module
    docstring): every layer one of them adapts is wrapped, the others are left as they are; the model then runs
    on the torch backend. Only layers inside the blocks may be adapted (a block's pre-hook selects the
    adapters). Returns the bank (also ``model.adapter_bank``)."""
    from .backends import get_backend
    from .lora import lora_layers

    if not isinstance(adapters, dict) or not adapters:
        raise InputError("serve_adapters takes a dict of adapter names and folders, with at least one")
    if getattr(model, "adapter_bank", None) is not None or lora_layers(model):
        raise InputError("the model already has LoRA adapters (trained or served): load it anew to serve others")
    for name in adapters:
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"an adapter's name must be a non-empty str, got {name!r}")
    read = {name: _read(model, source) for name, source in adapters.items()}
    bank = AdapterBank({n: i + 1 for i, n in enumerate(read)}, {n: a.source for n, a in read.items()}, model.device)
    blocks = _blocks(model)
    per_layer: dict[str, dict[int, tuple]] = {}
    rank = max(a.shape[0] for adapter in read.values() for a, _ in adapter.tensors.values())
    for name, adapter in read.items():
        for layer, (a, b) in adapter.tensors.items():
            full, module = _model_layer(model, layer)
            if not any(full.startswith(block + ".") for block in blocks):
                raise InputError(
                    f"adapter {name!r} adapts {full}, outside the model's blocks: a served adapter adapts the blocks' "
                    "layers only (merge it at load instead: --adapter)"
                )
            n_in, n_out = _shape(module)
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise CheckpointError(f"adapter {adapter.source}: {layer!r} does not fit this model (another base?)")
            per_layer.setdefault(full, {})[bank.names[name]] = (a, b, adapter.spec.scaling(layer))
    for full, updates in per_layer.items():
        parent, _, child = full.rpartition(".")
        module = model.get_submodule(full)
        setattr(model.get_submodule(parent), child, BankedLoraLinear(module, bank, rank, updates))
    for block in blocks:
        model.get_submodule(block).register_forward_pre_hook(lambda _module, args: bank.select(args))
    model.adapter_bank = bank
    model.backend = get_backend("auto", model)  # (the torch backend, saying why)
    return bank


def _blocks(model: nn.Module) -> list[str]:
    """The names of the model's blocks: the members of its ModuleLists of layers."""
    return [
        f"{name}.{i}"
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        for i in range(len(module))
    ]


@contextmanager
def pass_over(model: nn.Module, chunk):
    """A serving pass over one pool chunk whose blocks get its mask rather than a ``Packed`` (Coconut's passes
    where the pool's attention cannot be the model's): its rows' adapters."""
    bank = getattr(model, "adapter_bank", None)
    if bank is None:
        yield
        return
    bank.chunk = chunk
    try:
        yield
    finally:
        bank.chunk = None


@contextmanager
def using(model: nn.Module, name: str | None):
    """Passes outside the server (``generate()``, a prompt's scoring) run with adapter ``name`` (None: the base
    model) inside the block."""
    bank = getattr(model, "adapter_bank", None)
    if bank is None:
        if name is None:
            yield
            return
        raise InputError(f"no LoRA adapter {name!r} is served here: the model serves no adapters")
    slot, before = bank.slot(name), bank.call_slot
    bank.call_slot = slot
    try:
        yield
    finally:
        bank.call_slot = before
