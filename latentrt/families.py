"""THE registry of model families: config.json's ``model_type`` -> (config, model, decoder).

Everything family-specific lives in the family's own files: its config and reference model
(``latentrt/models/<family>.py``), its decoder (``latentrt/decode/<family>.py``: the generate()
options it accepts, prefill and the per-token computation) and, to be served, its serving program
(``latentrt/decode/<family>_serving.py``: many requests at different depths in one launch). Generic code
(loader, engine, CLI, server) looks the family up here and never branches on it. Adding a family = its
config, its model, its decoder (and serving program), and one line in ``FAMILIES`` (or one ``register``
call, e.g. from a test or a plugin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode.coconut import CoconutDecoder
from .decode.coconut_serving import CoconutServing
from .decode.recurrent import RecurrentDecoder
from .decode.recurrent_serving import RecurrentServing
from .errors import ConfigError, InputError, is_choice, not_a_model, plain_scalar
from .models.coconut import CoconutGPT2, GPT2Config
from .models.recurrent import RecurrentConfig, RecurrentDepthLM
from .options import GenerateOptions


@dataclass(frozen=True)
class Family:
    config: type  # a ModelConfig dataclass (latentrt/config.py)
    model: type  # a LatentModel (latentrt/models/base.py)
    decoder: type  # a Decoder (latentrt/decode/base.py)
    serving: type | None = None  # a ServingProgram (latentrt/decode/serving.py); None: not servable
    # the weights' dtype the published code trains and evaluates the family in on a GPU, which ``latentrt train``
    # and ``latentrt eval`` load in there unless --dtype; None: load's default (bf16, Huginn's own precision)
    published_dtype: str | None = None

    @property
    def title(self) -> str:
        """How messages name the family's models."""
        return self.decoder.TITLE


FAMILIES: dict[str, Family] = {
    "huginn_raven": Family(RecurrentConfig, RecurrentDepthLM, RecurrentDecoder, RecurrentServing),
    # Coconut's run.py trains and evaluates GPT-2 in fp32 (its configs' bf16: False)
    "gpt2": Family(GPT2Config, CoconutGPT2, CoconutDecoder, CoconutServing, published_dtype="float32"),
}


def register(model_type: str, family: Family) -> None:
    """Add (or replace) a family at run time."""
    FAMILIES[model_type] = family


def unregister(model_type: str) -> None:
    FAMILIES.pop(model_type, None)


def family_of(model_type, source: str = "config.json") -> Family:
    """The family of a config.json ``model_type``; a ConfigError naming the supported ones otherwise."""
    if model_type is None:
        raise ConfigError(f"{source} has no 'model_type' field (expected one of {sorted(FAMILIES)})")
    if not is_choice(model_type, FAMILIES):
        raise ConfigError(f"unknown model_type {model_type!r} in {source}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_for(model) -> Family:
    """The family of a loaded model; an InputError for anything that is not one."""
    cfg = getattr(model, "config", None)
    family = FAMILIES.get(getattr(cfg, "model_type", None))
    if family is None or not isinstance(model, family.model):
        raise not_a_model(model)
    return family


def parse_config(raw, overrides: dict | None = None, source: str = "config.json"):
    """The validated config of the family named by ``raw['model_type']`` (a config.json dict), with load()
    overrides applied."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    if overrides:  # a sweep's numpy scalars as the numbers they hold
        overrides = {name: plain_scalar(value) for name, value in overrides.items()}
    return family_of(raw.get("model_type"), source).config.from_raw(raw, overrides, source)


def check_applicable(family: Family, options: GenerateOptions) -> None:
    """Options some family's decoder takes (``OPTIONS``) but this family's does not are errors when set,
    naming the families they apply to."""
    family_options = set().union(*(f.decoder.OPTIONS for f in FAMILIES.values()))
    inapplicable = sorted(n for n in family_options - family.decoder.OPTIONS if options.is_set(n))
    if inapplicable:
        others = sorted({f.title for f in FAMILIES.values() if set(inapplicable) <= f.decoder.OPTIONS})
        verb, pronoun = ("does", "it applies") if len(inapplicable) == 1 else ("do", "they apply")
        where = f"; {pronoun} to {' / '.join(others)} models" if others else ""
        raise InputError(f"{', '.join(inapplicable)} {verb} not apply to this {family.title} model{where}")


def decodings() -> list[str]:
    """Every ``decoding`` some family offers: sequential, then the families' samplers (their ``SAMPLERS``)."""
    return ["sequential", *sorted({name for f in FAMILIES.values() for name in f.decoder.SAMPLERS})]


def build_model(cfg, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A freshly initialised model of ``cfg``'s family, allocated directly on ``device`` in ``dtype`` (see
    ``LatentModel.init_weights``), with the torch backend. Deterministic for a (seed, device) pair."""
    from .backends import get_backend
    from .memory import check_fits

    device = torch.device(device)
    check_fits(cfg.weight_bytes(dtype.itemsize), device, "the weights", ConfigError)
    with torch.device("meta"):
        model = family_of(cfg.model_type).model(cfg)
    model.to(dtype)  # still on meta: the weights are allocated once, in ``dtype`` (fp32 first doubled the peak)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(torch.Generator(device).manual_seed(seed))
    model.init_buffers()
    model.backend = get_backend("torch", model)
    return model
