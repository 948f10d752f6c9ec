"""tools/soak.py: the differential soak runs each check on both families and reports a mismatch it is shown."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import latentrt
from tools import soak


@pytest.mark.parametrize("model", ["builtin:recurrent", "builtin:coconut"])
def test_every_check_runs_and_agrees(model, capsys):
    filters = list(warnings.filters)
    assert soak.main(["--model", model, "--cases", "8", "--seed", "3"]) == 0  # every check, once or twice
    assert warnings.filters == filters  # the soak silences the options' warnings while it runs, not after
    out = capsys.readouterr().out
    assert "no mismatch" in out
    for check in ("batch", "stream", "serve", "hooks", "score", "http", "burst"):
        assert f"{check} compared" in out, out  # each check compared something
    assert "backend skipped (torch against torch)" in out
    spec = "speculative compared" if model == "builtin:recurrent" else "speculative skipped (the family has no such"
    assert spec in out


def test_options_follow_the_family_and_prompts_keep_markers_well_formed():
    rng = random.Random(0)
    recurrent, coconut = latentrt.load("builtin:recurrent"), latentrt.load("builtin:coconut")
    drawn = [soak.draw_options(rng, recurrent, seed=1) for _ in range(50)]
    assert any("num_steps" in kw for kw in drawn) and not any("num_thoughts" in kw for kw in drawn)
    assert any(kw.get("adaptive") for kw in drawn)
    drawn = [soak.draw_options(rng, coconut, seed=1) for _ in range(50)]
    assert all("num_steps" not in kw for kw in drawn) and any("num_thoughts" in kw for kw in drawn)
    prompts = [soak.draw_prompt(rng, coconut) for _ in range(200)]
    start = coconut.marker_ids[0]
    assert any(start in p for p in prompts)
    for p in prompts:
        coconut.latent_columns(p)  # well-formed markers (an InputError otherwise)


def test_a_mismatch_is_reported_with_its_seed_and_fails_the_run(monkeypatch, capsys):
    real = latentrt.generate

    def wrong_in_a_batch(model, prompt, **kw):  # a batch's first row answers otherwise than alone
        out = real(model, prompt, **kw)
        if isinstance(prompt, list) and isinstance(prompt[0], list) and not kw.get("stream"):
            out.tokens[0] = [t + 1 for t in out.tokens[0]]
        return out

    monkeypatch.setattr(soak.latentrt, "generate", wrong_in_a_batch)
    assert soak.main(["--cases", "2", "--checks", "batch", "--seed", "7"]) == 1
    out = capsys.readouterr().out
    # (seed 7's requests sample: its draws show the token is not the one drawn, which no rounding explains)
    assert "MISMATCH batch seed 7: position 0 (0: the prompt): a sampled token drawn from probabilities" in out
    assert "(relative), not as the draws say" in out
    assert "--checks CHECK --seed SEED --cases 1" in out


def test_a_case_that_raises_is_a_mismatch_and_the_soak_goes_on(monkeypatch, capsys):
    def broken(self, seed):
        if seed == 7:
            raise RuntimeError("boom")
        self.counts["batch compared"] += 1

    monkeypatch.setattr(soak.Soak, "batch", broken)
    assert soak.main(["--cases", "3", "--checks", "batch", "--seed", "6"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH batch seed 7: raised RuntimeError: boom" in out and "batch compared 2" in out


def test_logits_beyond_the_dtypes_rounding_are_a_mismatch(monkeypatch, capsys):
    real = latentrt.generate

    def off_in_a_batch(model, prompt, **kw):  # a batch's logits off by 1e-3 of their scale, tokens unchanged
        out = real(model, prompt, **kw)
        if isinstance(prompt, list) and isinstance(prompt[0], list) and not kw.get("stream"):
            out.logits[0] = out.logits[0] * (1 + 1e-3)
        return out

    monkeypatch.setattr(soak.latentrt, "generate", off_in_a_batch)
    assert soak.main(["--cases", "1", "--checks", "batch", "--seed", "7"]) == 1
    assert "MISMATCH batch seed 7: sequence 0's logits differ from alone by 0.001" in capsys.readouterr().out


def test_a_tie_within_rounding_is_labelled_as_one():
    kw = dict(adaptive=True, exit_criterion="kl", exit_threshold=1e-3)
    got, want = ([4, 5, 6], [3, 2, 2], "x", "length"), ([4, 5, 6], [3, 3, 2], "x", "length")
    assert (
        soak.describe(got, want, kw)
        == "position 1 (0: the prompt) exits 1 iteration apart (kl at 0.001): possibly a tie within rounding"
    )
    three = ([4, 5, 6], [3, 5, 2], "x", "length")
    assert soak.describe(got, three, kw) == "position 1 (0: the prompt) exits 3 iterations apart (kl at 0.001)"
    every = dict(kw, check_criterion_every_n_steps=3)  # one check apart
    assert soak.describe(got, three, every).endswith(
        "exits 3 iterations apart (kl at 0.001): possibly a tie within rounding"
    )
    assert soak.describe(got, (*got[:2], "y", "stop"), kw) == "the lengths, texts or finish reasons differ"
    batch = ([4, 7, 6], [3, 2, 2], "x", "length")  # greedy: the batch chose 7 where alone chose 5
    alone = torch.zeros(3, 10)
    alone[1, 5], alone[1, 7] = 2.0, 1.999  # nearly tied
    tied = alone.clone()
    tied[1, 7] = 2.001  # the batch's rounding put 7 first
    what = soak.describe(batch, got, {}, lambda j: (tied[j], alone[j]), tolerance=1e-2)
    tie = "chose another token from logits 0.001 apart (relative): possibly a tie within rounding"
    assert what == f"position 1 (0: the prompt) {tie}"
    differs = "position 1 (0: the prompt) differs"
    assert soak.describe(batch, got, {}, lambda j: (alone[j] * 1.1, alone[j]), 1e-2) == differs  # beyond rounding
    apart = alone.clone()
    apart[1, 7], apart[1, 0] = 1.0, 1e-4  # the logits alike, the two tokens far apart: no rounding chose 7
    assert soak.describe(batch, got, {}, lambda j: (apart[j], apart[j] + 1e-4), 1e-2) == differs
    sampled = soak.describe(batch, got, {"temperature": 0.7}, lambda j: (tied[j], alone[j]), 1e-2)
    assert sampled == f"{differs} (a sampled token, from logits 0.001 apart, relative)"
    penalised = soak.describe(batch, got, {"logit_bias": {7: 1.0}}, lambda j: (tied[j], alone[j]), 1e-2)
    assert penalised == f"{differs} (a penalised token, from logits 0.001 apart, relative)"


@pytest.mark.triton
def test_the_backend_check_compares_a_backend_with_torch(capsys):
    assert soak.main(["--backend", "triton", "--checks", "backend", "--cases", "2", "--seed", "1"]) == 0
    assert "on builtin:recurrent (triton): backend compared 2" in capsys.readouterr().out


def test_a_hook_that_misses_an_iteration_is_a_mismatch(monkeypatch, capsys):
    from latentrt.hooks import HookList

    real = HookList.on_iteration

    def skips_the_first(self, step, state, active):  # the hooks miss every token's first iteration
        return state if step == 0 else real(self, step, state, active)

    monkeypatch.setattr(HookList, "on_iteration", skips_the_first)
    assert soak.main(["--cases", "1", "--checks", "hooks", "--seed", "2"]) == 1
    assert "MISMATCH hooks seed 2: sequence 0's hook saw" in capsys.readouterr().out


def test_decode_logits_other_than_one_pass_over_the_tokens_are_a_mismatch(monkeypatch, capsys):
    from latentrt.models.recurrent import RecurrentDepthLM

    real = RecurrentDepthLM.logits
    monkeypatch.setattr(RecurrentDepthLM, "logits", lambda self, ids, **kw: real(self, ids, **kw) * (1 + 1e-3))
    assert soak.main(["--cases", "1", "--checks", "score", "--seed", "2"]) == 1
    assert "MISMATCH score seed 2: generate()'s logits differ from one pass over its tokens by 0.001" in (
        capsys.readouterr().out
    )


def test_a_sampled_token_drawn_otherwise_with_the_same_exponentials_is_labelled_a_tie():
    """Two runs of a seeded sequence draw the same Exp(1) numbers q at a token (argmax p / q): a token drawn
    otherwise from probabilities within rounding of each other is a tie; far apart, or with numbers the other
    run never drew (its generator went elsewhere), it is not."""
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    q = latentrt.sampling.exponentials(torch.zeros(1, 3), seeded())[0]  # (the numbers depend on the shape only)
    p_alone = torch.stack([q[0], q[1] * (1 - 1e-6), q[2] * 0.5])[None] / 4  # ratios p / q: token 0 by a hair
    p_tied = torch.stack([q[0] * (1 - 1e-6), q[1], q[2] * 0.5])[None] / 4  # token 1 by a hair
    with soak.DrawLog() as alone:
        token = int(latentrt.sampling.draw(p_alone, seeded())[0])
    assert token == 0 and torch.equal(alone.rows[0][0], p_alone[0]) and torch.equal(alone.rows[0][1], q)
    with soak.DrawLog() as served:
        other = int(latentrt.sampling.draw(p_tied, seeded())[0])
    assert other == 1
    got, want = ([other], [0], "", "length"), ([token], [0], "", "length")
    label = soak.describe(got, want, {"temperature": 1.0}, tolerance=1e-4, draws_at=soak.draws_of(served, alone, 1))
    assert label.startswith("position 0 (0: the prompt): a sampled token drawn from probabilities")
    assert label.endswith("with the same exponentials: a tie within rounding")
    far = soak.describe(got, want, {"temperature": 1.0}, tolerance=1e-9, draws_at=soak.draws_of(served, alone, 1))
    assert far.endswith("with the same exponentials")
    with soak.DrawLog() as elsewhere:
        latentrt.sampling.draw(p_tied, torch.Generator().manual_seed(6))
    draws = soak.draws_of(elsewhere, alone, 1)
    apart = soak.describe(got, want, {"temperature": 1.0}, tolerance=1e-4, draws_at=draws)
    assert apart.endswith("never drew with its generator's numbers here: the generators went apart")
    assert soak.draws_of(served, alone, 3) is None  # not one draw a token: nothing to match
    assert latentrt.sampling.exponentials.__module__ == "latentrt.sampling"  # each log put the real one back


def test_served_requests_arrive_over_steps_and_some_are_cancelled():
    """The serve check's timing (its own draws: a seed's requests and engine stay what they were): all at once
    or staggered over the first 40 steps, a quarter cancelled in a third of the cases."""
    staggered = cancelled = 0
    for seed in range(60):
        requests = [soak.Arrival([1], {}, None) for _ in range(8)]
        soak.draw_arrivals(random.Random(f"{seed}:arrivals"), requests)
        staggered += any(a.arrive for a in requests)
        cancelled += sum(a.cancel is not None for a in requests)
        assert all(a.cancel is None or a.cancel >= a.arrive for a in requests)
    assert 15 < staggered < 45 and cancelled > 5


def test_a_cancelled_request_is_compared_up_to_its_cancel_and_a_leaked_row_is_a_mismatch(monkeypatch, capsys):
    from latentrt.kv_pool import KVPool

    monkeypatch.setattr(soak, "draw_arrivals", lambda rng, requests: setattr(requests[0], "cancel", 3))
    assert soak.main(["--cases", "2", "--checks", "serve", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert "serve cancelled 2" in out and "no mismatch" in out
    real = KVPool.release
    monkeypatch.setattr(KVPool, "release", lambda self, row, clean_from=0: None if row == 0 else real(self, row))
    assert soak.main(["--cases", "1", "--checks", "serve", "--seed", "11"]) == 1
    assert "MISMATCH serve seed 11: idle, the engine has not given back pool rows [0] and slot rows [" in (
        capsys.readouterr().out
    )


def test_requests_at_once_over_http_answer_as_alone_and_a_dropped_stream_frees_its_row(monkeypatch, capsys):
    """The burst check: its requests arrive together (some streams dropped mid-way); a row the server keeps
    after a dropped stream, or an answer that changes among others, is a mismatch."""
    assert soak.main(["--cases", "3", "--checks", "burst", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "burst compared" in out and "burst dropped" in out and "no mismatch" in out
    real = soak.http_streamed

    def off(client, path, body, chat, keep=None):  # a whole stream answers otherwise than the plain request
        got = real(client, path, body, chat, keep)
        return got if got is None or got[0] != 200 else (200, {k: v + "!" for k, v in got[1].items()}, *got[2:])

    monkeypatch.setattr(soak, "http_streamed", off)
    assert soak.main(["--cases", "2", "--checks", "burst", "--seed", "3"]) == 1
    assert "MISMATCH burst seed 3: a request stream among others differs from alone" in capsys.readouterr().out
    monkeypatch.setattr(soak, "http_streamed", real)
    from latentrt.kv_pool import KVPool

    release = KVPool.release

    def loses_row_0(self, row, clean_from=0):  # row 0 given back, then never free again (the others serve on)
        release(self, row, clean_from)
        if row == 0:
            self.free_rows.remove(0)

    monkeypatch.setattr(KVPool, "release", loses_row_0)
    assert soak.main(["--cases", "1", "--checks", "burst", "--seed", "2"]) == 1
    assert "MISMATCH burst seed 2: idle, the engine has not given back pool rows [0] and slot rows []" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seconds", "-1"], "--seconds must be > 0, got -1.0"),
        (["--cases", "0"], "--cases must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be >= 0 and leave room for the cases' seeds"),
        (["--model", "nosuch:x"], "checkpoint folder 'nosuch:x' does not exist"),
    ],
)
def test_bad_flags_are_errors_not_an_empty_soak(flags, message, capsys):
    """A soak of no case said "no mismatch"; a negative seed made every case a mismatch; a bad model was a
    traceback: each is now an error naming the flag (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        soak.main(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err
