"""Reading and writing checkpoints: config.json, (sharded) safetensors, torch wrapper state dicts,
tokenizer.json, and the ``builtin:`` models shipped inside the package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError

BUILTIN_DIR = Path(__file__).parent / "builtin"
# Prefixes that training code wraps around the model's own keys (Coconut wrapper, DDP, torch.compile).
_STRIP_PREFIXES = ("base_causallm.", "module.", "_orig_mod.")
# Tensors that published files carry but that are derived, not learned.
_IGNORED_SUFFIXES = ("freqs_cis", ".attn.bias", ".attn.masked_bias")
_IGNORED_KEYS = {"freqs_cis", "embedding.weight"}


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or ``builtin:NAME`` for a model shipped in the package."""
    s = str(path)
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1] or "recurrent"
        folder = BUILTIN_DIR / name
        if not (folder / "config.json").is_file():
            known = (
                sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())
                if BUILTIN_DIR.is_dir()
                else []
            )
            raise CheckpointError(f"no built-in model {name!r}; available: {known}")
        return folder
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder (expected config.json + model.safetensors)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json")
    return folder


def read_config(folder: Path) -> dict:
    try:
        with open(folder / "config.json") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None


def read_generation_config(folder: Path) -> dict:
    p = folder / "generation_config.json"
    if not p.is_file():
        return {}
    with open(p) as f:
        return json.load(f)


def read_training_info(source: str | os.PathLike | None) -> dict:
    """A checkpoint's training.json (how the trainers made it: mode, curriculum, command), or {}."""
    if source is None:
        return {}
    p = resolve(source) / "training.json"
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p} is not valid JSON: {exc}") from None
    return info if isinstance(info, dict) else {}


def read_state_dict(folder: Path, weights: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint, with wrapper prefixes stripped.

    ``weights`` overrides the folder's model.safetensors: a .safetensors file or a ``torch.save``d
    state dict (e.g. Coconut's training checkpoints, keys prefixed ``base_causallm.``).
    """
    if weights is not None:
        wp = Path(weights)
        if not wp.is_file():
            raise CheckpointError(f"weights file {str(wp)!r} does not exist")
        sd = _read_safetensors([wp]) if wp.suffix == ".safetensors" else _read_torch(wp)
    elif (folder / "model.safetensors").is_file():
        sd = _read_safetensors([folder / "model.safetensors"])
    elif (folder / "model.safetensors.index.json").is_file():
        with open(folder / "model.safetensors.index.json") as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise CheckpointError(f"{folder / 'model.safetensors.index.json'} has no 'weight_map'")
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"shard file(s) {missing} named in model.safetensors.index.json are missing")
        sd = _read_safetensors([folder / s for s in shards])
        absent = sorted(set(index["weight_map"]) - set(sd))
        if absent:
            raise CheckpointError(f"tensors {absent[:5]} are listed in the index but not in their shards")
    else:
        raise CheckpointError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json")
    return _strip(sd)


def _read_safetensors(files: list[Path]) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    return sd


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a torch state dict: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_weights(model: nn.Module, sd: dict[str, Tensor], tied: tuple[str, str] | None) -> None:
    """Copy ``sd`` into ``model`` after checking names and shapes; clear errors for any mismatch.

    ``tied`` = (head key, embedding key) when the head shares the embedding: the head key may then be
    absent from the file.
    """
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)}
    if not any(k.startswith("transformer.") for k in sd) and any(("transformer." + k) in expected for k in sd):
        sd = {("transformer." + k if ("transformer." + k) in expected else k): v for k, v in sd.items()}
    if tied is not None:
        head, emb = tied
        sd.pop(head, None)  # a tied head always equals the embedding
        if emb in sd:
            sd[head] = sd[emb]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s): {missing[:8]}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected tensor(s): {unexpected[:8]}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {k!r} has shape {tuple(sd[k].shape)}, the config implies {tuple(t.shape)}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"tensor {k!r} has dtype {sd[k].dtype}, expected floating point")
    model.load_state_dict(sd, strict=True)


def load_tokenizer(folder: Path):
    p = folder / "tokenizer.json"
    if not p.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"cannot read {p}: {exc}") from None


def save_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    tie_key: str | None = None,
) -> Path:
    """Write config.json + model.safetensors (or shards with an index) + tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if v is not None and not k.endswith("_token")}
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if tie_key is not None:
        sd.pop(tie_key, None)
    if max_shard_bytes is None:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        with open(folder / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(str(folder / "tokenizer.json"))
    return folder
