"""The decoder contract: the model-side work of one generate() call, per family.

The engine (latentrt/engine.py) is the generic token loop: it validates the options, builds the batch,
samples, stops, streams and assembles the result. Everything between "these token ids" and "these
next-token logits" is the family's decoder: which options apply, how the prompt is extended (Coconut's
thoughts), which cache to allocate, the prefill, and each next token. A decoder calls its model's
reference methods or, where the backend offers them, the backend's fused seams (backends/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache import KVCache
from ..config import eos_ids
from ..options import GenerateOptions
from ..prompts import Batch, prompt_ids
from ..sampling import SequenceRNG


@dataclass
class TokenOutput:
    """What the prefill or one next token yields for a batch, all on the device (read back once)."""

    logits: Tensor  # [B, V] fp32 next-token logits
    iterations: Tensor  # [B] long: latent iterations run for this token (0 where the family has none)
    nonfinite: Tensor  # [B] long flags: 1 the latent state, 2 the logits became NaN/inf


class Decoder:
    """Base class of the family decoders (see module docstring)."""

    TITLE: ClassVar[str]  # how messages name the family's models
    OPTIONS: ClassVar[frozenset[str]] = frozenset()  # the family options (latentrt/options.py) it accepts
    SAMPLERS: ClassVar[dict] = {}  # name -> multi-token sampler class (decode/samplers.py) it offers
    GENERATE_ONLY: ClassVar[frozenset[str]] = frozenset()  # of OPTIONS, those the server's programs do not run

    def __init__(self, model, options: GenerateOptions, hooks) -> None:
        self.model, self.options, self.hooks = model, options, hooks
        self.rng: SequenceRNG | None = None  # per-sequence generators with a seed (latentrt/sampling.py)
        self.backend = model.backend
        self.cache: KVCache | None = None
        self.prefill_steps: torch.Tensor | None = None  # [B, S] iterations per prompt position, when known
        self.sampler = None  # a sampler committing several tokens per pass (decode/samplers.py), if asked for

    @classmethod
    def check_options(cls, model, options: GenerateOptions) -> None:
        """Validate the family options this decoder takes (``OPTIONS``; the engine has rejected the others)."""

    # ---------------------------------------------------------------- one generate() call
    def thoughts_per_sequence(self, batch: Batch) -> list[int]:
        """Continuous thoughts run for each prompt of the prepared ``batch`` (0 for families without them)."""
        return [0] * batch.ids.shape[0]

    def prepare_text(self, texts: list[str]) -> list[str]:
        """Text prompts as the family's format wants them before tokenization (e.g. Coconut's newline before
        the markers ``prepare_prompt`` appends); token-id prompts never come here."""
        return texts

    def prepare_prompt(self, batch: Batch) -> Batch:
        """The batch as the model runs it (e.g. with appended thought markers)."""
        return batch

    @property
    def kv_slots(self) -> int:
        """Slots the looped layers keep per position (the KV mode's)."""
        return 1

    @property
    def max_steps(self) -> int:
        """The most latent iterations a token of this call may run (1 for a model that does not loop)."""
        return 1

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self.cache = self.model.new_cache(batch, max_len)
        return self.cache

    def prefill(self, batch: Batch) -> TokenOutput:
        raise NotImplementedError

    def next_token(self, tokens: Tensor, alive: Tensor, rows: list[bool]) -> TokenOutput:
        """The next position for every sequence: ``tokens`` [B] the last sampled ids, ``alive`` [B] bool on
        the device and ``rows`` the same on the host (who draws random numbers)."""
        raise NotImplementedError

    def record(self, iterations: list[int], alive: list[bool]) -> None:
        """Host values of the token just produced (after the engine's one device->host read)."""

    # the family scores a prompt's own tokens (``prompt_logits``: the server's ``echo`` with log-probs)
    SCORES_PROMPTS: ClassVar[bool] = False

    def prompt_logits(self, ids: Tensor) -> Tensor:
        """Logits [S, V] (fp32) after each position of prompt ``ids`` [S]: how the model scores the prompt's
        own tokens, with this call's options (families with ``SCORES_PROMPTS``)."""
        raise NotImplementedError

    def default_stop_ids(self) -> set[int]:
        """Token ids that end a sequence unless ``default_stops=False``: the model's eos, where it is in the
        vocabulary (``load`` warns of one that is not: no token can be it)."""
        return {i for i in eos_ids(self.model.eos_token_id) if 0 <= i < self.model.config.vocab_size}

    def stops_at(self, index: int) -> bool:
        """Whether generated token ``index`` (0: the first) may end a sequence."""
        return True

    keep_stop_token: ClassVar[bool] = True  # a token that ends a sequence is part of its output

    # ---------------------------------------------------------------- evaluation and presentation
    EVAL_MODES: ClassVar[tuple[str, ...]] = ("plain",)  # prompt formats ``latentrt eval --modes`` takes

    @classmethod
    def eval_mode(cls, model) -> str:
        """The prompt format the model was trained for (the default of ``latentrt eval``)."""
        return cls.EVAL_MODES[0]

    @classmethod
    def eval_prompt(cls, model, question: str, mode: str, thoughts: int | None = None) -> list[int]:
        """Token ids of ``question`` in a prompt format of EVAL_MODES (``thoughts``: a count to use instead
        of the trained one, for families that think in latent tokens)."""
        return prompt_ids(model.tokenizer.encode(question))

    @classmethod
    def eval_options(cls, mode: str) -> dict:
        """generate() options a prompt format of EVAL_MODES needs beside its prompt (none by default)."""
        return {}

    @classmethod
    def eval_max_new_tokens(cls, mode: str, source: str) -> int:
        """``latentrt eval``'s default tokens per answer in a prompt format of EVAL_MODES (``source``: the data's
        name, a file's path); --chat has its own."""
        return 16

    @classmethod
    def report(cls, result) -> list[str]:
        """Lines the CLI prints after a generation's text (family-specific statistics)."""
        return []
