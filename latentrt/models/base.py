"""What every model has, whatever its family: config, device, dtype, tokenizer, backend, a KV cache.

A family's model derives from ``LatentModel`` and implements the abstract parts: its cache layout (how
many plain and looped layers hold K/V), its public ``logits``, and, where it needs them, the hooks for
loading (``bind_tokenizer``) and initialisation (``init_depth``). Generic code (loader, engine, CLI,
benchmarks) talks to models only through this surface and the family's decoder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..checkpoint import save_pretrained
from ..errors import InputError
from ..kv_modes import KVMode


@dataclass(frozen=True)
class CacheLayout:
    """The K/V a model keeps per position: ``plain`` layers one entry each, ``looped`` layers one entry per
    KV-mode slot (the recurrent core block; 0 for a plain transformer)."""

    plain: int
    looped: int
    kv_heads: int
    head_dim: int

    def bytes_per_position(self, slots: int, element_size: int) -> int:
        """K and V bytes one position of one sequence occupies."""
        return (self.plain + self.looped * slots) * self.kv_heads * self.head_dim * 2 * element_size


class LatentModel(nn.Module):
    """Base class of every family's model (see module docstring)."""

    family: ClassVar[str]  # short name users read ("recurrent", "coconut"): set by the family's model
    # backend="auto": the backends to try in order, each with the measurement that put it there
    AUTO_BACKENDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    # latentrt.lora.add_lora's default targets: the blocks' linear layers, by their last names (PEFT's rule)
    LORA_TARGETS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = None
        self.backend = None
        self.eos_token_id = config.eos_token_id  # an id, a list of ids (generation_config.json), or None
        self.generation_defaults: dict = {}  # generate() option defaults (generation_config.json; options.py)
        self.source: str | None = None  # what load() was given (a folder, builtin:NAME, a Hub id)
        self.folder = None  # the checkpoint folder it was read from (a Path), if any
        self.file_config: dict | None = None  # that folder's config.json as read (save_pretrained keeps its fields)
        self.weights_file: str | None = None  # load(weights=): the file its weights came from instead of the folder's
        self.adapter: str | None = None  # load(adapter=): the LoRA adapter merged into its weights
        self.adapter_folder = None  # that adapter's folder (its chat_template.jinja, if any, is the model's)
        self.lora = None  # the unmerged adapters' LoraSpec (latentrt.lora.add_lora), else None
        self.adapter_bank = None  # the adapters it serves side by side (latentrt.lora_serving), else None

    # ---------------------------------------------------------------- what every model has
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def cache_layout(self) -> CacheLayout:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, kv_mode: KVMode | None = None) -> KVCache:
        """A cache for ``batch`` sequences of up to ``max_len`` positions; ``kv_mode`` sets the slots of the
        looped layers (default: one slot, i.e. shared)."""
        layout = self.cache_layout()
        return KVCache(
            batch,
            max_len,
            layout.plain,
            layout.kv_heads,
            layout.head_dim,
            n_core=layout.looped,
            kv_mode=kv_mode,
            dtype=self.dtype,
            device=self.device,
        )

    def init_buffers(self) -> None:
        """(Re)compute derived, non-persistent buffers on the model's device (e.g. RoPE tables)."""

    def read_file_buffers(self, state_dict: dict) -> None:
        """Take the buffers the published model reads from its checkpoint file although they could be derived
        (Huginn's ``freqs_cis``: the published model uses the file's values, as stored) from a loaded state
        dict (tensors or ``checkpoint.StoredTensor``); before ``init_buffers``. None here."""

    FILE_BUFFERS: ClassVar[tuple[str, ...]] = ()  # the names ``file_buffers`` writes (a resume leaves them out)

    def file_buffers(self) -> dict[str, Tensor]:
        """The buffers a checkpoint of this model carries for the published code to load it (their published
        names); none here."""
        return {}

    def reserve_positions(self, n: int) -> None:
        """Make position-indexed tables (RoPE) cover positions [0, n) before a call that reaches them."""

    def default_steps(self) -> int:
        """Latent iterations per token when generate() is not told (1 for a model that does not loop)."""
        return 1

    def describe(self) -> list[str]:
        """Family-specific lines for ``latentrt info``."""
        return []

    @torch.no_grad()
    def logits(self, input_ids: Tensor, **kwargs) -> Tensor:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        """Calling the model as a module (transformers' ``model(input_ids)``) is not how latentrt runs it: the
        error names what does (a family's layers are modules; the whole model is run by its entry points)."""
        raise InputError(
            f"a {type(self).__name__} is not called as a module: model.logits(input_ids, ...) gives the logits "
            "(inference, no gradients), latentrt.generate(model, prompt) generates, and latentrt.train's "
            "train_recurrent / train_coconut train it"
        )

    # ---------------------------------------------------------------- weights
    HEAD_KEY: ClassVar[str] = "lm_head.weight"
    EMBEDDING_KEY: ClassVar[str] = "transformer.wte.weight"

    def tied_keys(self) -> tuple[str, str] | None:
        """(head key, embedding key) when the head shares the embedding (the file may omit the head)."""
        return (self.HEAD_KEY, self.EMBEDDING_KEY) if self.config.tied_head else None

    def tie_weights(self) -> None:
        keys = self.tied_keys()
        if keys is not None:
            head, emb = (self.get_submodule(k.rsplit(".", 1)[0]) for k in keys)
            head.weight = emb.weight

    def save_pretrained(
        self, folder: str | os.PathLike, *, max_shard_size: int | str | None = None, overwrite: bool = False
    ) -> Path:
        """Write the model as a checkpoint folder that ``latentrt.load`` reads back to the same numbers
        (transformers' name): config.json (load-time overrides included), safetensors in the weights' dtype
        (one file, or shards of at most ``max_shard_size``: bytes or "5GB" / "2GiB"), tokenizer.json, and
        the loaded folder's chat template, generation defaults and training.json. The folder is replaced
        whole and atomically (a crash leaves the previous or the new one complete); a folder holding other
        files than a checkpoint's is refused unless ``overwrite=True``. Returns the folder."""
        return save_pretrained(self, folder, max_shard_size=max_shard_size, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs):
        """transformers' name: ``save_pretrained``'s folder uploaded as one commit to the Hub model repository
        ``repo_id`` (created if missing); keywords ``private``, ``token``, ``revision``, ``commit_message``,
        ``create_pr``, ``max_shard_size`` (latentrt/hub.py). Returns huggingface_hub's ``CommitInfo``."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def bind_checkpoint(cls, config, tokenizer, state_dict: dict):
        """(config, tokenizer) completed from what the checkpoint holds (e.g. special-token ids, an embedding
        grown by training); unchanged here."""
        return config, tokenizer

    def init_depth(self) -> int:
        """Layers a token passes through (scales the output projections' init)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Small-normal weights (std sqrt(2/(5d)); output projections scaled down by sqrt(2 x depth), as in
        the papers' inits), unit norms, zero biases."""
        d = self.config.n_embd
        std = math.sqrt(2 / (5 * d))
        out_std = std / math.sqrt(2 * max(self.init_depth(), 1))
        for name, p in self.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif name.endswith("bias") or name.endswith("qk_bias"):
                p.zero_()
            else:
                p.normal_(0.0, out_std if name.endswith("proj.weight") else std, generator=generator)
