"""Training checkpoints: written atomically, read without running code, resumed only as a matching pair.

A checkpoint is the published layout latentrt.load reads (config.json, model.safetensors, tokenizer.json)
plus ``trainer_state.pt`` (optimizer state, step, RNG states, options: tensors and plain data only, so it
loads with ``torch.load(weights_only=True)``) and ``training.json`` (how it was made: the command, the
world size). A LoRA run's checkpoint (latentrt/lora.py) holds its adapter instead of the model, in PEFT's
layout (adapter_config.json, adapter_model.safetensors): ``latentrt.load`` reads the folder as its base model
with the adapter merged. The whole folder is replaced at once (latentrt.checkpoint.replaced_folder): a crash at any
point leaves the previous or the new checkpoint complete, never a mix. The step is recorded in the
weights' metadata and in the trainer state; a pair that disagrees is refused.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import (
    load_plain_torch,
    read_weights_metadata,
    recover_folder,
    replaced_folder,
    tensor_mismatch,
    tied_head_key,
    write_checkpoint_files,
)
from ..errors import CheckpointError, InputError, os_errors_as
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter_weights, read_adapter, write_adapter_files

STATE_FILE = "trainer_state.pt"


def check_output_folder(out: str | None, resume: str | None, overwrite: bool) -> None:
    """Before training: ``out`` may be new, empty, the folder being resumed, or replaced with ``overwrite``;
    a file, another run's checkpoint or a place that cannot be written is an error now rather than after
    training (a save writes a sibling folder, then renames it: its parent must take a new folder)."""
    if out is None:
        return
    path = Path(out)
    with os_errors_as(InputError, f"out={out!r}"):
        a_file = path.exists() and not path.is_dir()
    if a_file:
        raise InputError(f"out={out!r} is a file, not a folder for checkpoints")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=path.parent))
    except OSError as exc:
        raise InputError(
            f"out={out!r} cannot be written: a save writes beside it, in {str(path.parent)!r} ({exc.strerror})"
        ) from None
    resuming_here = resume is not None and path.exists() and Path(resume).resolve() == path.resolve()
    if path.is_dir() and any(path.iterdir()) and not (resuming_here or overwrite):
        raise InputError(
            f"out={out!r} already holds files (a previous run's checkpoint?): resume from it, choose a new "
            "folder, or pass overwrite=True (latentrt train: --overwrite) to replace it"
        )


def rng_state() -> dict:
    """torch / Python / NumPy (and CUDA) RNG states as tensors and plain data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
    }
    state["numpy"].update(has_gauss=int(has_gauss), cached=float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: str | Path,
    step: int,
    opts,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """The checkpoint of ``step`` (see module docstring), replacing ``folder`` as a whole; ``files``: more
    text files to write in it (name -> text), e.g. the chat template the run trained with."""
    from . import distributed

    state = {
        "format": 1,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "options": asdict(opts),
        "extra": extra or {},
        "rng": rng_state(),
    }
    info = {
        "step": step,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "world_size": distributed.world_size(),
        "torchrun": "LOCAL_RANK" in os.environ,
        "options": asdict(opts),
        **(extra or {}),
    }
    with replaced_folder(folder) as tmp:
        if getattr(model, "lora", None) is not None:  # a LoRA run's checkpoint is its adapter (PEFT's files)
            write_adapter_files(model, tmp, metadata={"step": str(step)})
        else:
            write_checkpoint_files(model, tmp, tie_key=tied_head_key(model), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        (tmp / "training.json").write_text(json.dumps(info, indent=1, default=str))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def _weights_mismatch(own: dict, saved: dict) -> str:
    """How a checkpoint's tensors differ from a model's, in a line ("" when they fit)."""
    missing, unexpected, misshaped = tensor_mismatch(own, saved)
    parts = [f"{len(missing)} of the model's tensors missing, e.g. {missing[0]!r}"] if missing else []
    parts += [f"{len(unexpected)} tensors it does not have, e.g. {unexpected[0]!r}"] if unexpected else []
    if misshaped:
        k = misshaped[0]
        shapes = f"{list(saved[k].shape)} saved, {list(own[k].shape)} here"
        parts.append(f"{len(misshaped)} of another shape, e.g. {k!r}: {shapes}")
    return "; ".join(parts)


def load_training(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Resume from a checkpoint written by save_training: the model's weights, the optimizer and RNG states.
    Returns the trainer state (``step``, ``extra``...). Refuses files that are not plain data (unpickling
    them could run code) and weights and trainer state from different saves."""
    folder = Path(folder)
    recover_folder(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {STATE_FILE}: not a training checkpoint to resume from")
    state = load_plain_torch(path, "a plain trainer state")
    if not isinstance(state, dict) or state.get("format") != 1 or "step" not in state:
        raise CheckpointError(f"{path} is not a latentrt trainer state")
    lora = getattr(model, "lora", None) is not None
    if lora != (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"{folder} holds "
            + ("a whole model, and this run trains LoRA adapters" if lora else "a LoRA adapter, and this run does not")
            + ": resume with the options the run was saved with (latentrt train: --lora-rank)"
        )
    saved = read_weights_metadata(folder, Path(ADAPTER_WEIGHTS).stem if lora else "model").get("step")
    if saved != str(state["step"]):
        raise CheckpointError(
            f"{folder}: the weights (step {saved}) and {STATE_FILE} (step {state['step']}) come from different "
            "saves; refusing to resume from a mismatched pair"
        )
    if lora:
        load_adapter_weights(model, read_adapter(folder))
    else:
        _load_model_weights(folder, model)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            saved = state.get("options", {}) if isinstance(state.get("options"), dict) else {}
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this run's optimizer ({exc}); it was saved with "
                f"decay_everything={saved.get('decay_everything')!r} (latentrt train: the recipe), which decides "
                "the parameter groups: resume with the options the run was saved with"
            ) from None
    set_rng_state(state["rng"])
    return state


def _load_model_weights(folder: Path, model: nn.Module) -> None:
    """A whole-model checkpoint's weights into ``model``, refused unless they are the same model's."""
    weights = load_file(str(folder / "model.safetensors"))
    for name in getattr(model, "FILE_BUFFERS", ()):  # (for the published code's loader: freqs_cis)
        weights.pop(name, None)
    keys = model.tied_keys() if hasattr(model, "tied_keys") else None
    if keys is not None and keys[0] not in weights:
        weights[keys[0]] = weights[keys[1]]
    mismatch = _weights_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointError(
            f"{folder} holds another model's weights ({mismatch}): resume with the model the run started from"
        )
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
