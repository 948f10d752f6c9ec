"""Expected values from the published implementations, for tests/test_published.py.

    python -m tools.published --huginn DIR --coconut DIR [--out tests/published_vectors.json]

``--huginn DIR``: a folder holding the published ``raven_modeling_minimal.py`` and ``raven_config_minimal.py``
(Huginn's recurrent-pretraining repository, ``recpre/``); ``--coconut DIR``: one holding Coconut's
``coconut.py`` and ``dataset.py``. Neither is vendored: fetch them, point this tool at them. The tool builds the
tiny models of ``CASES`` with latentrt's own seeded initialisation (``build``; the test rebuilds the same
weights and checks their checksum), runs the published generate paths on them on the CPU (in fp32; the ``-bf16``
models in bf16, Huginn-0125's dtype) with the few shims transformers 5 needs (below), and writes the tokens and
per-token iterations they produce. The test then runs latentrt with the same options on every backend and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from . import wrapped

# ---------------------------------------------------------------------------------------------- the models
BASE_HUGINN = dict(
    model_type="huginn_raven",
    n_embd=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=40,
    block_size=128,
    n_layers_in_prelude=2,  # the published cache code hard-codes 2 prelude and 4 core layers
    n_layers_in_recurrent_block=4,
    n_layers_in_coda=2,
    mean_recurrence=8,
    tie_embeddings=True,
)
MODELS = {
    "huginn-a": dict(config=BASE_HUGINN, seed=1),
    "huginn-b": dict(config=BASE_HUGINN, seed=7),
    # the published config ignores padding_multiple: 97 rows, not 4096
    "huginn-vocab97": dict(config=dict(BASE_HUGINN, vocab_size=97, padding_multiple=4096), seed=2),
    # Huginn-0125's own dtype: the published exit criteria on the states (latent-diff, cosine) run in it
    "huginn-a-bf16": dict(config=BASE_HUGINN, seed=1, dtype="bfloat16"),
    "huginn-b-bf16": dict(config=BASE_HUGINN, seed=7, dtype="bfloat16"),
    # one KV head with qk_bias: the key broadcasts to every query head with that head's bias
    "huginn-mqa": dict(config=dict(BASE_HUGINN, num_attention_heads=4, num_key_value_heads=1), seed=3),
    # Huginn-0125's vocabulary size, so its stop tokens 65504 / 65505 / 65508 exist; the head row of 65505
    # copies (x 1.5) the row of a token the model produces, so the published stop is reached
    "huginn-stops": dict(
        config=dict(BASE_HUGINN, vocab_size=65536, n_embd=16, intermediate_size=32, tie_embeddings=False),
        seed=4,
        head_row_copy=(65505, None, 1.5),  # (row, source row: filled in by this tool, scale)
    ),
    "gpt2-a": dict(
        config=dict(model_type="gpt2", n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=40),
        seed=5,
        noise=0.3,
        markers=dict(latent_id=4, start_latent_id=2, end_latent_id=3),
    ),
    # GPT-2's vocabulary in bf16 (run.py evaluates a bf16 model so): a pass of one position over the KV cache
    # rounds otherwise than the published generate's pass over the whole sequence, and an answer token differs
    "gpt2-bf16": dict(
        config=dict(model_type="gpt2", n_embd=64, n_head=2, n_layer=2, n_positions=128, vocab_size=50257),
        seed=7,
        noise=0.3,
        markers=dict(latent_id=50254, start_latent_id=50255, end_latent_id=50256),
        dtype="bfloat16",
    ),
}


def build(name: str, spec: dict | None = None):
    """The model ``name`` of MODELS (or ``spec``) with latentrt's seeded init, on the CPU in fp32 (or the spec's
    ``dtype``, cast from those fp32 weights)."""
    from latentrt.families import build_model, parse_config

    spec = spec or MODELS[name]
    cfg = parse_config(dict(spec["config"], **spec.get("markers", {})))
    model = build_model(cfg, seed=spec["seed"])
    with torch.no_grad():
        for p in model.parameters():  # spread the (small-normal) init so exits and tokens vary
            g = torch.Generator().manual_seed(spec["seed"] + p.numel())
            p.add_(torch.randn(p.shape, generator=g) * spec.get("noise", 0.02))
        copy = spec.get("head_row_copy")
        if copy is not None and copy[1] is not None:
            row, src, scale = copy
            model.lm_head.weight[row] = scale * model.lm_head.weight[src]
        if spec.get("head_scale"):  # logits spread as a trained model's: peaked distributions
            model.lm_head.weight.mul_(spec["head_scale"])
    model.eval()
    return model.to(getattr(torch, spec.get("dtype", "float32")))


def checksum(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the cases
def _speculative(name: str, model: str, lookahead: int, draft_steps: int, threshold, depth: int, kv: str) -> dict:
    """A generate_speculative case: 12 greedy tokens at ``depth`` under the published lookup ``kv``."""
    return dict(
        name=name,
        model=model,
        max_new_tokens=12,
        speculative=dict(lookahead=lookahead, draft_steps=draft_steps, verification_threshold=threshold),
        options=dict(num_steps=depth, init_scale=0.0, kv_sharing=kv, decoding="speculative"),
    )


PROMPT = [5, 6, 7, 8, 9, 10, 11]
ADAPTIVE = dict(adaptive=True, num_steps=12, init_scale=0.0)
# the sampled adaptive cases' exit (their random initial state: the default init_scale 1)
SAMPLED_KL = dict(adaptive=True, num_steps=12, exit_criterion="kl", exit_threshold=5e-3, kv_sharing="latest-m4")
CASES = [
    # 1. min_steps: no check (and no criterion update) for the first min_steps iterations
    dict(
        name="min_steps latent-diff shared",
        model="huginn-a",
        options=dict(
            ADAPTIVE, exit_criterion="latent-diff", exit_threshold=0.3, min_steps=3, kv_sharing="latest-m4-compress-s4"
        ),
    ),
    dict(
        name="min_steps kl full",
        model="huginn-b",
        options=dict(ADAPTIVE, exit_criterion="kl", exit_threshold=5e-3, min_steps=2, kv_sharing="latest-m4"),
    ),
    dict(
        name="min_steps argmax-stability ring-2",
        model="huginn-a",
        options=dict(
            ADAPTIVE,
            exit_criterion="argmax-stability",
            exit_threshold=2,
            min_steps=4,
            kv_sharing="latest-m4-compress-s8",
        ),
    ),
    dict(  # min_steps above num_steps: the published loop never checks (latentrt warns, and runs it alike)
        name="min_steps above num_steps kl",
        model="huginn-b",
        options=dict(
            ADAPTIVE, num_steps=5, exit_criterion="kl", exit_threshold=1.0, min_steps=7, kv_sharing="latest-m4"
        ),
    ),
    # 2. the published default thresholds ("auto")
    dict(
        name="default kl threshold",
        model="huginn-b",
        options=dict(ADAPTIVE, exit_criterion="kl", kv_sharing="latest-m4"),
    ),
    dict(
        name="default latent-diff threshold",
        model="huginn-a",
        options=dict(ADAPTIVE, exit_criterion="latent-diff", kv_sharing="latest-m4"),
    ),
    # 3. Huginn's stop tokens
    dict(
        name="published stop tokens", model="huginn-stops", max_new_tokens=16, options=dict(num_steps=4, init_scale=0.0)
    ),
    # 4. padded_vocab_size as published
    dict(
        name="vocab 97 padding_multiple 4096",
        model="huginn-vocab97",
        options=dict(ADAPTIVE, exit_criterion="latent-diff", exit_threshold=0.1, kv_sharing="latest-m4"),
    ),
    # 5. one KV head with qk_bias
    dict(name="single kv head with qk_bias", model="huginn-mqa", options=dict(num_steps=5, init_scale=0.0)),
    dict(
        name="single kv head adaptive",
        model="huginn-mqa",
        options=dict(ADAPTIVE, exit_criterion="kl", exit_threshold=1e-2, kv_sharing="latest-m4"),
    ),
    # 6. the options latentrt lacked
    dict(
        name="minp-kl",
        model="huginn-b",
        options=dict(ADAPTIVE, exit_criterion="minp-kl", exit_threshold=1e-3, kv_sharing="latest-m4"),
    ),
    dict(
        name="check every 3 steps latent-diff",
        model="huginn-a",
        options=dict(
            ADAPTIVE,
            exit_criterion="latent-diff",
            exit_threshold=0.2,
            check_criterion_every_n_steps=3,
            kv_sharing="latest-m4",
        ),
    ),
    dict(
        name="check every 2 steps kl min_steps 1",
        model="huginn-b",
        options=dict(
            ADAPTIVE,
            exit_criterion="kl",
            exit_threshold=5e-3,
            min_steps=1,
            check_criterion_every_n_steps=2,
            kv_sharing="latest-m4-compress-s8",
        ),
    ),
    dict(
        name="do not exit in prefill",
        model="huginn-a",
        options=dict(
            ADAPTIVE,
            exit_criterion="latent-diff",
            exit_threshold=0.2,
            do_not_exit_in_prefill=True,
            kv_sharing="latest-m4",
        ),
    ),
    dict(
        name="cosine shared",
        model="huginn-b",
        options=dict(ADAPTIVE, exit_criterion="cosine", exit_threshold=0.02, kv_sharing="compress-s4"),
    ),
    # the criteria on the states in Huginn-0125's dtype: the published code computes and compares them in bf16
    dict(
        name="cosine bf16 default threshold",
        model="huginn-a-bf16",
        prompt=[20, 1, 1, 1, 34, 0, 24],
        options=dict(ADAPTIVE, exit_criterion="cosine", kv_sharing="latest-m4"),
    ),
    dict(
        name="latent-diff bf16",
        model="huginn-b-bf16",
        prompt=[2, 3, 15, 25, 2, 25, 31],
        options=dict(
            ADAPTIVE, exit_criterion="latent-diff", exit_threshold=0.10217837019447579, kv_sharing="latest-m4"
        ),
    ),
    dict(
        name="latent-diff bf16 b",
        model="huginn-a-bf16",
        prompt=[25, 36, 23, 33, 17, 5, 29],
        options=dict(
            ADAPTIVE, exit_criterion="latent-diff", exit_threshold=0.26223584276085815, kv_sharing="latest-m4"
        ),
    ),
    # a bf16 checkpoint file loaded by the published from_pretrained: its RoPE table is the file's (bf16 values)
    dict(
        name="bf16 checkpoint file rope table",
        model="huginn-a",
        from_file=True,
        prompt=[27, 30, 36, 0, 13, 29, 31, 17, 10, 2, 33, 31, 20, 4, 15, 23, 2, 26, 8, 38, 22, 24, 26, 18],
        max_new_tokens=12,
        options=dict(num_steps=8, init_scale=0.0, default_stops=False),
    ),
    # a zero initial state: the published cosine (no epsilon) is NaN at the first check, which never exits
    dict(
        name="cosine zero initial state",
        model="huginn-a",
        options=dict(ADAPTIVE, exit_criterion="cosine", exit_threshold=1.5, kv_sharing="latest-m4"),
    ),
    dict(
        name="entropy-diff ring-3 continuous",
        model="huginn-a",
        options=dict(
            ADAPTIVE,
            exit_criterion="entropy-diff",
            exit_threshold=0.05,
            continuous=True,
            kv_sharing="latest-m4-compress-s12",
        ),
    ),
    # continuous_compute at fixed depth: generate_with_adaptive_compute with criterion "none" feeds back the state
    # before ln_f (latentrt's rule); generate_minimal, where the published dispatcher sends continuous_compute
    # without a criterion, feeds back its forward's latent_states, the state after ln_f (README: a difference)
    dict(name="continuous fixed depth", model="huginn-a", options=dict(num_steps=4, init_scale=0.0, continuous=True)),
    dict(
        name="generate_minimal continuous fixed depth (the state after ln_f: differs)",
        model="huginn-a",
        minimal=True,
        published_differs=True,
        options=dict(num_steps=4, init_scale=0.0, continuous=True),
    ),
    # generate_minimal, the published fixed-depth loop: a sampled batch from torch's generator
    dict(
        name="generate_minimal sampled batch",
        model="huginn-b",
        minimal=True,
        prompts=[[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]],
        torch_seed=21,
        max_new_tokens=8,
        options=dict(num_steps=5, temperature=1.0, top_k=8, kv_sharing="latest-m4-compress-s4"),
    ),
    dict(
        name="token-by-token adaptive prefill",
        model="huginn-a",
        max_new_tokens=1,
        adaptive_prefill=True,
        options=dict(
            adaptive=True,
            exit_criterion="latent-diff",
            exit_threshold=0.2,
            num_steps=8,
            init_scale=0.0,
            kv_sharing="latest-m4",
            adaptive_prefill=True,
        ),
    ),
    dict(
        name="token-by-token adaptive prefill random initial state",
        model="huginn-b",
        prompt=[29, 23, 1, 35, 7, 7, 17],
        max_new_tokens=1,
        adaptive_prefill=True,
        options=dict(
            adaptive=True,
            exit_criterion="kl",
            exit_threshold=0.02,
            num_steps=8,
            kv_sharing="latest-m4-compress-s8",
            adaptive_prefill=True,
            seed=297,
        ),
    ),
    # 8. self-speculative decoding (generate_speculative): greedy, fixed depths, every KV rule, thresholds
    *[
        _speculative(f"speculative lookahead {la} draft {ds} threshold {thr} {kv}", mdl, la, ds, thr, 8, kv)
        for mdl, la, ds, thr, kv in [
            ("huginn-a", 3, 2, 1, "full"),
            ("huginn-b", 4, 1, 1, "full"),
            ("huginn-a", 2, 4, 1, "latest-m4"),
            ("huginn-b", 3, 2, 1, "latest-m4-compress-s4"),
            ("huginn-a", 4, 3, 1, "latest-m4-compress-s8"),
            ("huginn-b", 3, 1, 0.5, "full"),
            ("huginn-a", 5, 2, 0.2, "latest-m4-compress-s4"),
            ("huginn-b", 1, 3, 1, "full"),
        ]
    ],
    # 8b. the published lookups under speculative decoding (a depth past the anchor: 12)
    *[
        _speculative(f"speculative lookahead {la} draft {ds} {kv} depth {r}", mdl, la, ds, 1, r, kv)
        for mdl, la, ds, r, kv in [
            ("huginn-a", 3, 2, 12, "latest-m4-compress-anchor"),
            ("huginn-b", 4, 10, 12, "latest-m4-compress-anchor"),
            ("huginn-b", 3, 2, 8, "skip"),
            ("huginn-a", 3, 2, 8, "always-last-m4"),
            ("huginn-b", 4, 10, 12, "always-last-m4"),
            # drafts deeper than the verifier: the cache keeps draft_steps iterations; a draft's query past num_steps
            # finds no entry of the committed positions (the published full lookup: latentrt's skip; latest-m4:
            # latentrt's full, their latest entry)
            ("huginn-b", 8, 9, 6, "skip"),
            ("huginn-b", 8, 9, 6, "latest-m4"),
        ]
    ],
    # 9. wavefront decoding (generate_diffusion_style): the published defaults without randomness
    # (init_scale 0), and each freeze strategy / mixer / window setting
    *[
        dict(
            name=f"wavefront {label}",
            model=mdl,
            max_new_tokens=10,
            wavefront=opts,
            options=dict(num_steps=8, init_scale=0.0, decoding="wavefront"),
        )
        for label, mdl, opts in [
            ("defaults, never freezing", "huginn-a", {}),  # the window grows to the context, one token
            ("defaults b", "huginn-b", {}),
            ("exit_t 0.1 inner 2", "huginn-b", dict(exit_t=0.1, inner_recurrence=2)),
            ("latent-acceleration-1", "huginn-b", dict(freeze_strategy="latent-acceleration-1", exit_t=0.1)),
            ("latent-acceleration-2", "huginn-b", dict(freeze_strategy="latent-acceleration-2", exit_t=0.2)),
            ("token-stability", "huginn-b", dict(freeze_strategy="token-stability")),
            ("fixed", "huginn-a", dict(freeze_strategy="fixed")),
            ("no ema no noise", "huginn-b", dict(ema_embeds=0.0, state_noise_mixing=0.0, exit_t=0.05)),
            ("constant sqrt mixer", "huginn-a", dict(dampened_state_mixer=False, sqrt_mixer=True)),
            ("max_wavefront 3", "huginn-b", dict(max_wavefront=3, exit_t=0.01)),
            ("continuous", "huginn-a", dict(continuous=True, exit_t=0.05)),
            ("max_wavefront 0", "huginn-b", dict(max_wavefront=0, exit_t=0.01)),  # freezes past need + 1 positions
            ("fixed max_diffusion_steps 3", "huginn-a", dict(freeze_strategy="fixed", max_diffusion_steps=3)),
        ]
    ],
    # 9b. wavefront decoding under other published lookups than its default (one slot per core layer)
    *[
        dict(
            name=f"wavefront {kv} depth {r}",
            model=mdl,
            max_new_tokens=10,
            wavefront=opts,
            options=dict(num_steps=r, init_scale=0.0, decoding="wavefront", kv_sharing=kv),
        )
        for kv, mdl, r, opts in [
            ("latest-m4", "huginn-b", 8, dict(exit_t=0.1)),
            ("latest-m4-compress-s8", "huginn-b", 8, dict(exit_t=0.1)),
            ("latest-m4-compress-anchor", "huginn-a", 12, dict(exit_t=0.05, inner_recurrence=4)),
            ("skip", "huginn-b", 8, dict(exit_t=0.1)),
            ("latest-m4", "huginn-b", 3, dict(exit_t=0.1, inner_recurrence=6)),  # the prompt's entries end at 3
            ("skip", "huginn-b", 3, dict(exit_t=0.1, inner_recurrence=6)),  # ... the published full drops them
            ("always-last-m4", "huginn-b", 8, dict(exit_t=0.1)),
            ("always-last-m4", "huginn-b", 3, dict(exit_t=0.1, inner_recurrence=6)),
        ]
    ],
    # 10. the published sampler's repetition_penalty (HF's rule over the prompt and the new tokens), greedy
    dict(
        name="repetition penalty fixed depth",
        model="huginn-a",
        max_new_tokens=12,
        options=dict(num_steps=4, init_scale=0.0, repetition_penalty=1.8),
    ),
    dict(
        name="repetition penalty adaptive kl",
        model="huginn-b",
        max_new_tokens=12,
        options=dict(
            ADAPTIVE, exit_criterion="kl", exit_threshold=5e-3, kv_sharing="latest-m4", repetition_penalty=3.0
        ),
    ),
    # 10b. the same penalty from the model's own generation config (``self.generation_config``, what the
    # published generate reads when the caller passes none; latentrt: the checkpoint's generation_config.json)
    dict(
        name="repetition penalty from the model's generation config",
        model="huginn-a",
        max_new_tokens=12,
        options=dict(num_steps=4, init_scale=0.0),
        generation_config=dict(repetition_penalty=1.8, do_sample=False),
    ),
    # 11. the published sampler's DRY penalty (its own n-gram rule; applied when repetition_penalty != 1, in
    # its place: run_huginn passes a repetition_penalty of 2 beside it), greedy
    dict(
        name="dry penalty fixed depth",
        model="huginn-a",
        max_new_tokens=14,
        options=dict(num_steps=4, init_scale=0.0, dry_multiplier=0.8),
    ),
    dict(
        name="dry penalty adaptive kl",
        model="huginn-a",
        max_new_tokens=14,
        options=dict(
            ADAPTIVE,
            exit_criterion="kl",
            exit_threshold=5e-3,
            kv_sharing="latest-m4",
            dry_multiplier=2.0,
            dry_base=1.5,
            dry_allowed_length=1,
        ),
    ),
    # its penalty multiplier x base ** (match + 1 - allowed_length), which seldom reaches a chosen token (its match
    # reads the context forwards against the end backwards): here the prompt ends as it began, "9" then "20",
    # so the greedy 20 is penalised; 0.17 x 3 ** 1 outweighs its lead over 27 (0.40), 0.17 x 1.75 (the default
    # base) or 0.17 x 3 ** 0 (the default allowed length 2) does not: the case pins both fields
    dict(
        name="dry penalty base and allowed length",
        model="huginn-a",
        prompt=[9, 20, 13, 18, 23, 9],
        max_new_tokens=6,
        options=dict(num_steps=4, init_scale=0.0, dry_multiplier=0.17, dry_base=3.0, dry_allowed_length=1),
    ),
    # 12. the published default lookup under adaptive exit: its "full" (run with the published default, as
    # ``published_cache`` says) and its "skip" drop the positions that did not run the iteration; latentrt's
    # "skip" mode
    *[
        dict(
            name=name,
            model=model,
            max_new_tokens=16,
            published_cache=published,
            options=dict(ADAPTIVE, exit_criterion=crit, exit_threshold=th, kv_sharing="skip"),
        )
        for name, model, crit, th, published in [
            ("published full lookup adaptive kl", "huginn-b", "kl", 5e-3, "full"),
            ("published full lookup adaptive argmax-stability", "huginn-a", "argmax-stability", 3, "full"),
            ("skip lookup adaptive entropy-diff", "huginn-a", "entropy-diff", 1e-2, "skip"),
        ]
    ],
    # the same lookup where it drops positions in bf16: the published cache stacks the kept entries alone, and
    # attention over them with the dropped ones masked in between (or after them) rounds otherwise; here that
    # moved the fifth token's exit by one check (found by the published soak, seed 3371)
    dict(
        name="skip lookup bf16 cosine: the kept keys alone",
        model="huginn-a-bf16",
        prompt=[0, 11, 24, 28, 25, 25, 25, 4, 36, 30, 14, 17, 5, 8, 1],
        max_new_tokens=10,
        published_cache="full",
        options=dict(
            num_steps=11,
            init_scale=1.0,
            seed=569,
            adaptive=True,
            exit_criterion="cosine",
            exit_threshold=0.00012958383357396675,
            min_steps=3,
            continuous=True,
            kv_sharing="skip",
        ),
    ),
    # the published "always-last-m4" lookup: each earlier position's last iteration when one lacks the query's
    *[
        dict(
            name=f"always-last-m4 adaptive {crit}",
            model=model,
            max_new_tokens=16,
            options=dict(ADAPTIVE, exit_criterion=crit, exit_threshold=th, kv_sharing="always-last-m4"),
        )
        for model, crit, th in [("huginn-b", "kl", 5e-3), ("huginn-a", "entropy-diff", 1e-2)]
    ],
    # the published "available-m4" lookup: latentrt reads it as "full" (kv_modes.py says why they are one rule)
    dict(
        name="available-m4 adaptive kl",
        model="huginn-b",
        max_new_tokens=16,
        options=dict(ADAPTIVE, exit_criterion="kl", exit_threshold=5e-3, kv_sharing="available-m4"),
    ),
    # 13. the published anchored cache: the first 8 recurrences keep their K/V, later ones share one slot per layer
    dict(
        name="compress-anchor fixed depth",
        model="huginn-a",
        max_new_tokens=10,
        options=dict(num_steps=12, init_scale=0.0, kv_sharing="latest-m4-compress-anchor"),
    ),
    dict(
        name="compress-anchor adaptive kl",
        model="huginn-b",
        max_new_tokens=12,
        options=dict(ADAPTIVE, exit_criterion="kl", exit_threshold=5e-3, kv_sharing="latest-m4-compress-anchor"),
    ),
    # 14. randomness on torch's generator (``seed``: torch.manual_seed(seed) before the published call, latentrt's
    # ``seed=``): the random initial state of the default init_scale 1, drawn as the published draws it, and
    # its sampler's draws (do_sample with temperature / top_k / min_p) from the float32 probabilities it builds
    *[
        dict(name=name, model=model, max_new_tokens=n, options=dict(options, seed=seed))
        for name, model, n, seed, options in [
            ("random initial state fixed depth", "huginn-a", 8, 0, dict(num_steps=4)),
            (
                "random initial state adaptive kl",
                "huginn-b",
                10,
                1,
                dict(adaptive=True, num_steps=12, exit_criterion="kl", exit_threshold=5e-3, kv_sharing="latest-m4"),
            ),
            (
                "random initial state continuous latent-diff",
                "huginn-a",
                10,
                2,
                dict(adaptive=True, num_steps=12, exit_criterion="latent-diff", exit_threshold=0.1, continuous=True),
            ),
            ("sampling temperature fixed depth", "huginn-a", 12, 3, dict(num_steps=4, temperature=0.9)),
            # min_p where it drops tokens (the top_k / min_p case above draws the same tokens without it)
            ("sampling min_p fixed depth", "huginn-a", 12, 6, dict(num_steps=4, temperature=1.5, min_p=0.2)),
            (
                "sampling top_k min_p repetition penalty adaptive kl",
                "huginn-b",
                12,
                4,
                dict(SAMPLED_KL, temperature=1.3, top_k=6, min_p=0.05, repetition_penalty=1.5),
            ),
            # at init_scale 0 the published still draws the state (then zeroes it): the samples after it move
            (
                "sampling with a zero initial state",
                "huginn-b",
                12,
                5,
                dict(num_steps=4, init_scale=0.0, temperature=1.0),
            ),
            # its top_p rule (latentrt's published_top_p; its default is HF's): the token crossing p dropped,
            # the mass counted over the top-k probabilities as they are, not renormalised
            (
                "sampling published top_p fixed depth",
                "huginn-a",
                16,
                7,
                dict(num_steps=4, temperature=1.5, top_p=0.5, published_top_p=True),
            ),
            (
                "sampling published top_p top_k adaptive kl",
                "huginn-b",
                16,
                8,
                dict(SAMPLED_KL, temperature=2.0, top_k=8, top_p=0.5, published_top_p=True),
            ),
        ]
    ],
    # a batch at fixed depth (where the published batch is latentrt's): unseeded, every row draws from
    # torch's generator in the published order
    dict(
        name="batch sampling random initial state fixed depth",
        model="huginn-b",
        prompts=[PROMPT, [t + 2 for t in PROMPT], [t * 3 % 40 for t in PROMPT]],
        torch_seed=9,
        max_new_tokens=8,
        options=dict(num_steps=4, temperature=0.9, top_k=10),
    ),
    dict(
        name="speculative random initial state",
        model="huginn-a",
        max_new_tokens=12,
        speculative=dict(lookahead=3, draft_steps=2, verification_threshold=1),
        options=dict(num_steps=8, init_scale=1.0, kv_sharing="full", decoding="speculative", seed=6),
    ),
    # the samplers sampling (do_sample): drafts, the final token of a round, the wavefront's window
    dict(
        name="speculative sampling threshold 0.5",
        model="huginn-a",
        max_new_tokens=12,
        speculative=dict(lookahead=3, draft_steps=2, verification_threshold=0.5),
        options=dict(num_steps=8, init_scale=1.0, kv_sharing="full", decoding="speculative", temperature=0.7, seed=0),
    ),
    dict(
        name="wavefront sampling",
        model="huginn-b",
        max_new_tokens=10,
        wavefront=dict(exit_t=0.1),
        options=dict(num_steps=8, init_scale=1.0, decoding="wavefront", temperature=0.8, seed=2),
    ),
    # headway 2: each step's guess drawn by torch.randint below 65510 (a model with Huginn-0125's vocabulary)
    dict(
        name="wavefront headway 2 random guesses",
        model="huginn-stops",
        max_new_tokens=8,
        wavefront=dict(headway=2, exit_t=0.1),
        options=dict(num_steps=4, init_scale=1.0, decoding="wavefront", default_stops=False, seed=8),
    ),
    # continuous with a window narrower than headway (the first step's): new positions from fresh states
    dict(
        name="wavefront continuous headway 2",
        model="huginn-stops",
        max_new_tokens=8,
        wavefront=dict(headway=2, continuous=True, exit_t=0.1),
        options=dict(num_steps=4, init_scale=1.0, decoding="wavefront", default_stops=False, seed=8),
    ),
    dict(
        name="wavefront random initial state",
        model="huginn-b",
        max_new_tokens=10,
        wavefront=dict(exit_t=0.1),
        options=dict(num_steps=8, init_scale=1.0, decoding="wavefront", seed=7),
    ),
    # the published latent-acceleration-2 where a window cut by max_wavefront leaves one position against empty
    # slices of the earlier steps: torch broadcasts them to none (no freeze that step) and the sampler goes on
    dict(
        name="wavefront latent-acceleration-2 broadcast slices",
        model="huginn-a",
        prompt=[32, 6, 22, 17, 14],
        max_new_tokens=10,
        wavefront=dict(
            inner_recurrence=6,
            freeze_strategy="latent-acceleration-2",
            state_noise_mixing=0.0,
            sqrt_mixer=True,
            max_wavefront=4,
        ),
        options=dict(num_steps=12, init_scale=0.0, decoding="wavefront", temperature=1.0, top_k=2, seed=450),
    ),
    # 7. Coconut's end of sequence
    dict(
        name="coconut published eos",
        model="gpt2-a",
        coconut=True,
        prompt=[13, 2, 4, 4, 4, 4, 3],
        max_new_tokens=10,
        options=dict(published_eos=True),
    ),
    dict(  # eos := the second answer token: the first one the published generate checks ends it, left out
        name="coconut published eos, the second answer token",
        model="gpt2-a",
        coconut=True,
        prompt=[13, 2, 4, 4, 4, 4, 3],
        max_new_tokens=10,
        eos_at=1,
        options=dict(published_eos=True),
    ),
    dict(  # the seventh answer token: from the cache, 472; the published generate's whole-sequence pass, 40871
        name="coconut bf16 answer tokens recomputed as published",
        model="gpt2-bf16",
        coconut=True,
        prompt=[22403, 20018, 47870, 21749, 2898, 50255, 50254, 50254, 50254, 50256],
        max_new_tokens=8,
        options=dict(published_eos=True, published_recompute=True),
    ),
]


# ---------------------------------------------------------------------------------------------- shims
def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def huginn_module(folder: Path):
    """The published modeling file as a package ``raven`` (it imports its config relatively), under transformers
    5 with the shims it needs: tied-weight keys as a mapping, a ``cache`` field on its output class (the
    output wrapper renames past_key_values), transformers 4's ``_get_initial_cache_position`` and its
    cache-position update between tokens."""
    pkg = type(sys)("raven")
    pkg.__path__ = [str(folder)]
    sys.modules["raven"] = pkg
    _load_module(folder / "raven_config_minimal.py", "raven.raven_config_minimal")
    rm = _load_module(folder / "raven_modeling_minimal.py", "raven.raven_modeling_minimal")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # the version the file was written for: no shims
        return rm
    from dataclasses import dataclass
    from typing import Any

    @dataclass
    class Output(rm.CausalLMOutputRecurrentLatents):
        cache: Any = None

    def initial_cache_position(self, seq_length, device, model_kwargs):
        model_kwargs["cache_position"] = torch.arange(seq_length, device=device)
        return model_kwargs

    def next_cache_position(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        # transformers 4's rule, which the published loops rely on (5 no longer advances cache_position here);
        # the Huginn cache object stays in model_kwargs
        model_kwargs["cache_position"] = model_kwargs["cache_position"][-1:] + num_new_tokens
        return model_kwargs

    rm.CausalLMOutputRecurrentLatents = Output
    rm.RavenForCausalLM._get_initial_cache_position = initial_cache_position
    rm.RavenForCausalLM._update_model_kwargs_for_generation = next_cache_position
    rm.RavenPreTrainedModel._tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    return rm


def published_huginn(rm, model):
    """The published RavenForCausalLM with ``model``'s weights, instrumented to count iterations per unit."""
    raw = {k: v for k, v in model.config.to_dict().items() if v is not None and k != "model_type"}
    raw["n_heads"] = raw.pop("num_attention_heads")
    cfg = rm.RavenConfig(**raw)
    pub = rm.RavenForCausalLM(cfg).eval()
    missing, unexpected = pub.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "freqs_cis"}, (missing, unexpected)
    if not model.config.tie_embeddings:
        pub.lm_head.weight.data.copy_(model.lm_head.weight)
    pub = pub.to(model.lm_head.weight.dtype)  # the published model in the model's dtype (bf16: Huginn-0125's)
    units: list[int] = []
    embed, iterate = pub.embed_inputs, pub.iterate_one_step

    def counted_embed(*a, **k):
        units.append(0)
        return embed(*a, **k)

    def counted_iterate(*a, **k):
        units[-1] += 1
        return iterate(*a, **k)

    pub.embed_inputs, pub.iterate_one_step = counted_embed, counted_iterate
    return pub, units


def _seed(case: dict) -> None:
    """With the option ``seed``, torch's generator seeded just before the published call: its random initial states (and
    samples) are drawn from it, as latentrt draws them from ``generate(..., seed=)``'s."""
    if "seed" in case["options"]:
        torch.manual_seed(case["options"]["seed"])
    elif "torch_seed" in case:  # a batch: latentrt unseeded, on torch's generator seeded alike
        torch.manual_seed(case["torch_seed"])


def _sampling(options: dict) -> dict:
    """The published sampler's generation-config fields for latentrt's options: do_sample with a temperature
    (its draws on torch's generator, seeded by ``_seed``), top_k / top_p / min_p (None: off)."""
    out = {k: options.get(k) for k in ("temperature", "top_k", "top_p", "min_p")}
    return dict(out, do_sample=bool(options.get("temperature")))


def _penalties(options: dict) -> dict:
    """The published sampler's penalty fields: a repetition penalty, or DRY (which it applies in place of a
    repetition penalty != 1)."""
    if not options.get("dry_multiplier"):
        return dict(repetition_penalty=options.get("repetition_penalty", 1.0))
    dry = {k: options[k] for k in ("dry_base", "dry_allowed_length") if k in options}
    return dict(repetition_penalty=2.0, dry_multiplier=options["dry_multiplier"], **dry)


def _prompt_ids(case: dict) -> torch.Tensor:
    """The case's prompt as a [1, S] batch, or its prompts (one length) as [B, S]."""
    return torch.tensor(case["prompts"] if "prompts" in case else [case.get("prompt", PROMPT)])


def _new_tokens(case: dict, seq: torch.Tensor, ids: torch.Tensor) -> list:
    """The tokens after the prompt in a published output ``seq``: a list, or one per row for a batch."""
    tokens = seq[:, ids.shape[1] :].tolist()
    return tokens if "prompts" in case else tokens[0]


def run_speculative(rm, case: dict, model) -> dict:
    """generate_speculative; the tokens committed per round from where each verify pass starts."""
    from transformers import GenerationConfig

    pub, _ = published_huginn(rm, model)
    o, sp = case["options"], case["speculative"]
    ids = torch.tensor([case.get("prompt", PROMPT)])
    n_new = case["max_new_tokens"]
    starts: list[int] = []
    forward = pub.forward

    def recorded(*a, **k):  # a verify pass: num_steps over lookahead positions after the prompt
        if k.get("num_steps") == o["num_steps"] and starts is not None:
            starts.append(int(k["cache_position"][0]) if k.get("cache_position") is not None else -1)
        return forward(*a, **k)

    pub.forward = recorded
    gc = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, **_sampling(o))
    _seed(case)
    seq = pub.generate_speculative(
        ids,
        gc,
        num_steps=o["num_steps"],
        init_scale=o["init_scale"],
        cache_lookup_strategy=o["kv_sharing"],
        draft_steps=sp["draft_steps"],
        lookahead_for_draft=sp["lookahead"],
        verification_threshold=sp["verification_threshold"],
        max_new_tokens=n_new,
    )
    verify = [s for s in starts[1:]]  # starts[0]: the prompt
    if sp["draft_steps"] == o["num_steps"]:
        verify = verify[sp["lookahead"] :: sp["lookahead"] + 1]  # every lookahead + 1-th call verifies
    ends = [v + 1 for v in verify] + [seq.shape[1]]  # round r commits ends[r + 1] - ends[r] tokens
    accepted = [b - a for a, b in zip(ends, ends[1:])]
    return {"tokens": seq[0, ids.shape[1] :].tolist()[:n_new], "accepted": accepted}


def run_minimal(rm, case: dict, model) -> dict:
    """generate_minimal (the published dispatcher's path for ``continuous_compute`` without an exit criterion):
    fixed depth, one or several prompts; the tokens (each row's, for a batch)."""
    from transformers import GenerationConfig

    pub, _ = published_huginn(rm, model)
    o = case["options"]
    ids = _prompt_ids(case)
    n_new = case.get("max_new_tokens", 8)
    gc = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, **_sampling(o), **_penalties(o))
    _seed(case)
    seq = pub.generate_minimal(
        ids,
        gc,
        continuous_compute=o.get("continuous", False),
        init_scale=o.get("init_scale", 1.0),
        cache_lookup_strategy=o.get("kv_sharing", "full"),
        num_steps=o.get("num_steps", model.config.mean_recurrence),
        max_new_tokens=n_new,
    )
    return {"tokens": _new_tokens(case, seq, ids)}


def run_hf(rm, case: dict, model) -> dict:
    """The published model through transformers' own ``generate`` (its dispatcher's path without latentrt's
    keywords: the model card's ``model.generate(ids, config, num_steps=...)``; transformers 4, whose generate
    loop the published file was written for), fixed depth, greedy or sampled by transformers' processors."""
    from transformers import GenerationConfig

    pub, _ = published_huginn(rm, model)
    o = case["options"]
    ids = _prompt_ids(case)
    n_new = case.get("max_new_tokens", 8)
    # top_k None: transformers 4's GenerationConfig would sample from the top 50 (latentrt reads no such default)
    gc = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, use_cache=True, **_sampling(o), **_penalties(o))
    _seed(case)
    seq = pub.generate(ids, gc, num_steps=o["num_steps"], init_scale=o.get("init_scale", 1.0))
    return {"tokens": _new_tokens(case, seq, ids)}


def run_wavefront(rm, case: dict, model) -> dict:
    """generate_diffusion_style; the tokens and the iterations of the state that produced each."""
    from transformers import GenerationConfig

    pub, _ = published_huginn(rm, model)
    o, wf = case["options"], dict(case["wavefront"])
    ids = torch.tensor([case.get("prompt", PROMPT)])
    n_new = case["max_new_tokens"]
    if "continuous" in wf:
        wf["continuous_compute"] = wf.pop("continuous")
    gc = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, return_dict_in_generate=True, **_sampling(o))
    if "kv_sharing" in o:  # the published default otherwise (latest-m4-compress-s4)
        wf["cache_lookup_strategy"] = "full" if o["kv_sharing"] == "skip" else o["kv_sharing"]
    _seed(case)
    out = pub.generate_diffusion_style(
        ids, gc, num_steps=o["num_steps"], init_scale=o["init_scale"], max_new_tokens=n_new, **wf
    )
    S = ids.shape[1]
    tokens = out.sequences[0, S:].tolist()[:n_new]
    per_position = out.scores["recurrence_per_position"][0].tolist()
    steps = [per_position[S + i - 1] for i in range(len(tokens))]
    return {"tokens": tokens, "steps": steps, "diffusion_steps": out.scores["diffusion_steps"]}


def run_latentrt(case: dict, model, backend: str = "torch", n_tokens: int | None = None):
    """latentrt's generate() on ``model`` with ``case``'s options as the published run had them (its multi-token
    sampler's options, the model's generation config, a Coconut case's eos, a batch's torch seed); the first
    ``n_tokens`` (default the case's ``max_new_tokens``, else 8)."""
    import latentrt
    from latentrt.backends import get_backend
    from latentrt.options import generation_defaults

    model.backend = get_backend(backend, model)
    if case.get("coconut"):
        model.eos_token_id = case["eos"]
    n = n_tokens or case.get("max_new_tokens", 8)
    sampler = case.get("speculative") or case.get("wavefront")  # a multi-token sampler's options
    extra = {} if sampler is None else dict(decoding_options=sampler)
    # the model's generation_config.json, as load() reads it (the published: the model's generation config)
    model.generation_defaults = generation_defaults(case.get("generation_config", {}), case["name"])
    if "torch_seed" in case:  # a batch drawing from torch's generator, seeded as the published run was
        torch.manual_seed(case["torch_seed"])
    prompt = case.get("prompts") or case.get("prompt", PROMPT)
    return latentrt.generate(model, prompt, max_new_tokens=n, **case["options"], **extra)


def save_bf16_checkpoint(model, folder: Path) -> None:
    """``model`` saved as a bf16 Huginn checkpoint is (Huginn-0125's dtype): latentrt's folder (published config
    names, the published ``freqs_cis`` table) with every tensor, the table included, cast to bf16."""
    from safetensors.torch import load_file, save_file

    from latentrt.checkpoint import save_checkpoint

    save_checkpoint(model, folder, tie_key="lm_head.weight" if model.config.tie_embeddings else None)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def run_huginn_from_file(rm, case: dict, model) -> dict:
    """The published model loaded by ``from_pretrained`` (bf16) from ``save_bf16_checkpoint``'s folder, its greedy
    fixed-depth tokens: its RoPE table is the file's, rounded to bf16."""
    import tempfile

    from transformers import GenerationConfig

    o = case["options"]
    with tempfile.TemporaryDirectory() as tmp:
        save_bf16_checkpoint(model, Path(tmp))
        pub = rm.RavenForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
    ids = torch.tensor([case["prompt"]])
    gc = GenerationConfig(max_new_tokens=case["max_new_tokens"], eos_token_id=None, do_sample=False)
    seq = pub.generate_with_adaptive_compute(
        ids, gc, max_new_tokens=case["max_new_tokens"], num_steps=o["num_steps"], init_scale=0.0, criterion="none"
    )
    return {"tokens": seq[0, ids.shape[1] :].tolist()}


def run_huginn(rm, case: dict, model) -> dict:
    from transformers import GenerationConfig

    if "speculative" in case:
        return run_speculative(rm, case, model)
    if "wavefront" in case:
        return run_wavefront(rm, case, model)
    if case.get("minimal"):
        return run_minimal(rm, case, model)
    if case.get("hf"):
        return run_hf(rm, case, model)
    if case.get("from_file"):
        return run_huginn_from_file(rm, case, model)
    pub, units = published_huginn(rm, model)
    o = case["options"]
    ids = _prompt_ids(case)
    n_new = case.get("max_new_tokens", 8)
    gc = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, **_sampling(o), **_penalties(o))
    if "generation_config" in case:  # the model's own config, read by generate when it is passed none
        pub.generation_config = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, **case["generation_config"])
        gc = None
    if case.get("adaptive_prefill"):
        evaluator = rm.get_adaptive_exit_evaluator(pub, o["exit_criterion"], o["exit_threshold"])
        cache = rm.HuginnDynamicCache(lookup_strategy=o["kv_sharing"])
        _seed(case)
        out = pub.forward_with_adaptive_compute(
            ids, evaluator, past_key_values=cache, init_scale=o.get("init_scale", 1.0)
        )
        return {"tokens": [int(out.logits[0, -1].argmax())], "prefill_steps": out.stats["compute_steps"]}
    kw = dict(
        max_new_tokens=n_new,
        criterion=o.get("exit_criterion", "none") if o.get("adaptive") else "none",
        exit_threshold=o.get("exit_threshold") if o.get("exit_threshold") is not None else "auto",
        num_steps=o.get("num_steps", model.config.mean_recurrence),
        init_scale=o.get("init_scale", 1.0),
        cache_lookup_strategy=case.get("published_cache", o.get("kv_sharing", "full")),
        min_steps=o.get("min_steps", 0),
        check_criterion_every_n_steps=o.get("check_criterion_every_n_steps", 1),
        do_not_exit_in_prefill=o.get("do_not_exit_in_prefill", False),
        continuous_compute=o.get("continuous", False),
    )
    _seed(case)
    seq = pub.generate_with_adaptive_compute(ids, gc, **kw)
    tokens = _new_tokens(case, seq, ids)
    if "prompts" in case:
        return {"tokens": tokens}
    steps = [u for u in units if u]  # continuous mode embeds the prompt once more to initialise the state
    return {"tokens": tokens, "steps": steps[: len(tokens)]}


def coconut_module(folder: Path):
    return _load_module(folder / "coconut.py", "coconut_published")


def coconut_dataset_module(folder: Path):
    """Coconut's dataset.py. It imports HF ``datasets`` for a type it names only; where that package is absent a
    stand-in module lets it load (the functions used here take any object with ``map`` and ``features``)."""
    if importlib.util.find_spec("datasets") is None:
        sys.modules["datasets"] = type(sys)("datasets")
        sys.modules["datasets"].Dataset = object
    return _load_module(folder / "dataset.py", "coconut_dataset_published")


def published_coconut(cm, model, eos: int):
    """Coconut's module (``cm.Coconut``) around an HF GPT-2 with ``model``'s weights; past key values as the
    legacy tuples the published code slices (transformers 5 passes cache objects). Returns (it, the HF
    model)."""
    from torch import nn
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import Cache

    c = model.config
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_embd=c.n_embd,
            n_head=c.n_head,
            n_layer=c.n_layer,
            n_positions=c.n_positions,
            vocab_size=c.vocab_size,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    ).eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    hf = hf.to(model.lm_head.weight.dtype)  # the model's dtype (as published_huginn)

    class LegacyCache(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def forward(self, past_key_values=None, **kw):
            if past_key_values is not None and not isinstance(past_key_values, Cache):
                past_key_values = DynamicCache(ddp_cache_data=list(past_key_values), config=self.lm.config)
            out = self.lm(past_key_values=past_key_values, **kw)
            if out.past_key_values is not None:
                out.past_key_values = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
            return out

    m = c.start_latent_id, c.latent_id, c.end_latent_id
    return cm.Coconut(LegacyCache(hf), m[1], m[0], m[2], eos), hf


def run_coconut(cm, case: dict, model, eos: int) -> dict:
    """Coconut's generate on the HF GPT-2 with ``model``'s weights."""
    pub, _ = published_coconut(cm, model, eos)
    ids = torch.tensor([case["prompt"]])
    with torch.no_grad():
        seq = pub.generate(ids, torch.ones_like(ids), max_new_tokens=case["max_new_tokens"])
    return {"tokens": seq[0, ids.shape[1] :].tolist(), "eos": eos}


# Coconut training: a batch of curriculum examples (question [+ start + thoughts] | [end +] steps + answer + eos,
# labels on the steps and the answer), markers by name, laid out by the published collator (dataset.py's
# MyCollator); run.py's forward for the mode (the Coconut module for coconut, the plain GPT-2 for the others) in
# train mode where torch_seed is given: its loss and gradients
TRAINING = [
    dict(
        name="coconut training loss, a padded batch",
        model="gpt2-a",
        eos=1,
        examples=[
            ([5, 6, 7, 8, "S", "L", "L"], ["E", 9, 10, 11, 12, "EOS"]),
            ([13, 14, "S", "L", "L"], ["E", 15, 9, 10, 16, 17, 18, "EOS"]),
            ([19, 5, 20, "S", "L", "L"], ["E", 21, "EOS"]),
        ],
    ),
    dict(  # run.py trains the model in train mode: GPT-2's dropout (0.1 at each site) draws from torch's generator
        name="coconut training loss in train mode (dropout), a padded batch",
        model="gpt2-a",
        eos=1,
        torch_seed=11,
        examples=[
            ([5, 6, 7, 8, "S", "L", "L", "L"], ["E", 9, 10, 11, 12, "EOS"]),
            ([13, 14, "S", "L", "L", "L"], ["E", 15, 9, 10, 16, 17, 18, "EOS"]),
            ([19, 5, 20, "S", "L", "L", "L"], ["E", 21, "EOS"]),
        ],
    ),
    dict(  # uniform_prob mixes stages in a batch: the collator aligns the first thoughts, a row without any stays
        name="coconut training in train mode, rows of 3, 1 and 0 thoughts (mixed stages)",
        model="gpt2-a",
        eos=1,
        torch_seed=12,
        examples=[
            ([5, 6, "S", "L", "L", "L"], ["E", 9, 10, "EOS"]),
            ([13, 14, 15, 16, 17, "S", "L"], ["E", 15, 9, 10, 16, 17, 18, "EOS"]),
            ([19, 5, 20, "S"], ["E", 21, 22, 23, "EOS"]),
        ],
    ),
    dict(
        name="cot training in train mode: no markers, rows of different question lengths",
        model="gpt2-a",
        mode="cot",
        eos=1,
        torch_seed=13,
        examples=[([5, 6, 7, 8, 9], [10, 11, 12, 13, "EOS"]), ([14, 15], [16, 17, "EOS"]), ([18, 19, 20], [21, "EOS"])],
    ),
    dict(
        name="pause-as-thought training in train mode: the latent tokens ordinary",
        model="gpt2-a",
        mode="pause",
        eos=1,
        torch_seed=14,
        examples=[
            ([5, 6, 7, "S", "L", "L"], ["E", 9, 10, "EOS"]),
            ([13, "S", "L", "L"], ["E", 15, 9, 10, 16, "EOS"]),
        ],
    ),
]
PLAIN_MODES = ("cot", "nocot", "nothoughts")  # run.py: no markers (no_special_marker), all labels after the question


def _hf_tokenizer(vocab_size: int, pad: int):
    """A transformers tokenizer over ids alone (``str(i)`` is token i) whose pad token is ``pad``, right padding:
    what the published collator needs of run.py's (GPT-2's, its pad token its eos)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=str(pad))
    hf.padding_side = "right"
    return hf


def grad_norm(module) -> float:
    """The gradients' norm in float64 (a bf16 model's gradients summed in bf16 round by the parameters' order,
    which the published modules and latentrt's need not share)."""
    return float(sum(p.grad.double().norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5)


def coconut_examples(case: dict, model) -> list[list]:
    """The case's examples with the markers' names (S, L, E, EOS) resolved, each (pre, post, labels of post) as
    get_cot_latent_dataset labels them: the post part after the end marker, or all of it in a plain mode."""
    c = model.config
    names = {"S": c.start_latent_id, "L": c.latent_id, "E": c.end_latent_id, "EOS": case["eos"]}
    plain = case.get("mode", "coconut") in PLAIN_MODES
    out = []
    for pre, post in ([[names.get(t, t) for t in part] for part in ex] for ex in case["examples"]):
        out.append([pre, post, post if plain else [-100] + post[1:]])
    return out


def run_coconut_training(cm, dm, case: dict, model) -> dict:
    """run.py's training step on the case's batch: each example as get_cot_latent_dataset makes it (input ids,
    labels: -100 on the question, the markers and the thoughts; attention mask; position ids), the batch from
    the published MyCollator (left padding that aligns the rows' first thoughts, a row without thoughts
    unpadded, then right padding), the forward run.py runs for the mode; its loss and the gradient norm of the
    weights."""
    c = model.config
    eos = case["eos"]
    examples = coconut_examples(case, model)
    features = []
    for pre, post, post_labels in examples:
        ids = pre + post
        features.append(
            dict(
                input_ids=ids,
                labels=[-100] * len(pre) + post_labels,
                attention_mask=[1] * len(ids),
                position_ids=list(range(len(ids))),
            )
        )
    batch = dm.MyCollator(_hf_tokenizer(c.vocab_size, eos), latent_id=c.latent_id)(features)
    pub, hf = published_coconut(cm, model, eos)
    if case.get("torch_seed") is not None:  # train mode: dropout on, drawn from torch's generator
        hf.train()
        torch.manual_seed(case["torch_seed"])
    with torch.enable_grad():
        if case.get("mode", "coconut") == "coconut":
            loss = pub(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]).loss
        else:  # run.py wraps only Coconut's model: the others are the plain GPT-2 (pause: its latent tokens too)
            loss = hf(**batch).loss
        loss.backward()
    return {"examples": examples, "loss": float(loss), "grad_norm": grad_norm(hf)}


# Coconut's data: its dataset.py's get_cot_latent_dataset (one training sequence and its labels) on token ids, at a
# scheduled stage, with the configs run.py gives each method (coconut / pause: the *_coconut.yaml fields; cot:
# gsm_cot.yaml's c_thought 0 and stage 0; no_cot; no_thoughts: c_thought 0), markers 2 / 3 / 4 (start, end, latent)
_SAMPLES = [  # (question, steps, answer): 0, 1, 2 and 4 steps
    ([10, 11, 12], [], [30, 31, 1]),
    ([10, 13], [[20, 21]], [32, 1]),
    ([14, 15, 16, 17], [[22], [23, 24, 25]], [33, 34, 1]),
    ([18], [[26, 27], [28], [29, 20], [21, 22, 23]], [35, 1]),
]
CURRICULUM = [
    dict(name=f"coconut data: {mode} c={c} max_stage={m} stage {s}", mode=mode, c=c, max_stage=m, stage=s)
    for mode, c, m, stages in (
        ("coconut", 1, 2, (0, 1, 2, 3, 5)),
        ("coconut", 2, 3, (1, 3, 4)),
        ("cot", 1, 2, (0,)),
        ("nocot", 1, 2, (0,)),
        ("nothoughts", 1, 2, (0, 1, 2, 3)),
    )
    for s in stages
]


def run_curriculum(dm, case: dict) -> dict:
    """get_cot_latent_dataset on ``_SAMPLES`` over a list standing in for the HF dataset (its ``map`` over the
    rows in order; with one process it shuffles nothing): each sample's input_ids and labels."""
    from types import SimpleNamespace

    class Rows(list):
        features = {"question_tokenized": 0, "steps_tokenized": 0, "answer_tokenized": 0, "idx": 0}

        def map(self, fn, remove_columns=None, num_proc=None):
            return Rows(fn(dict(row)) for row in self)

    mode, c = case["mode"], case["c"]
    plain = mode in ("cot", "nocot", "nothoughts")  # run.py: no_special_marker=cot or no_cot or no_thoughts
    configs = SimpleNamespace(
        c_thought=0 if mode in ("cot", "nothoughts") else c,  # gsm_cot.yaml's 0; run.py zeroes it for no_thoughts
        max_latent_stage=case["max_stage"],
        pad_latent_to_max=True,  # every published config
        uniform_prob=0.0,
        no_cot=mode == "nocot",
    )
    stage = 0 if mode in ("cot", "nocot") else case["stage"]  # run.py: stage 0 for cot and no_cot
    rows = Rows(
        dict(question_tokenized=q, steps_tokenized=steps, answer_tokenized=a, idx=i)
        for i, (q, steps, a) in enumerate(_SAMPLES)
    )
    out = dm.get_cot_latent_dataset(stage, rows, configs, 2, 4, 3, no_special_marker=plain)
    return {"samples": _SAMPLES, "sequences": [[r["input_ids"], r["labels"]] for r in out]}


# Huginn training: the published forward in training mode as its fine-tuning script calls it (input_ids[:, :-1],
# labels[:, 1:]: right-padded rows, labels -100 where there is no loss) at a given (no-grad, grad) depth, its
# random initial state drawn from torch's generator seeded just before; the loss and the gradients' norm
HUGINN_TRAINING = [
    dict(
        name="huginn training: random state, truncated backprop, a padded batch",
        model="huginn-a",
        steps=[3, 2],
        torch_seed=21,
        ids=[[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 0, 0, 0]],
        labels=[[-100, -100, -100, -100, 9, 10, 11, 12, 13], [-100, -100, 16, 17, 18, 19, -100, -100, -100]],
    ),
    dict(
        name="huginn training: every iteration with gradients",
        model="huginn-b",
        steps=[0, 4],
        torch_seed=22,
        ids=[[20, 21, 22, 23, 24, 25, 26]],
        labels=[[20, 21, 22, 23, 24, 25, 26]],
    ),
    dict(  # the fine-tuning script's precision ("bf16-true": bf16 weights, no autocast)
        name="huginn training in bf16",
        model="huginn-a-bf16",
        steps=[3, 2],
        torch_seed=24,
        ids=[[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 0, 0, 0]],
        labels=[[-100, -100, -100, -100, 9, 10, 11, 12, 13], [-100, -100, 16, 17, 18, 19, -100, -100, -100]],
    ),
    dict(
        name="huginn training: one KV head with qk_bias",
        model="huginn-mqa",
        steps=[2, 3],
        torch_seed=23,
        ids=[[5, 9, 13, 17, 21, 25], [6, 10, 14, 18, 22, 26]],
        labels=[[-100, 9, 13, 17, 21, 25], [-100, -100, -100, 18, 22, 26]],
    ),
]


# the published sampler (``_sample_next_token``: the adaptive, speculative and wavefront samplers' draws) on logits
# with ties: a bf16 model's logits take few values (here bf16-rounded normals over 512 tokens), so a top-k, top-p
# or min-p cut often falls inside a tie; four equal logits make the plainest one
SAMPLERS_CASES = [
    dict(name=f"{what} T={t}", vocab=v, scale=sc, seed=seed, temperature=t, **filters)
    for seed, (what, v, sc, filters) in enumerate(
        [
            ("top_p 0.9 bf16", 512, 2.0, dict(top_p=0.9)),
            ("top_p 0.5 bf16", 512, 2.0, dict(top_p=0.5)),
            ("top_k 40 top_p 0.8 bf16", 512, 2.0, dict(top_k=40, top_p=0.8)),
            ("min_p 0.1 bf16", 512, 2.0, dict(min_p=0.1)),
            ("top_k 30 top_p 0.95 min_p 0.05 bf16", 512, 1.0, dict(top_k=30, top_p=0.95, min_p=0.05)),
            ("top_p 0.5 four equal logits", 4, 0.0, dict(top_p=0.5)),
        ],
        start=40,
    )
    for t in (0.7, 1.0)
]


def sampler_logits(case: dict) -> torch.Tensor:
    """A sampler case's logits [1, vocab]: float32 holding bf16 values (normals x ``scale`` from its seed)."""
    x = torch.randn(1, case["vocab"], generator=torch.Generator().manual_seed(case["seed"])) * case["scale"]
    return x.to(torch.bfloat16).float()


def run_sampler(rm, case: dict) -> dict:
    """The published ``_sample_next_token`` on the case's logits after ``torch.manual_seed(seed)``: the ids its
    distribution keeps (the nonzero entries of what it hands ``torch.multinomial``) and the token it draws."""
    from transformers import GenerationConfig

    seen = []

    def record(real):
        def multinomial(probs, *args, **kwargs):
            seen.append(probs.clone())
            return real(probs, *args, **kwargs)

        return multinomial

    filters = {k: case.get(k) for k in ("top_k", "top_p", "min_p")}
    config = GenerationConfig(do_sample=True, temperature=case["temperature"], repetition_penalty=None, **filters)
    torch.manual_seed(case["seed"])
    with wrapped(torch, "multinomial", record):
        token = rm.RavenForCausalLM._sample_next_token(None, sampler_logits(case), None, config)
    return {"kept": seen[0][0].nonzero().flatten().tolist(), "token": int(token)}


def run_huginn_training(rm, case: dict, model) -> dict:
    """The published RavenForCausalLM in training mode on the case's batch: its loss and gradients' norm."""
    pub, _ = published_huginn(rm, model)
    pub.train()
    ids, labels = torch.tensor(case["ids"]), torch.tensor(case["labels"])
    n, k = (torch.tensor(v) for v in case["steps"])
    torch.manual_seed(case["torch_seed"])
    with torch.enable_grad():
        loss = pub(ids[:, :-1], labels=labels[:, 1:].contiguous(), num_steps=(n, k)).loss
        loss.backward()
    return {"loss": float(loss), "grad_norm": grad_norm(pub)}


def _loss_and_grad_norm(model, loss_fn) -> dict:
    """``loss_fn()``'s value and the weights' gradient norm after its backward (gradients cleared before and
    after, the model back in eval mode)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = loss_fn()
        loss.backward()
    norm = grad_norm(model)
    model.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": loss.item(), "grad_norm": norm}


def latentrt_coconut_training(case: dict, model) -> dict:
    """The Coconut trainer's loss (its thoughts as KV-cached single-position passes, latentrt's collate) on the
    case's resolved examples (pre, post, labels of post: ``run_coconut_training``'s), in train mode with dropout
    drawn from torch's generator where the case has a ``torch_seed``; its gradient norm."""
    from latentrt.train.coconut import CoconutLoss, collate

    examples = [tuple(ex) for ex in case["examples"]]
    continuous = case.get("mode") != "pause"  # pause as thought: the latent tokens are ordinary tokens

    def loss():
        if case.get("torch_seed") is not None:
            model.train()
            torch.manual_seed(case["torch_seed"])
        return CoconutLoss(model, None, continuous)(*collate(examples, 0, "cpu", model.config.latent_id))

    return _loss_and_grad_norm(model, loss)


def latentrt_huginn_training(case: dict, model) -> dict:
    """The recurrent trainer's loss (RecurrentLoss at the case's no-grad / grad depth) in train mode, the random
    initial state drawn from torch's generator seeded by the case; its gradient norm."""
    from latentrt.train.recurrent import RecurrentLoss

    def loss():
        model.train()
        torch.manual_seed(case["torch_seed"])
        return RecurrentLoss(model)(torch.tensor(case["ids"]), torch.tensor(case["labels"]), *case["steps"])

    return _loss_and_grad_norm(model, loss)


# ---------------------------------------------------------------------------------------------- main
def draw_fingerprint() -> dict:
    """What this torch draws from seed 0 with the samplers the cases draw from, with its version and the CPU
    instruction set its kernels run (``cpu_capability``: the bf16 cases depend on it):
    ``trunc_normal_`` (the published random initial state; torch 2.13 changed it, 2.11 gives other numbers)
    and ``multinomial`` (sampling; torch 2.4 gives other tokens than 2.11 and 2.13), and ``bernoulli_`` (GPT-2's
    dropout masks in the train-mode training cases; torch 2.4 draws others). The published code and
    latentrt follow their torch alike, so a case that draws holds only under a torch that draws as the one
    that made the vectors did; tests/test_published.py compares the two."""
    seeded = torch.Generator().manual_seed(0)  # draws as torch.manual_seed(0) would, leaving torch's own alone
    x = torch.nn.init.trunc_normal_(torch.empty(4), 0.0, 1.0, -3.0, 3.0, generator=seeded)
    probs = torch.softmax(torch.linspace(0.0, 1.0, 40), 0)[None]
    seeded = torch.Generator().manual_seed(0)
    tokens = [torch.multinomial(probs, 1, generator=seeded).item() for _ in range(8)]
    seeded = torch.Generator().manual_seed(0)
    mask = torch.empty(32).bernoulli_(0.9, generator=seeded)  # dropout's mask draw (p=0.1 keeps 0.9)
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # (bf16 tokens differ between AVX512 and AVX2)
        "trunc_normal_seed_0": x.tolist(),
        "multinomial_seed_0": tokens,
        "bernoulli_seed_0": mask.int().tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--huginn", required=True, type=Path)
    ap.add_argument("--coconut", required=True, type=Path)
    ap.add_argument("--out", default="tests/published_vectors.json", type=Path)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (a dry run)")
    args = ap.parse_args(argv)
    import latentrt

    torch.set_grad_enabled(False)
    rm, cm, dm = huginn_module(args.huginn), coconut_module(args.coconut), coconut_dataset_module(args.coconut)
    models = {name: dict(spec) for name, spec in MODELS.items()}
    # the stop-token model: point row 65505 at the token the plain model produces third
    stops = models["huginn-stops"]
    plain = build("huginn-stops", stops)
    third = latentrt.generate(plain, PROMPT, max_new_tokens=3, num_steps=4, init_scale=0.0, default_stops=False)
    stops["head_row_copy"] = (65505, third.tokens[2], 1.5)
    out = {"draws": draw_fingerprint(), "models": {}, "cases": []}
    for name, spec in models.items():
        out["models"][name] = dict(spec, checksum=checksum(build(name, spec)))
    for case in TRAINING:
        if args.only and args.only not in case["name"]:
            continue
        expected = run_coconut_training(cm, dm, case, build(case["model"], models[case["model"]]))
        out.setdefault("training", []).append(dict(case, **expected))
        print(f"{case['name']}: {expected['loss']}, {expected['grad_norm']}", flush=True)
    for case in HUGINN_TRAINING:
        if args.only and args.only not in case["name"]:
            continue
        expected = run_huginn_training(rm, case, build(case["model"], models[case["model"]]))
        out.setdefault("huginn_training", []).append(dict(case, **expected))
        print(f"{case['name']}: {expected['loss']}, {expected['grad_norm']}", flush=True)
    for case in CURRICULUM:
        if args.only and args.only not in case["name"]:
            continue
        out.setdefault("curriculum", []).append(dict(case, **run_curriculum(dm, case)))
    for case in SAMPLERS_CASES:
        if args.only and args.only not in case["name"]:
            continue
        out.setdefault("samplers", []).append(dict(case, **run_sampler(rm, case)))
    for case in CASES:
        if args.only and args.only not in case["name"]:
            continue
        model = build(case["model"], models[case["model"]])
        if case.get("coconut"):
            # eos := the first answer token (or the case's ``eos_at``-th), so the published rule (never stop on
            # the first answer token; a later eos ends the answer and is left out) differs from stopping at once
            at = case.get("eos_at", 0)
            answer = latentrt.generate(model, case["prompt"], max_new_tokens=at + 1, default_stops=False).tokens
            expected = run_coconut(cm, case, model, answer[at])
        else:
            expected = run_huginn(rm, case, model)
        out["cases"].append(dict(case, **expected))
        print(f"{case['name']}: {expected}", flush=True)
    if args.only:
        return 0
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
