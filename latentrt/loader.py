"""``latentrt.load``: config.json -> model family -> weights -> tokenizer -> backend."""

from __future__ import annotations

import os

import torch

from . import lora
from .backends import get_backend
from .caller import warn_at_caller
from .checkpoint import load_tokenizer, load_weights, read_config, read_generation_config, read_state_dict, resolve
from .config import eos_ids
from .errors import ConfigError, InputError
from .families import family_of, parse_config
from .memory import check_fits
from .models.base import LatentModel
from .options import generation_defaults

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def merged_overrides(hf_overrides: dict | None, overrides: dict) -> dict:
    """``load()``'s config overrides: its keywords and vLLM's ``hf_overrides`` dict, one set."""
    if hf_overrides is None:
        return overrides
    if not isinstance(hf_overrides, dict) or not all(isinstance(k, str) for k in hf_overrides):
        raise ConfigError(f"hf_overrides must be a dict of config.json fields, got {hf_overrides!r}")
    both = sorted(set(hf_overrides) & set(overrides))
    if both:
        raise ConfigError(f"config field(s) {both} given both in hf_overrides and as load() keywords")
    return {**hf_overrides, **overrides}


# transformers' from_pretrained keywords that are no config field: what load() does with each (the Huginn card's
# `from_pretrained(..., torch_dtype=torch.bfloat16, trust_remote_code=True)` carried over as it is)
IGNORED_TRANSFORMERS_KEYWORDS = {
    "trust_remote_code": "latentrt never runs code from a checkpoint: it implements the model itself",
    "low_cpu_mem_usage": "latentrt always allocates each weight once, in its dtype",
    "attn_implementation": "each latentrt backend has its own attention (backend=...)",
}


def transformers_keywords(dtype, overrides: dict) -> tuple:
    """(dtype, overrides) with transformers' ``from_pretrained`` keywords taken out: ``torch_dtype`` is ``dtype``
    (transformers' older name), those that change nothing here are named in a warning, ``device_map`` is an error
    naming ``device=`` (it spreads a model over devices; latentrt loads onto one)."""
    overrides = dict(overrides)
    if "torch_dtype" in overrides:
        if dtype is not None:
            raise ConfigError("torch_dtype (transformers' name for dtype) and dtype both given: give one")
        dtype = overrides.pop("torch_dtype")
    if "device_map" in overrides:
        raise ConfigError(
            f"device_map={overrides['device_map']!r} is transformers' (it spreads a model over devices); "
            "latentrt.load puts the model on one device: device='cuda', 'cuda:1' or 'cpu'"
        )
    ignored = sorted(set(overrides) & set(IGNORED_TRANSFORMERS_KEYWORDS))
    for name in ignored:
        overrides.pop(name)
    if ignored:
        why = "; ".join(f"{name}: {IGNORED_TRANSFORMERS_KEYWORDS[name]}" for name in ignored)
        warn_at_caller(f"latentrt.load ignores transformers' {', '.join(ignored)} ({why})", UserWarning)
    return dtype, overrides


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    weights: str | os.PathLike | None = None,
    backend: str = "auto",
    revision: str | None = None,
    hf_overrides: dict | None = None,
    adapter: str | os.PathLike | None = None,
    **overrides,
) -> LatentModel:
    """Load a checkpoint: a local folder, ``builtin:NAME``, or a Hugging Face Hub id (``owner/name``, at ``revision``;
    through the hub's cache, offline with HF_HUB_OFFLINE=1). The family is read from config.json's model_type.

    device: default torch's default device where one was set (``torch.set_default_device``), else CUDA when
    available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU (torch's default dtype is not read). weights: a
    .safetensors or torch state-dict file to use instead of the folder's weights (e.g. a Coconut training checkpoint
    on top of a GPT-2 folder or Hub id). overrides: config fields to replace (e.g. mean_recurrence=16, or Coconut
    marker ids latent_id=...); unknown names are an error. adapter: a LoRA adapter folder in PEFT's layout (or a Hub
    id) merged into the weights (latentrt/lora.py); a ``path`` that is such a folder loads its base model (its
    ``base_model_name_or_path``) with it, as transformers does with PEFT installed. hf_overrides: the same as a
    dict, as vLLM's ``LLM(hf_overrides=...)`` and the CLI's ``--hf-overrides`` take them (a field given both ways is
    an error). transformers' ``from_pretrained`` keywords: ``torch_dtype`` is ``dtype``; ``trust_remote_code``,
    ``low_cpu_mem_usage`` and ``attn_implementation`` change nothing (a warning says why); ``device_map`` is an
    error naming ``device``.
    """
    dtype, overrides = transformers_keywords(dtype, overrides)
    overrides = merged_overrides(hf_overrides, overrides)
    path, adapter = lora.base_and_adapter(path, adapter)
    lora_adapter = None if adapter is None else lora.read_adapter(adapter)
    folder, file_config, cfg, family = _read_model_config(path, revision, overrides)
    gen_cfg = read_generation_config(folder)
    state_dict = read_state_dict(folder, weights)
    cfg, tokenizer = family.model.bind_checkpoint(cfg, load_tokenizer(folder), state_dict)
    eos = gen_cfg.get("eos_token_id", cfg.eos_token_id)
    _warn_eos_outside_vocabulary(
        eos, cfg.vocab_size, folder / ("generation_config.json" if "eos_token_id" in gen_cfg else "config.json")
    )
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    check_fits(cfg.weight_bytes(dtype.itemsize), device, f"the weights of {path} ({dtype})", ConfigError)

    with torch.device("meta"):
        model = family.model(cfg)
    model.to(dtype)  # on the meta device: the weights are allocated once, in their dtype (no fp32 copy first)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, state_dict, model.tied_keys())
    if lora_adapter is not None:
        lora.merge_adapter(model, lora_adapter)
        model.adapter, model.adapter_folder = str(adapter), lora_adapter.folder
    model.read_file_buffers(state_dict)
    model.init_buffers()
    model.eval()
    model.tokenizer = tokenizer
    model.eos_token_id = eos
    model.generation_defaults = generation_defaults(gen_cfg, str(folder / "generation_config.json"))
    model.source, model.folder = str(path), folder
    model.file_config = file_config  # (its fields latentrt does not model: a save keeps them)
    model.weights_file = None if weights is None else str(weights)
    model.backend = get_backend(backend, model)
    return model


def _warn_eos_outside_vocabulary(eos, vocab_size: int, source) -> None:
    """An eos id the model cannot produce ends no sequence (HF's generate loads such configs too, e.g. a tiny
    GPT-2 keeping GPT2Config's default 50256): said once at load; the default stops leave it out."""
    outside = [i for i in eos_ids(eos) if not 0 <= i < vocab_size]
    if outside:
        warn_at_caller(
            f"{source}: eos_token_id {outside[0] if len(outside) == 1 else outside} is not in the vocabulary "
            f"(ids 0 to {vocab_size - 1}): no generated token can be it, so it ends no sequence",
            UserWarning,
        )


def read_model_config(path: str | os.PathLike, revision: str | None = None, **overrides):
    """What ``load`` reads before any weight: the checkpoint folder, its parsed config and its family (the
    errors ``load`` would give about them, without reading the weights)."""
    folder, _, cfg, family = _read_model_config(path, revision, overrides)
    return folder, cfg, family


def _read_model_config(path, revision, overrides: dict):
    """``read_model_config`` and the config.json it parsed, as read (a save keeps its other fields)."""
    if revision is not None and not isinstance(revision, str):  # (a Hub id's branch, tag or commit)
        raise InputError(f"revision must be a branch, tag or commit name (a str), got {revision!r}")
    folder = resolve(path, revision)
    raw = read_config(folder)
    cfg = parse_config(raw, overrides, source=str(folder / "config.json"))
    return folder, raw, cfg, family_of(cfg.model_type)


def parse_device(device) -> torch.device:
    """A usable torch device: None is torch's default device where one was set (``torch.set_default_device``
    or a ``with torch.device(...)`` block, as HF's ``from_pretrained`` reads it), else CUDA when available,
    else the CPU; a clear error otherwise."""
    if device is None:
        default = torch.get_default_device()
        if default.type == "meta":
            raise InputError(
                "torch's default device is 'meta' (torch.set_default_device or a `with torch.device(...)` block): "
                "a loaded model needs its weights; pass device='cpu' or 'cuda', or load outside that block"
            )
        if default.type == "cpu":  # not set (torch's own default): CUDA where there is one
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return parse_device(str(default))
        except InputError as exc:
            raise InputError(f"{exc}: it is torch's default device (torch.set_default_device)") from None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # (ValueError: an index past 64 bits)
        raise InputError(f"device {device!r} is not a device torch knows ({str(exc).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available on this machine (use device='cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r}: latentrt runs on 'cpu' and 'cuda' devices")
    return dev


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    """A supported torch dtype from its name or itself; None: bf16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} (or its torch.dtype)")
