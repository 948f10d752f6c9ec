"""Samplers that commit more than one token per pass (``generate(decoding=...)``).

Sequential decoding (the default) is the engine's token loop: one unit per generated token. A *sampler*
replaces that loop's source of tokens for one prompt: it runs the family decoder's primitives (units of
any length at fixed depth, the cache's rollback) in its own order and hands the engine a stream of
``Proposal``s, committed tokens in order; the engine stops, streams and assembles the result as for
sequential decoding. A family lists the samplers it offers in its decoder's ``SAMPLERS`` (one line per
sampler; each sampler is its own file with its options and their published defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..errors import InputError


@dataclass
class Proposal:
    """One committed token: its id, the latent iterations spent on the state that produced it, its
    logits (fp32 [V], for ``return_logits``; None where none exist) and non-finite flags (1 state, 2 logits)."""

    token: int
    steps: int
    logits: Tensor | None = None
    nonfinite: int = 0


@dataclass(frozen=True)
class SamplerOptions:
    """Base of a sampler's options: fields with their published defaults, checked by ``check``.

    ``PUBLISHED_NAMES``: a published keyword latentrt names otherwise -> that name (given the published one,
    the error says it). ``NOT_IMPLEMENTED``: published keywords no field implements -> (the value that is
    what latentrt does, why another is refused): given that value they are accepted, any other is an error
    naming them."""

    PUBLISHED_NAMES: ClassVar[dict[str, str]] = {"cache_lookup_strategy": "generate()'s kv_sharing"}
    NOT_IMPLEMENTED: ClassVar[dict[str, tuple[Any, str]]] = {}

    def check(self) -> None:
        """Raise InputError naming a bad field."""

    @classmethod
    def parse(cls, given: Any) -> SamplerOptions:
        """``decoding_options`` (None, a dict or this class) as this class, validated."""
        if given is None:
            opts = cls()
        elif isinstance(given, cls):
            opts = given
        elif isinstance(given, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            given = cls._published_keywords(given)
            unknown = sorted(set(given) - names)
            if unknown:
                raise InputError(f"unknown decoding_options {unknown}; this sampler takes {sorted(names)}")
            opts = cls(**given)
        else:
            raise InputError(f"decoding_options must be a dict, got {type(given).__name__}")
        opts.check()
        return opts

    @classmethod
    def _published_keywords(cls, given: dict) -> dict:
        """``given`` less the published keywords set to what latentrt does; an InputError for a published
        name of a field or a published keyword set to what latentrt does not implement."""
        renamed = sorted(set(given) & set(cls.PUBLISHED_NAMES))
        if renamed:
            name = renamed[0]
            raise InputError(f"decoding_options {name!r} (the published keyword) is {cls.PUBLISHED_NAMES[name]} here")
        kept = dict(given)
        for name in sorted(set(given) & set(cls.NOT_IMPLEMENTED)):
            value, why = cls.NOT_IMPLEMENTED[name]
            if type(given[name]) is not type(value) or given[name] != value:
                raise InputError(
                    f"decoding_options {name}={given[name]!r} is a published option latentrt does not implement "
                    f"(only {name}={value!r}, what latentrt does): {why}"
                )
            del kept[name]
        return kept


class Sampler:
    """Base class: ``tokens`` yields the committed tokens of one prompt (see module docstring)."""

    NAME: ClassVar[str]
    Options: ClassVar[type[SamplerOptions]] = SamplerOptions

    def __init__(self, decoder, options: SamplerOptions) -> None:
        self.decoder, self.options = decoder, options
        self.stats: dict = {}  # what the sampler reports in GenerationResult.decoding

    REFUSES: ClassVar[dict[str, str]] = {}  # generate() flags this sampler cannot honour -> why

    @classmethod
    def check(cls, generate_options) -> None:
        """Options of generate() this sampler cannot honour (``REFUSES``, set to True): InputError."""
        for name, why in cls.REFUSES.items():
            if getattr(generate_options, name):
                raise InputError(f"decoding={cls.NAME!r} does not take {name}=True: {why}")

    def kv_sharing(self, generate_options):
        """The KV mode the sampler runs (default: the call's ``kv_sharing``)."""
        return generate_options.kv_sharing

    @property
    def kv_depth(self) -> int | None:
        """Iterations a position may run at most in this sampler (sizes a ``full`` KV cache); None: num_steps."""
        return None

    @property
    def extra_positions(self) -> int:
        """Cache positions beyond the prompt and the new tokens the sampler may hold at once."""
        return 0

    def tokens(self, batch, draw: Callable[[Tensor], Tensor]) -> Iterator[Proposal]:
        """Committed tokens, in order; ``draw(logits [n, V]) -> ids [n]`` samples with the call's settings."""
        raise NotImplementedError
