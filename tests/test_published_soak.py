"""tools/published_soak.py: its cases are ones latentrt runs, they span the published option space, and a result
that differs from the published one is reported (the published code itself is not here: it is not vendored)."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from latentrt.exits import CRITERIA
from tools import published_soak as ps


@pytest.fixture
def as_published(monkeypatch):
    """The soak with latentrt standing in for the published code (no published files needed)."""
    monkeypatch.setattr(ps, "huginn_module", lambda folder: None)
    monkeypatch.setattr(ps, "coconut_module", lambda folder: None)
    monkeypatch.setattr(ps, "coconut_dataset_module", lambda folder: None)
    monkeypatch.setattr(ps, "published_outcome", lambda modules, case, model: ps.latentrt_outcome(case, model))


def run(capsys, *args: str) -> tuple[int, str]:
    code = ps.main(["--huginn", "none", "--coconut", "none", *args])
    return code, capsys.readouterr().out


def test_every_kind_of_case_runs_and_compares(as_published, capsys):
    filters = list(warnings.filters)
    code, out = run(capsys, "--cases", str(2 * len(ps.KINDS)), "--seed", "7")
    assert code == 0 and "no mismatch" in out, out
    for kind in ps.KINDS:  # none refused, none raised (transformers' own generate is compared under 4 only)
        assert f"{kind} compared 2" in out or kind == "hf" and "hf skipped (transformers' generate needs" in out, out
    assert "refused" not in out and "raised" not in out
    assert "sequential states compared" in out and "prefill states compared" in out  # (every prefill is adaptive)
    assert torch.is_grad_enabled()  # the soak leaves autograd as it found it (later tests train)
    assert warnings.filters == filters  # and the warnings filters (it silences the options' warnings itself)


def test_the_cases_span_the_published_options():
    rng = random.Random(0)
    sequential = [ps.draw_sequential(rng)["options"] for _ in range(400)]
    assert {o.get("exit_criterion") for o in sequential} >= set(CRITERIA) - {"none"}
    assert {o.get("kv_sharing") for o in sequential} >= set(ps.LOOKUPS) - {"full"} | {"skip"}
    for name in ("continuous", "do_not_exit_in_prefill", "published_top_p", "repetition_penalty", "dry_multiplier"):
        assert any(o.get(name) for o in sequential), name
    assert any("exit_threshold" not in o for o in sequential if o.get("adaptive"))  # the published "auto"
    assert {o["init_scale"] for o in sequential} == {0.0, 1.0}
    cases = [ps.draw_sequential(rng) for _ in range(400)]
    assert {c.get("published_cache") for c in cases} == {None, "full", "skip"}
    # fixed depth takes the full lookup by its own name (adaptive, the published full is latentrt's skip)
    assert "full" in {c["options"].get("kv_sharing") for c in cases if not c["options"].get("adaptive")}
    assert "full" not in {c["options"].get("kv_sharing") for c in cases if c["options"].get("adaptive")}
    kl = {o["exit_threshold"] for o in sequential if o.get("exit_criterion") == "kl" and "exit_threshold" in o}
    assert len(kl) > 10 and min(kl) < CRITERIA["kl"].DEFAULT < max(kl)  # drawn around the default
    # each model's prompts from its own vocabulary
    assert ps._vocab("huginn-vocab97") == 97 and ps._vocab("huginn-a") == 40 and ps._vocab("gpt2-bf16") == 50257
    wide = [t for c in cases if c["model"] == "huginn-vocab97" for t in c["prompt"]]
    assert max(wide) >= 40 and max(t for c in cases if c["model"] == "huginn-a" for t in c["prompt"]) < 40
    waves = [ps.draw_wavefront(rng)["wavefront"] for _ in range(200)]
    assert {w["freeze_strategy"] for w in waves} == set(ps.FREEZE)


def test_a_result_other_than_the_published_is_a_mismatch_with_its_case(as_published, monkeypatch, capsys, tmp_path):
    def one_step_more(modules, case, model):
        want = ps.latentrt_outcome(case, model)
        want["steps"] = [s + 1 for s in want["steps"]]
        return want

    monkeypatch.setattr(ps, "published_outcome", one_step_more)
    out_file = tmp_path / "mismatches.json"
    code, out = run(capsys, "--cases", "1", "--kinds", "sequential", "--seed", "3", "--out", str(out_file))
    assert code == 1
    assert "MISMATCH sequential seed 3: token 0 (0: the prompt's) exits 1 iteration apart" in out
    assert "--kinds KIND --seed SEED --cases 1" in out
    (case,) = json.loads(out_file.read_text())
    assert case["name"] == "sequential seed 3" and case["published"]["steps"] != case["latentrt"]["steps"]


def test_where_names_the_first_difference():
    case = dict(options=dict(adaptive=True, check_criterion_every_n_steps=2))
    got, want = dict(tokens=[1, 2, 3], steps=[4, 4, 4]), dict(tokens=[1, 2, 5], steps=[4, 4, 6])
    assert (
        ps.where(got, want, case)
        == "token 2 (0: the prompt's) exits 2 iterations apart: possibly a tie within rounding"
    )
    assert ps.where(dict(tokens=[1, 2]), dict(tokens=[1, 3]), {"options": {}}) == "token 1 differs"
    batch = dict(prompts=[[1], [2]], options={})
    assert ps.where(dict(tokens=[[1], [2]]), dict(tokens=[[1], [3]]), batch) == "the batch's tokens differ: 1"


def test_models_keeps_the_cases_of_the_named_models(as_published, capsys):
    code, out = run(capsys, "--cases", "12", "--kinds", "sequential", "--models", "huginn-a,huginn-b", "--seed", "1")
    assert code == 0 and "skipped (--models)" in out and "sequential compared" in out
    with pytest.raises(SystemExit):
        run(capsys, "--cases", "1", "--models", "huginn-z")
    assert "--models takes names of" in capsys.readouterr().err
    for flags, message in [(["--models", ","], "--models takes names of"), (["--kinds", ","], "--kinds takes")]:
        with pytest.raises(SystemExit):
            run(capsys, "--cases", "1", *flags)
        assert message in capsys.readouterr().err


def test_states_a_hair_apart_are_a_mismatch_though_tokens_and_steps_agree(as_published, monkeypatch, capsys):
    """Bit-identical means the states every exit check sees, not only the tokens and exits they lead to: a
    sequential adaptive case whose states differ by a hair (the published side's adapter scaled by 1 + 1e-6,
    standing in for attention that rounds otherwise) is a mismatch at the first check that differs."""

    def a_hair_apart(modules, case, model):
        w = model.transformer.adapter.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(1 + 1e-6)
        try:
            return ps.latentrt_outcome(case, model)
        finally:
            with torch.no_grad():
                w.copy_(saved)

    code, out = run(capsys, "--kinds", "sequential", "--cases", "12", "--seed", "3")
    assert code == 0 and "sequential states compared" in out, out  # the same code on both sides: the same bits
    monkeypatch.setattr(ps, "published_outcome", a_hair_apart)
    code, out = run(capsys, "--kinds", "sequential", "--cases", "12", "--seed", "3")
    assert code == 1 and "differ (max |difference|" in out and "though tokens and steps agree" in out, out


def test_a_coconut_first_answer_from_logits_a_hair_apart_is_a_mismatch():
    """HeadsSeen compares the first answer token's logits (the last prompt pass's head, call ``passes - 1``)
    bit for bit: here both sides are latentrt's head (the published GPT-2's stands in), equal, then one run's head
    weights scaled by 1 + 1e-6 (every token the same), which is a mismatch; with ``published_recompute`` each
    later answer token's logits too (a call each)."""
    import latentrt
    from latentrt.models.coconut import CoconutGPT2
    from tools.published import build

    case = ps.draw_coconut(random.Random(3))
    model = build(case["model"])
    passes = case["prompt"].count(model.config.latent_id) + 1
    seen = ps.HeadsSeen()
    seen.methods["published"] = (CoconutGPT2, "lm_logits")
    runs = []
    for side in ("latentrt", "published"):
        with seen.side(side):
            runs.append(latentrt.generate(model, case["prompt"], max_new_tokens=3).tokens)
    assert runs[0] == runs[1] and seen.differs(passes) is None and len(seen.runs["latentrt"]) >= passes
    seen.runs = {"published": [], "latentrt": []}
    w = model.lm_head.weight
    for side, scale in (("latentrt", 1.0), ("published", 1 + 1e-6)):
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(scale)
        with seen.side(side):
            latentrt.generate(model, case["prompt"], max_new_tokens=3)
        with torch.no_grad():
            w.copy_(saved)
    assert seen.differs(passes).startswith("answer token 0's logits differ (max |difference|")
    assert seen.differs(passes + 100).endswith(f"fewer than the prompt's {passes + 100} passes")
    # with published_recompute every answer token's logits are compared: a later one a hair apart is a mismatch
    seen.runs = {"published": [], "latentrt": []}
    for side in ("latentrt", "published"):
        with seen.side(side):
            latentrt.generate(model, case["prompt"], max_new_tokens=3, published_recompute=True)
    assert seen.differs(passes, recomputed=True) is None and len(seen.runs["latentrt"]) == passes + 2
    seen.runs["published"][passes + 1] = seen.runs["published"][passes + 1] * (1 + 1e-6)
    assert seen.differs(passes) is None
    assert seen.differs(passes, recomputed=True).startswith("answer token 2's logits differ (max |difference|")
    seen.runs["published"].pop()
    assert seen.differs(passes, recomputed=True) == f"{passes + 2} head calls against the published {passes + 1}"


def test_each_path_is_drawn_only_what_it_takes():
    """generate_minimal runs at fixed depth (no exit option, no skip lookup: its full one); transformers'
    generate has no published top-p; the adaptive prefill's lookups are the published named ones; the bf16
    GPT-2 always recomputes as the published generate does (README)."""
    from latentrt.decode.recurrent import RecurrentDecoder

    rng = random.Random(1)
    minimal = [ps.draw_minimal(rng)["options"] for _ in range(300)]
    assert not any(k in o for o in minimal for k in RecurrentDecoder.ADAPTIVE_ONLY)
    assert all(o["adaptive"] is False and o["continuous"] is False for o in minimal)
    assert "skip" not in {o.get("kv_sharing") for o in minimal} and "full" in {o.get("kv_sharing") for o in minimal}
    assert not any(ps.draw_hf(rng)["options"].get("published_top_p") for _ in range(300))
    prefill = {ps.draw_prefill(rng)["options"]["kv_sharing"] for _ in range(300)}
    assert prefill == set(ps.LOOKUPS) - {"skip", "full"}
    coconut = [ps.draw_coconut(rng) for _ in range(200)]
    assert all(c["options"]["published_recompute"] for c in coconut if c["model"] == "gpt2-bf16")
    assert {c["options"]["published_recompute"] for c in coconut if c["model"] == "gpt2-a"} == {False, True}


def test_outcomes_carry_what_each_kind_records():
    """latentrt's outcome in the published run's terms: an adaptive prefill's iterations per prompt position, the
    speculative rounds' accepted tokens; a Coconut case's eos is its first answer token (so the published rule,
    never stopping on it, differs from stopping at once)."""
    from tools.published import build

    rng = random.Random(2)
    prefill = dict(ps.draw_prefill(rng), name="prefill")
    got = ps.latentrt_outcome(prefill, build(prefill["model"], ps.ALL_MODELS[prefill["model"]]))
    assert set(got) == {"tokens", "prefill_steps"} and len(got["prefill_steps"]) == len(prefill["prompt"])
    spec = dict(ps.draw_speculative(rng), name="speculative")
    got = ps.latentrt_outcome(spec, build(spec["model"], ps.ALL_MODELS[spec["model"]]))
    assert set(got) == {"tokens", "accepted"} and sum(got["accepted"]) >= len(got["tokens"]) > 0
    coconut = dict(ps.draw_coconut(rng), name="coconut")
    model = build(coconut["model"], ps.ALL_MODELS[coconut["model"]])
    ps.complete(coconut, model)
    assert ps.latentrt_outcome(coconut, model)["tokens"][0] == coconut["eos"]


def test_differs_and_where_name_each_difference():
    """Training: the loss and gradient norm within TRAINING_TOLERANCE; otherwise where the results first differ
    (steps after tokens already differ are no exit tie; fixed depth has no tie)."""
    train = {"training": "coconut"}
    base = {k: 1.0 for k in ps.TRAINING_TOLERANCE}
    assert ps.differs(dict(base), dict(base), train) is None
    off = dict(base, **{k: 1.5 for k in list(ps.TRAINING_TOLERANCE)[:1]})
    assert ps.differs(off, base, train) == f"{list(ps.TRAINING_TOLERANCE)[0]} 0.5 apart (relative)"
    adaptive = {"options": {"adaptive": True}}
    got, want = dict(tokens=[1, 2, 3], steps=[4, 4, 5]), dict(tokens=[1, 9, 3], steps=[4, 4, 4])
    assert ps.where(got, want, adaptive) == "token 1 differs"  # (the steps part after the tokens did)
    fixed = dict(tokens=[1, 2], steps=[4, 5]), dict(tokens=[1, 2], steps=[4, 4])
    assert ps.where(*fixed, {"options": {}}) == "token 1 (0: the prompt's) exits 1 iteration apart"
    prefill = dict(tokens=[7], prefill_steps=[3, 4, 5]), dict(tokens=[7], prefill_steps=[3, 6, 5])
    assert ps.where(*prefill, {"options": {}}) == "prompt position 1 exits 2 iterations apart (adaptive prefill)"
    short = dict(tokens=[7], prefill_steps=[3, 4]), dict(tokens=[7], prefill_steps=[3, 4, 5])
    assert ps.where(*short, {"options": {}}) == "prefill_steps differ"
    accepted = dict(tokens=[7, 8], accepted=[2, 1]), dict(tokens=[7, 8], accepted=[2, 2])
    assert ps.where(*accepted, {"options": {}}) == "accepted differ"
    assert ps.where(dict(tokens=[1, 2]), dict(tokens=[1, 2, 3]), {"options": {}}) == "token 2 differs"
    longer = dict(tokens=[1, 2], steps=[4, 4]), dict(tokens=[1, 2], steps=[4, 4, 4])  # (the tokens alike)
    assert ps.where(*longer, {"options": {}}) == "the lengths differ"


def test_states_seen_must_match_bit_for_bit_and_check_for_check():
    seen = ps.StatesSeen(None)  # (no published module: latentrt's criteria only)
    x = torch.tensor([1.0, 2.0])
    seen.runs = {"latentrt": [x, x], "published": [x.clone(), x.clone()]}
    assert seen.differs() is None
    seen.runs["published"][1] = x * (1 + 1e-7)  # allclose, not equal
    assert seen.differs().startswith("the states at exit check 1 differ (max |difference|")
    seen.runs["published"][1] = x.double()  # the same values in another dtype
    assert seen.differs().startswith("the states at exit check 1 differ")
    seen.runs["published"] = [x.clone()]
    assert seen.differs() == "2 exit checks against the published 1 though tokens and steps agree"


def test_refusals_and_crashes_are_counted_and_named(as_published, monkeypatch, capsys):
    """latentrt refusing (InputError) a case the published code runs is printed once with its reason; refused
    by both is counted only; the published code raising is a finding (RAISED, exit 1)."""
    from latentrt.errors import InputError

    def refuses(case, model, backend="torch"):
        raise InputError("not this one")

    def fails(modules, case, model):
        raise RuntimeError("published boom")

    monkeypatch.setattr(ps, "latentrt_outcome", refuses)
    monkeypatch.setattr(ps, "published_outcome", lambda modules, case, model: {"tokens": [1]})
    code, out = run(capsys, "--cases", "2", "--kinds", "sequential", "--seed", "3")
    assert code == 0 and out.count("REFUSED") == 1 and "sequential refused by latentrt 2" in out
    assert "REFUSED sequential seed 3 (the published code runs it): not this one" in out
    monkeypatch.setattr(ps, "published_outcome", fails)
    code, out = run(capsys, "--cases", "2", "--kinds", "sequential", "--seed", "3")
    assert code == 0 and "sequential refused by both 2" in out and "REFUSED" not in out
    monkeypatch.setattr(ps, "latentrt_outcome", lambda case, model, backend="torch": {"tokens": [1]})
    code, out = run(capsys, "--cases", "1", "--kinds", "sequential", "--seed", "3")
    assert code == 1 and "RAISED sequential seed 3: the published code: RuntimeError: published boom" in out


def test_coconut_heads_are_compared_from_the_prompts_last_pass(as_published, monkeypatch, capsys):
    """With the published Coconut loaded (here latentrt's head stands in for GPT-2's), each Coconut case on the
    torch backend compares its answer logits from call passes - 1, passes the prompt's thoughts + 1."""
    from latentrt.models.coconut import CoconutGPT2

    asked = []

    class Heads(ps.HeadsSeen):
        def __init__(self):
            super().__init__()
            self.methods["published"] = (CoconutGPT2, "lm_logits")

        def differs(self, passes, recomputed=False):
            asked.append(passes)
            return super().differs(passes, recomputed)

    monkeypatch.setattr(ps, "coconut_module", lambda folder: object())  # (loaded: its outcome is stubbed)
    monkeypatch.setattr(ps, "HeadsSeen", Heads)
    kinds = ",".join(ps.KINDS)
    code, out = run(capsys, "--cases", str(3 * len(ps.KINDS)), "--kinds", kinds, "--seed", "5")
    assert code == 0 and "answer logits compared" in out, out
    seeds = [5 + i for i in range(3 * len(ps.KINDS)) if ps.KINDS[i % len(ps.KINDS)] == "coconut"]
    cases = [ps.draw_coconut(random.Random(s)) for s in seeds]
    latent = {m: ps.ALL_MODELS[m]["markers"]["latent_id"] for m in ("gpt2-a", "gpt2-bf16")}
    assert asked == [c["prompt"].count(latent[c["model"]]) + 1 for c in cases]
    assert any(n > 1 for n in asked)


def test_a_bf16_mismatch_on_a_fused_backend_says_why(as_published, monkeypatch, capsys):
    def one_step_more(modules, case, model):
        want = ps.latentrt_outcome(case, model)
        want["steps"] = [s + 1 for s in want["steps"]]
        return want

    monkeypatch.setattr(ps, "published_outcome", one_step_more)
    argv = ["--cases", "1", "--kinds", "sequential", "--seed", "5", "--backend", "triton"]
    code, out = run(capsys, *argv, "--models", "huginn-a-bf16")  # (seed 5's case: that model, adaptive)
    assert code == 1 and "(bf16 on triton: its fused kernels round otherwise than the published eager bf16 ops)" in out
