"""Every option of the published generate paths behaves as published.

tests/published_vectors.json holds what the published implementations (Huginn's raven_modeling_minimal.py
``generate_with_adaptive_compute`` / ``forward_with_adaptive_compute`` / ``generate_speculative`` /
``generate_diffusion_style``, Coconut's ``generate``, its trainer's data and loss) produced on
tiny seeded models, made by ``python -m tools.published`` (see there; the published code is not vendored).
latentrt must give the same tokens and iterations per token with the same options, on every backend.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import latentrt
import latentrt.kernels as kernels
from latentrt.sampling import draw, dropped, sampling_probs
from tools.published import (
    build,
    checksum,
    draw_fingerprint,
    latentrt_coconut_training,
    latentrt_huginn_training,
    run_latentrt,
    sampler_logits,
)

VECTORS = json.loads((Path(__file__).parent / "published_vectors.json").read_text())
CASES = {c["name"]: c for c in VECTORS["cases"]}
_models: dict = {}
DRAWS = draw_fingerprint()
# what the cases draw from (the initial state, samples) -> their draws in the fingerprints
# (latentrt's sampler draws as torch.multinomial does, from exponential_: latentrt/sampling.py ``draw``)
SAMPLERS = {
    "trunc_normal_": "trunc_normal_seed_0",
    "multinomial": "multinomial_seed_0",
    "exponential_": "multinomial_seed_0",
}
# the instruction set torch's CPU kernels ran where the vectors were made: bf16 arithmetic rounds by it
# (2026-12-05, an AVX2-only AMD EPYC: the bf16 cases' tokens and loss differ from the vectors under AVX2 and under
# the default kernels alike, the fp32 cases hold; "AVX512" was inferred then: the earlier CI machines passed)
RECORDED_CPU = VECTORS["draws"].get("cpu_capability")


def _skip_bf16_elsewhere(model_name: str, from_file: bool = False) -> None:
    """Skip a case computed in bf16 (a bf16 model, or a bf16 checkpoint file) on a CPU whose torch kernels run
    another instruction set than the one that made the vectors (python -m tools.published remakes them)."""
    bf16 = from_file or VECTORS["models"][model_name].get("dtype") == "bfloat16"
    running = torch.backends.cpu.get_cpu_capability()
    if bf16 and running != RECORDED_CPU:
        pytest.skip(
            f"a bf16 case: the vectors were made where torch's CPU kernels ran {RECORDED_CPU}, this CPU runs "
            f"{running}, whose bf16 arithmetic rounds otherwise (python -m tools.published remakes them here)"
        )


@contextmanager
def _as_recorded():
    """Run a case; skip the test if it drew from a sampler (a random initial state by ``trunc_normal_``, a
    sample by ``multinomial``) that this torch draws otherwise than the torch that made the vectors did (the
    published code and latentrt draw alike under any: torch 2.13 draws trunc_normal_ otherwise than 2.11,
    2.4 multinomial otherwise than 2.11 and 2.13)."""
    originals = {
        "trunc_normal_": torch.nn.init.trunc_normal_,
        "multinomial": torch.multinomial,
        "exponential_": torch.Tensor.exponential_,
    }
    drew = set()

    def counted(name):
        def call(*args, **kwargs):
            drew.add(name)
            return originals[name](*args, **kwargs)

        return call

    torch.nn.init.trunc_normal_, torch.multinomial = counted("trunc_normal_"), counted("multinomial")
    torch.Tensor.exponential_ = counted("exponential_")
    try:
        yield
    finally:
        torch.nn.init.trunc_normal_, torch.multinomial = originals["trunc_normal_"], originals["multinomial"]
        torch.Tensor.exponential_ = originals["exponential_"]
    differ = [n for n, key in SAMPLERS.items() if n in drew and DRAWS[key] != VECTORS["draws"][key]]
    if differ:
        pytest.skip(
            f"draws with {', '.join(differ)}, which torch {torch.__version__} draws otherwise than torch "
            f"{VECTORS['draws']['torch']} that made the vectors (python -m tools.published remakes them)"
        )


def _model(name: str):
    if name not in _models:
        spec = VECTORS["models"][name]
        model = build(name, spec)
        assert checksum(model) == spec["checksum"], "the seeded weights changed: regenerate the vectors"
        _models[name] = model
    return _models[name]


def _from_file(name: str):
    """The model ``name`` as a bf16 checkpoint file holds it, loaded by latentrt (``save_bf16_checkpoint``: the
    file the published ``from_pretrained`` read for the case)."""
    import tempfile

    from tools.published import save_bf16_checkpoint

    key = ("file", name)
    if key not in _models:
        with tempfile.TemporaryDirectory() as tmp:
            save_bf16_checkpoint(_model(name), Path(tmp))
            _models[key] = latentrt.load(tmp, device="cpu", dtype="bfloat16")
    return _models[key]


def _generate(case: dict, backend: str, n_tokens: int | None = None):
    _skip_bf16_elsewhere(case["model"], case.get("from_file", False))
    model = _from_file(case["model"]) if case.get("from_file") else _model(case["model"])
    with _as_recorded():
        return run_latentrt(case, model, backend, n_tokens)


# a case a documented difference keeps apart (README, The published implementations): tested on its own below
AGREE = sorted(name for name, case in CASES.items() if not case.get("published_differs"))


@pytest.mark.parametrize("name", AGREE)
def test_torch_backend_equals_published(name):
    case = CASES[name]
    got = _generate(case, "torch")
    assert got.tokens == case["tokens"]
    if "steps" in case:
        assert got.steps == case["steps"]
    if "prefill_steps" in case:
        assert got.prefill_steps == case["prefill_steps"]
    if "accepted" in case:  # speculative: the tokens committed per draft-and-verify round
        assert got.decoding["accepted"] == case["accepted"]
    if "diffusion_steps" in case:  # wavefront: the published counter, which skips the step its loop breaks in
        assert case["diffusion_steps"] <= got.decoding["steps"] <= case["diffusion_steps"] + 1


def test_continuous_compute_feeds_back_the_state_before_ln_f_as_the_adaptive_loop_does():
    """The published dispatcher sends ``continuous_compute`` without a criterion to ``generate_minimal``, whose
    forward returns the state after ln_f as ``latent_states`` and feeds that back; ``generate_with_adaptive_compute``
    (criterion "none", and every exit criterion) feeds back the state before ln_f. latentrt keeps one rule, the
    adaptive loop's, at any depth (README): it equals that case, not generate_minimal's, and continuous bites."""
    minimal = CASES["generate_minimal continuous fixed depth (the state after ln_f: differs)"]
    adaptive = CASES["continuous fixed depth"]
    assert minimal["options"] == adaptive["options"] and minimal["model"] == adaptive["model"]
    assert _generate(minimal, "torch").tokens == adaptive["tokens"] != minimal["tokens"]
    restarted = _generate(dict(adaptive, options=dict(adaptive["options"], continuous=False)), "torch")
    assert restarted.tokens != adaptive["tokens"]


SEEDED = sorted(name for name, c in CASES.items() if "seed" in c["options"])
# the seeded cases the two tests below run for their first tokens only (test_torch_backend_equals_published runs
# them whole): 366 diffusion steps of ~1,800 iterations a token for the whole case, ~12 s a run on CI's machine
FIRST_TOKENS = {"wavefront latent-acceleration-2 broadcast slices": 2}


@pytest.mark.parametrize("name", SEEDED)
def test_unseeded_draws_from_torchs_generator_as_published(name):
    """Without ``seed=`` latentrt draws from torch's global generator in the published order: seeding it with
    torch.manual_seed as the published run was gives the published tokens."""
    case = CASES[name]
    n = FIRST_TOKENS.get(name)
    options = {k: v for k, v in case["options"].items() if k != "seed"}
    torch.manual_seed(case["options"]["seed"])
    got = _generate(dict(case, options=options), "torch", n)
    assert got.tokens == case["tokens"][:n]
    if "steps" in case:
        assert got.steps == case["steps"][:n]


def test_the_seeded_vectors_depend_on_their_draws():
    """Another seed gives other tokens or steps in every seeded case, so each checks the draws; the cases reach
    the random initial state at the default init_scale, sampling, and the draw at init_scale 0."""
    assert len(SEEDED) >= 8
    for name in SEEDED:
        case, n = CASES[name], FIRST_TOKENS.get(name)
        if n:  # the published seed's first tokens are the published ones (so the other seed's differ by its draws)
            assert _generate(case, "torch", n).tokens == case["tokens"][:n], name
        other = _generate(dict(case, options=dict(case["options"], seed=case["options"]["seed"] + 100)), "torch", n)
        published = (case["tokens"][:n], case["steps"][:n] if "steps" in case else other.steps)
        assert (other.tokens, other.steps) != published, name
    assert any("init_scale" not in CASES[n]["options"] and "temperature" not in CASES[n]["options"] for n in SEEDED)
    zero = CASES["sampling with a zero initial state"]["options"]
    assert zero["init_scale"] == 0 and zero["temperature"] > 0
    batch = CASES["batch sampling random initial state fixed depth"]  # unseeded, on torch's generator
    assert _generate(dict(batch, torch_seed=batch["torch_seed"] + 100), "torch").tokens != batch["tokens"]


TRITON = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_status()[1])


# the cases that reach every fused piece the rules run on: latent-diff / cosine / kl exit kernels, the
# check schedule, the slot rule for shared / ring / full, one KV head with per-head keys (the loop itself is
# latentrt/recurrence.py, shared with the torch backend, which runs every case)
TRITON_CASES = [
    "min_steps latent-diff shared",
    "check every 2 steps kl min_steps 1",
    "min_steps argmax-stability ring-2",
    "single kv head adaptive",
    "cosine shared",
    "cosine bf16 default threshold",
    "latent-diff bf16",
    "speculative lookahead 3 draft 2 threshold 1 full",
    "wavefront defaults b",
    "wavefront skip depth 3",
    "always-last-m4 adaptive entropy-diff",
    "random initial state adaptive kl",
    "sampling top_k min_p repetition penalty adaptive kl",
]


@TRITON
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_backend_equals_published(name):
    """The Triton token runner (under the interpreter on a CPU: the first tokens, to keep CI fast)."""
    case = CASES[name]
    n = 2
    got = _generate(case, "triton", n)
    assert got.tokens == case["tokens"][:n]
    if "steps" in case:
        assert got.steps == case["steps"][:n]


def test_the_published_stop_tokens_are_stops_where_the_vocabulary_has_them():
    """Huginn's generate paths stop on <|begin_text|>, <|end_text|> and <|end_turn|> (65504, 65505, 65508) besides
    the configured eos (the vectors show 65505 only); a vocabulary without them (the built-in model's) stops on its
    eos alone, and ``default_stops=False`` on none."""
    from latentrt.engine import Generation
    from latentrt.options import GenerateOptions

    def stop_ids(model, **kw):
        return set(Generation(model, [1, 2], GenerateOptions(max_new_tokens=2, **kw)).stop_ids.tolist())

    model = _model("huginn-stops")
    eos = {model.eos_token_id} - {None}
    assert stop_ids(model) == {65504, 65505, 65508} | eos
    assert stop_ids(model, default_stops=False) == set()
    builtin = latentrt.load("builtin:recurrent")
    assert stop_ids(builtin) == {builtin.eos_token_id}


def test_the_vectors_cover_each_published_difference():
    """The cases exercise what they are named after: exits vary, stops and the Coconut eos rule bite."""
    for name in ("min_steps latent-diff shared", "check every 3 steps latent-diff", "minp-kl"):
        assert len(set(CASES[name]["steps"])) > 1, name
    stops = CASES["published stop tokens"]
    assert stops["tokens"][-1] == 65505 and len(stops["tokens"]) < stops["max_new_tokens"]
    speculative = [c for c in CASES.values() if "speculative" in c]
    assert len({len(set(c["accepted"])) > 1 for c in speculative}) == 2  # rounds accept more and fewer
    assert any(max(c["accepted"]) == c["speculative"]["lookahead"] for c in speculative)  # whole drafts
    # drafts deeper than num_steps read the committed positions by the lookup rule: the published full (skip) and
    # latest-m4 (latentrt's full) accept different drafts
    deep = [CASES[f"speculative lookahead 8 draft 9 {kv} depth 6"] for kv in ("skip", "latest-m4")]
    assert deep[0]["tokens"] == deep[1]["tokens"] and deep[0]["accepted"] != deep[1]["accepted"]
    wavefront = [c for c in CASES.values() if "wavefront" in c]
    assert sum(len(c["tokens"]) == c["max_new_tokens"] for c in wavefront) >= 9  # they freeze and commit
    assert all(len(set(c["tokens"])) > 2 for c in wavefront if len(c["tokens"]) > 1)
    for a, b in [("latest-m4 depth 3", "skip depth 3"), ("latest-m4 depth 8", "latest-m4-compress-s8 depth 8")]:
        assert CASES[f"wavefront {a}"]["tokens"] != CASES[f"wavefront {b}"]["tokens"]  # the wavefront's KV rule bites
    last = CASES["always-last-m4 adaptive entropy-diff"]  # always-last differs from latest-m4 and skip here
    for kv in ("full", "skip"):
        other = _generate(dict(last, options=dict(last["options"], kv_sharing=kv)), "torch")
        assert (other.tokens, other.steps) != (last["tokens"], last["steps"]), kv
    available, skip = CASES["available-m4 adaptive kl"], CASES["published full lookup adaptive kl"]
    assert available["options"]["exit_threshold"] == skip["options"]["exit_threshold"]  # the lookup alone differs
    assert (available["tokens"], available["steps"]) != (skip["tokens"], skip["steps"])
    coconut = CASES["coconut published eos"]
    assert coconut["tokens"][0] == coconut["eos"] and coconut["eos"] not in coconut["tokens"][1:]
    assert len(coconut["tokens"]) < coconut["max_new_tokens"]  # a later eos ended it, left out
    second = CASES["coconut published eos, the second answer token"]  # the first eos it checks, left out
    assert len(second["tokens"]) == 1 and second["tokens"][0] != second["eos"]
    recomputed = CASES["coconut bf16 answer tokens recomputed as published"]  # the cached pass: another token
    cached = _generate(dict(recomputed, options=dict(recomputed["options"], published_recompute=False)), "torch")
    assert cached.tokens != recomputed["tokens"] and cached.tokens[:6] == recomputed["tokens"][:6]
    penalised = ("repetition penalty fixed depth", "repetition penalty adaptive kl", "dry penalty fixed depth")
    for name in (*penalised, "dry penalty adaptive kl"):  # the penalty bites
        case = CASES[name]
        drop = ("repetition_penalty", "dry_multiplier", "dry_base", "dry_allowed_length")
        unpenalised = dict(case, options={k: v for k, v in case["options"].items() if k not in drop})
        assert _generate(unpenalised, "torch").tokens != case["tokens"], name


def test_the_bf16_cases_depend_on_the_criteria_rounding_in_bf16(monkeypatch):
    """Computed in fp32 (as latentrt did), the bf16 cases' latent-diff and cosine exit at other iterations than
    the published code's, which computes and compares them in the states' bf16; and the zero initial state's
    first cosine check is NaN (no epsilon), which never exits, where an epsilon would give 1 - 0 < 1.5."""
    from latentrt.exits import ReferenceExitOps

    assert _generate(CASES["cosine zero initial state"], "torch").steps[0] == 2  # not at the NaN check
    bf16 = [n for n in CASES if CASES[n]["model"].endswith("-bf16") and not CASES[n].get("coconut")]
    assert {CASES[n]["options"]["exit_criterion"] for n in bf16} == {"latent-diff", "cosine"}
    in_fp32 = ReferenceExitOps.latent_diff

    def fp32(prev, new, valid, cosine):
        return in_fp32(prev.float(), new.float(), valid, cosine)

    monkeypatch.setattr(ReferenceExitOps, "latent_diff", staticmethod(fp32))
    for name in bf16:
        case = CASES[name]
        assert _generate(case, "torch").steps != case["steps"], name


def test_a_bf16_files_rope_table_is_what_the_case_checks():
    """The published model rotates with the bf16 file's RoPE table (the vector); with the exact fp32 table,
    which latentrt used before, this case's tokens differ."""
    case = CASES["bf16 checkpoint file rope table"]
    _skip_bf16_elsewhere(case["model"], from_file=True)
    model = _from_file(case["model"])
    saved = model.file_rope
    assert saved is not None
    try:
        model.file_rope = None
        model.init_buffers()
        other = latentrt.generate(model, case["prompt"], max_new_tokens=case["max_new_tokens"], **case["options"])
    finally:
        model.file_rope = saved
        model.init_buffers()
    assert other.tokens != case["tokens"]


SEQUENTIAL = [c for c in CASES.values() if not (c.get("speculative") or c.get("wavefront"))]  # one token a unit


def test_the_published_full_lookup_differs_from_latest_m4():
    """The published default lookup under adaptive exit ("full", which drops the positions without the
    iteration's entry: latentrt's "skip") and latentrt's "full" ("latest-m4") give different tokens or steps
    on these vectors, so they check the rule."""
    lookup = [c for c in SEQUENTIAL if c["options"].get("kv_sharing") == "skip"]
    assert {c.get("published_cache") for c in lookup} == {"full", "skip"}
    for case in lookup:
        latest = _generate(dict(case, options=dict(case["options"], kv_sharing="full")), "torch")
        assert (latest.tokens, latest.steps) != (case["tokens"], case["steps"]), case["name"]


def test_the_anchored_cache_differs_from_the_other_modes():
    """The compress-anchor vectors check the anchor rule: for each other mode, one of them gives different
    tokens or steps."""
    anchored = [c for c in SEQUENTIAL if c["options"].get("kv_sharing") == "latest-m4-compress-anchor"]
    assert len(anchored) == 2
    for kv in ("full", "ring-2", "shared"):
        runs = [_generate(dict(c, options=dict(c["options"], kv_sharing=kv)), "torch") for c in anchored]
        assert any((r.tokens, r.steps) != (c["tokens"], c["steps"]) for r, c in zip(runs, anchored)), kv


@pytest.mark.parametrize("case", VECTORS["training"], ids=lambda c: c["name"])
def test_coconut_training_loss_and_gradients_equal_published(case):
    """The Coconut trainer's loss (its thoughts as KV-cached single-position passes, latentrt's collate) on the
    examples the published collator lays out (first thoughts aligned, a row without thoughts unpadded), against
    the forward run.py runs for the mode (the Coconut module; the plain GPT-2 for cot and pause): the loss to
    float rounding, the gradients' norm too. A case with ``torch_seed`` runs both in train mode, GPT-2's dropout
    drawn from torch's generator seeded alike: the same layout and passes draw the same masks."""
    model = _model(case["model"])
    c = model.config
    examples = [tuple(ex) for ex in case["examples"]]  # (pre, post, labels of post)
    assert any(c.latent_id in pre for pre, _, _ in examples) == (case.get("mode") in (None, "coconut", "pause"))
    if case.get("torch_seed") is not None and DRAWS["bernoulli_seed_0"] != VECTORS["draws"]["bernoulli_seed_0"]:
        pytest.skip(
            f"draws dropout masks, which torch {torch.__version__} draws otherwise than torch "
            f"{VECTORS['draws']['torch']} that made the vectors (python -m tools.published remakes them)"
        )
    got = latentrt_coconut_training(case, model)
    assert abs(got["loss"] - case["loss"]) <= 1e-6 * case["loss"]
    assert abs(got["grad_norm"] - case["grad_norm"]) <= 1e-5 * case["grad_norm"]


@pytest.mark.parametrize("case", VECTORS["curriculum"], ids=lambda c: c["name"])
def test_coconut_curriculum_data_equals_published(case):
    """The Coconut trainer's sequence and labels of a record at a stage (``assemble``: the question [+ markers
    and thoughts], the steps left, the answer; labels on the steps and the answer) against the published
    get_cot_latent_dataset with the configs run.py gives each method, for records with 0 to 4 steps at stages
    before, at and past max_stage (where the thoughts stay at max_stage * c, as every published config pads)."""
    from latentrt.train.coconut import Curriculum, TokenizedRecord, assemble

    cur = Curriculum(case["mode"], max_stage=case["max_stage"], thoughts_per_step=case["c"])
    cur.validate()
    assert len(case["samples"]) == len(case["sequences"]) == 4
    for (question, steps, answer), (ids, labels) in zip(case["samples"], case["sequences"]):
        pre, post, post_labels = assemble(TokenizedRecord(question, steps, answer), cur, case["stage"], (2, 3, 4))
        assert pre + post == ids
        assert [-100] * len(pre) + post_labels == labels


@pytest.mark.parametrize("case", VECTORS["samplers"], ids=lambda c: c["name"])
def test_published_top_p_keeps_and_draws_as_the_published_sampler(case):
    """``published_top_p=True``: the published sampler's rule (its ``_sample_next_token``, which the adaptive,
    speculative and wavefront samplers call) on logits with ties (bf16 values; four equal logits): the tokens
    its distribution keeps, ties broken as it breaks them (the earlier ids, where HF's rule keeps the later),
    and the token drawn from a generator seeded as the published run's."""
    logits = sampler_logits(case)
    settings = (case["temperature"], case.get("top_k"), case.get("top_p"), case.get("min_p") or 0.0, True)
    assert (~dropped(logits, *settings))[0].nonzero().flatten().tolist() == case["kept"]
    with _as_recorded():
        token = draw(sampling_probs(logits, *settings), torch.Generator().manual_seed(case["seed"]))
    assert int(token) == case["token"]


@pytest.mark.parametrize("case", VECTORS["huginn_training"], ids=lambda c: c["name"])
def test_huginn_training_loss_and_gradients_equal_published(case):
    """The recurrent trainer's loss (RecurrentLoss at a given no-grad / grad depth) against the published
    forward in training mode as its fine-tuning script calls it, the random initial state drawn from torch's
    generator seeded alike: the loss to float rounding, the gradients' norm too."""
    _skip_bf16_elsewhere(case["model"])
    with _as_recorded():
        got = latentrt_huginn_training(case, _model(case["model"]))
    assert abs(got["loss"] - case["loss"]) <= 1e-6 * case["loss"]
    assert abs(got["grad_norm"] - case["grad_norm"]) <= 1e-5 * case["grad_norm"]


def test_coconut_default_stops_at_the_first_eos_and_keeps_it():
    """latentrt's default (as HF): any eos ends the answer and is kept; published_eos=True gives Coconut's."""
    case = dict(CASES["coconut published eos"], options={})
    assert _generate(case, "torch").tokens == [case["eos"]]


def test_published_stops_are_overridable():
    case = CASES["published stop tokens"]
    got = _generate(dict(case, options=dict(case["options"], default_stops=False)), "torch")
    assert len(got.tokens) == case["max_new_tokens"] and got.tokens[: len(case["tokens"])] == case["tokens"]
