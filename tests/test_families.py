"""A new model family is its config, its model, its decoder and one registry line.

The toy family below (a looped block with a learned exit gate, defined only here) is registered with one
``register`` call and then runs through everything generic: ``build_model``, ``generate()`` with
adaptive exit on the torch backend (the latent loop of latentrt/recurrence.py with its own criterion),
batching, checkpoints and ``latentrt.load``, and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import WORDS
from torch import Tensor, nn

import latentrt
from latentrt import families
from latentrt.checkpoint import save_checkpoint
from latentrt.cli import main
from latentrt.config import ModelConfig, require_positive
from latentrt.decode.base import Decoder, TokenOutput
from latentrt.errors import InputError
from latentrt.exits import ExitCriterion, make_criterion
from latentrt.families import build_model, parse_config
from latentrt.kernels.reference import nonfinite_flags
from latentrt.models.base import CacheLayout, LatentModel
from latentrt.recurrence import LoopSpec, run_recurrence
from latentrt.tokenizer import word_tokenizer


# ------------------------------------------------------------------------------ the toy family's files
@dataclass(frozen=True)
class GatedLoopConfig(ModelConfig):
    REQUIRED: ClassVar[tuple[str, ...]] = ("n_embd", "vocab_size", "block_size")

    n_embd: int
    vocab_size: int
    block_size: int
    max_loops: int = 8
    eos_token_id: int | None = None
    model_type: str = "toy_gated_loop"

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def tied_head(self) -> bool:
        return False

    def weight_bytes(self, element_size: int) -> int:
        d, v = self.n_embd, self.vocab_size
        return (2 * v * d + 2 * d * d + d + d + 1) * element_size  # wte, head, block, gate

    def validate(self) -> None:
        require_positive(self, "n_embd", "vocab_size", "block_size", "max_loops")


class GatedLoopLM(LatentModel):
    """Each position's state loops s <- tanh(W [s, e]) until a learned gate sigmoid(g . s) says stop."""

    family = "toy"

    def __init__(self, cfg: GatedLoopConfig) -> None:
        super().__init__(cfg)
        d = cfg.n_embd
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(cfg.vocab_size, d)))
        self.block = nn.Linear(2 * d, d)
        self.gate = nn.Linear(d, 1)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)

    def cache_layout(self) -> CacheLayout:
        return CacheLayout(0, 0, 1, 1)  # no attention: nothing cached

    def init_depth(self) -> int:
        return self.config.max_loops

    def default_steps(self) -> int:
        return self.config.max_loops

    def iterate(self, s: Tensor, e: Tensor) -> Tensor:
        return torch.tanh(self.block(torch.cat([s, e], -1)))

    def exit_probability(self, s: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(s))[..., 0]


@dataclass(frozen=True)
class GateExit(ExitCriterion):
    """Exit when the model's gate on the last position's state exceeds the threshold."""

    DEFAULT: ClassVar[float] = 0.5
    model: nn.Module = field(default=None, compare=False)

    def update(self, state, prev, new, logits, valid, ops):
        return self.model.exit_probability(new[:, -1]) > self.threshold, state


class GatedLoopDecoder(Decoder):
    TITLE = "toy gated-loop"
    OPTIONS = frozenset({"adaptive", "num_steps", "exit_threshold"})

    def __init__(self, model, options, hooks) -> None:
        super().__init__(model, options, hooks)
        o = options
        threshold = GateExit.DEFAULT if o.exit_threshold is None else o.exit_threshold
        crit = GateExit("gate", threshold, model) if o.adaptive else make_criterion("none")
        self.spec = LoopSpec(o.num_steps or model.default_steps(), crit)

    def prefill(self, batch) -> TokenOutput:
        return self._unit(batch.ids, torch.ones(batch.ids.shape[0], dtype=torch.bool))

    def next_token(self, tokens, alive, rows) -> TokenOutput:
        return self._unit(tokens[:, None], alive)

    def _unit(self, ids, alive) -> TokenOutput:
        m = self.model
        e = m.transformer.wte(ids)
        s, used, logits = run_recurrence(
            self.spec,
            torch.zeros_like(e),
            alive,
            torch.ones(ids.shape, dtype=torch.bool),
            m.config.vocab_size,
            iterate=lambda s, t, active: m.iterate(s, e),
            head=lambda s, active: m.lm_head(s[:, -1]).float(),
            mark=lambda t, active: None,
            hooks=self.hooks,
            host_may_stop=True,
        )
        return TokenOutput(logits, used, nonfinite_flags(s, None, logits, alive))


TOY = families.Family(GatedLoopConfig, GatedLoopLM, GatedLoopDecoder)


# ------------------------------------------------------------------------------ the tests
@pytest.fixture
def toy():
    families.register("toy_gated_loop", TOY)  # the one registry line
    model = build_model(parse_config(dict(model_type="toy_gated_loop", n_embd=16, vocab_size=40, block_size=64)))
    with torch.no_grad():
        # gate values spread around the threshold: varied exit depths (its own generator: the global RNG's
        # state here depends on the tests before it, which made the spread, and this test, vary)
        model.gate.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    model.tokenizer = word_tokenizer(WORDS)
    yield model
    families.unregister("toy_gated_loop")


def _by_hand(model, prompt, n_new, r, threshold):
    """The toy's decode written directly: every token loops until the gate opens (at most r times)."""
    tokens, steps, ids = [], [], list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            e = model.transformer.wte(torch.tensor(ids[-1]))
            s = torch.zeros_like(e)
            used = 0
            while used < r:
                s, used = model.iterate(s, e), used + 1
                if model.exit_probability(s) > threshold:
                    break
            tokens.append(int(model.lm_head(s).argmax()))
            steps.append(used)
            ids.append(tokens[-1])
    return tokens, steps


def test_toy_family_generates_with_adaptive_exit(toy):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    kw = dict(max_new_tokens=6, adaptive=True, num_steps=7, exit_threshold=0.6)
    batch = latentrt.generate(toy, prompts, **kw)
    seen = set()
    for i, p in enumerate(prompts):
        want_tokens, want_steps = _by_hand(toy, p, 6, 7, 0.6)
        alone = latentrt.generate(toy, p, **kw)
        assert alone.tokens == want_tokens and alone.steps == want_steps
        assert batch.tokens[i] == want_tokens and batch.steps[i] == want_steps
        seen |= set(want_steps)
    assert len(seen) > 1, "the gate should stop at different depths"
    fixed = latentrt.generate(toy, prompts[0], max_new_tokens=3, num_steps=5)
    assert fixed.steps == [5, 5, 5]


def test_toy_family_options_checkpoints_and_cli(toy, tmp_path, capsys):
    # the message names the families an option applies to, not every other one
    with pytest.raises(InputError, match="^kv_sharing does not apply to this toy gated-loop model; it applies to "):
        latentrt.generate(toy, [5, 6], kv_sharing="shared")
    with pytest.raises(InputError, match="; it applies to recurrent-depth models$"):
        latentrt.generate(toy, [5, 6], kv_sharing="shared")
    with pytest.raises(
        InputError, match="num_thoughts does not apply .*; it applies to Coconut continuous-thought models$"
    ):
        latentrt.generate(toy, [5, 6], num_thoughts=2)
    save_checkpoint(toy, tmp_path / "toy")
    loaded = latentrt.load(tmp_path / "toy", device="cpu")
    assert isinstance(loaded, GatedLoopLM) and loaded.backend.name == "torch"
    kw = dict(max_new_tokens=4, adaptive=True, num_steps=6)
    assert latentrt.generate(loaded, [5, 6], **kw).tokens == latentrt.generate(toy, [5, 6], **kw).tokens
    assert (
        main(["generate", str(tmp_path / "toy"), "every cat", "--adaptive", "--steps", "6", "--max-new-tokens", "3"])
        == 0
    )
    assert "KV cache" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "toy"), "every cat", "--kv", "shared"]) == 2
    assert "--kv does not apply" in capsys.readouterr().err


def test_the_registrys_lookups_name_what_is_wrong(capsys):
    """Something that only looks like a loaded model (a transformers GPT-2 has config.model_type 'gpt2') is named
    as not one; ``decodings`` (the CLI's --decoding choices) starts with the default, sequential; eos ids in
    any form config.json holds them come back as a list."""
    from types import SimpleNamespace

    from latentrt.config import eos_ids

    for fake, what in [
        (SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), "a SimpleNamespace"),
        ("builtin:recurrent", "the string 'builtin:recurrent'"),
    ]:
        with pytest.raises(InputError, match=rf"^expected a model from latentrt.load\(\.\.\.\), got {what}; call"):
            latentrt.generate(fake, [5, 6])
    # torch.compile's wrapper (its OptimizedModule holds the module as ``_orig_mod``; a stand-in: importing
    # torch._dynamo costs a second and warnings)
    compiled = SimpleNamespace(_orig_mod=latentrt.load("builtin:recurrent"))
    with pytest.raises(InputError, match=r"got a torch.compile'd RecurrentDepthLM; pass the model itself"):
        latentrt.generate(compiled, [5, 6])
    ddp = torch.nn.DataParallel(latentrt.load("builtin:recurrent"))  # (DDP's wrapper holds it as .module too)
    with pytest.raises(InputError, match=r"got a DataParallel wrapping a RecurrentDepthLM; pass its \.module$"):
        latentrt.generate(ddp, [5, 6])
    assert families.decodings() == ["sequential", "speculative", "wavefront"]
    assert main(["generate", "builtin:recurrent", "Alex is", "--decoding", "sequential", "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert [eos_ids(None), eos_ids(3), eos_ids([1, 2]), eos_ids((4,))] == [[], [3], [1, 2], [4]]
