"""Model configs parsed and validated from a published config.json (Huginn/raven or HF GPT-2)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Union

from .errors import ConfigError

# Fields that published config.json files carry but that do not change the computation.
_HF_BOILERPLATE = {
    "name",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
    "tie_word_embeddings",
    "model_type",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_decoder",
    "id2label",
    "label2id",
    "task_specific_params",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "use_return_dict",
}
_RAVEN_IGNORED = {
    "architecture_class_name",
    "block_class_name",
    "norm_class_name",
    "mlp_class_name",
    "nonlin_name",
    "init_strategy",
    "init_orthogonal",
    "sampling_scheme",
    "activation_checkpoint_impl",
    "init_values",
    "test_time_noise",
    "test_time_noise_type",
    "effective_expected_depth",
    "num_hidden_layers",
    "n_layers",
    "head_dim",
    "embed_step",
    "n_embd_init",
    "attn_impl",
    "rope_settings",
    "randomize_embedding",
    "simple_ops",
    "strategy",
    "loss_shape",
    "mod_capacity",
    "state_init_std",
    "local_rank",
}
_GPT2_IGNORED = {
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "add_cross_attention",
    "n_ctx",
    "reorder_and_upcast_attn",
    "gradient_checkpointing",
}


@dataclass(frozen=True)
class RecurrentConfig:
    """Recurrent-depth LM (Huginn-0125, model_type huginn_raven): prelude, looped core block, coda."""

    n_embd: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    block_size: int
    n_layers_in_prelude: int
    n_layers_in_recurrent_block: int
    n_layers_in_coda: int
    mean_recurrence: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    padding_multiple: int = 1
    mean_backprop_depth: int = 8
    norm_eps: float = 1e-6
    rope_base: float = 50000.0
    qk_bias: bool = True
    tie_embeddings: bool = True
    bias: bool = False
    injection_type: str = "linear"
    state_init: str = "like-init"
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    model_type: str = "huginn_raven"

    family = "recurrent"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.padding_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    @property
    def init_std(self) -> float:
        return math.sqrt(2 / (5 * self.n_embd))

    def validate(self) -> None:
        _positive(
            self,
            "n_embd",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "block_size",
            "n_layers_in_recurrent_block",
            "mean_recurrence",
            "padding_multiple",
        )
        _nonnegative(self, "n_layers_in_prelude", "n_layers_in_coda", "mean_backprop_depth")
        if self.n_embd % self.num_attention_heads:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.injection_type != "linear":
            raise ConfigError(f"injection_type={self.injection_type!r} is not supported (only 'linear')")
        if self.state_init not in ("like-init", "zero"):
            raise ConfigError(f"state_init={self.state_init!r} is not supported ('like-init' or 'zero')")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 as saved by HF transformers (model_type gpt2), run as a Coconut continuous-thought LM."""

    n_embd: int
    n_head: int
    n_layer: int
    n_positions: int
    vocab_size: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    latent_token: str = "<|latent|>"
    start_latent_token: str = "<|start-latent|>"
    end_latent_token: str = "<|end-latent|>"
    latent_id: int | None = None
    start_latent_id: int | None = None
    end_latent_id: int | None = None
    model_type: str = "gpt2"

    family = "coconut"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def block_size(self) -> int:
        return self.n_positions

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    def validate(self) -> None:
        _positive(self, "n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ConfigError(f"n_inner must be positive, got {self.n_inner}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in _GPT2_ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported ({sorted(_GPT2_ACTIVATIONS)})"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_GPT2_ACTIVATIONS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu"}
ModelConfig = Union[RecurrentConfig, GPT2Config]

_FAMILIES: dict[str, tuple[type, set[str], dict[str, str], tuple[str, ...]]] = {
    # model_type: (class, ignored fields, aliases, required fields)
    "huginn_raven": (
        RecurrentConfig,
        _RAVEN_IGNORED,
        {"n_heads": "num_attention_heads"},
        (
            "n_embd",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "block_size",
            "n_layers_in_prelude",
            "n_layers_in_recurrent_block",
            "n_layers_in_coda",
            "mean_recurrence",
        ),
    ),
    "gpt2": (GPT2Config, _GPT2_IGNORED, {}, ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")),
}


def parse_config(
    raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "config.json"
) -> ModelConfig:
    """Build a validated config from a config.json dict plus load() overrides.

    Unknown fields in the file are reported with a warning (published files carry many fields that
    do not affect inference); unknown override names are an error, since they are user typos.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source} has no 'model_type' field (expected one of {sorted(_FAMILIES)})")
    if model_type not in _FAMILIES:
        raise ConfigError(f"unknown model_type {model_type!r} in {source}; supported: {sorted(_FAMILIES)}")
    cls, ignored, aliases, required = _FAMILIES[model_type]
    names = {f.name for f in dataclasses.fields(cls)}

    values: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        key = aliases.get(key, key)
        if key in names:
            values[key] = value
        elif key not in ignored and key not in _HF_BOILERPLATE:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config fields {sorted(unknown)}", stacklevel=3)
    for key, value in (overrides or {}).items():
        key = aliases.get(key, key)
        if key not in names or key == "model_type":
            raise ConfigError(
                f"unknown config field {key!r} for model_type {model_type!r}; "
                f"known fields: {sorted(names - {'model_type'})}"
            )
        values[key] = value

    missing = [k for k in required if values.get(k) is None]
    if missing:
        raise ConfigError(f"{source} is missing required field(s) {missing} for model_type {model_type!r}")
    if cls is RecurrentConfig:
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("rope_base") is None:
            values["rope_base"] = 50000.0
    _check_types(cls, values, source)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _check_types(cls: type, values: dict[str, Any], source: str) -> None:
    for f in dataclasses.fields(cls):
        if f.name not in values or values[f.name] is None:
            continue
        v, t = values[f.name], str(f.type)
        if t.startswith("int") and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                values[f.name] = int(v)
                continue
            raise ConfigError(f"{source}: field {f.name!r} must be an integer, got {v!r}")
        if t.startswith("float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{source}: field {f.name!r} must be a number, got {v!r}")
        if t.startswith("bool") and not isinstance(v, bool):
            raise ConfigError(f"{source}: field {f.name!r} must be true or false, got {v!r}")
        if t.startswith("str") and not isinstance(v, str):
            raise ConfigError(f"{source}: field {f.name!r} must be a string, got {v!r}")


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ConfigError(f"config field {n!r} must be positive, got {getattr(cfg, n)}")


def _nonnegative(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ConfigError(f"config field {n!r} must be >= 0, got {getattr(cfg, n)}")


__all__ = ["RecurrentConfig", "GPT2Config", "ModelConfig", "parse_config"]
