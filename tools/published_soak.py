"""Differential soak against the published implementations: random cases, each run by the published code and by
latentrt, for a time budget or a count of cases.

    python -m tools.published_soak --huginn DIR --coconut DIR [--seconds 300 | --cases N] [--seed 0]
                                   [--kinds sequential,batch,minimal,hf,prefill,speculative,wavefront,coconut,
                                            coconut_training,huginn_training]
                                   [--backend torch] [--models huginn-a,...] [--out FILE]

``--huginn`` / ``--coconut``: the folders ``python -m tools.published`` takes (the published files are not
vendored: fetch them). tests/published_vectors.json pins chosen cases; this tool draws others in the same
format from the published option space, on the same tiny seeded models (``tools.published.MODELS``, fp32 and
bf16: both sides run on this CPU), and compares the tokens, the iterations per token, an adaptive prefill's
iterations per position and the speculative rounds' accepted tokens (latentrt on ``--backend``), or a training
step's loss and gradients; where those agree, a sequential adaptive or adaptive prefill case on the torch backend
also compares the latent states every exit check sees, bit for bit (``StatesSeen``), and a Coconut case the logits
of its first answer token, of every one with ``published_recompute`` (``HeadsSeen``):

- ``sequential``: ``generate_with_adaptive_compute`` at batch 1: fixed depth or an adaptive exit (every published
  criterion, the default "auto" threshold or a drawn one, ``min_steps``, ``check_criterion_every_n_steps``,
  ``do_not_exit_in_prefill``, ``continuous_compute``), every published cache lookup latentrt names
  (``kv_modes``), a random or zero initial state, greedy or sampled (temperature, top-k, the published top-p,
  min-p), a repetition or DRY penalty; ``continuous_compute`` at fixed depth too (criterion "none");
- ``batch``: the same at fixed depth over 2-3 prompts of one length (the published adaptive batch runs every row
  until the last exits: only batch 1 compares there), unseeded on torch's generator seeded alike;
- ``hf``: transformers' own ``generate`` on the published model (the model card's ``model.generate(ids,
  config, num_steps=...)``), fixed depth, greedy or sampled by transformers' processors (top-k, top-p, min-p,
  repetition penalty); under transformers 4 only (the file's; its loop changed in 5: skipped, said so);
- ``minimal``: ``generate_minimal``, the published fixed-depth loop, at batch 1 or over prompts of one length
  (without ``continuous_compute``: there it feeds back the state after ln_f, README);
- ``prefill``: ``forward_with_adaptive_compute`` (token-by-token adaptive prefill): the first token and the
  iterations per prompt position;
- ``speculative`` / ``wavefront``: ``generate_speculative`` / ``generate_diffusion_style`` with drawn options;
- ``coconut``: Coconut's ``generate`` on a prompt with 0-4 thoughts (latentrt with ``published_eos``, and
  ``published_recompute`` always on the bf16 GPT-2, on half the cases on the fp32 one);
- ``coconut_training``: run.py's training step (the published collator and Coconut forward; the plain GPT-2 for
  cot and pause) on 1-4 random examples with 0-3 thoughts each, in train mode (dropout) or not, against
  latentrt's ``CoconutLoss`` on its ``collate``: the loss and the gradients' norm to float rounding;
- ``huginn_training``: the published forward in training mode (a no-grad / grad depth, the random initial
  state) on a right-padded batch, against latentrt's ``RecurrentLoss``, the same way.

What latentrt refuses (an ``InputError``) is counted, as "refused by both" where the published code fails on it
too, else printed once with its reason. A mismatch prints the case as JSON (a line to add to
``tools.published.CASES`` once understood) and where it first differs; ``--out`` writes the mismatching cases
with both results. Both sides compute the same products in the same dtype but not always in the same order, so
an exit whose criterion lies within rounding of its threshold can go one check apart (README, Guarantees): such
a mismatch is labelled, not explained away. A bf16 model on a fused backend (``--backend triton``) need not
round where the published eager bf16 ops round (norms folded into products, fused exit tests): measured, its
logits lie ~1e-2 (relative) from torch's bf16 ones, each as far from fp32, so exits near a threshold move; such
mismatches say so (fp32 models must agree exactly there too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

import latentrt
from latentrt.backends import CHOICES
from latentrt.decode.recurrent import RecurrentDecoder
from latentrt.errors import InputError
from latentrt.exits import CRITERIA

from . import check_budget, warnings_silenced, wrapped
from .published import (
    BASE_HUGINN,
    MODELS,
    build,
    coconut_dataset_module,
    coconut_examples,
    coconut_module,
    huginn_module,
    latentrt_coconut_training,
    latentrt_huginn_training,
    run_coconut,
    run_coconut_training,
    run_huginn,
    run_huginn_training,
    run_latentrt,
)

# training: the loss and the gradients' norm agree to float rounding (tests/test_published.py's tolerances)
TRAINING_TOLERANCE = dict(loss=1e-6, grad_norm=1e-5)
# the soak's own models beside the vectors': Huginn-0125's vocabulary and dtype, its head scaled so the
# distributions are peaked as a trained model's: bf16 logits over 65,536 tokens tie often at a top-k / top-p /
# min-p cut, where the rules differ in which ids of a tie they keep (latentrt/sampling.py ``dropped``)
SOAK_MODELS = {
    "huginn-peaked-bf16": dict(
        config=dict(BASE_HUGINN, vocab_size=65536, tie_embeddings=False), seed=11, dtype="bfloat16", head_scale=8.0
    ),
}
ALL_MODELS = {**MODELS, **SOAK_MODELS}
HUGINN_MODELS = ("huginn-a", "huginn-b", "huginn-mqa", "huginn-vocab97", "huginn-a-bf16", "huginn-b-bf16")
HUGINN_MODELS += tuple(SOAK_MODELS)  # (last: the speculative and wavefront draws take the first ones)
# the published cache lookups latentrt takes by name (latentrt/kv_modes.py), and the published name its "full"
# lookup has under an adaptive exit (latentrt's ``skip``); ``full`` at fixed depth is every mode's rule
LOOKUPS = (
    "latest-m4",
    "available-m4",
    "always-last-m4",
    "compress-s4",
    "latest-m4-compress-s4",
    "latest-m4-compress-s8",
    "latest-m4-compress-s12",
    "latest-m4-compress-anchor",
    "skip",
    "full",
)
SPECULATIVE_LOOKUPS = ("full", "latest-m4", "latest-m4-compress-s4", "latest-m4-compress-anchor", "always-last-m4")
FREEZE = ("latent-diff", "latent-acceleration-1", "latent-acceleration-2", "token-stability", "fixed")


def _prompt(rng: random.Random, vocab: int, low: int = 1, high: int = 16) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randrange(low, high + 1))]


def _kv(rng: random.Random, adaptive: bool) -> tuple[dict, dict]:
    """(latentrt's kv_sharing option, the case's published_cache field where its name differs)."""
    lookup = rng.choice(LOOKUPS)
    if lookup == "full" and adaptive:  # the published full lookup under an exit is latentrt's skip
        return dict(kv_sharing="skip"), dict(published_cache="full")
    if lookup == "skip":
        return dict(kv_sharing="skip"), dict(published_cache="skip")
    return dict(kv_sharing=lookup), {}


def _threshold(rng: random.Random, criterion: str):
    """The published "auto" (None) or a threshold near the criterion's default (a tenth to ten times it)."""
    if rng.random() < 0.25:
        return None
    if criterion == "argmax-stability":
        return rng.randrange(1, 5)
    return CRITERIA[criterion].DEFAULT * 10 ** rng.uniform(-1, 1)


def _vocab(model: str) -> int:
    """The vocabulary of a model of ``ALL_MODELS`` (BASE_HUGINN's 40 where its config leaves it)."""
    return ALL_MODELS[model]["config"].get("vocab_size", 40)


def _sampling(rng: random.Random) -> dict:
    out: dict = dict(temperature=rng.choice([0.7, 1.0, 1.5]))
    if rng.random() < 0.5:
        out["top_k"] = rng.randrange(2, 10)
    if rng.random() < 0.4:
        out.update(top_p=rng.choice([0.5, 0.8, 0.95]), published_top_p=True)
    if rng.random() < 0.3:
        out["min_p"] = rng.choice([0.02, 0.1])
    return out


def draw_sequential(rng: random.Random) -> dict:
    model = rng.choice(HUGINN_MODELS)
    vocab = _vocab(model)
    o: dict = dict(num_steps=rng.randrange(1, 13), init_scale=rng.choice([0.0, 1.0]), seed=rng.randrange(1000))
    case: dict = dict(model=model, prompt=_prompt(rng, vocab), max_new_tokens=rng.randrange(1, 13))
    if rng.random() < 0.7:
        criterion = rng.choice(sorted(set(CRITERIA) - {"none"}))
        threshold = _threshold(rng, criterion)
        o.update(adaptive=True, exit_criterion=criterion)
        if threshold is not None:
            o["exit_threshold"] = threshold
        o.update(min_steps=rng.choice([0, 0, 1, 3]), check_criterion_every_n_steps=rng.choice([1, 1, 2, 3]))
        o["do_not_exit_in_prefill"] = rng.random() < 0.2
        o["continuous"] = rng.random() < 0.2
        kv, published = _kv(rng, adaptive=True)
        o.update(kv)
        case.update(published)
    else:
        if rng.random() < 0.5:
            o.update(_kv(rng, adaptive=False)[0])
        o["continuous"] = rng.random() < 0.2
    if rng.random() < 0.4:
        o.update(_sampling(rng))
    if rng.random() < 0.15:
        o["repetition_penalty"] = rng.choice([1.3, 1.8, 3.0])
    elif rng.random() < 0.1:
        o.update(dry_multiplier=rng.choice([0.8, 2.0]), dry_base=rng.choice([1.5, 1.75]), dry_allowed_length=1)
    return dict(case, options=o)


def draw_batch(rng: random.Random) -> dict:
    model = rng.choice(HUGINN_MODELS)
    vocab = _vocab(model)
    n = rng.randrange(1, 12)
    o: dict = dict(num_steps=rng.randrange(1, 9), init_scale=rng.choice([0.0, 1.0]))
    if rng.random() < 0.6:
        o.update(_sampling(rng))
    if rng.random() < 0.5:
        o.update(_kv(rng, adaptive=False)[0])
    prompts = [[rng.randrange(vocab) for _ in range(n)] for _ in range(rng.randrange(2, 4))]
    return dict(
        model=model, prompts=prompts, torch_seed=rng.randrange(1000), max_new_tokens=rng.randrange(1, 9), options=o
    )


def draw_minimal(rng: random.Random) -> dict:
    """``generate_minimal``, the published fixed-depth loop, at batch 1 or over prompts of one length (its
    ``continuous_compute`` feeds back the state after ln_f: a documented difference, not drawn)."""
    case = draw_batch(rng) if rng.random() < 0.4 else draw_sequential(rng)
    o = {k: v for k, v in case["options"].items() if k not in RecurrentDecoder.ADAPTIVE_ONLY}
    o.update(adaptive=False, continuous=False)
    if o.get("kv_sharing") == "skip":
        o["kv_sharing"] = "full"
    case.pop("published_cache", None)
    return dict(case, minimal=True, options=o)


def draw_hf(rng: random.Random) -> dict:
    """transformers' ``generate`` on the published model (the model card's call), fixed depth, batch 1 or
    prompts of one length, greedy or sampled with transformers' own top-k / top-p / min-p and repetition
    penalty (latentrt's ``top_p`` without ``published_top_p`` is transformers')."""
    case = draw_minimal(rng)
    o = {k: v for k, v in case["options"].items() if k not in ("kv_sharing", "dry_multiplier", "dry_base")}
    o.pop("dry_allowed_length", None)
    if o.get("published_top_p"):
        o["published_top_p"] = False
    if _vocab(case["model"]) > 65504:  # transformers stops at no Huginn stop
        o["default_stops"] = False  # token (its eos is None here): neither does latentrt then
    case.pop("minimal")
    return dict(case, hf=True, options=o)


def draw_prefill(rng: random.Random) -> dict:
    model = rng.choice(HUGINN_MODELS)
    vocab = _vocab(model)
    criterion = rng.choice(sorted(set(CRITERIA) - {"none"}))
    threshold = _threshold(rng, criterion)
    o = dict(adaptive=True, exit_criterion=criterion, exit_threshold=threshold or CRITERIA[criterion].DEFAULT)
    o.update(num_steps=ALL_MODELS[model]["config"]["mean_recurrence"], adaptive_prefill=True)
    o.update(init_scale=rng.choice([0.0, 1.0]), seed=rng.randrange(1000))
    o["kv_sharing"] = rng.choice([k for k in LOOKUPS if k not in ("skip", "full")])
    return dict(model=model, prompt=_prompt(rng, vocab), max_new_tokens=1, adaptive_prefill=True, options=o)


def draw_speculative(rng: random.Random) -> dict:
    model = rng.choice(HUGINN_MODELS[:4])
    depth = rng.randrange(2, 13)
    drafts = dict(lookahead=rng.randrange(1, 6), draft_steps=rng.randrange(1, depth + 1))
    drafts["verification_threshold"] = rng.choice([1, 1, 0.5, 0.2])
    o: dict = dict(num_steps=depth, init_scale=rng.choice([0.0, 1.0]), decoding="speculative")
    o.update(kv_sharing=rng.choice(SPECULATIVE_LOOKUPS), seed=rng.randrange(1000))
    if rng.random() < 0.3:
        o["temperature"] = rng.choice([0.7, 1.0])
    vocab = _vocab(model)
    case = dict(model=model, prompt=_prompt(rng, vocab, 2), max_new_tokens=rng.randrange(1, 13))
    return dict(case, speculative=drafts, options=o)


def draw_wavefront(rng: random.Random) -> dict:
    model = rng.choice(HUGINN_MODELS[:2])
    depth = rng.randrange(2, 13)
    wf: dict = dict(exit_t=rng.choice([0.01, 0.05, 0.1, 0.2]), inner_recurrence=rng.randrange(1, 5))
    wf["freeze_strategy"] = rng.choice(FREEZE[:1] * 3 + FREEZE[1:])  # latent-diff, the default, most often
    if rng.random() < 0.3:
        wf["max_wavefront"] = rng.randrange(2, 6)  # 1 (= headway) is refused: a one-position window never commits
    if rng.random() < 0.3:
        wf.update(ema_embeds=rng.choice([0.0, 0.5]), state_noise_mixing=rng.choice([0.0, 0.5]))
    if rng.random() < 0.2:
        wf["continuous"] = True
    wf["max_diffusion_steps"] = rng.choice([16, 64])  # a bound on settings that never freeze (4096 by default)
    o: dict = dict(num_steps=depth, init_scale=rng.choice([0.0, 1.0]), decoding="wavefront", seed=rng.randrange(1000))
    if rng.random() < 0.5:
        o["kv_sharing"] = rng.choice(["latest-m4", "latest-m4-compress-s8", "skip", "always-last-m4"])
    if rng.random() < 0.3:
        o.update(temperature=rng.choice([0.7, 1.0]))
    vocab = _vocab(model)
    case = dict(model=model, prompt=_prompt(rng, vocab, 2, 10), max_new_tokens=rng.randrange(1, 9))
    return dict(case, wavefront=wf, options=o)


def draw_coconut(rng: random.Random) -> dict:
    """A Coconut prompt of 0-4 thoughts on a GPT-2 of 40 tokens (fp32; half the cases with
    ``published_recompute``) or of GPT-2's vocabulary in bf16 (always with it: the cached pass gives another token
    in a few answers of a hundred there, README)."""
    model = rng.choice(["gpt2-a", "gpt2-bf16"])
    markers, vocab = ALL_MODELS[model]["markers"], _vocab(model)
    words = [rng.randrange(vocab) for _ in range(12)]
    question = [w for w in words if w not in markers.values()][: rng.randrange(1, 12)] or [vocab - 4]
    thoughts = [markers["start_latent_id"]] + [markers["latent_id"]] * rng.randrange(0, 5)
    prompt = question + thoughts + [markers["end_latent_id"]]
    recompute = model == "gpt2-bf16" or rng.random() < 0.5
    return dict(
        model=model,
        coconut=True,
        prompt=prompt,
        max_new_tokens=rng.randrange(1, 13),
        options=dict(published_eos=True, published_recompute=recompute),
    )


def draw_coconut_training(rng: random.Random) -> dict:
    """A batch of 1-4 curriculum examples as run.py trains them (tools.published.TRAINING's format: the question
    [+ start marker and 0-3 thoughts] | [end marker +] the steps and answer + eos), coconut, cot or pause
    as thought, in train mode (dropout drawn from torch's generator) or eval mode."""
    mode = rng.choice(["coconut", "coconut", "cot", "pause"])
    words = list(range(5, ALL_MODELS["gpt2-a"]["config"]["vocab_size"]))
    examples = []
    for _ in range(rng.randrange(1, 5)):
        pre = [rng.choice(words) for _ in range(rng.randrange(1, 9))]
        post = [rng.choice(words) for _ in range(rng.randrange(1, 7))] + ["EOS"]
        if mode != "cot":
            pre, post = pre + ["S"] + ["L"] * rng.randrange(0, 4), ["E"] + post
        examples.append((pre, post))
    case = dict(model="gpt2-a", training="coconut", mode=mode, eos=1, examples=examples)
    return dict(case, torch_seed=rng.randrange(1000)) if rng.random() < 0.5 else case


def draw_huginn_training(rng: random.Random) -> dict:
    """A right-padded batch of 1-3 rows (labels -100 on a prompt prefix and the padding) at a no-grad / grad depth,
    as the fine-tuning script's forward takes it, the random initial state from torch's generator."""
    model = rng.choice(HUGINN_MODELS)
    vocab = _vocab(model)
    S = rng.randrange(3, 13)
    ids, labels = [], []
    for _ in range(rng.randrange(1, 4)):
        n = rng.randrange(2, S + 1)
        prompt = rng.randrange(0, min(3, n - 1))  # a label after the first position (the loss shifts by one)
        row = [rng.randrange(1, vocab) for _ in range(n)]
        ids.append(row + [0] * (S - n))
        labels.append([-100] * prompt + row[prompt:] + [-100] * (S - n))
    steps = [rng.randrange(0, 5), rng.randrange(1, 5)]
    return dict(model=model, training="huginn", steps=steps, torch_seed=rng.randrange(1000), ids=ids, labels=labels)


DRAW = dict(
    sequential=draw_sequential,
    batch=draw_batch,
    minimal=draw_minimal,
    hf=draw_hf,
    prefill=draw_prefill,
    speculative=draw_speculative,
    wavefront=draw_wavefront,
    coconut=draw_coconut,
    coconut_training=draw_coconut_training,
    huginn_training=draw_huginn_training,
)
KINDS = tuple(DRAW)  # the checks take turns in this order


def complete(case: dict, model) -> dict:
    """The case with what depends on its model: a Coconut case's eos, its first answer token (as tools.published
    chooses it), so the published rule (never stop on the first answer token; a later eos ends the answer, left
    out) differs from stopping at once."""
    if case.get("coconut"):
        case["eos"] = latentrt.generate(model, case["prompt"], max_new_tokens=1, default_stops=False).tokens[0]
    return case


def latentrt_outcome(case: dict, model, backend: str = "torch") -> dict:
    """latentrt's result on ``backend`` in the published run's terms: the tokens, and what the published run of
    the case's kind records (the iterations per token, an adaptive prefill's per position, the speculative
    rounds' accepted tokens)."""
    if case.get("training") == "coconut":
        return latentrt_coconut_training(dict(case, examples=coconut_examples(case, model)), model)
    if case.get("training") == "huginn":
        return latentrt_huginn_training(case, model)
    got = run_latentrt(case, model, backend)
    if case.get("adaptive_prefill"):
        return dict(tokens=got.tokens, prefill_steps=got.prefill_steps)
    if case.get("speculative"):
        return dict(tokens=got.tokens, accepted=got.decoding["accepted"])
    if "prompts" in case or case.get("coconut") or case.get("minimal") or case.get("hf"):  # no steps counted
        return dict(tokens=got.tokens)
    return dict(tokens=got.tokens, steps=got.steps)


def published_outcome(modules: dict, case: dict, model) -> dict:
    """The published code's result for the case (``modules``: the loaded huginn, coconut and dataset files), in
    the terms ``latentrt_outcome`` gives."""
    if case.get("training") == "coconut":
        want = run_coconut_training(modules["coconut"], modules["dataset"], case, model)
        want.pop("examples")
        return want
    if case.get("training") == "huginn":
        return run_huginn_training(modules["huginn"], case, model)
    if case.get("coconut"):
        want = run_coconut(modules["coconut"], case, model, case["eos"])
        want.pop("eos")
        return want
    want = run_huginn(modules["huginn"], case, model)
    want.pop("diffusion_steps", None)
    return want


def differs(got: dict, want: dict, case: dict) -> str | None:
    """None where the two results agree (a training step's loss and gradient norm to float rounding, anything
    else exactly), else where they differ."""
    if case.get("training"):
        off = {k: abs(got[k] - want[k]) / max(abs(want[k]), 1e-30) for k in TRAINING_TOLERANCE}
        bad = [f"{k} {off[k]:.2g} apart (relative)" for k, tol in TRAINING_TOLERANCE.items() if off[k] > tol]
        return ", ".join(bad) or None
    return where(got, want, case) if got != want else None


def where(got: dict, want: dict, case: dict) -> str:
    """Where the two results first differ, and whether an exit one check apart (a possible tie) explains it."""
    t1, t2 = got["tokens"], want["tokens"]
    if "prompts" in case:
        return "the batch's tokens differ: " + ", ".join(str(i) for i, (a, b) in enumerate(zip(t1, t2)) if a != b)
    s1, s2 = got.get("steps"), want.get("steps")
    n = next((j for j in range(min(len(t1), len(t2))) if t1[j] != t2[j]), min(len(t1), len(t2)))
    if s1 is not None and s2 is not None:
        m = next((j for j in range(min(len(s1), len(s2))) if s1[j] != s2[j]), None)
        if m is not None and m <= n:
            apart, every = abs(s1[m] - s2[m]), case["options"].get("check_criterion_every_n_steps", 1)
            tie = ": possibly a tie within rounding" if apart == every and case["options"].get("adaptive") else ""
            return f"token {m} (0: the prompt's) exits {apart} iteration{'s' * (apart > 1)} apart{tie}"
    p1, p2 = got.get("prefill_steps"), want.get("prefill_steps")
    if p1 != p2 and p1 and p2 and len(p1) == len(p2):
        j = next(j for j in range(len(p1)) if p1[j] != p2[j])
        return f"prompt position {j} exits {abs(p1[j] - p2[j])} iterations apart (adaptive prefill)"
    for key in ("prefill_steps", "accepted"):
        if got.get(key) != want.get(key):
            return f"{key} differ"
    return f"token {n} differs" if n < max(len(t1), len(t2)) else "the lengths differ"


class StatesSeen:
    """The latent states every exit check sees, on both sides: the published evaluators' ``check(model, latents,
    aux)`` and latentrt's criteria's ``update(state, prev, new, ...)``. Bit-identical means these are equal bit for
    bit, check by check; tokens and steps agree far more often (states 1e-7 apart seldom move a token or an
    exit: the ``skip`` lookup's attention rounded so until 2026-12-06 with every token and exit equal).
    ``with seen.side("published"): ...`` records one run."""

    def __init__(self, huginn) -> None:
        self.runs: dict[str, list[torch.Tensor]] = {"published": [], "latentrt": []}
        base = getattr(huginn, "PerIterationExitEvaluator", None)  # (None: no published module loaded)
        found = vars(huginn).values() if base is not None else ()
        published = [c for c in found if isinstance(c, type) and issubclass(c, base)]
        self.methods = [(c, "check", 2) for c in published if "check" in vars(c)]  # (class, method, latents' index)
        self.methods += [(c, "update", 3) for c in set(CRITERIA.values()) if "update" in vars(c)]

    @contextlib.contextmanager
    def side(self, name: str) -> Iterator[None]:
        seen = self.runs[name]

        def recording(at: int):
            def wrap(method):
                def call(*args, **kwargs):
                    seen.append(args[at].detach().clone())
                    return method(*args, **kwargs)

                return call

            return wrap

        with contextlib.ExitStack() as stack:
            for cls, method, at in self.methods:
                stack.enter_context(wrapped(cls, method, recording(at)))
            yield

    def differs(self) -> str | None:
        """None where both runs' checks saw the same states bit for bit, else the first check where not."""
        a, b = self.runs["latentrt"], self.runs["published"]
        for i, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                off = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else float("nan")
                return f"the states at exit check {i} differ (max |difference| {off:.2g}) though tokens and steps agree"
        if len(a) != len(b):
            return f"{len(a)} exit checks against the published {len(b)} though tokens and steps agree"
        return None


class HeadsSeen:
    """The last row of every head call on both sides of a Coconut case (the published GPT-2's
    ``GPT2LMHeadModel.forward`` logits, latentrt's ``CoconutGPT2.lm_logits``): the first answer token's logits are
    the last pass's, call ``passes - 1`` on both sides (one pass per thought after the first, and one more),
    compared bit for bit. Later tokens' too (a call each) where latentrt runs them as the published ``generate``
    does (``published_recompute``: the whole sequence anew); else latentrt decodes from its cache, which rounds
    otherwise. ``with seen.side("published"): ...`` records one run."""

    def __init__(self) -> None:
        from transformers import GPT2LMHeadModel

        from latentrt.models.coconut import CoconutGPT2

        self.runs: dict[str, list[torch.Tensor]] = {"published": [], "latentrt": []}
        self.methods = {"published": (GPT2LMHeadModel, "forward"), "latentrt": (CoconutGPT2, "lm_logits")}

    @contextlib.contextmanager
    def side(self, name: str) -> Iterator[None]:
        seen = self.runs[name]

        def wrap(real):
            def recording(*args, **kwargs):
                out = real(*args, **kwargs)
                logits = out if isinstance(out, torch.Tensor) else out.logits
                seen.append(logits[0, -1].detach().float().clone())
                return out

            return recording

        with wrapped(*self.methods[name], wrap):
            yield

    def differs(self, passes: int, recomputed: bool = False) -> str | None:
        """None where both runs' first answer token (with ``recomputed``, every answer token) came from the same
        logits bit for bit."""
        a, b = self.runs["latentrt"], self.runs["published"]
        if min(len(a), len(b)) < passes:
            return f"{len(a)} head calls against the published {len(b)}, fewer than the prompt's {passes} passes"
        if recomputed and len(a) != len(b):
            return f"{len(a)} head calls against the published {len(b)}"
        for t, (x, y) in enumerate(zip(a[passes - 1 :], b[passes - 1 :] if recomputed else b[passes - 1 : passes])):
            if not torch.equal(x, y):
                off = float((x - y).abs().max())
                return f"answer token {t}'s logits differ (max |difference| {off:.2g}) though the tokens agree"
        return None


def attempt(run, *args):
    """(run's result, None) or (None, the exception it raised)."""
    try:
        return run(*args), None
    except Exception as exc:  # noqa: BLE001 (the caller judges it)
        return None, exc


@torch.no_grad()  # restored on return (the training kinds enable it for their step)
@warnings_silenced
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.published_soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--huginn", required=True, type=Path)
    ap.add_argument("--coconut", required=True, type=Path)
    ap.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    ap.add_argument("--cases", type=int, default=None, help="stop after this many cases instead")
    ap.add_argument("--seed", type=int, default=0, help="the first case's seed (case i: seed + i)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    ap.add_argument("--backend", default="torch", choices=CHOICES, help="latentrt's backend (default torch)")
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated names of tools.published.MODELS (or the soak's SOAK_MODELS) to keep",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the mismatching cases here (JSON)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds takes {','.join(KINDS)}; got {args.kinds!r}")
    keep = None if args.models is None else {m.strip() for m in args.models.split(",") if m.strip()}
    if keep is not None and (not keep or keep - set(ALL_MODELS)):
        ap.error(f"--models takes names of {','.join(ALL_MODELS)}; got {args.models!r}")
    check_budget(ap, args)
    import transformers

    transformers_4 = int(transformers.__version__.split(".")[0]) < 5
    modules = dict(huginn=huginn_module(args.huginn), coconut=coconut_module(args.coconut))
    modules["dataset"] = coconut_dataset_module(args.coconut)
    models: dict = {}
    counts: Counter = Counter()
    mismatches: list[dict] = []
    refusals: set[str] = set()
    start, i = time.time(), 0
    while (i < args.cases) if args.cases is not None else (time.time() - start < args.seconds):
        seed, kind = args.seed + i, kinds[i % len(kinds)]
        i += 1
        if kind == "hf" and not transformers_4:  # its generate loop changed in 5 (tools.published's shims)
            counts["hf skipped (transformers' generate needs transformers 4)"] += 1
            continue
        case = dict(DRAW[kind](random.Random(seed)), name=f"{kind} seed {seed}")
        if keep is not None and case["model"] not in keep:
            counts["skipped (--models)"] += 1
            continue
        if case["model"] not in models:
            models[case["model"]] = build(case["model"], ALL_MODELS[case["model"]])
        model = models[case["model"]]
        complete(case, model)
        # compared where all else agrees, on the torch backend: a sequential adaptive or adaptive prefill case's
        # states, a Coconut case's first answer logits (with the published Coconut loaded)
        adaptive = case.get("options", {}).get("adaptive") or case.get("adaptive_prefill")
        torch_backend = args.backend == "torch"
        states = torch_backend and kind in ("sequential", "prefill") and adaptive
        heads = torch_backend and kind == "coconut" and modules["coconut"] is not None
        seen = StatesSeen(modules["huginn"]) if states else HeadsSeen() if heads else None
        with seen.side("published") if seen is not None else contextlib.nullcontext():
            want, published_error = attempt(published_outcome, modules, case, model)
        with seen.side("latentrt") if seen is not None else contextlib.nullcontext():
            got, error = attempt(latentrt_outcome, case, model, args.backend)
        if isinstance(error, InputError):  # latentrt refuses: the published code fails too, or runs (its reason, once)
            agree = published_error is not None
            counts[f"{kind} refused by both" if agree else f"{kind} refused by latentrt"] += 1
            if not agree and str(error) not in refusals:
                refusals.add(str(error))
                print(f"REFUSED {case['name']} (the published code runs it): {error}\n  case {json.dumps(case)}")
            continue
        if error is not None or published_error is not None:  # a crash is a finding: its case, then the next
            counts[f"{kind} raised"] += 1
            side, exc = ("latentrt", error) if error is not None else ("the published code", published_error)
            mismatches.append(dict(case, error=f"{side}: {type(exc).__name__}: {exc}"))
            trace = "".join(traceback.format_exception(exc))
            print(f"RAISED {case['name']}: {side}: {type(exc).__name__}: {exc}\n  case {json.dumps(case)}\n{trace}")
            continue
        counts[f"{kind} compared"] += 1
        what = differs(got, want, case)
        if what is None and states:
            counts[f"{kind} states compared"] += 1
            what = seen.differs()
        if what is None and heads:
            recomputed = case["options"]["published_recompute"]
            counts["coconut answer logits compared" if recomputed else "coconut first answer logits compared"] += 1
            what = seen.differs(case["prompt"].count(model.config.latent_id) + 1, recomputed)
        if what is not None and args.backend != "torch" and ALL_MODELS[case["model"]].get("dtype") == "bfloat16":
            what += f" (bf16 on {args.backend}: its fused kernels round otherwise than the published eager bf16 ops)"
        if what is not None:
            counts[f"{kind} differ"] += 1
            mismatches.append(dict(case, published=want, latentrt=got, where=what))
            print(f"MISMATCH {case['name']}: {what}\n  case      {json.dumps(case)}")
            print(f"  published {want}\n  latentrt  {got}")
    print(
        f"published soak: {i} cases in {time.time() - start:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    if args.out is not None:
        args.out.write_text(json.dumps(mismatches, indent=1) + "\n")
    if mismatches:
        print(f"{len(mismatches)} mismatches; repeat one with --kinds KIND --seed SEED --cases 1")
        return 1
    print("no mismatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
