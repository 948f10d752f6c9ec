"""latentrt/logprobs.py through generate()'s ``logprobs=k``: each new token's log-prob and the k best under the
model's distribution (the log-softmax of the logits ``return_logits`` gives: before penalties, constraints and
temperature), one per token kept; Engine.generate's equal generate() alone's; the CLI's; the errors."""

import json

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent

import latentrt
from latentrt.cli import main
from latentrt.serve import Engine


def make(family: str):
    if family == "recurrent":
        return tiny_recurrent(seed=3), dict(num_steps=3, init_scale=0.0)
    return tiny_coconut(seed=3), dict(num_thoughts=1)


def check_against_logits(result, k: int, vocab: int, i: int | None = None) -> None:
    tokens = result.tokens if i is None else result.tokens[i]
    logits = result.logits if i is None else result.logits[i]
    lps = result.logprobs if i is None else result.logprobs[i]
    assert len(lps) == len(tokens) == len(logits)
    for j, (lp, token) in enumerate(zip(lps, tokens)):
        want = torch.log_softmax(logits[j, :vocab].double(), -1)
        assert lp.token == token and lp.logprob == pytest.approx(float(want[token]), abs=1e-5)
        best = want.topk(k)
        assert [t for t, _ in lp.top] == best.indices.tolist(), j
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_tokens_log_prob_and_the_k_best_are_the_models_distributions(family):
    """Penalties, a bias and sampling change the tokens, not the distribution their log-probs are read from;
    in a batch each sequence's, for the tokens it kept (one stops early)."""
    model, det = make(family)
    vocab = model.config.vocab_size
    kw = dict(det, max_new_tokens=8, default_stops=False, return_logits=True, logprobs=3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = latentrt.generate(model, prompts, **kw)
    stop = plain.tokens[0][2]
    out = latentrt.generate(
        model, prompts, **kw, stop=[stop], temperature=0.9, seed=2, repetition_penalty=1.5, logit_bias={stop: 3.0}
    )
    assert len(out.tokens[0]) < 8
    for i in range(2):
        check_against_logits(out, 3, vocab, i)
    one = latentrt.generate(model, prompts[1], **dict(kw, logprobs=0))
    check_against_logits(one, 0, vocab)
    assert all(lp.top == [] for lp in one.logprobs)
    assert latentrt.generate(model, prompts[1], **dict(kw, logprobs=None)).logprobs is None


def test_a_stop_token_left_out_has_no_log_prob():
    """Coconut's ``published_eos``: the eos that ends the answer is not in the output, nor its log-prob (the
    first answer token never ends it: an eos there is kept)."""
    model, det = make("coconut")
    eos = model.tokenizer.token_to_id("<|endoftext|>")
    out = latentrt.generate(
        model, [5, 6, 7], **det, max_new_tokens=12, stop=[eos], published_eos=True, logprobs=1, logit_bias={eos: 9.0}
    )
    assert out.finish_reasons == ["stop"] and out.tokens == [eos]  # (the second eos ended it)
    assert [lp.token for lp in out.logprobs] == [eos]


def test_speculative_decodings_log_probs_are_sequential_decodings():
    model, det = make("recurrent")
    kw = dict(det, max_new_tokens=8, default_stops=False, logprobs=2)
    seq = latentrt.generate(model, [5, 6, 7], **kw)
    spec = latentrt.generate(model, [5, 6, 7], **kw, decoding="speculative")
    assert spec.tokens == seq.tokens
    for a, b in zip(spec.logprobs, seq.logprobs):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_a_stream_gives_each_tokens_log_prob_as_it_comes(family):
    """vLLM streams each token's log-probs with it: each event of a stream carries its tokens' TokenLogprob, the
    very ones the result holds (None for a sequence that ended, and no log-probs without ``logprobs``); the
    stream's result equals the same call not streamed."""
    model, det = make(family)
    kw = dict(det, max_new_tokens=8, default_stops=False, logprobs=2, temperature=0.8, seed=4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    stop = latentrt.generate(model, prompts, **kw).tokens[1][1]
    stream = latentrt.generate(model, prompts, **kw, stop=[stop], stream=True)
    events = list(stream)
    result = stream.result
    assert result.logprobs == latentrt.generate(model, prompts, **kw, stop=[stop]).logprobs
    assert len(result.tokens[1]) < len(result.tokens[0])  # (the second sequence stops first)
    for b in range(2):
        mine = [e.logprobs[b] for e in events if e.tokens[b] is not None]
        assert mine == result.logprobs[b] and [lp.token for lp in mine] == result.tokens[b]
        assert all(e.logprobs[b] is None for e in events if e.tokens[b] is None)
    one = latentrt.generate(model, prompts[0], **kw, stream=True)
    assert [e.logprobs for e in one] == one.result.logprobs
    spec = (
        latentrt.generate(
            model, [5, 6, 7], **dict(kw, temperature=0.0, logprobs=1), decoding="speculative", stream=True
        )
        if family == "recurrent"
        else None
    )
    if spec is not None:  # (a sampler's tokens: their rows are stacked host values)
        assert [e.logprobs for e in spec] == spec.result.logprobs
    plain = latentrt.generate(model, prompts[0], **dict(kw, logprobs=None), stream=True)
    assert all(e.logprobs is None for e in plain)


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_the_engines_log_probs_equal_generate_alones(family):
    model, det = make(family)
    kw = dict(det, max_new_tokens=6, default_stops=False, logprobs=2)
    prompts = [[5, 6, 7, 8], [9, 10], [11]]
    got = Engine(model, max_batch=2).generate(prompts, **kw)
    for p, r in zip(prompts, got):
        alone = latentrt.generate(model, p, **kw)
        assert r.tokens == alone.tokens and len(r.logprobs) == len(alone.logprobs)
        for a, b in zip(r.logprobs, alone.logprobs):
            assert (a.token, a.offset) == (b.token, None) and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("k, message", [(-1, "logprobs must be an integer in \\[0, 20\\]"), (21, "in \\[0, 20\\]")])
def test_bad_logprobs_are_clear_errors(k, message):
    model, det = make("recurrent")
    with pytest.raises(latentrt.InputError, match=message):
        latentrt.generate(model, [5, 6], max_new_tokens=2, logprobs=k)
    for bad in (True, 2.0):
        with pytest.raises(latentrt.InputError, match="logprobs must be an integer"):
            latentrt.generate(model, [5, 6], max_new_tokens=2, logprobs=bad)
    engine = Engine(model)
    with pytest.raises(latentrt.InputError, match="top_logprobs=2 and logprobs=3 disagree"):
        engine.submit([5, 6], latentrt.GenerateOptions(logprobs=3), top_logprobs=2)
    from latentrt.serve import server_defaults

    with pytest.raises(latentrt.InputError, match=r"\['logprobs'\] cannot be server defaults"):
        server_defaults(model, {"logprobs": 2})


def test_the_cli_reports_them(recurrent_dir, capsys):
    model = latentrt.load(recurrent_dir, device="cpu")
    want = latentrt.generate(model, "every cat is", max_new_tokens=4, logprobs=2, init_scale=0.0)
    argv = ["generate", str(recurrent_dir), "every cat is", "--max-new-tokens", "4", "--logprobs", "2"]
    argv += ["--init-scale", "0"]
    assert main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)["logprobs"]
    assert [(g["token"], g["logprob"], [tuple(t) for t in g["top"]]) for g in got] == [
        (w.token, w.logprob, w.top) for w in want.logprobs
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"log-prob per token: {[round(w.logprob, 3) for w in want.logprobs]}" in out
    assert main(["generate", str(recurrent_dir), "x", "--logprobs", "30"]) == 2
    assert "error: --logprobs must be an integer in [0, 20], got 30" in capsys.readouterr().err


def test_a_served_request_whose_state_overflows_fails_as_non_finite_with_log_probs():
    """Sampling from non-finite logits may draw a padding column of the head (past the vocabulary): its
    log-prob row read past the vocabulary's logits and failed the whole scheduler step with an IndexError (the
    server's 500 "index 112 is out of bounds", found by tools.fuzz); the request now fails alone as generate()
    does, with the non-finite state's error, and the other request finishes."""
    from latentrt.errors import NonFiniteStateError
    from latentrt.options import GenerateOptions

    model = latentrt.load("builtin:recurrent")  # (its head is wider than its vocabulary: 128 columns, 68 ids)
    assert model.lm_head.weight.shape[0] > model.config.vocab_size
    kw = dict(max_new_tokens=4, seed=360, temperature=1.3, top_k=5, top_p=0.9, num_steps=12, kv_sharing="ring-2")
    prompt = "grimpus Bob ### dumpus yumpus Polly lorpus Oliver . rompus"
    engine = Engine(model, max_batch=2)
    bad = engine.submit(prompt, GenerateOptions(**kw, init_scale=1e300), top_logprobs=0)
    good = engine.submit(prompt, GenerateOptions(**kw), top_logprobs=0)
    engine.run_until_idle()
    assert isinstance(bad.error, NonFiniteStateError) and good.error is None
    assert good.tokens == latentrt.generate(model, prompt, **kw).tokens
    with pytest.raises(NonFiniteStateError):
        latentrt.generate(model, prompt, **kw, init_scale=1e300, logprobs=0)
