"""tools/soak.py: the differential soak runs each check on both families and reports a mismatch it is shown."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

import latentrt
from tools import soak


@pytest.mark.parametrize("model", ["builtin:recurrent", "builtin:coconut"])
def test_every_check_runs_and_agrees(model, capsys):
    filters = list(warnings.filters)
    assert soak.main(["--model", model, "--cases", "10", "--seed", "3"]) == 0  # every check, once or twice
    assert warnings.filters == filters  # the soak silences the options' warnings while it runs, not after
    out = capsys.readouterr().out
    assert "no mismatch" in out
    for check in ("batch", "stream", "serve", "offline", "hooks", "score", "http", "burst"):
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
    # seed 7's batch samples: each row equals its prompt alone with seed 7 + i, and with the rows' seeds swapped
    # not (the soak seeds each row's run alone so)
    assert soak.main(["--cases", "1", "--checks", "batch", "--seed", "7"]) == 0
    assert "batch compared" in capsys.readouterr().out
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


def test_any_difference_in_an_outcome_is_a_mismatch():
    """compare: the steps, the text or the finish reason alone differing is a mismatch (not the tokens only); at
    fixed depth steps apart are no exit tie."""
    logged = []
    check = soak.Soak(latentrt.load("builtin:recurrent"), "torch", log=logged.append)
    want = ([5, 6], [4, 4], "a b", "length")
    check.compare("batch", 1, want, want, {})
    assert not check.mismatches
    check.compare("batch", 2, ([5, 6], [4, 5], "a b", "length"), want, {"num_steps": 4})
    check.compare("batch", 3, ([5, 6], [4, 4], "a c", "length"), want, {})
    check.compare("batch", 4, ([5, 6], [4, 4], "a b", "stop"), want, {})
    assert check.mismatches == [
        "batch seed 2: position 1 (0: the prompt) differs",
        "batch seed 3: the lengths, texts or finish reasons differ",
        "batch seed 4: the lengths, texts or finish reasons differ",
    ]
    assert check.counts["batch compared"] == 4 and len(logged) == 3


def test_streamed_text_other_than_the_results_is_a_mismatch(monkeypatch, capsys):
    """The batch check streams the batch too: its events' text pieces joined must be each sequence's text."""
    import dataclasses

    real = latentrt.generate

    class Garbled:  # the stream's events with a character added to each piece (its result untouched)
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            for event in self.stream:
                yield dataclasses.replace(event, text=[None if t is None else t + "~" for t in event.text])

        @property
        def result(self):
            return self.stream.result

    def garbled(model, prompt, **kw):
        out = real(model, prompt, **kw)
        return Garbled(out) if kw.get("stream") else out

    monkeypatch.setattr(soak.latentrt, "generate", garbled)
    assert soak.main(["--cases", "1", "--checks", "batch", "--seed", "7"]) == 1
    assert "MISMATCH stream seed 7: its events' text" in capsys.readouterr().out


def test_a_served_request_is_judged_against_alone():
    """judge: a finished request's whole outcome, a cancelled one's tokens and steps up to its cancel (so its
    first tokens must be generate()'s), a failed or unfinished one a mismatch, a refused one skipped."""
    from types import SimpleNamespace as NS

    check = soak.Soak(latentrt.load("builtin:recurrent"), "torch", log=lambda line: None)
    alone = NS(tokens=[5, 7, 8], steps=[4, 3, 3], text="a b c", finish_reasons=["length"])

    def served(**request):
        fields = dict(
            error=None, finished=True, finish_reason="length", tokens=[5, 7, 8], steps=[4, 3, 3], text="a b c"
        )
        return soak.Arrival([1, 2], {}, alone, soak.DrawLog(), request=NS(**{**fields, **request}))

    for seed, request in enumerate(
        [
            dict(),  # as alone
            dict(finish_reason="cancelled", tokens=[5, 7], steps=[4, 3]),  # generate()'s first tokens
            dict(finish_reason="cancelled", tokens=[5, 6], steps=[4, 3]),
            dict(finish_reason="cancelled", tokens=[5], steps=[5]),
            dict(finished=False),
            dict(error=ValueError("boom")),
            dict(text="a b d"),
        ]
    ):
        check.judge(served(**request), seed, {}, soak.DrawLog())
    check.judge(soak.Arrival([1], {}, alone, soak.DrawLog()), 9, {}, soak.DrawLog())  # refused: no request
    assert check.mismatches == [
        "serve seed 2: position 1 (0: the prompt) differs",
        "serve seed 3: position 0 (0: the prompt) differs",
        "serve seed 4: a request never finished",
        "serve seed 5: a request failed: boom",
        "serve seed 6: the lengths, texts or finish reasons differ",
    ]
    assert check.counts["serve cancelled"] == 3 and check.counts["serve compared"] == 5


def test_the_engine_refusing_a_request_is_a_mismatch_unless_it_never_fits():
    """_drive: an engine refusing a request generate() runs is a mismatch, but for its capacity ("this server":
    K/V slots, context); and idle, an engine holding a row, a slot row, a request or non-finite K/V is one."""
    from types import SimpleNamespace as NS

    from latentrt.errors import InputError

    class Refusing:  # an engine that refuses every request, with a reason per prompt
        busy = False

        def submit(self, prompt, **kw):
            raise InputError("the prompt needs more K/V slots than this server has" if prompt == [1] else "bogus")

    check = soak.Soak(latentrt.load("builtin:recurrent"), "torch", log=lambda line: None)
    requests = [soak.Arrival([1], {}, None), soak.Arrival([2], {}, None, arrive=3)]
    assert check._drive(Refusing(), requests, 7, {"max_batch": 1})
    assert check.counts["refused by the engine"] == 1
    assert check.mismatches == ["serve seed 7: refused what generate() takes: bogus"]

    def engine(**changes):
        ok = dict(rows=2, free_rows=[0, 1], slot_rows=1, free_slot_rows=[0], held={})
        kv = dict(plain_k=torch.zeros(2), plain_v=torch.zeros(2), core_k=torch.zeros(2), core_v=torch.zeros(2))
        pool = NS(**{**ok, **kv, **{k: v for k, v in changes.items() if k in ok or k in kv}})
        state = dict(resident=[], queue=[])
        return NS(program=NS(pool=pool), **{**state, **{k: v for k, v in changes.items() if k in state}})

    check.mismatches.clear()
    check.check_released("serve", engine(), 1, {})
    assert not check.mismatches
    for changes in [
        dict(free_rows=[1]),
        dict(free_slot_rows=[]),
        dict(held={0: 1}),
        dict(resident=["r"]),
        dict(queue=["q"]),
        dict(core_v=torch.tensor([0.0, float("nan")])),
    ]:
        check.check_released("serve", engine(**changes), 2, {})
    assert [m.split(": ", 1)[1].split(" (")[0] for m in check.mismatches] == [
        "idle, the engine has not given back pool rows [0] and slot rows []",
        "idle, the engine has not given back pool rows [] and slot rows [0]",
        "idle, the engine has not given back pool rows [] and slot rows []",
        "idle, the engine has not given back pool rows [] and slot rows []",
        "idle, the engine has not given back pool rows [] and slot rows []",
        "idle, the K/V pool holds a non-finite value",
    ]


def test_engine_settings_span_the_engines_options():
    rng = random.Random(0)
    drawn = [soak.draw_engine_settings(rng) for _ in range(100)]
    assert {d["async_scheduling"] for d in drawn} == {False, True}
    assert {d["scheduler"] for d in drawn} == set(soak.SCHEDULERS)
    assert {d["max_batch"] for d in drawn} == {1, 2, 3, 5, 8} and {d["kv_slots"] for d in drawn} == {8, 16, 40, 200}
    assert {d["prefill_budget"] for d in drawn} == {1, 4, 16, 2048}


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
def test_the_backend_check_compares_a_backend_with_torch(monkeypatch, capsys):
    assert soak.main(["--backend", "triton", "--checks", "backend", "--cases", "2", "--seed", "1"]) == 0
    assert "on builtin:recurrent (triton): backend compared 2" in capsys.readouterr().out
    real = latentrt.generate

    def torch_otherwise(model, prompt, **kw):  # the torch backend's last token otherwise
        out = real(model, prompt, **kw)
        if model.backend.name == "torch":
            out.tokens[-1] += 1
        return out

    monkeypatch.setattr(soak.latentrt, "generate", torch_otherwise)
    assert soak.main(["--backend", "triton", "--checks", "backend", "--cases", "1", "--seed", "1"]) == 1
    assert "MISMATCH backend seed 1: position" in capsys.readouterr().out


def test_two_answers_agree_when_equal_or_refused_alike():
    answer = (200, {0: "a b"}, {0: "stop"}, {"prompt_tokens": 3})
    assert soak.same_answer(answer, answer)
    assert not soak.same_answer((200, {0: "a b"}, {0: "length"}, answer[3]), answer)
    assert not soak.same_answer((200, {0: "a b"}, {0: "stop"}, {"prompt_tokens": 4}), answer)  # (usage too)
    assert soak.same_answer((400, "bad top_p"), (400, "bad top_p")) and not soak.same_answer((400, "x"), (400, "y"))
    assert not soak.same_answer((500, "boom"), (500, "boom"))  # a server error is never an answer


def test_a_stream_is_joined_and_dropped_after_its_events(monkeypatch):
    """http_streamed joins each choice's pieces, keeps the finish reasons and the usage, and with ``keep`` the
    client goes away after that many events (None returned, the rest unread)."""
    import contextlib

    events = [
        {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "x"}]},
        {"choices": [{"index": 0, "text": " b", "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "text": None, "finish_reason": "length"}]},
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    read = []

    class Response:
        status_code = 200

        def iter_lines(self):
            for line in [": ping", *(f"data: {json.dumps(e)}" for e in events), "data: [DONE]"]:
                read.append(line)
                yield line

    class Client:
        def stream(self, method, path, json):
            assert json["stream"] and json["stream_options"] == {"include_usage": True}
            return contextlib.nullcontext(Response())

    got = soak.http_streamed(Client(), "/v1/completions", {}, False)
    assert got == (200, {0: "a b", 1: "x"}, {0: "stop", 1: "length"}, {"completion_tokens": 3})
    for keep in (0, 1, 2):
        read.clear()
        assert soak.http_streamed(Client(), "/v1/completions", {}, False, keep) is None
        assert len(read) == keep + 2  # (the comment line, the kept events, the one it left at)


def test_a_hook_that_misses_an_iteration_is_a_mismatch(monkeypatch, capsys):
    from latentrt.hooks import HookList

    real = HookList.on_iteration

    def skips_the_first(self, step, state, active):  # the hooks miss every token's first iteration
        return state if step == 0 else real(self, step, state, active)

    monkeypatch.setattr(HookList, "on_iteration", skips_the_first)
    assert soak.main(["--cases", "1", "--checks", "hooks", "--seed", "2"]) == 1
    assert "MISMATCH hooks seed 2: sequence 0's hook saw" in capsys.readouterr().out


def test_a_hook_sees_an_adaptive_prefills_iterations_as_token_0s(capsys):
    """With ``adaptive_prefill`` the prompt runs position by position, each exiting on its own: the hook's
    iterations for token 0 are their sum (the result's ``prefill_steps``), not the result's steps[0]."""
    model = latentrt.load("builtin:recurrent")
    rng = random.Random(27)  # (the hooks check's draws for seed 27: three prompts, an adaptive prefill)
    prompts = [soak.draw_prompt(rng, model) for _ in range(rng.randrange(1, 4))]
    assert len(prompts) == 3 and soak.draw_options(rng, model, seed=27)["adaptive_prefill"]
    assert soak.main(["--cases", "1", "--checks", "hooks", "--seed", "27"]) == 0
    assert "hooks compared 3" in capsys.readouterr().out


def test_a_hook_that_misses_a_thought_is_a_mismatch(monkeypatch, capsys):
    from latentrt.hooks import HookList

    real = HookList.on_thought

    def skips_the_first(self, step, state, active):  # the hooks miss each prompt's first thought
        return state if step == 0 else real(self, step, state, active)

    monkeypatch.setattr(HookList, "on_thought", skips_the_first)
    assert soak.main(["--model", "builtin:coconut", "--cases", "4", "--checks", "hooks", "--seed", "2"]) == 1
    out = capsys.readouterr().out  # (a Coconut model: no iterations; the thoughts it saw fall short)
    assert "MISMATCH hooks seed 2: sequence 0's hook saw [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] iterations and 0 " in out
    assert "; its result counts [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] and 1" in out


def test_speculative_tokens_other_than_sequential_are_a_mismatch(monkeypatch, capsys):
    real = latentrt.generate

    def drafts_go_wrong(model, prompt, **kw):  # speculative decoding's last token otherwise
        out = real(model, prompt, **kw)
        if kw.get("decoding") == "speculative":
            out.tokens[-1] += 1
        return out

    monkeypatch.setattr(soak.latentrt, "generate", drafts_go_wrong)
    assert soak.main(["--cases", "1", "--checks", "speculative", "--seed", "4"]) == 1
    assert "MISMATCH speculative seed 4: position" in capsys.readouterr().out


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
    # a token the alone run's own draw does not give (its ratios' argmax is token 0, not 2)
    odd = soak.drawn_tie(soak.draws_of(served, alone, 1)(0), (1, 2), 1e-4)
    assert odd.endswith("(relative), not as the draws say")
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


def test_offline_results_other_than_alone_or_a_refusal_are_mismatches(monkeypatch, capsys):
    """The offline check compares Engine.generate's results with generate() alone: the outcome, then the fields
    beside it; a refusal that is not the engine's capacity is a mismatch, one that is is left out."""
    from latentrt.serve import offline

    assert soak.main(["--cases", "2", "--checks", "offline", "--seed", "5"]) == 0
    assert "no mismatch" in capsys.readouterr().out
    real_result, real_bytes = offline.result_of, offline.kv_bytes
    monkeypatch.setattr(offline, "kv_bytes", lambda engine, req: real_bytes(engine, req) + 1)
    assert soak.main(["--cases", "1", "--checks", "offline", "--seed", "5"]) == 1
    assert "MISMATCH offline seed 5: kv_bytes differ from generate() alone" in capsys.readouterr().out
    monkeypatch.setattr(offline, "kv_bytes", real_bytes)

    def other_steps(engine, req):
        result = real_result(engine, req)
        result.steps = [s + 1 for s in result.steps]
        return result

    monkeypatch.setattr(offline, "result_of", other_steps)
    assert soak.main(["--cases", "1", "--checks", "offline", "--seed", "5"]) == 1
    assert "MISMATCH offline seed 5: position 0 (0: the prompt)" in capsys.readouterr().out
    monkeypatch.setattr(offline, "result_of", real_result)

    def refusing(self, prompt, options=None, **kw):
        raise latentrt.InputError("no")

    monkeypatch.setattr(soak.Engine, "request", refusing)
    assert soak.main(["--cases", "1", "--checks", "offline", "--seed", "5"]) == 1
    assert "MISMATCH offline seed 5: refused what generate() takes: no" in capsys.readouterr().out

    def full(self, prompt, options=None, **kw):
        raise latentrt.PromptError("more than this server's context")

    monkeypatch.setattr(soak.Engine, "request", full)
    assert soak.main(["--cases", "1", "--checks", "offline", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "refused by the engine" in out and "offline compared" not in out


def test_a_streamed_answer_other_than_the_plain_one_is_a_mismatch(monkeypatch, capsys):
    real = soak.http_streamed

    def off(client, path, body, chat, keep=None):  # the stream's texts end otherwise
        got = real(client, path, body, chat, keep)
        return got if got[0] != 200 else (200, {k: v + "!" for k, v in got[1].items()}, *got[2:])

    monkeypatch.setattr(soak, "http_streamed", off)
    assert soak.main(["--cases", "1", "--checks", "http", "--seed", "1"]) == 1
    assert "MISMATCH http seed 1: the streamed answer differs" in capsys.readouterr().out


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
    monkeypatch.setattr(soak, "http_streamed", lambda client, path, body, chat, keep=None: None)  # no answer
    assert soak.main(["--cases", "1", "--checks", "burst", "--seed", "3"]) == 1
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
        (["--checks", ","], "--checks takes batch,serve"),
        (["--checks", "batch,nosuch"], "--checks takes batch,serve"),
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


def test_an_engine_refusing_its_settings_is_counted_not_run():
    check = soak.Soak(latentrt.load("builtin:recurrent"), "torch", log=lambda _: None)
    assert check.engine({"scheduler": "nope"}) is None and check.counts["engines refused"] == 1
    engine = check.engine({"max_batch": 2})
    assert engine is not None and engine.max_batch == 2 and check.counts["engines refused"] == 1


def test_logprobs_agree_within_the_tolerance_and_a_tie_may_swap_the_best_ids():
    from latentrt.logprobs import TokenLogprob

    want = [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.25), (8, -1.25)])]
    swapped = [TokenLogprob(5, -0.50001, [(5, -0.5), (8, -1.25), (7, -1.25)])]
    assert soak.same_logprobs(swapped, want, 1e-4) and soak.same_logprobs(None, None, 1e-4)
    for other in (
        [TokenLogprob(5, -0.6, want[0].top)],  # the token's log-prob
        [TokenLogprob(6, -0.5, want[0].top)],  # another token
        [TokenLogprob(5, -0.5, want[0].top[:2])],  # fewer best
        [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.3), (8, -1.25)])],  # a best's value
        [],
        None,
    ):
        assert not soak.same_logprobs(other, want, 1e-4), other
