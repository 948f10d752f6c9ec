"""latentrt/choices.py: ``guided_choice`` (vLLM's): the text is one of the choices, then a stop token; each token
the argmax of what the choices' trie leaves (written out here per token from the choices' encodings), through
generate(), its batch rule and the serving engine; and the errors."""

import pytest
from conftest import tiny_coconut, tiny_recurrent

import latentrt
from latentrt.options import GenerateOptions
from latentrt.serve import Engine


def make(family: str, seed: int = 3):
    """A tiny model of ``family`` and the options its runs take: deterministic recurrence, and the end-of-text
    token (id 0) as a stop (the tiny configs name no eos)."""
    if family == "recurrent":
        return tiny_recurrent(seed=seed), dict(num_steps=3, init_scale=0.0, stop=[0])
    return tiny_coconut(seed=seed), dict(num_thoughts=1, stop=[0])


CHOICES = ["Tom is a cat", "Tom is a dog", "Ann", "Ann is not a bird"]  # ("Ann" begins another choice)


def encode(model, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def allowed_after(model, choices: list[str], generated: list[int], stops: list[int]) -> set[int]:
    """The rule token by token: a token continuing a choice the tokens so far began; a stop token where they are
    a whole choice."""
    out = set()
    for c in map(lambda c: encode(model, c), choices):
        if c[: len(generated)] == generated:
            out |= {c[len(generated)]} if len(c) > len(generated) else set(stops)
    return out


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_greedy_token_is_the_argmax_of_what_the_choices_leave_and_the_text_is_one(family):
    model, det = make(family)
    eos = det["stop"][0]
    vocab = model.config.vocab_size
    kw = dict(det, max_new_tokens=12, return_logits=True)
    prompts = ["every cat is", "Ann is a", "the dog of Tom is", "no"]
    out = latentrt.generate(model, prompts, **kw, guided_choice=CHOICES)
    assert all(t in CHOICES for t in out.text) and out.finish_reasons == ["stop"] * 4
    for b in range(4):
        tokens = out.tokens[b]
        assert tokens[-1] == eos and tokens[:-1] == encode(model, out.text[b])
        for i, token in enumerate(tokens):
            x = out.logits[b][i, :vocab].clone()
            keep = allowed_after(model, CHOICES, tokens[:i], [eos])
            x[[t for t in range(vocab) if t not in keep]] = float("-inf")
            assert int(x.argmax()) == token, (b, i)


def test_sampled_choices_are_choices_and_a_batch_equals_each_alone():
    model, det = make("recurrent", seed=5)
    kw = dict(det, max_new_tokens=12, temperature=1.5, seed=7, guided_choice=CHOICES)
    prompts = ["every cat is", "Ann is a", "the dog of Tom is"] * 3
    out = latentrt.generate(model, prompts, **kw)
    assert all(t in CHOICES for t in out.text)
    assert len(set(out.text)) > 1  # (sampled: not one choice every time)
    for i, p in enumerate(prompts):
        assert latentrt.generate(model, p, **dict(kw, seed=7 + i)).tokens == out.tokens[i]


def test_choices_compose_with_the_other_constraints_and_max_new_tokens_cuts_one():
    model, det = make("recurrent")
    kw = dict(det, max_new_tokens=12, guided_choice=["Tom is a cat", "Ann"])
    first = latentrt.generate(model, "every cat is", **kw).text
    other = ({"Tom is a cat", "Ann"} - {first}).pop()
    banned = first.split()[0]  # the first word of the greedy choice, banned: the other choice
    assert latentrt.generate(model, "every cat is", **kw, bad_words=[banned]).text == other
    cut = latentrt.generate(model, "every cat is", **dict(kw, max_new_tokens=2, guided_choice=["Tom is a cat"]))
    assert cut.text == "Tom is" and cut.finish_reasons == ["length"]  # (vLLM's: the length ends it)


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_the_serving_engine_equals_generate_alone(family):
    model, det = make(family)
    engine = Engine(model, max_batch=2)
    cases = [
        ("every cat is", dict(guided_choice=CHOICES)),
        ("Ann is a", dict(guided_choice=CHOICES[2:], temperature=0.9, seed=4)),
        ("no", dict(guided_choice=["Tom", "Tom is"], bad_words=["is"])),
        ("the dog", dict()),
    ]
    reqs = [engine.submit(p, GenerateOptions(**det, max_new_tokens=10, **c)) for p, c in cases]
    engine.run_until_idle()
    for req, (p, c) in zip(reqs, cases):
        alone = latentrt.generate(model, p, **det, max_new_tokens=10, **c)
        assert (req.tokens, req.steps, req.finish_reason) == (alone.tokens, alone.steps, alone.finish_reasons[0])
    assert reqs[2].text == "Tom"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guided_choice="cat"), "guided_choice must be a non-empty list of strings"),
        (dict(guided_choice=[]), "guided_choice must be a non-empty list of strings"),
        (dict(guided_choice=["cat", ""]), r"guided_choice\[1\] must be a non-empty string"),
        (dict(guided_choice=["cat", 3]), r"guided_choice\[1\] must be a non-empty string, got 3"),
        (dict(guided_choice=["cat jabberwock"]), r"guided_choice\[0\] 'cat jabberwock': \['jabberwock'\] not in"),
        (dict(guided_choice=["cat"]), r"a stop token and there is none \(the model names no end-of-text token\)"),
        (dict(guided_choice=["cat"], default_stops=False), r"a stop token and there is none \(default_stops=False\)"),
        (dict(guided_choice=["cat"], decoding="speculative"), "guided_choice applies with decoding='sequential'"),
    ],
)
def test_bad_choices_are_clear_errors(kwargs, message):
    model, _ = make("recurrent")
    with pytest.raises(latentrt.InputError, match=message):
        latentrt.generate(model, "every cat", max_new_tokens=4, **kwargs)


def test_choices_need_a_tokenizer():
    model, _ = make("recurrent")
    model.tokenizer = None
    with pytest.raises(latentrt.InputError, match="guided_choice needs a tokenizer"):
        latentrt.generate(model, [5, 6], max_new_tokens=2, guided_choice=["x"])
