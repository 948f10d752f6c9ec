"""Reading and writing checkpoints: config.json, (sharded) safetensors, torch wrapper state dicts,
tokenizer.json, and the ``builtin:`` models shipped inside the package."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .caller import warn_at_caller
from .errors import CheckpointError, ConfigError, InputError, json_loads, os_errors_as

BUILTIN_DIR = Path(__file__).parent / "builtin"
# Prefixes that training code wraps around the model's own keys (Coconut wrapper, DDP, torch.compile).
_STRIP_PREFIXES = ("base_causallm.", "module.", "_orig_mod.")
# Tensors that published files carry but that are derived, not learned.
_IGNORED_SUFFIXES = ("freqs_cis", ".attn.bias", ".attn.masked_bias")
_IGNORED_KEYS = {"freqs_cis", "embedding.weight"}


def builtin_names() -> list[str]:
    """The models shipped in the package (``builtin:NAME``)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())


def resolve(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder, ``builtin:NAME`` for a model shipped in the package, or a Hugging Face Hub
    id (``owner/name``, optionally at ``revision``) resolved through the hub's cache (latentrt/hub.py)."""
    s = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(s, str) or not s.strip():  # None, a number, bytes, "" (read as '.')
        raise CheckpointError(f"a model is a folder path, builtin:NAME or a Hub id (owner/name), got {path!r}")
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        if name not in builtin_names():  # exact names only: no paths out of the built-in folder
            raise CheckpointError(f"no built-in model {name!r}; the built-in models are {builtin_names()}")
        _revision_unused(revision, f"{s!r} is a built-in model")
        return BUILTIN_DIR / name
    folder = Path(path)
    with os_errors_as(CheckpointError, f"checkpoint folder {s!r}"):
        exists = folder.exists()
    if not exists:
        from .hub import is_hub_id, resolve_hub

        if is_hub_id(s):
            return resolve_hub(s, revision)
        partial = folder.parent / f".{folder.name}.previous"
        hint = f"; an interrupted save left {str(partial)!r}" if partial.exists() else ""
        raise CheckpointError(
            f"checkpoint folder {str(folder)!r} does not exist (and {s!r} is not a Hub id, owner/name){hint}"
        )
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder (expected config.json + model.safetensors)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json")
    _revision_unused(revision, f"{s!r} is a local folder")
    return folder


def _revision_unused(revision: str | None, what: str) -> None:
    """A revision names a Hub commit, branch or tag: given with a local or built-in model it cannot apply, and
    the files read are not what was asked for (HF and vLLM ignore it silently)."""
    if revision is not None:
        warn_at_caller(f"revision={revision!r} applies to Hub ids; {what}, read as it is")


def read_json(path: Path, error: type[Exception]) -> object:
    """A JSON file's content; ``error`` names the file when it is not UTF-8 JSON."""
    try:
        return json_loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def read_config(folder: Path) -> dict:
    return read_json(folder / "config.json", ConfigError)


def read_generation_config(folder: Path) -> dict:
    """generation_config.json (an object), or {}; ``eos_token_id`` normalised to a list of ids."""
    p = folder / "generation_config.json"
    if not p.is_file():
        return {}
    raw = read_json(p, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a JSON object, got {type(raw).__name__}")
    eos = raw.get("eos_token_id")
    if eos is not None:
        ids = [eos] if not isinstance(eos, list) else eos
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"{p}: eos_token_id must be a token id or a list of them, got {eos!r}")
        raw = dict(raw, eos_token_id=ids)
    return raw


def read_training_info(folder: str | os.PathLike | None) -> dict:
    """A checkpoint folder's training.json (how the trainers made it: mode, curriculum, command), or {}."""
    path = None if folder is None else Path(folder) / "training.json"
    if path is None or not path.is_file():
        return {}
    info = read_json(path, CheckpointError)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(info).__name__}")
    return info


# safetensors' dtype names (a file's header) -> torch's, so an error names a dtype alike in either format
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class StoredTensor:
    """A tensor of a safetensors file, read when ``read`` is called; its shape and dtype are known before
    (from the header). The loader copies one tensor at a time into the model, so a checkpoint never sits
    whole in host memory beside the model it fills."""

    def __init__(self, handle, path: Path, key: str) -> None:
        view = handle.get_slice(key)
        self.shape, self._dtype = tuple(view.get_shape()), view.get_dtype()
        self._handle, self._path, self._key = handle, path, key

    def is_floating_point(self) -> bool:
        return self._dtype.startswith(("F", "BF"))  # F16 / BF16 / F32 / F64 / F8_*

    @property
    def dtype(self) -> torch.dtype | str:
        """torch's dtype of the header's name (the name itself where torch has none)."""
        return getattr(torch, _SAFETENSORS_DTYPES.get(self._dtype, ""), self._dtype)

    def read(self) -> Tensor:
        try:
            return self._handle.get_tensor(self._key)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {self._key!r} from {self._path}: {exc}") from None


def read_state_dict(folder: Path, weights: str | os.PathLike | None = None) -> dict[str, Tensor | StoredTensor]:
    """All tensors of a checkpoint, with wrapper prefixes stripped: safetensors files' as ``StoredTensor``
    (read one at a time by ``load_weights``), a torch state dict's as tensors.

    ``weights`` overrides the folder's model.safetensors: a .safetensors file or a ``torch.save``d
    state dict (e.g. Coconut's training checkpoints, keys prefixed ``base_causallm.``).
    """
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise InputError(f"weights must be a file's path (a str or os.PathLike), got {type(weights).__name__}")
        wp = Path(weights)
        with os_errors_as(CheckpointError, f"weights file {str(wp)!r}"):
            found = wp.is_file()
        if not found:
            raise CheckpointError(f"weights file {str(wp)!r} does not exist")
        sd = _read_safetensors([wp]) if wp.suffix == ".safetensors" else _read_torch(wp)
    elif (folder / "model.safetensors").is_file():
        sd = _read_safetensors([folder / "model.safetensors"])
    elif (folder / "model.safetensors.index.json").is_file():
        index_path = folder / "model.safetensors.index.json"
        index = read_json(index_path, CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name -> shard file)")
        for shard in weight_map.values():  # (before sorting them: a number or a list among them cannot be)
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index_path} names shard {shard!r}: shards must be files in the folder")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"shard file(s) {missing} named in model.safetensors.index.json are missing")
        sd = _read_safetensors([folder / s for s in shards])
        absent = sorted(set(weight_map) - set(sd))
        if absent:
            raise CheckpointError(f"tensors {absent[:5]} are listed in the index but not in their shards")
    else:
        torch_files = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (
            f"; it holds {torch_files[:3]}: a single torch state dict loads as weights='{folder / torch_files[0]}' "
            "(read with torch.load(weights_only=True): no code runs)"
            if torch_files
            else ""
        )
        raise CheckpointError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json{hint}")
    return _strip(sd)


def _read_safetensors(files: list[Path]) -> dict[str, StoredTensor]:
    """The files' tensors, not read yet (their headers are: a corrupt or truncated file fails here)."""
    sd: dict[str, StoredTensor] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")  # (open while a StoredTensor refers to it)
            for k in handle.keys():
                sd[k] = StoredTensor(handle, path, k)
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    return sd


def load_plain_torch(path: Path, what: str) -> object:
    """A ``torch.save`` file of tensors and plain data, read with ``weights_only=True`` (code in the file never
    runs); otherwise CheckpointError saying it cannot be read as ``what``, with the unpickler's reason in one
    line (torch's own message suggests ``weights_only=False``, which would run the file's code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as {what}: {_unpickling_reason(str(exc)) or type(exc).__name__} (torch files are "
            "read with weights_only=True: tensors and plain data only, so no code in them runs)"
        ) from None


_TORCH_ADVICE = ("Weights only load failed", "Check the documentation")  # torch.load's paragraphs around the reason


def _unpickling_reason(text: str) -> str:
    """torch.load's reason for refusing a file, in one line, without the paragraphs around it (which advise
    ``weights_only=False`` or allow-listing the file's globals: running its code)."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.split("WeightsUnpickler error:")[-1].split(" Please use `torch.serialization")[0]
        paragraph = " ".join(paragraph.split())
        if paragraph and not paragraph.startswith(_TORCH_ADVICE):
            kept.append(paragraph)
    return " ".join(kept)[:300]


def _read_torch(path: Path) -> dict[str, Tensor]:
    obj = load_plain_torch(path, "a torch state dict")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        while k.startswith(_STRIP_PREFIXES):  # in any order: torch.compile of a DDP model is _orig_mod.module.
            k = k[len(next(p for p in _STRIP_PREFIXES if k.startswith(p))) :]
        out[k] = v
    return out


def tensor_mismatch(expected: dict, found: dict) -> tuple[list[str], list[str], list[str]]:
    """The names of a state dict's tensors that ``found`` lacks, that it has beyond ``expected``, and that it
    holds in another shape (each in its dict's order; all empty when it fits)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, misshaped


def load_weights(model: nn.Module, sd: dict[str, Tensor | StoredTensor], tied: tuple[str, str] | None) -> None:
    """Copy ``sd`` into ``model`` after checking names and shapes; clear errors for any mismatch. Stored
    tensors are read and copied one at a time (converted to the model's dtype and device as they go).

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
    missing, unexpected, misshaped = tensor_mismatch(expected, sd)
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s): {missing[:8]}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected tensor(s): {unexpected[:8]}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    if misshaped:
        k = misshaped[0]
        raise CheckpointError(
            f"tensor {k!r} has shape {tuple(sd[k].shape)}, the config implies {tuple(expected[k].shape)}"
        )
    for k in expected:
        if not sd[k].is_floating_point():
            raise CheckpointError(f"tensor {k!r} has dtype {sd[k].dtype}, expected floating point")
    with torch.no_grad():
        for k, t in expected.items():  # (the state dict's tensors share the parameters' storage)
            t.copy_(sd[k].read() if isinstance(sd[k], StoredTensor) else sd[k])


def load_tokenizer(folder: Path):
    p = folder / "tokenizer.json"
    if not p.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"cannot read {p}: {exc}") from None


# ------------------------------------------------------------------------------------------ writing
class SimulatedCrash(BaseException):
    """Raised at a save step named in ``CRASH_AT`` (tests: the folder is left as a kill there would leave it)."""


CRASH_AT: str | None = None  # tests only: the save step at which to "crash"


def _step(name: str) -> None:
    if CRASH_AT == name:
        raise SimulatedCrash(name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(folder: Path) -> tuple[Path, Path]:
    """(where a save writes, where the previous folder waits until the new one is in place)."""
    return folder.parent / f".{folder.name}.partial", folder.parent / f".{folder.name}.previous"


def recover_folder(folder: str | os.PathLike) -> None:
    """Finish what an interrupted save left: the previous complete folder comes back if the new one never
    took its place; a half-written new folder and a leftover previous one are removed."""
    folder = Path(folder)
    partial, previous = _siblings(folder)
    if previous.exists():
        if folder.exists():
            shutil.rmtree(previous)
        else:
            os.rename(previous, folder)
    if partial.exists():
        shutil.rmtree(partial)


@contextmanager
def replaced_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a folder's new contents into a sibling temporary folder; once everything is written and synced
    to disk, swap it in whole (the previous folder stays complete until the new one is in place). A crash
    at any point leaves either the previous or the new folder complete (``recover_folder`` tidies up)."""
    folder = Path(folder)
    with os_errors_as(CheckpointError, f"checkpoint folder {str(folder)!r}"):
        a_file = folder.exists() and not folder.is_dir()
    if a_file:
        raise CheckpointError(f"{str(folder)!r} is a file, not a checkpoint folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    partial, previous = _siblings(folder)
    partial.mkdir()
    _step("begin")
    yield partial  # no cleanup on error: an exception leaves what a kill would, for recover_folder
    _step("written")
    for f in partial.iterdir():
        _fsync(f)
    _fsync(partial)
    _step("synced")
    if folder.exists():
        os.rename(folder, previous)
        _step("previous-moved")
    os.rename(partial, folder)
    _fsync(folder.parent)
    _step("new-moved")
    if previous.exists():
        shutil.rmtree(previous)
    _step("done")


# files of the folder a model was loaded from that a checkpoint of it keeps (the tokenizer's chat template and
# special tokens, the generation defaults); training.json is not one (a trainer writes its own)
COMPANION_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")


def config_file_dict(model: nn.Module) -> dict:
    """config.json as a save writes it: the model's config under its published names, over the fields of the
    file it was loaded from (``model.file_config``) that latentrt does not model (transformers' ``architectures``
    and ``auto_map``, a published config's own fields), as transformers' save keeps them; a field that file
    spelled another way (an alias: Huginn's ``n_heads`` / ``num_attention_heads``) keeps that file's spelling,
    and its dtype field says the saved weights' dtype."""
    source = getattr(model, "file_config", None) or {}
    aliases = type(model.config).ALIASES  # published name -> field

    def field(key: str) -> str:
        return aliases.get(key, key)

    out = dict(source)
    for key, value in model.config.to_file_dict().items():
        spelled = [k for k in out if field(k) == field(key)]
        if value is None and not spelled or key.endswith("_token"):
            continue  # (a field without a value is left out unless the file had it)
        for k in spelled:
            del out[k]
        out[spelled[0] if spelled else key] = value
    for key in ("torch_dtype", "dtype"):  # (transformers' name for the weights' dtype, before and since 4.56)
        if key in source:
            out[key] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return out


def tied_head_key(model: nn.Module) -> str | None:
    """The head's key a checkpoint leaves out when the head is the token embedding (tied: the file may omit
    it, as the published ones do), else None."""
    keys = model.tied_keys() if hasattr(model, "tied_keys") else None
    return keys[0] if keys else None


def write_checkpoint_files(
    model: nn.Module,
    folder: Path,
    *,
    max_shard_bytes: int | None = None,
    tie_key: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """config.json + model.safetensors (or shards with an index) + tokenizer.json into an existing folder, and
    the ``COMPANION_FILES`` of the folder the model was loaded from that ``folder`` does not have yet;
    ``metadata`` goes into every safetensors header (e.g. the trainer's step)."""
    if getattr(model, "lora", None) is not None or getattr(model, "adapter_bank", None) is not None:  # (wrapped)
        raise InputError(
            "the model has LoRA adapters not merged: latentrt.lora.save_adapter(model, folder) writes the adapter, "
            "or latentrt.lora.merge_lora(model) first to write the whole model"
        )
    (folder / "config.json").write_text(json.dumps(config_file_dict(model), indent=2))
    _step("config-written")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if tie_key is not None:
        sd.pop(tie_key, None)
    file_buffers = getattr(model, "file_buffers", None)  # what the published code reads from the file too
    if file_buffers is not None:
        sd.update(file_buffers())
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:  # (all within one shard: one file, no index, as transformers writes it)
        save_file(sd, str(folder / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    _step("weights-written")
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(str(folder / "tokenizer.json"))
    adapter = getattr(model, "adapter_folder", None)  # a merged LoRA fine-tune's own chat template, if it has one
    if adapter is not None and (Path(adapter) / "chat_template.jinja").is_file():
        shutil.copyfile(Path(adapter) / "chat_template.jinja", folder / "chat_template.jinja")
    source = getattr(model, "folder", None)
    for name in COMPANION_FILES:  # as save_pretrained keeps them: the chat template, the generation defaults
        if source is not None and (Path(source) / name).is_file() and not (folder / name).exists():
            shutil.copyfile(Path(source) / name, folder / name)


def save_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    tie_key: str | None = None,
) -> Path:
    """Write config.json + model.safetensors (or shards with an index) + tokenizer.json, replacing the
    folder's contents as a whole (``replaced_folder``: a crash never leaves a half-written folder)."""
    with replaced_folder(folder) as tmp:
        write_checkpoint_files(model, tmp, max_shard_bytes=max_shard_bytes, tie_key=tie_key)
    return Path(folder)


# the files a checkpoint folder consists of (what ``write_checkpoint_files`` and the trainers write): a folder of
# these only is one ``save_pretrained`` may replace without ``overwrite=True``
_CHECKPOINT_FILE = re.compile(
    r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors|tokenizer\.json"
    r"|training\.json|trainer_state\.pt|" + "|".join(re.escape(name) for name in COMPANION_FILES)
)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def shard_bytes(max_shard_size: int | str | None) -> int | None:
    """transformers' ``max_shard_size``: bytes as an int, or a string such as "5GB" (10^9) or "2GiB" (2^30)."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise InputError(f"max_shard_size must be bytes (an int) or a size such as '5GB', got {max_shard_size!r}")
    if isinstance(max_shard_size, int):
        size = max_shard_size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", max_shard_size.upper())
        if m is None:
            raise InputError(f"max_shard_size {max_shard_size!r} is not a size such as '500MB', '5GB' or '2GiB'")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size < 1:
        raise InputError(f"max_shard_size must be at least 1 byte, got {max_shard_size!r}")
    return size


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """``LatentModel.save_pretrained``: the model as a checkpoint folder ``load`` reads back to the same
    numbers (config.json with any load-time overrides, the weights in their dtype, tokenizer.json, and the
    source folder's chat template, generation defaults and training.json). The folder is replaced whole and
    atomically, so one holding anything but checkpoint files is refused unless ``overwrite``."""
    limit = shard_bytes(max_shard_size)
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder).strip():
        raise InputError(f"save_pretrained takes a folder path, got {folder!r}")
    path = Path(folder)
    with os_errors_as(CheckpointError, f"checkpoint folder {str(path)!r}"):
        others = (
            sorted(
                f.name + ("/" if f.is_dir() else "") for f in path.iterdir() if not _CHECKPOINT_FILE.fullmatch(f.name)
            )
            if path.is_dir()
            else []
        )
    if others and not overwrite:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise CheckpointError(
            f"{str(path)!r} holds files that are not a checkpoint's ({listed}); save_pretrained replaces the "
            "folder whole: choose another folder, or pass overwrite=True to replace it with everything in it"
        )
    with replaced_folder(path) as tmp:
        write_checkpoint_files(model, tmp, max_shard_bytes=limit, tie_key=tied_head_key(model))
        source = getattr(model, "folder", None)
        trained = None if source is None else Path(source) / "training.json"
        # how the folder's weights were trained (a Coconut model's prompt format and thought count); not for
        # weights read from another file (load(weights=...)), which it does not describe
        if trained is not None and trained.is_file() and getattr(model, "weights_file", None) is None:
            shutil.copyfile(trained, tmp / "training.json")
    return path


def read_weights_metadata(folder: str | os.PathLike, name: str = "model") -> dict[str, str]:
    """The safetensors header metadata of a folder's (first) weights file, ``name``.safetensors or its shards
    (``name``: e.g. "adapter_model", a LoRA adapter's)."""
    folder = Path(folder)
    single = folder / f"{name}.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob(f"{name}-*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(folder)!r} has no {single.name}")
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"cannot read {files[0]}: {exc}") from None
