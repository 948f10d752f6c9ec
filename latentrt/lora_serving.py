"""Several LoRA adapters served by one model at once (vLLM's ``--enable-lora --lora-modules``).

``serve_adapters(model, {name: adapter folder})`` keeps the base weights as they are and wraps every layer an
adapter adapts in a ``BankedLoraLinear`` that holds all the adapters side by side: A stacked as one [N*r, in]
matrix, B (its scaling folded in) as one [out, N*r], N slots of r columns (``max_loras``, ``max_lora_rank``), a
smaller rank padded with zeros. A token's update is ``((x A^T) * its adapter's columns) B^T``: one pass over every
token of a batch whatever adapters its rows use, without a host sync (a token of the base model, slot 0, selects no
column and gets nothing added). The bank's ``add`` and ``remove`` write a slot in place (the server's runtime
loading, between two steps): no buffer moves.

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

from .errors import CheckpointError, InputError, check_unicode
from .lora import Adapter, is_linear, layer_name, layer_shape, model_layer, read_adapter
from .models.layers import Packed

BASE_SLOT = 0  # the base model: no adapter

DEFAULT_MAX_RANK = 16  # a server started for adapters loaded later: their rank at most (vLLM's --max-lora-rank)


class AdapterNotFound(LookupError):
    """No served adapter of that name (a server's 404)."""

    kind = "model_not_found"


@dataclass
class AdapterBank:
    """The served adapters: their names' slots (1..``capacity``; 0 the base model), the wrapped layers holding
    them (``layers``: ``rank`` columns per slot), the slot of each pool row and of passes that are not the
    server's (``using``). ``add`` and ``remove`` write a slot's columns in place: the buffers never move, so a
    captured pass stays valid."""

    capacity: int
    rank: int
    device: torch.device
    names: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    layers: dict[str, BankedLoraLinear] = field(default_factory=dict)
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

    def add(self, name: str, adapter: Adapter) -> int:
        """Serve ``adapter`` as ``name`` in a free slot (checked whole before any column is written)."""
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"an adapter's name must be a non-empty str, got {name!r}")
        check_unicode("an adapter's name", name)  # (answers carry it)
        if name in self.names:
            raise InputError(f"a LoRA adapter named {name!r} is served already (unload it first)")
        free = sorted(set(range(1, self.capacity + 1)) - set(self.names.values()))
        if not free:
            raise InputError(f"{self.capacity} LoRA adapters are served, the most this server holds (--max-loras)")
        plan = []
        for layer, (a, b) in adapter.tensors.items():
            full = layer_name(layer, self.layers)
            if full not in self.layers:
                raise InputError(
                    f"adapter {name!r} adapts {full}, which this server does not (adapters are served on the layers "
                    f"inside the blocks that the startup's adapters adapt: {_last_names(self.layers)})"
                )
            wrapped = self.layers[full]
            if a.shape[0] > self.rank:
                raise InputError(
                    f"adapter {name!r} has rank {a.shape[0]}, above this server's {self.rank} (--max-lora-rank)"
                )
            n_in, n_out = layer_shape(wrapped.base_layer)
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise CheckpointError(f"adapter {adapter.source}: {layer!r} does not fit this model (another base?)")
            plan.append((wrapped, a, b, adapter.spec.scaling(layer)))
        slot = free[0]
        for wrapped in self.layers.values():
            wrapped.clear(slot)
        for wrapped, a, b, scaling in plan:
            wrapped.write(slot, a, b, scaling)
        self.names[name], self.sources[name] = slot, adapter.source
        return slot

    def remove(self, name: str) -> None:
        """Stop serving ``name``: its slot free (no request uses it: the engine refuses to unload one in use)."""
        if name not in self.names:
            raise AdapterNotFound(f"no LoRA adapter {name!r} is served here; the served adapters: {list(self.names)}")
        del self.names[name], self.sources[name]  # (its columns are cleared when the slot is taken again)

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
    """A frozen linear layer plus every served adapter's update, each token its own (see module docstring):
    ``rank`` columns per slot, ``slots`` slots, in fp32 whatever the layer's dtype (as trained adapters are)."""

    def __init__(self, base: nn.Module, bank: AdapterBank) -> None:
        super().__init__()
        n_in, n_out = layer_shape(base)
        self.base_layer, self.bank, self.rank = base, bank, bank.rank
        device = base.weight.device
        self.register_buffer("lora_A", torch.zeros(bank.capacity * bank.rank, n_in, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(n_out, bank.capacity * bank.rank, device=device), persistent=False)
        column_slot = torch.arange(1, bank.capacity + 1, device=device).repeat_interleave(bank.rank)
        self.register_buffer("column_slot", column_slot, persistent=False)

    def write(self, slot: int, a: Tensor, b: Tensor, scaling: float) -> None:
        """Slot ``slot``'s columns: A's rows, B's columns times the scaling (a smaller rank padded with zeros)."""
        at, r = (slot - 1) * self.rank, a.shape[0]
        with torch.no_grad():
            self.lora_A[at : at + r] = a.float()
            self.lora_B[:, at : at + r] = b.float() * scaling

    def clear(self, slot: int) -> None:
        at = (slot - 1) * self.rank
        with torch.no_grad():
            self.lora_A[at : at + self.rank] = 0
            self.lora_B[:, at : at + self.rank] = 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        slots = self.bank.current
        xa = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype) @ self.lora_A.t()
        chosen = slots.reshape(-1, 1) == self.column_slot  # [tokens or 1, N*r]
        update = (xa * chosen) @ self.lora_B.t()
        return y + update.view(*y.shape).to(y.dtype)


def _last_names(layers) -> str:
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers)) or "none"


def read_for(model: nn.Module, source) -> Adapter:
    """An adapter folder (or Hub id, or a read ``Adapter``) read and checked against the model's layers."""
    adapter = source if isinstance(source, Adapter) else read_adapter(source)
    modules = dict(model.named_modules())
    for layer in adapter.tensors:
        name, module = model_layer(model, layer, modules)
        if isinstance(module, BankedLoraLinear):  # (a served model: the layer it wraps)
            module = module.base_layer
        if module is None or not is_linear(module):
            raise CheckpointError(f"adapter {adapter.source}: {layer!r} is not a linear layer of this model")
    return adapter


def serve_adapters(
    model: nn.Module,
    adapters: dict[str, str | os.PathLike | Adapter],
    *,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    targets: tuple[str, ...] | None = None,
) -> AdapterBank:
    """Serve ``adapters`` (name -> a PEFT adapter folder, Hub id or read ``Adapter``) from ``model`` (see module
    docstring), with room for ``max_loras`` adapters (default: these) of rank ``max_lora_rank`` at most (default:
    their largest), vLLM's flags: the bank's ``add`` and ``remove`` change the set while it serves. The layers
    wrapped are those the adapters adapt, or with ``targets`` (layer names, PEFT's rule) those inside the blocks
    that they name (for adapters added later); the model then runs on the torch backend. Only layers inside the
    blocks may be adapted (a block's pre-hook selects the adapters). Returns the bank (also
    ``model.adapter_bank``)."""
    from .backends import get_backend
    from .errors import check_int
    from .lora import _matches, lora_layers

    if not isinstance(adapters, dict) or not (adapters or max_loras):
        raise InputError("serve_adapters takes a dict of adapter names and folders, with at least one (or max_loras)")
    if getattr(model, "adapter_bank", None) is not None or lora_layers(model):
        raise InputError("the model already has LoRA adapters (trained or served): load it anew to serve others")
    read = {name: read_for(model, source) for name, source in adapters.items()}
    ranks = [a.shape[0] for adapter in read.values() for a, _ in adapter.tensors.values()]
    capacity = len(read) if max_loras is None else max_loras
    rank = max(ranks, default=DEFAULT_MAX_RANK) if max_lora_rank is None else max_lora_rank
    check_int("max_loras", capacity, max(1, len(read)))
    check_int("max_lora_rank", rank, 1)
    blocks, modules = _blocks(model), dict(model.named_modules())
    inside = {n for n, m in modules.items() if is_linear(m) and any(n.startswith(b + ".") for b in blocks)}
    wanted = set()
    for name, adapter in read.items():  # (all checked before the model changes)
        for layer, (a, b) in adapter.tensors.items():
            full, module = model_layer(model, layer, modules)
            if full not in inside:
                raise InputError(
                    f"adapter {name!r} adapts {full}, outside the model's blocks: a served adapter adapts the blocks' "
                    "layers only (merge it at load instead: --adapter)"
                )
            n_in, n_out = layer_shape(module)
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise CheckpointError(f"adapter {adapter.source}: {layer!r} does not fit this model (another base?)")
            if a.shape[0] > rank:
                raise InputError(f"adapter {name!r} has rank {a.shape[0]}, above max_lora_rank={rank}")
            wanted.add(full)
    if targets is not None:
        wanted |= {n for n in inside if _matches(n, targets)}
    if not wanted:
        raise InputError(f"targets {targets!r} name no layer inside the model's blocks")
    bank = AdapterBank(capacity, rank, model.device)
    for full in sorted(wanted):
        parent, _, child = full.rpartition(".")
        wrapped = BankedLoraLinear(model.get_submodule(full), bank)
        setattr(model.get_submodule(parent), child, wrapped)
        bank.layers[full] = wrapped
    for name, adapter in read.items():
        bank.add(name, adapter)
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
