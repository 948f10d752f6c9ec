"""Model configs parsed and validated from a published config.json: the machinery every family's config uses.

A family's config is a frozen dataclass deriving from ``ModelConfig`` (see models/recurrent.py and
models/coconut.py) that names its required fields, the published fields it ignores, its aliases and its
own validation. ``latentrt.families.parse_config`` picks the class by config.json's ``model_type``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .caller import warn_at_caller
from .errors import ConfigError, as_float

# Fields that published config.json files carry but that do not change the computation.
HF_BOILERPLATE = frozenset(
    {
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
)


class ModelConfig:
    """Mixin of every family's config dataclass. Subclasses set the class variables below, implement
    ``validate``, and provide (as fields or properties) what the generic code reads: ``block_size`` (the
    context), ``padded_vocab_size`` (rows of the embedding and the head), ``tied_head`` (lm_head shares
    the token embedding), ``eos_token_id``, ``n_embd``, and ``weight_bytes(element_size)`` (what a load
    allocates, checked before allocating)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()  # fields config.json must have
    IGNORED: ClassVar[frozenset[str]] = frozenset()  # published fields that do not affect inference
    ALIASES: ClassVar[dict[str, str]] = {}  # published name -> field name
    CONTEXT_FIELD: ClassVar[str] = "block_size"  # how config.json names the context (messages quote it)

    def context(self) -> str:
        """The context as config.json names it, for messages: ``block_size=512``, ``n_positions=1024``."""
        return f"{self.CONTEXT_FIELD}={self.block_size}"

    model_type: str

    @classmethod
    def from_raw(
        cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "config.json"
    ) -> ModelConfig:
        """Build a validated config from a config.json dict plus load() overrides.

        Unknown fields in the file are reported with a warning (published files carry many fields that
        do not affect inference); unknown override names are an error, since they are user typos."""
        model_type = raw["model_type"]
        cls.check_ignored(raw, source)
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in raw.items():
            key = cls.ALIASES.get(key, key)
            if key in names:
                values[key] = value
            elif key not in cls.IGNORED and key not in HF_BOILERPLATE:
                unknown.append(key)
        if unknown:
            warn_at_caller(f"{source}: ignoring unknown config fields {sorted(unknown)}")
        for key, value in (overrides or {}).items():
            key = cls.ALIASES.get(key, key)
            if key not in names or key == "model_type":
                raise ConfigError(
                    f"unknown config field {key!r} for model_type {model_type!r}; "
                    f"known fields: {sorted(names - {'model_type'})}"
                )
            values[key] = value
        missing = [k for k in cls.REQUIRED if values.get(k) is None]
        if missing:
            raise ConfigError(f"{source} is missing required field(s) {missing} for model_type {model_type!r}")
        values = cls.fill_defaults(values)
        check_types(cls, values, source)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def check_ignored(cls, raw: dict[str, Any], source: str) -> None:
        """Refuse an ignored published field whose value would change the published computation (ignoring it
        would be a silent wrong answer); nothing here."""

    @classmethod
    def fill_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Defaults that depend on other fields (a published null meaning "same as ..."); identity here."""
        return values

    def validate(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file_dict(self) -> dict[str, Any]:
        """The fields a saved config.json holds, under their published names where they have one (ALIASES
        inverted: Huginn's ``n_heads``), so the published code reads the folder as latentrt does."""
        published = {field: name for name, field in self.ALIASES.items()}
        return {published.get(k, k): v for k, v in self.to_dict().items()}


def eos_ids(eos) -> list[int]:
    """An ``eos_token_id`` as config.json and generation_config.json hold it (one id, a list of them, or None)
    as a list of ids."""
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Each given field has its annotated type (an integral float is accepted as an int)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], str(f.type)
        if v is None:  # null: only where the field may be None (a bool's null is false, as HF reads it)
            kind = {"int": "an integer", "float": "a number", "str": "a string"}.get(t.split(" ")[0])
            if kind is not None and "None" not in t:
                raise ConfigError(f"{source}: field {f.name!r} must be {kind}, got null")
            continue
        if t.startswith("int") and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                values[f.name] = int(v)
                continue
            raise ConfigError(f"{source}: field {f.name!r} must be an integer, got {v!r}")
        if t.startswith("float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{source}: field {f.name!r} must be a number, got {v!r}")
        if t.startswith("float") and isinstance(v, int):  # (as a float: an int past its range is infinite, which
            values[f.name] = as_float(v)  # the family's checks refuse, where torch could not take it: tools.fuzz)
        if t.startswith("bool") and not isinstance(v, bool):
            raise ConfigError(f"{source}: field {f.name!r} must be true or false, got {v!r}")
        if t.startswith("str") and not isinstance(v, str):
            raise ConfigError(f"{source}: field {f.name!r} must be a string, got {v!r}")


def require_positive(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ConfigError(f"config field {n!r} must be positive, got {getattr(cfg, n)}")


def require_nonnegative(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ConfigError(f"config field {n!r} must be >= 0, got {getattr(cfg, n)}")


__all__ = ["ModelConfig", "check_types", "require_positive", "require_nonnegative"]
