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
