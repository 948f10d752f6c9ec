"""Low-rank adapters (LoRA, arXiv 2106.09685) on a latentrt model, in PEFT's file layout.

Fine-tuning: ``add_lora(model, rank, alpha, targets)`` freezes the model and wraps each target linear layer in a
``LoraLinear``: ``W x + s * B A dropout(x)``, with ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), A
drawn as PEFT draws it and B zero, so the wrapped model starts equal to the model. Only the torch backend runs
wrapped layers (the fused backends read the weights themselves). Inference: ``merge_lora`` folds ``s B A`` into
each weight (summed in fp32, rounded once to the weight's dtype) and unwraps, so every backend runs the adapted
model as it runs any other.

Files: ``save_adapter`` and ``read_adapter`` use PEFT's layout (adapter_config.json, adapter_model.safetensors
with keys ``base_model.model.<layer>.lora_A.weight``). latentrt's layer names are the published models' (Huginn's
``transformer.core_block.0.attn.Wqkv``, GPT-2's ``transformer.h.0.attn.c_attn``), so an adapter trained here
loads in PEFT on the published model, and one trained with PEFT loads here (``latentrt.load(model,
adapter=...)``). PEFT features that change what an adapter computes beyond that (DoRA, trained biases, extra
trained modules...) are refused by name rather than ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import CheckpointError, InputError, check_bool, check_finite, check_float, check_int, os_errors_as
from .models.coconut import Conv1D

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: its PeftModel wrapping the transformers model
_LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: ``rank`` and ``alpha`` (``scaling``), the layers it wraps (``targets``: layer names or
    their last parts, as PEFT's ``target_modules`` list; a str is a regular expression the whole name matches;
    None: the family's ``LORA_TARGETS``), ``dropout`` on a wrapped layer's input while training, ``rslora``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    rslora: bool = False
    # per layer (PEFT's rank_pattern / alpha_pattern): a pattern -> rank or alpha, for adapters read from files
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_int("rank", self.rank, 1)
        check_finite("alpha", self.alpha)
        check_float("dropout", self.dropout, 0, 1)
        if self.dropout == 1:
            raise InputError("dropout must be below 1 (1 drops every input: the adapter would never train)")
        check_bool("rslora", self.rslora)
        if self.targets is not None and not isinstance(self.targets, str):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise InputError(f"targets must be layer names (non-empty strs) or one pattern, got {self.targets!r}")
        for name, patterns, check in (
            ("rank_pattern", self.rank_pattern, lambda k, v: check_int(f"rank_pattern[{k!r}]", v, 1)),
            ("alpha_pattern", self.alpha_pattern, lambda k, v: check_finite(f"alpha_pattern[{k!r}]", v)),
        ):
            for key, value in patterns.items():
                _pattern(name, key if isinstance(key, str) else repr(key))
                check(key, value)
        if isinstance(self.targets, str):
            _pattern("targets", self.targets)

    def scaling(self, layer: str) -> float:
        """``alpha / rank`` for ``layer`` (the patterns' values where one matches, PEFT's rule)."""
        rank = _by_pattern(self.rank_pattern, layer, self.rank)
        alpha = _by_pattern(self.alpha_pattern, layer, self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _pattern(name: str, pattern: str) -> None:
    """InputError unless ``pattern`` is a regular expression Python reads."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{name}: {pattern!r} is not a regular expression ({exc})") from None


def _by_pattern(patterns: dict, layer: str, default):
    """PEFT's per-layer lookup: the first pattern that ends ``layer`` at a name boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", layer):
            return value
    return default


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's ``target_modules`` rule: a str is a regular expression for the whole name; a list's entries
    match a name they equal or end (after a dot)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, Conv1D)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features): nn.Linear stores its weight [out, in], GPT-2's Conv1D [in, out]."""
    rows, cols = layer.weight.shape
    return (rows, cols) if isinstance(layer, Conv1D) else (cols, rows)


def target_layers(model: nn.Module, targets: tuple[str, ...] | str | None = None) -> dict[str, nn.Module]:
    """The linear layers ``targets`` names (see ``LoraSpec``), by name; an error for a name that is not a
    linear layer, for the head when it is the token embedding, and when nothing matches."""
    targets = type(model).LORA_TARGETS if targets is None else targets
    tied = model.tied_keys() if hasattr(model, "tied_keys") else None
    found = {}
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, LoraLinear):
            raise InputError(f"{name} already has a LoRA adapter (merge_lora(model) first to add another)")
        if not is_linear(module):
            raise InputError(
                f"LoRA target {name} ({type(module).__name__}) is not a linear layer: adapters wrap linear layers "
                f"only (this model's: {_linear_names(model)})"
            )
        if tied is not None and f"{name}.weight" in tied:
            raise InputError(f"LoRA target {name} is tied to the token embedding: adapters wrap untied layers only")
        found[name] = module
    if not found:
        raise InputError(
            f"LoRA targets {targets!r} match no layer of the model (its linear layers: {_linear_names(model)})"
        )
    return found


def _linear_names(model: nn.Module) -> str:
    """The last parts of the model's linear layers' names, each once: what ``targets`` usually lists."""
    names = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear(m))
    return ", ".join(names)


class LoraLinear(nn.Module):
    """A frozen linear layer plus its low-rank update (see module docstring). Submodule names are PEFT's
    (``base_layer``, ``lora_A``, ``lora_B``), so the adapter's state-dict keys are PEFT's file keys. The
    adapter's weights are fp32 whatever the layer's dtype (PEFT's default too): a bf16 update of a small rank
    would round away most of a step."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        n_in, n_out = layer_shape(base)
        self.base_layer = base
        device = base.weight.device
        self.lora_A = nn.Linear(n_in, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, n_out, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # (PEFT's init_lora_weights=True)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        drop = self.dropout if self.training and torch.is_grad_enabled() else 0.0  # (inference never drops)
        update = self.lora_B(self.lora_A(F.dropout(x.to(self.lora_A.weight.dtype), drop))) * self.scaling
        return y + update.to(y.dtype)

    def delta(self) -> Tensor:
        """``s B A`` in fp32, laid out as the wrapped layer's weight."""
        return _delta(self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling)


def _delta(layer: nn.Module, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``scaling B A`` in fp32, laid out as ``layer``'s weight (GPT-2's Conv1D: transposed)."""
    d = (b.float() @ a.float()) * scaling
    return d.t() if isinstance(layer, Conv1D) else d


def _fold(layer: nn.Module, a: Tensor, b: Tensor, scaling: float) -> None:
    """``layer``'s weight += ``scaling B A``, summed in fp32 and rounded once to the weight's dtype."""
    w = layer.weight
    with torch.no_grad():
        w.copy_((w.float() + _delta(layer, a, b, scaling).to(w.device)).to(w.dtype))


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's wrapped layers by name (empty when it has no unmerged adapter)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | list[str] | str | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """Freeze ``model`` and wrap its ``targets`` (default: the family's ``LORA_TARGETS``, every linear layer of
    its blocks) in ``LoraLinear`` adapters of ``rank``: the trainers then train the adapters only, and their
    checkpoints are the adapter (``save_adapter``'s files). ``seed``: draws A from its own generator (default:
    torch's). The model runs on the torch backend until ``merge_lora``. Returns the model."""
    if lora_layers(model):
        raise InputError("the model already has LoRA adapters: merge_lora(model) first to add others")
    if getattr(model, "adapter_bank", None) is not None:
        raise InputError("the model already has LoRA adapters (served ones): load it anew to train others")
    spec = LoraSpec(rank, alpha, tuple(targets) if isinstance(targets, list) else targets, dropout, rslora)
    spec.validate()
    layers = target_layers(model, spec.targets)
    if seed is not None:
        check_int("seed", seed, 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)
    for name, layer in layers.items():
        wrapped = LoraLinear(layer, rank, spec.scaling(name), dropout)
        if generator is not None:  # drawn on the CPU, then moved: the same numbers on every device
            a = torch.empty_like(wrapped.lora_A.weight, device="cpu")
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5))'s bound
            wrapped.lora_A.weight.data.copy_(a.uniform_(-bound, bound, generator=generator))
        _replace(model, name, wrapped)
    targets = type(model).LORA_TARGETS if spec.targets is None else spec.targets
    model.lora = LoraSpec(rank, alpha, targets, dropout, rslora)
    _use_torch_backend(model)
    return model


def _use_torch_backend(model: nn.Module) -> None:
    """Wrapped layers run where modules run: the torch backend (the one chosen before returns at merge)."""
    from .backends import get_backend

    backend = getattr(model, "backend", None)
    if backend is not None:
        model.backend_before_lora = backend.requested
        model.backend = get_backend("auto", model)  # (the torch backend, saying why)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (fp32 sum, one rounding) and unwrap it; the model's
    parameters keep their requires_grad. The backend chosen before ``add_lora`` is chosen again (anew: a fused
    backend may hold copies of the weights). Returns the model."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("the model has no LoRA adapter to merge")
    for name, wrapped in layers.items():
        _fold(wrapped.base_layer, wrapped.lora_A.weight, wrapped.lora_B.weight, wrapped.scaling)
        _replace(model, name, wrapped.base_layer)
    model.lora = None
    before = model.__dict__.pop("backend_before_lora", None)
    if before is not None:
        from .backends import get_backend

        model.backend = get_backend(before, model)
    return model


# ---------------------------------------------------------------- files (PEFT's layout)


def adapter_config(model: nn.Module) -> dict:
    """adapter_config.json for the model's adapters, as PEFT writes it (the fields PEFT reads for LoRA)."""
    spec: LoraSpec = model.lora
    conv = any(isinstance(m.base_layer, Conv1D) for m in lora_layers(model).values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name(model),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": spec.targets if isinstance(spec.targets, str) else list(spec.targets),
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "fan_in_fan_out": conv,  # (GPT-2's Conv1D layers store their weight [in, out])
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def base_model_name(model: nn.Module) -> str | None:
    """What ``load`` reads the model's weights from again: its built-in name or Hub id, or its folder as an
    absolute path (the adapter may be read from elsewhere); None when its weights are not a loadable model's
    (read from another file, or with an adapter merged in), and the base must then be given."""
    source, folder = getattr(model, "source", None), getattr(model, "folder", None)
    if source is None or getattr(model, "weights_file", None) or getattr(model, "adapter", None):
        return None
    if source.startswith("builtin:") or folder is None or not Path(source).exists():
        return source
    return str(Path(folder).resolve())


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights under PEFT's file keys, on the CPU."""
    out = {}
    for name, wrapped in lora_layers(model).items():
        for part in ("A", "B"):
            weight = getattr(wrapped, f"lora_{part}").weight
            out[f"{PEFT_PREFIX}{name}.lora_{part}.weight"] = weight.detach().contiguous().cpu()
    return out


def write_adapter_files(model: nn.Module, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing folder (``metadata``: the safetensors
    header's, e.g. a trainer's step)."""
    if not lora_layers(model):
        raise InputError("the model has no LoRA adapter to save (latentrt.lora.add_lora adds them)")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model), indent=2))
    save_file(adapter_tensors(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", **(metadata or {})})


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """The model's adapters as a PEFT adapter folder (see module docstring); the folder is replaced whole,
    atomically. ``latentrt.load(folder)`` loads the base model it names with the adapter merged."""
    from .checkpoint import replaced_folder

    with replaced_folder(folder) as tmp:
        write_adapter_files(model, tmp)
    return Path(folder)


# PEFT LoraConfig fields that change what an adapter computes and that latentrt does not implement: their
# value when unused (an adapter giving another is refused, by name)
_UNUSED = {
    "use_dora": False,
    "modules_to_save": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "megatron_config": None,
}


@dataclass(frozen=True)
class Adapter:
    """An adapter read from its folder: its spec and its tensors under the model's layer names ({layer: (A, B)})."""

    source: str
    folder: Path
    spec: LoraSpec
    tensors: dict[str, tuple[Tensor, Tensor]]
    base_model: str | None = None


def adapter_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local adapter folder or a Hub id's snapshot (through the hub's cache, as models are)."""
    s = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(s, str) or not s.strip():
        raise InputError(f"an adapter is a folder path or a Hub id (owner/name), got {path!r}")
    folder = Path(s)
    with os_errors_as(CheckpointError, f"adapter folder {s!r}"):
        exists = folder.exists()
    if not exists:
        from .hub import is_hub_id, resolve_hub

        if not is_hub_id(s):
            raise CheckpointError(f"adapter folder {s!r} does not exist (and it is not a Hub id, owner/name)")
        folder = resolve_hub(s, revision)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{s!r} has no {ADAPTER_CONFIG}: not a LoRA adapter folder (PEFT's layout)")
    return folder


def read_adapter(path: str | os.PathLike, revision: str | None = None) -> Adapter:
    """Read and check a PEFT LoRA adapter folder (or Hub id): its config and its tensors, without a model."""
    from .checkpoint import read_json

    folder = adapter_folder(path, revision)
    config_path = folder / ADAPTER_CONFIG
    config = read_json(config_path, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r}; latentrt reads LoRA adapters")
    for key, unused in _UNUSED.items():
        if config.get(key, unused) not in (unused, [], {}, False):
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} is a PEFT feature latentrt does not run")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{config_path}: bias={config['bias']!r} (trained biases) is not supported; only 'none'")
    try:
        spec = LoraSpec(
            rank=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            targets=config.get("target_modules") if isinstance(config.get("target_modules"), str) else None,
            rslora=config.get("use_rslora", False),
            rank_pattern=_object(config, "rank_pattern"),
            alpha_pattern=_object(config, "alpha_pattern"),
        )
        spec.validate()
    except (InputError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = (
            "adapter_model.bin (a pickle: latentrt reads safetensors only)"
            if (folder / "adapter_model.bin").is_file()
            else "none"
        )
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS} (weights found: {found})")
    try:
        flat = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from None
    return Adapter(str(path), folder, spec, _pairs(flat, weights), config.get("base_model_name_or_path"))


def _object(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise InputError(f"{key} must be an object (pattern -> value), got {value!r}")
    return value


def _pairs(flat: dict[str, Tensor], source: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (A, B)} from PEFT's file keys; any other key (an embedding's adapter, a trained bias) is an error."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in flat.items():
        m = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if m is None or not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{source}: tensor {key!r} is not a LoRA A or B weight of a linear layer")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise CheckpointError(f"{source}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, not a float matrix")
        parts.setdefault(m["layer"], {})[m["part"]] = tensor
    pairs = {}
    for layer, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{source}: layer {layer!r} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{source}: layer {layer!r}'s lora_A has rank {a.shape[0]}, lora_B {b.shape[1]}")
        pairs[layer] = (a, b)
    if not pairs:
        raise CheckpointError(f"{source} holds no LoRA weights")
    return pairs


def model_layer(model: nn.Module, layer: str, modules: dict | None = None) -> tuple[str, nn.Module | None]:
    """The model's layer a file key names, and its name (``modules``: the model's by name, given to look up many
    layers; default: ``model.named_modules()``)."""
    modules = dict(model.named_modules()) if modules is None else modules
    name = layer_name(layer, modules)
    return name, modules.get(name)


def layer_name(layer: str, names) -> str:
    """The name among ``names`` of a file's layer: PEFT on transformers' GPT2Model (the base model class) leaves out
    the ``transformer.`` prefix latentrt's names have, as a weights file may."""
    return "transformer." + layer if layer not in names and "transformer." + layer in names else layer


def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Fold a read adapter into the model's weights (``merge_lora``'s arithmetic); every layer it names must be
    one of the model's untied linear layers of the right shape, checked before any weight changes."""
    tied = model.tied_keys() if hasattr(model, "tied_keys") else None
    modules = dict(model.named_modules())
    plan = []
    for layer, (a, b) in adapter.tensors.items():
        name, module = model_layer(model, layer, modules)
        if module is None or not is_linear(module):
            what = "no layer" if module is None else f"not a linear layer ({type(module).__name__})"
            raise CheckpointError(f"adapter {adapter.source}: {layer!r} is {what} of this model (another base model?)")
        if tied is not None and f"{name}.weight" in tied:
            raise CheckpointError(f"adapter {adapter.source}: {layer!r} is tied to the token embedding")
        n_in, n_out = layer_shape(module)
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise CheckpointError(
                f"adapter {adapter.source}: {layer!r} is {n_in} -> {n_out} here, the adapter's "
                f"{a.shape[1]} -> {b.shape[0]} (another base model?)"
            )
        plan.append((module, a, b, adapter.spec.scaling(layer)))  # (PEFT's patterns name its own layers)
    for module, a, b, scaling in plan:
        _fold(module, a, b, scaling)


def load_adapter_weights(model: nn.Module, adapter: Adapter) -> None:
    """Copy a read adapter into the model's unmerged ``LoraLinear`` layers (a resumed fine-tune): the layers
    and shapes must be those the model has."""
    layers = lora_layers(model)
    names = {layer_name(layer, layers): ab for layer, ab in adapter.tensors.items()}
    if set(names) != set(layers):
        missing, extra = sorted(set(layers) - set(names)), sorted(set(names) - set(layers))
        raise CheckpointError(
            f"adapter {adapter.source} wraps other layers than this model's adapters ("
            + "; ".join(p for p in (missing and f"missing {missing[:3]}", extra and f"extra {extra[:3]}") if p)
            + "): resume with the LoRA options the run was saved with"
        )
    for name, (a, b) in names.items():
        wrapped = layers[name]
        if a.shape != wrapped.lora_A.weight.shape or b.shape != wrapped.lora_B.weight.shape:
            raise CheckpointError(
                f"adapter {adapter.source}: {name!r} has rank {a.shape[0]}, this model's adapter "
                f"{wrapped.lora_A.weight.shape[0]}: resume with the LoRA options the run was saved with"
            )
    with torch.no_grad():
        for name, (a, b) in names.items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)


def base_and_adapter(path, adapter):
    """``load``'s model and adapter: a local folder that holds an adapter but no config.json stands for the
    model its adapter_config.json names (``base_model_name_or_path``) with that adapter."""
    from .checkpoint import read_json

    s = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if s is None:
        return path, adapter
    folder = Path(s)
    try:
        only_adapter = (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").exists()
    except OSError:  # (load's own checks name the problem)
        return path, adapter
    if not only_adapter:
        return path, adapter
    if adapter is not None:
        raise InputError(f"{s!r} is a LoRA adapter folder, and adapter={adapter!r} another: give the base model")
    config = read_json(folder / ADAPTER_CONFIG, CheckpointError)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise CheckpointError(
            f"{s!r} is a LoRA adapter folder whose {ADAPTER_CONFIG} names no base model (base_model_name_or_path): "
            f"load the base model with adapter={s!r} (latentrt CLI: MODEL --adapter {s})"
        )
    return base, s
